"""The one interface every modality implements.

A modality supplies the parts of data2vec that differ between speech, vision and text: how a raw
shard sample becomes an example (decode, augment, mask: runs in DataLoader workers), the local
encoder that turns inputs into tokens (with the learned mask embedding), the student head, and
the numbers the trainer reports (tokens and FLOPs per sample). Everything else (encoder, targets,
loss, EMA, distribution) is shared. Adding a modality = a new file + one registry entry.
"""

from __future__ import annotations

import abc
import random
from typing import Any, ClassVar

import torch
import torch.nn as nn
from megatron.core.model_parallel_config import ModelParallelConfig

from pipeline.config import EncoderConfig
from pipeline.model.decoder import ConvDecoder, DecoderConfig


class Modality(abc.ABC):
    name: ClassVar[str]
    Config: ClassVar[type]  # the modality's own dataclass (the ``model:`` section of a preset)
    data_kind: ClassVar[str]  # the data_prep manifest's "modality" this modality trains on
    prefix_tokens: ClassVar[int] = 0  # tokens prepended by the embedder (e.g. CLS), excluded from targets
    # example keys whose shape every example of a data stream shares (collate stacks them): a sample whose
    # shapes differ is skipped as bad instead of crashing collate
    fixed_shape_keys: ClassVar[tuple[str, ...]] = ()
    decay_exempt: ClassVar[str] = "none"  # train.decay_exempt=reference means this (the released recipe's rule)
    teacher_precision: ClassVar[str] = "autocast"  # train.teacher_precision=reference: fairseq's fp16 teacher
    # teacher parameters of a local encoder the teacher can share with the student when they are copied, not
    # averaged (the embedder's ``features(batch)`` gives its output; ``batch["features"]`` takes it back)
    shared_prefixes: ClassVar[tuple[str, ...]] = ()
    decoder_dims: ClassVar[int] = 1  # data2vec 2.0's decoder convolves over time (1) or the patch grid (2)

    def __init__(self, cfg: Any, visible_only: bool = False):
        self.cfg = cfg
        # the method's student encodes only the visible positions (data2vec 2.0): examples mark the positions it
        # leaves out (same count in every row) instead of corrupting the input for a mask embedding
        self.visible_only = visible_only

    @property
    def clones(self) -> int:
        """Masked clones of each sample that share one teacher pass (``model.clone_batch``)."""
        return getattr(self.cfg, "clone_batch", 1)

    # -- data side (DataLoader workers) -------------------------------------------------------
    @abc.abstractmethod
    def example(self, sample: dict[str, Any], rng: random.Random) -> dict[str, torch.Tensor] | None:
        """Raw shard sample (bytes per key) -> tensors (None: skip this sample, e.g. too short).
        ``rng`` is seeded per sample, so decoding is reproducible for exact resume."""

    def collate(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Examples -> a batch holding the model inputs and a bool ``mask`` (B x M, T), True = masked: the M
        clones of sample b are rows b*M .. b*M+M-1 (an example's (M, T) masks are stacked row by row)."""
        batch = {key: torch.stack([ex[key] for ex in examples]) for key in examples[0]}
        for key in CLONED_KEYS:
            if key in batch and batch[key].dim() == 3:  # (B, M, T) -> (B x M, T)
                batch[key] = batch[key].flatten(0, 1)
        return batch

    def eval_inputs(self, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Raw shard sample -> one example's model inputs (batch of 1), decoded with no augmentation, no crop
        and no mask: what feature extraction feeds the backbone, and what HF's preprocessor reproduces."""
        raise NotImplementedError(f"the {self.name} modality has no evaluation transform")

    def on_host(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The trainer's CPU batch, just before it goes to the device: add what the model would otherwise have to
        read back from the device (nothing for most modalities)."""
        return batch

    def valid_positions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(B, T) True where a position holds input rather than padding (None: every position does)."""
        return None

    def check_manifest(self, manifest: dict) -> str | None:
        """What is wrong with training this model on a data_prep manifest's shards (None: nothing)."""
        kind = manifest.get("modality")
        if kind != self.data_kind:
            return f"holds {kind!r} shards but modality={self.name} trains on {self.data_kind!r} shards"
        return None

    # -- model side ---------------------------------------------------------------------------
    @abc.abstractmethod
    def build_embedder(self, enc: EncoderConfig, mp: ModelParallelConfig) -> nn.Module:
        """Module: ``forward(batch, mask=None, visible=None) -> (tokens (R, prefix+T', D), attn_bias or None)``.
        Teacher: neither given, R = B, all T positions. v1 student: masked positions (mask (B, T) True) replaced
        by the learned mask embedding. data2vec 2.0 student: ``visible`` (B x M, K) holds the positions each
        clone keeps (``mask`` its complement): R = B x M rows of those K positions only (``visible_rows``)."""

    def build_decoder(self, enc: EncoderConfig, dec: DecoderConfig) -> nn.Module:
        """data2vec 2.0's decoder over (R, T, D) sequences (1-D convolutions over time by default)."""
        return ConvDecoder(dec, enc.dim)

    def build_head(self, enc: EncoderConfig, mp: ModelParallelConfig) -> nn.Module:
        """Student regression head (v1 audio/vision: Linear(D, D))."""
        return nn.Linear(enc.dim, enc.dim)

    # -- accounting ---------------------------------------------------------------------------
    @abc.abstractmethod
    def masked_share(self) -> float:
        """Nominal share of a sample's positions that carry loss (the planner's and the FLOP counts' figure)."""

    @abc.abstractmethod
    def tokens_per_sample(self) -> int:
        """Nominal positions the encoder sees per sample (excluding prefix tokens)."""

    @abc.abstractmethod
    def sample_bytes(self) -> int:
        """Largest size of one collated sample, mask included: what a DataLoader worker passes per sample."""

    def embed_flops_per_sample(self, enc: EncoderConfig, tokens: int | None = None) -> float:
        """Forward FLOPs of the local encoder per sample giving ``tokens`` positions (default: nominal)."""
        return 0.0

    def shared_flops_per_sample(self, enc: EncoderConfig, tokens: int | None = None) -> float:
        """The part of ``embed_flops_per_sample`` that ``shared_prefixes`` compute (saved when shared)."""
        return 0.0

    def clone_flops_per_sample(self, enc: EncoderConfig, tokens: int | None = None) -> float:
        """The part of ``embed_flops_per_sample`` a data2vec 2.0 student computes once per clone rather than once
        per sample (speech: the positional convolutions over each clone's masked sequence)."""
        return 0.0


CLONED_KEYS = ("mask", "student_tokens")  # example keys holding one row per masked clone


def visible_rows(x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) per-sample values -> (B x M, K, ...): row r (clone r % M of sample r // M) keeps the positions
    ``visible[r]`` (B x M, K). Indices are formed on the device from ``visible``: nothing waits for it."""
    rows, kept = visible.shape
    # the first flat row of row r's sample
    owner = torch.arange(rows, device=visible.device) // (rows // x.shape[0]) * x.shape[1]
    flat = (visible + owner[:, None]).flatten()
    return x.flatten(0, 1).index_select(0, flat).view(rows, kept, *x.shape[2:])
