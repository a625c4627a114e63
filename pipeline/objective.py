"""The data2vec objective on plain tensors: targets from the teacher, regression loss, collapse stats.

Nothing here talks to the cluster: the caller all-reduces the statistics these functions return
(masked count, loss sum, first and second moments) over the data-parallel group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.config import doc, one_of, require


@dataclass
class ObjectiveConfig:
    """How targets are built from the teacher and how the student is scored against them."""

    top_k: int = doc("average the teacher's top K block outputs", 6)
    layer_norm: str = doc("normalisation of each tapped layer: 'layer' (LayerNorm, no affine), "
                          "'instance' (instance norm over time) or 'none'", "layer")
    final_norm: str = doc("normalisation of the K-layer average: 'layer', 'instance' or 'none'", "layer")
    loss: str = doc("'smooth_l1' or 'l2'", "smooth_l1")
    beta: float = doc("Smooth L1 beta", 2.0)
    reduce_dim: str = doc("per masked position: 'sum' or 'mean' over the D target dimensions", "mean")
    scale: str = doc("per-position loss scale: 'none' or 'inv_sqrt_dim' (1/sqrt(D))", "none")
    cls_loss: float = doc("data2vec 2.0 images: weight of the CLS loss, the regression of each clone's CLS output on "
                          "the mean of its sample's targets (same per-position loss), averaged over the clones of the "
                          "global batch and added to the masked-position mean. fairseq's cls_loss 0.01 weights a per-GPU "
                          "sum, i.e. 0.01 x clones per GPU here (0.01 x 16 images x 16 clones = 2.56 for ViT-B); this "
                          "form does not change with the number of GPUs. 0: off", 0.0)

    def __post_init__(self):
        require(self.top_k >= 1, "objective.top_k must be >= 1")
        one_of("objective.layer_norm", self.layer_norm, ("layer", "instance", "none"))
        one_of("objective.final_norm", self.final_norm, ("layer", "instance", "none"))
        one_of("objective.loss", self.loss, ("smooth_l1", "l2"))
        require(self.beta > 0, "objective.beta must be > 0 (use objective.loss=l2 for a squared loss)")
        one_of("objective.reduce_dim", self.reduce_dim, ("sum", "mean"))
        one_of("objective.scale", self.scale, ("none", "inv_sqrt_dim"))
        require(self.cls_loss >= 0, "objective.cls_loss must be >= 0")


def normalise(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Normalise (B, T, D) features in fp32: per position over D, or per channel over time."""
    x = x.float()
    if kind == "layer":
        return F.layer_norm(x, x.shape[-1:])
    if kind == "instance":
        return F.instance_norm(x.transpose(1, 2)).transpose(1, 2)
    return x


def teacher_targets(layer_outputs: list[torch.Tensor], cfg: ObjectiveConfig) -> torch.Tensor:
    """Average of the top-K tapped teacher layers, each normalised, then optionally normalised again.

    layer_outputs: one (B, T, D) tensor per block, bottom to top. Returns fp32 (B, T, D).
    """
    require(len(layer_outputs) >= cfg.top_k,
            f"objective.top_k={cfg.top_k} exceeds the encoder depth {len(layer_outputs)}")
    top = layer_outputs[-cfg.top_k:]
    target = sum(normalise(y, cfg.layer_norm) for y in top) / len(top)
    return normalise(target, cfg.final_norm)


