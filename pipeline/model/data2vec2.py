"""The data2vec 2.0 student: the backbone on the visible positions of M masked clones, then the conv decoder."""

from __future__ import annotations

import torch
import torch.nn as nn
from megatron.core.model_parallel_config import ModelParallelConfig

from pipeline.config import EncoderConfig
from pipeline.methods.base import Predictions
from pipeline.model.data2vec import Backbone
from pipeline.model.decoder import DecoderConfig, fill_masked


class Student2(nn.Module):
    def __init__(self, modality, enc: EncoderConfig, dec: DecoderConfig, mp: ModelParallelConfig):
        super().__init__()
        self.backbone = Backbone(modality, enc, mp)
        self.decoder = modality.build_decoder(enc, dec)  # the student's alone: the teacher has none
        self.input_dropout = nn.Dropout(dec.input_dropout)
        self.noise_std = dec.mask_noise_std

    def forward(self, batch: dict[str, torch.Tensor], mask: torch.Tensor, skip: tuple[int, ...] = (),
                index: torch.Tensor | None = None) -> Predictions:
        """``mask`` (R, T) True where row r (clone r % M of sample r // M) leaves a position out; ``batch["visible"]``
        (R, K) the positions it keeps. -> predictions at ``index`` (flat into (R x T); default: every masked
        position) and the CLS output of each row (None without a CLS token)."""
        visible = batch["visible"]
        x, attn_bias = self.backbone.embed(batch, mask, visible)  # (R, prefix + K, D)
        final, _ = self.backbone.encoder(x, attn_bias, 0, skip)
        prefix = self.backbone.prefix
        full = fill_masked(self.input_dropout(final[:, prefix:]), visible, mask.shape[1], self.noise_std)
        decoded = self.decoder(full).flatten(0, 1)  # (R x T, D)
        index = mask.flatten().nonzero().squeeze(1) if index is None else index
        return Predictions(decoded.index_select(0, index), final[:, 0] if prefix else None)
