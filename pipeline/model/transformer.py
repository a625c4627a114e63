"""Transformer encoder on megatron-core parallel linears.

Attention heads and the FFN hidden layer are split across tensor-parallel ranks by
``ColumnParallelLinear`` -> ``RowParallelLinear`` pairs; layer norms are replicated. With
``tp = 1`` the layers are plain dense layers. Blocks return the features the data2vec teacher
taps, so the objective never reaches into the block.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch.utils.checkpoint import checkpoint

from pipeline.config import EncoderConfig


def weight_init(rule: str, std: float = 0.02, pad_row: int | None = None) -> Callable[[torch.Tensor], None]:
    """The weight init of ``encoder.init``: 'beit' draws trunc_normal(std) cut at +-1 std (BEiT's own
    trunc_normal_, a=-std, b=std); 'bert' draws normal(std) (fairseq init_bert_params), with an embedding's
    ``pad_row`` zeroed."""
    def init(weight: torch.Tensor) -> None:
        if rule == "bert":
            nn.init.normal_(weight, std=std)
            if pad_row is not None:
                with torch.no_grad():
                    weight[pad_row].zero_()
        else:
            nn.init.trunc_normal_(weight, std=std, a=-std, b=std)
    return init


class OwnInit:
    """Mixin for a torch layer: its weight is drawn by ``init`` (see ``weight_init``) and its bias zeroed, in
    its own ``reset_parameters``, which the layer's constructor calls.

    Every module initialises its own parameters inside its own ``__init__``: under ``deepspeed.zero.Init``
    a module's parameters are partitioned when its ``__init__`` returns, so an init a parent applies
    afterwards is silently lost.
    """

    def __init__(self, *args, init: Callable[[torch.Tensor], None], **kwargs):
        self.init = init
        super().__init__(*args, **kwargs)

    def reset_parameters(self) -> None:
        self.init(self.weight)
        if getattr(self, "bias", None) is not None:
            nn.init.zeros_(self.bias)


class InitEmbedding(OwnInit, nn.Embedding):
    pass


class InitLinear(OwnInit, nn.Linear):
    """BEiT's and fairseq's heads (``_init_weights``, ``init_bert_params``)."""


class InitConv2d(OwnInit, nn.Conv2d):
    """BEiT's patch embedding (``_init_weights`` covers Conv2d)."""


class InitConv1d(OwnInit, nn.Conv1d):
    """wav2vec 2.0's conv feature encoder (``ConvFeatureExtractionModel``: kaiming_normal_)."""


class DenseAtTP1:
    """Mixin for megatron's parallel linears: with one tensor-parallel rank there is nothing to split or reduce, so
    the layer is ``F.linear`` (one fused matmul + bias, as torch's nn.Linear); megatron's autograd function, which
    adds the bias in a separate pass, runs only where it communicates (TP > 1: the input gradient's all-reduce,
    overlapped with the weight gradient's matmul on a GPU). Same parameters, same (output, None) result."""

    def forward(self, x: torch.Tensor):
        if self.config.tensor_model_parallel_size == 1:
            return F.linear(x, self.weight, self.bias), None
        return super().forward(x)


class ColumnLinear(DenseAtTP1, ColumnParallelLinear):
    pass


class RowLinear(DenseAtTP1, RowParallelLinear):
    pass


def column(in_dim: int, out_dim: int, mp: ModelParallelConfig, init: Callable, bias: bool = True):
    return ColumnLinear(in_dim, out_dim, config=mp, init_method=init, bias=bias, gather_output=False)


def row(in_dim: int, out_dim: int, mp: ModelParallelConfig, init: Callable):
    return RowLinear(in_dim, out_dim, config=mp, init_method=init, bias=True, input_is_parallel=True,
                     skip_bias_add=False)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability p."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty(x.shape[0], *([1] * (x.dim() - 1)), dtype=x.dtype, device=x.device)
        return x * keep.bernoulli_(1 - self.p) / (1 - self.p)