def regression_loss(prediction: torch.Tensor, target: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """Sum over masked positions of the per-position loss. prediction, target: (M, D).

    The caller divides by the global masked count across data-parallel ranks.
    """
    prediction = prediction.float()
    if cfg.loss == "l2":
        per_element = F.mse_loss(prediction, target, reduction="none")
    else:
        per_element = F.smooth_l1_loss(prediction, target, reduction="none", beta=cfg.beta)
    per_position = per_element.sum(-1) if cfg.reduce_dim == "sum" else per_element.mean(-1)  # (M,)
    if cfg.scale == "inv_sqrt_dim":
        per_position = per_position / math.sqrt(prediction.shape[-1])
    return per_position.sum()


def class_targets(targets: torch.Tensor, clones: int) -> torch.Tensor:
    """data2vec 2.0's CLS target: the mean over positions of each sample's (B, T, D) targets, one row per clone
    (B x M, D)."""
    return targets.mean(1).repeat_interleave(clones, 0)


def moment_stats(x: torch.Tensor) -> torch.Tensor:
    """[count, sum over rows (D), sum of squares over rows (D)] of (M, D) features, for an all-reduce."""
    x = x.detach().float().reshape(-1, x.shape[-1])
    return torch.cat([x.new_full((1,), float(x.shape[0])), x.sum(0), (x * x).sum(0)])


def std_from_stats(stats: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the per-dimension std across positions (fairseq's compute_var), as a 0-d tensor on
    the stats' device (NaN below 2 rows): nothing here waits for the device."""
    dim = (stats.numel() - 1) // 2
    n, s, ss = stats[0], stats[1:1 + dim], stats[1 + dim:]
    var = ss / (n - 1).clamp_min(1) - s * s / (n * (n - 1)).clamp_min(1)
    std = torch.sqrt(var.clamp_min(0) + 1e-6).mean()
    return torch.where(n >= 2, std, torch.full_like(std, float("nan")))


# Content collapse: how much of the targets' variance position alone explains. Targets are projected on a fixed
# random basis of PROJECTED_DIMS directions (variance ratios survive a random projection) and only the first
# POSITION_BINS positions are counted, so the statistic is a small fixed-size tensor that rides in the step's
# one all-reduce whatever the model width or sequence length.
PROJECTED_DIMS, POSITION_BINS = 16, 256


def projection(dim: int, device) -> torch.Tensor:
    """The fixed (D, PROJECTED_DIMS) random basis: the same on every rank and in every run."""
    gen = torch.Generator().manual_seed(20220207)
    return (torch.randn(dim, PROJECTED_DIMS, generator=gen) / math.sqrt(PROJECTED_DIMS)).to(device)


def position_stats(targets: torch.Tensor, basis: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[count per position (BINS), projected sum per position (BINS x P), total sum of squares] of (B, T, D)
    targets, ``valid`` (B, T) marking the positions to count (None: all); for an all-reduce."""
    y = targets.detach().float()[:, :POSITION_BINS] @ basis  # (B, T', P)
    keep = torch.ones(y.shape[:2], device=y.device) if valid is None else valid[:, :POSITION_BINS].float()
    y = y * keep.unsqueeze(-1)
    counts = torch.zeros(POSITION_BINS, device=y.device)
    sums = torch.zeros(POSITION_BINS, basis.shape[1], device=y.device)
    counts[:y.shape[1]] = keep.sum(0)
    sums[:y.shape[1]] = y.sum(0)
    return torch.cat([counts, sums.flatten(), y.pow(2).sum().view(1)])


def mask_stats(mask: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[masked positions, input positions] of a micro-batch's (R, T) mask rows (R = B x clones), padding (``valid``
    (B, T) False) left out; for an all-reduce. masked / input is the ``masked_fraction`` metrics.jsonl logs."""
    mask = mask.bool()
    if valid is None:
        return torch.stack([mask.sum().float(), mask.new_full((), mask.numel(), dtype=torch.float32)])
    valid = valid.bool().repeat_interleave(mask.shape[0] // valid.shape[0], 0)
    return torch.stack([(mask & valid).sum().float(), valid.sum().float()])


def position_share(stats: torch.Tensor) -> torch.Tensor:
    """Share of the target variance explained by position (omega squared of a one-way ANOVA with positions as
    groups, unbiased for the batch size): 0 = position says nothing, 1 = the targets are a function of
    position alone (the collapse a lost position-embedding init once caused). A 0-d tensor on the stats' device;
    NaN with fewer than 2 rows per position."""
    counts, rest = stats[:POSITION_BINS], stats[POSITION_BINS:]
    sums, square = rest[:-1].view(POSITION_BINS, -1), rest[-1]  # positions never seen hold zeros
    n, groups = counts.sum(), (counts > 0).sum()
    total = sums.sum(0).pow(2).sum() / n.clamp_min(1)
    between = (sums.pow(2).sum(1) / counts.clamp_min(1)).sum() - total
    mean_within = (square - total - between) / (n - groups).clamp_min(1)
    share = ((between - (groups - 1) * mean_within) / (square - total + mean_within)).clamp(0.0, 1.0)
    return torch.where(n > groups, share, torch.full_like(share, float("nan")))


@dataclass
class CollapseConfig:
    """Representation-collapse monitor (the reference aborts when targets or predictions go flat)."""

    min_target_std: float = doc("alarm when the all-reduced target std falls below this", 0.1)
    min_prediction_std: float = doc("alarm when the all-reduced prediction std falls below this", 0.01)
    max_position_share: float = doc("alarm when position alone explains more than this share of the target variance "
                                    "(content collapse: the targets no longer depend on the input; 1: off)", 0.95)
    after_steps: int = doc("start checking after this many steps", 5000)
    action: str = doc("on alarm: 'log' (warn), 'skip' (skip the update) or 'stop' (save and exit non-zero)", "log")
    max_skips: int = doc("with action=skip: stop (save, exit non-zero) after this many consecutive skipped steps", 100)

    def __post_init__(self):
        one_of("collapse.action", self.action, ("log", "skip", "stop"))
        require(self.after_steps >= 0, "collapse.after_steps must be >= 0")
        require(self.max_skips >= 1, "collapse.max_skips must be >= 1")
        require(0 < self.max_position_share <= 1, "collapse.max_position_share must be in (0, 1]")


def collapse_alarm(step: int, target_std: float, prediction_std: float, cfg: CollapseConfig,
                   share: float = float("nan")) -> str | None:
    """A message when the representations look collapsed at this step, else None. ``share``: position_share."""
    if step < cfg.after_steps:
        return None
    if share > cfg.max_position_share and cfg.max_position_share < 1:
        return (f"position explains {share:.3f} of the target variance > {cfg.max_position_share} "
                f"(collapse.max_position_share): the targets hardly depend on the input")
    if target_std < cfg.min_target_std:
        return f"target std {target_std:.4g} < {cfg.min_target_std} (collapse.min_target_std)"
    if prediction_std < cfg.min_prediction_std:
        return f"prediction std {prediction_std:.4g} < {cfg.min_prediction_std} (collapse.min_prediction_std)"
    return None
