"""data2vec 2.0's light convolutional decoder: it fills the masked slots and predicts the targets there.

The student encodes only the visible positions. The decoder puts them back at their places in the full
sequence, fills every masked slot with noise N(0, mask_noise_std^2), and runs a few grouped convolutions over
time (1-D: speech, text) or over the patch grid (2-D: images), each followed by LayerNorm without affine and
GELU, with a residual where the widths agree; a linear projection maps back to the model width D. It belongs
to the student alone: the EMA teacher has no decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import doc, one_of, require
from pipeline.model.transformer import InitLinear, weight_init


@dataclass
class DecoderConfig:
    """The data2vec 2.0 decoder (method: data2vec2 only)."""

    dim: int = doc("channels of the decoder's convolutions", 384)
    layers: int = doc("convolution blocks (conv -> LayerNorm without affine -> GELU)", 4)
    kernel: int = doc("convolution kernel size (per side of the grid for images)", 7)
    groups: int = doc("convolution groups (must divide encoder.dim and decoder.dim)", 16)
    residual: bool = doc("add each block's input to its output where the widths agree", True)
    input_dropout: float = doc("dropout on the encoder output before it enters the decoder", 0.1)
    projection_layers: int = doc("linear layers mapping decoder.dim back to encoder.dim (GELU between)", 1)
    projection_ratio: float = doc("with projection_layers > 1: the first hidden width is decoder.dim x this", 2.0)
    mask_noise_std: float = doc("std of the noise that fills the masked slots", 0.01)
    init: str = doc("the projection's Linear weights: 'torch' (PyTorch's default, as fairseq's image and audio decoders "
                    "reset them) or 'bert' (normal(0.02), bias 0: fairseq's text decoder keeps init_bert_params)",
                    "torch")

    def __post_init__(self):
        require(self.dim > 0 and self.layers >= 1 and self.kernel >= 1 and self.groups >= 1,
                "decoder.dim, decoder.kernel and decoder.groups must be positive and decoder.layers >= 1")
        require(self.dim % self.groups == 0, f"decoder.dim={self.dim} must be divisible by decoder.groups={self.groups}")
        require(0.0 <= self.input_dropout < 1.0, f"decoder.input_dropout={self.input_dropout} must be in [0, 1)")
        require(self.projection_layers >= 1 and self.projection_ratio > 0,
                "decoder.projection_layers must be >= 1 and decoder.projection_ratio > 0")
        require(self.mask_noise_std >= 0, "decoder.mask_noise_std must be >= 0")
        one_of("decoder.init", self.init, ("torch", "bert"))


def projection_widths(cfg: DecoderConfig, dim: int) -> list[int]:
    """Widths along the decoder's output projection, decoder.dim first and D last."""
    return [cfg.dim] + [int(cfg.dim * cfg.projection_ratio)] * (cfg.projection_layers - 1) + [dim]


class ConvBlock(nn.Module):
    """Grouped Conv (same length) -> LayerNorm over channels, no affine -> GELU, on (B, C, *spatial)."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, groups: int, dims: int):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.conv = conv(in_dim, out_dim, kernel, padding=kernel // 2, groups=groups)
        self.trim = 1 - kernel % 2  # an even kernel gives one extra step per axis (fairseq SamePad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.trim:
            y = y[..., :-1, :-1] if y.dim() == 4 else y[..., :-1]
        y = F.layer_norm(y.movedim(1, -1), y.shape[1:2]).movedim(-1, 1)
        return F.gelu(y)


class ConvDecoder(nn.Module):
    """(R, T, D) full sequences (visible encoder outputs at their places, noise elsewhere) -> (R, T, D).
    ``grid``: side of the square patch grid for a 2-D decoder (T = grid^2), None for 1-D."""

    def __init__(self, cfg: DecoderConfig, dim: int, grid: int | None = None):
        super().__init__()
        require(dim % cfg.groups == 0, f"encoder.dim={dim} must be divisible by decoder.groups={cfg.groups}")
        self.grid, self.residual = grid, cfg.residual
        dims = 1 if grid is None else 2
        self.blocks = nn.ModuleList(ConvBlock(dim if i == 0 else cfg.dim, cfg.dim, cfg.kernel, cfg.groups, dims)
                                    for i in range(cfg.layers))
        widths = projection_widths(cfg, dim)
        layers = []
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            layers += [nn.GELU()] if i else []
            layers.append(InitLinear(a, b, init=weight_init("bert")) if cfg.init == "bert" else nn.Linear(a, b))
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, length, width = x.shape
        y = x.transpose(1, 2)  # (R, D, T)
        if self.grid is not None:
            y = y.reshape(rows, width, self.grid, self.grid)
        for block in self.blocks:
            out = block(y)
            y = out + y if self.residual and out.shape == y.shape else out
        return self.proj(y.flatten(2).transpose(1, 2))  # (R, T, D)


def decoder_flops_per_row(cfg: DecoderConfig, dim: int, length: int, dims: int) -> float:
    """Forward FLOPs of the decoder for one row of ``length`` positions (``dims``: 1 or 2-D convolutions)."""
    taps = cfg.kernel ** dims
    convs = sum((dim if i == 0 else cfg.dim) // cfg.groups * cfg.dim * taps for i in range(cfg.layers))
    widths = projection_widths(cfg, dim)
    return 2.0 * length * (convs + sum(a * b for a, b in zip(widths, widths[1:])))


def fill_masked(visible: torch.Tensor, positions: torch.Tensor, length: int, noise_std: float) -> torch.Tensor:
    """Decoder input: (R, K, D) visible encoder outputs at ``positions`` (R, K) of (R, length, D) rows whose
    other slots hold noise N(0, noise_std^2)."""
    rows, _, width = visible.shape
    full = visible.new_empty(rows, length, width).normal_(0.0, noise_std)
    return full.scatter(1, positions.unsqueeze(-1).expand(-1, -1, width), visible)