def tensor_parallel_rank() -> int:
    from megatron.core import parallel_state
    return parallel_state.get_tensor_model_parallel_rank()


@contextlib.contextmanager
def own_dropout_stream(tp_rank: int, enabled: bool, device: torch.device):
    """Random numbers of this tensor-parallel rank's own inside the block (megatron's RNG-tracker idea): TP peers
    keep their global RNG in step (their other dropout must agree), so without this the attention dropout of
    head j on every TP rank (different heads of the model) would draw the same mask. One draw from the CPU
    generator (no device read) seeds a stream offset by the TP rank; the global RNG is restored afterwards and so
    advances alike on every peer, and activation checkpointing, which restores it before recomputing, replays
    the same masks."""
    if not enabled:
        yield
        return
    seed = int(torch.randint(2 ** 62, (1,)))
    devices = [device.index or 0] if device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(seed + 1000003 * (tp_rank + 1))
        yield


class Attention(nn.Module):
    """Multi-head self-attention; under tensor parallelism this rank holds heads/tp of the heads. A
    per-head ``attn_bias`` (..., heads/tp, T, T) must hold this rank's heads; (..., 1, T, T) broadcasts."""

    def __init__(self, cfg: EncoderConfig, mp: ModelParallelConfig, out_std: float):
        super().__init__()
        tp = mp.tensor_model_parallel_size
        self.local_heads = cfg.heads // tp
        self.head_dim = cfg.dim // cfg.heads
        self.attn_dropout = cfg.attn_dropout
        self.tp_size, self.tp_rank = tp, tensor_parallel_rank() if tp > 1 else 0
        init = weight_init(cfg.init)
        self.query = column(cfg.dim, cfg.dim, mp, init)
        self.key = column(cfg.dim, cfg.dim, mp, init, bias=cfg.key_bias)
        self.value = column(cfg.dim, cfg.dim, mp, init)
        self.out = row(cfg.dim, cfg.dim, mp, weight_init(cfg.init, out_std))

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, h*hd) -> (B, h, T, hd)
        b, t, _ = x.shape
        return x.view(b, t, self.local_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (self.split_heads(proj(x)[0]) for proj in (self.query, self.key, self.value))
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        p = self.attn_dropout if self.training else 0.0
        with own_dropout_stream(self.tp_rank, p > 0 and self.tp_size > 1, q.device):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=p)
        b, _, t, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, t, -1))[0]  # (B, T, D)


class FeedForward(nn.Module):
    def __init__(self, cfg: EncoderConfig, mp: ModelParallelConfig, out_std: float):
        super().__init__()
        self.fc1 = column(cfg.dim, cfg.ffn_dim, mp, weight_init(cfg.init))
        self.fc2 = row(cfg.ffn_dim, cfg.dim, mp, weight_init(cfg.init, out_std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)[0]))[0]


