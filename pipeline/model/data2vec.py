"""Student and teacher networks. Both are plain ``nn.Module``s; sharding is applied from outside."""

from __future__ import annotations

import torch
import torch.nn as nn
from megatron.core.model_parallel_config import ModelParallelConfig

from pipeline.config import EncoderConfig
from pipeline.modalities.base import Modality
from pipeline.model.transformer import Encoder


class Backbone(nn.Module):
    """Local encoder (modality) + transformer encoder. The teacher is exactly this."""

    def __init__(self, modality: Modality, enc: EncoderConfig, mp: ModelParallelConfig):
        super().__init__()
        self.prefix = modality.prefix_tokens
        self.embed = modality.build_embedder(enc, mp)
        self.encoder = Encoder(enc, mp)

    def encode(self, batch: dict[str, torch.Tensor], mask: torch.Tensor | None, keep: int | None = None,
               skip: tuple[int, ...] = ()):
        """-> (final (B, T, D), taps: list of (B, T, D), the top ``keep`` blocks' or all), prefix tokens
        (CLS) removed. ``skip``: blocks left out (layerdrop)."""
        x, attn_bias = self.embed(batch, mask)
        final, taps = self.encoder(x, attn_bias, keep, skip)
        p = self.prefix
        return final[:, p:], [t[:, p:] for t in taps]

    def forward(self, batch: dict[str, torch.Tensor], keep: int | None = None) -> list[torch.Tensor]:
        """Teacher mode: the unmasked input's per-block taps (only the top ``keep`` when given)."""
        return self.encode(batch, None, keep)[1]


class Student(nn.Module):
    def __init__(self, modality: Modality, enc: EncoderConfig, mp: ModelParallelConfig):
        super().__init__()
        self.backbone = Backbone(modality, enc, mp)
        self.head = modality.build_head(enc, mp)

    def forward(self, batch: dict[str, torch.Tensor], mask: torch.Tensor, skip: tuple[int, ...] = (),
                index: torch.Tensor | None = None) -> torch.Tensor:
        """Predictions at the masked positions, (M, D) in row-major (batch, time) order, with the blocks
        in ``skip`` left out (layerdrop). ``index``: those positions as flat indices into (B * T), made on the host
        so that selecting them does not wait for the device (default: from ``mask``)."""
        final, _ = self.backbone.encode(batch, mask, keep=0, skip=skip)
        if index is None:
            return self.head(final[mask])
        return self.head(final.flatten(0, 1).index_select(0, index))


def teacher_parameter_name(student_name: str) -> str | None:
    """Teacher parameter matching a student parameter (the teacher has no head)."""
    prefix = "backbone."
    return student_name[len(prefix):] if student_name.startswith(prefix) else None
