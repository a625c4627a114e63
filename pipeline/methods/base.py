"""The one interface every pretraining method implements, beside the modality interface.

A method decides what the student sees and how it predicts: data2vec (v1) corrupts the input with a mask
embedding and regresses the targets with a head; data2vec 2.0 encodes only the visible positions of M masked
clones per sample and predicts with a convolutional decoder. Targets (the EMA teacher's top-K layers), the loss,
the EMA, sharding and checkpoints are shared; the trainer calls this interface and never asks which method runs.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn as nn


class Predictions(NamedTuple):
    masked: torch.Tensor  # (N, D) at the scored positions, in the order of the batch's ``masked_index``
    cls: torch.Tensor | None = None  # (R, D) the CLS output of every row, for objective.cls_loss (None: no CLS loss)


class Method(abc.ABC):
    name: ClassVar[str]
    visible_only: ClassVar[bool] = False  # the student encodes only visible positions (tells the modality's examples)

    def __init__(self, cfg: Any, modality):
        self.cfg, self.modality = cfg, modality  # the ExperimentConfig, the Modality

    @staticmethod
    def problems(cfg: Any) -> list[str]:
        """What in an experiment config this method cannot run (checked before any process group starts)."""
        return []

    @abc.abstractmethod
    def build_student(self, mp) -> nn.Module:
        """The student network: ``forward(batch, mask, skip, index) -> Predictions``; its ``backbone`` is what the
        teacher (``Backbone``) mirrors."""

    def predict(self, student, batch: dict, mask: torch.Tensor, skip: tuple[int, ...],
                index: torch.Tensor) -> Predictions:
        """The student (module or engine) on a device batch -> Predictions at ``index``."""
        return student(batch, mask, skip, index)

    @abc.abstractmethod
    def on_host(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The CPU batch before it goes to the device: add ``masked_index`` (flat indices of the scored positions
        into the student's (R x T) rows) and ``target_index`` (the same positions in the teacher's (B x T) rows)."""

    @abc.abstractmethod
    def flops_per_sample(self, tokens: int, share_features: bool) -> dict[str, float]:
        """Model FLOPs of one sample of ``tokens`` positions in a training step (forward + backward):
        {'teacher', 'student', 'decoder'}."""

    def student_shape(self, tokens: int) -> tuple[int, int]:
        """(rows per sample, positions per row) the student's blocks run on for samples of ``tokens`` positions."""
        return 1, tokens + self.modality.prefix_tokens

    @abc.abstractmethod
    def predictor_activation_bytes(self, samples: int, tokens: int, a: int) -> float:
        """Stored activations (bytes, ``a`` per element) of what turns the encoder output into predictions, for
        ``samples`` samples of ``tokens`` positions (the planner's)."""

    def decay_exempt(self) -> str:
        """train.decay_exempt=reference resolved: the parameters the released recipe spares from weight decay."""
        return self.modality.decay_exempt

    def teacher_precision(self) -> str:
        """train.teacher_precision=reference resolved."""
        return self.modality.teacher_precision


def flat_index(mask: torch.Tensor) -> torch.Tensor:
    """Row-major flat indices of a bool (R, T) mask's True entries."""
    return mask.flatten().nonzero().squeeze(1)