class Block(nn.Module):
    """One encoder block. ``forward`` returns (output, ffn_branch) where ffn_branch is the FFN output
    before the last residual (and before the post-LN), the tap data2vec uses for speech and text."""

    def __init__(self, cfg: EncoderConfig, mp: ModelParallelConfig, layer_id: int, drop_path: float):
        super().__init__()
        self.norm_first = cfg.norm_first
        out_std = 0.02 / math.sqrt(2.0 * layer_id) if cfg.norm_first else 0.02  # BEiT's rescaled init
        self.attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg, mp, out_std)
        self.ffn_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg, mp, out_std)
        self.dropout = nn.Dropout(cfg.dropout)
        self.drop_path = DropPath(drop_path)
        if cfg.layer_scale_init > 0:
            self.gamma_1 = nn.Parameter(torch.full((cfg.dim,), cfg.layer_scale_init))
            self.gamma_2 = nn.Parameter(torch.full((cfg.dim,), cfg.layer_scale_init))
        else:
            self.gamma_1 = self.gamma_2 = None
        self.recompute = False  # activation checkpointing (Encoder.recompute sets it)

    def scaled(self, x: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
        return self.drop_path(self.dropout(x) if gamma is None else gamma * self.dropout(x))

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None, skip: bool = False):
        """-> (output, ffn branch). ``skip`` (layerdrop): return the input. A dropped block is still called, so that
        ZeRO-3 sees the same modules in the same order every step and keeps its prefetch trace; each block is one
        ZeRO-3 leaf module (pipeline.distributed.gathered_whole), fetched once on the way in and once per output on
        the way back, so a dropped block returns two tensors as a computed one does. ``recompute`` (activation
        checkpointing) recomputes the block's math from its input in the backward, inside this call, so ZeRO-3 sees
        no extra block call there."""
        if skip:
            return x, x
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self.compute, x, attn_bias, use_reentrant=False)
        return self.compute(x, attn_bias)

    def compute(self, x: torch.Tensor, attn_bias: torch.Tensor | None):
        if self.norm_first:  # pre-LN (BEiT)
            x = x + self.scaled(self.attn(self.attn_norm(x), attn_bias), self.gamma_1)
            ffn = self.scaled(self.ffn(self.ffn_norm(x)), self.gamma_2)
            return x + ffn, ffn
        x = self.attn_norm(x + self.scaled(self.attn(x, attn_bias), self.gamma_1))  # post-LN
        ffn = self.scaled(self.ffn(x), self.gamma_2)
        return self.ffn_norm(x + ffn), ffn


class Encoder(nn.Module):
    """A stack of blocks (+ a final LayerNorm for pre-LN stacks).

    ``forward`` returns (final (B, T, D), taps) where taps holds one (B, T, D) tensor per block:
    the block output (``tap='block'``) or the FFN branch (``tap='ffn'``).
    """

    def __init__(self, cfg: EncoderConfig, mp: ModelParallelConfig):
        super().__init__()
        self.tap = cfg.tap
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, mp, i + 1, rates[i]) for i in range(cfg.depth))
        self.final_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps) if cfg.norm_first else nn.Identity()

    @property
    def recompute(self) -> bool:
        """Activation checkpointing of every block (train.activation_checkpointing: the trainer sets it)."""
        return all(block.recompute for block in self.blocks)

    @recompute.setter
    def recompute(self, on: bool) -> None:
        for block in self.blocks:
            block.recompute = on

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None, keep: int | None = None,
                skip: tuple[int, ...] = ()):
        """``keep``: return only the top ``keep`` taps (the teacher needs K of them, not all L).
        ``skip``: indices of blocks to leave out (layerdrop, student only: skipped blocks give no tap)."""
        first = 0 if keep is None else len(self.blocks) - keep
        taps = []
        for i, block in enumerate(self.blocks):
            x, ffn = block(x, attn_bias, i in skip)
            if i >= first and i not in skip:
                taps.append(x if self.tap == "block" else ffn)
        return self.final_norm(x), taps


def layerdrop_choice(p: float, depth: int, seed: int) -> tuple[int, ...]:
    """The blocks a layerdrop rate ``p`` leaves out, drawn from ``seed`` alone: every rank that passes
    the same seed skips the same blocks (ZeRO-3 and tensor parallelism need that)."""
    if p <= 0:
        return ()
    draws = torch.rand(depth, generator=torch.Generator().manual_seed(seed))
    return tuple(i for i in range(depth) if draws[i] < p)


def matmul_flops_per_token(cfg: EncoderConfig, seq_len: int) -> float:
    """Forward multiply-add FLOPs (x2) per token of the encoder: projections, FFN and attention."""
    d, f = cfg.dim, cfg.ffn_dim
    return cfg.depth * (2 * 4 * d * d + 2 * 2 * d * f + 2 * 2 * seq_len * d)
