"""Non-finite steps (``train.nonfinite``): never counted as training, never saved.

DeepSpeed skips an optimizer step whose gradient norm is NaN or inf (its own host read of the norm, reduced over
every rank, so every rank sees the same). The trainer then counts no step; this module decides what follows: skip
(as fairseq's fp16 recipes skip overflowed steps until their loss scale reaches its minimum), up to
``train.nonfinite_limit`` in a row, or stop at once. A save first checks that every weight is finite, so no
checkpoint holding a NaN is written, and none can prune the last good one.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("pipeline")


class NonFiniteError(RuntimeError):
    """Non-finite gradients, loss or weights: the run stops (exit 5) without writing a checkpoint of them."""


def nonfinite_step(train_cfg, step: int, in_a_row: int, is_main: bool) -> int:
    """Step ``step + 1`` had a non-finite gradient norm, the ``in_a_row``-th such step in a row: raise
    NonFiniteError (train.nonfinite=stop, or the limit reached) or warn. -> ``in_a_row``."""
    what = f"step {step + 1}: the gradient norm is not finite (NaN or inf); DeepSpeed skipped the update"
    if train_cfg.nonfinite == "stop":
        raise NonFiniteError(f"{what} (train.nonfinite=stop)")
    if in_a_row >= train_cfg.nonfinite_limit:
        raise NonFiniteError(f"{what}: {in_a_row} such steps in a row (train.nonfinite_limit)")
    if is_main:
        log.warning("%s, and no step is counted (train.nonfinite=skip: %d of %d in a row)", what, in_a_row,
                    train_cfg.nonfinite_limit)
    return in_a_row


def weights_finite(trainer) -> bool:
    """Every rank's student (master and working) and teacher partitions are finite (their own elements, not ZeRO-3's
    padding), agreed by all ranks. One parameter at a time (an offloaded optimizer's master is a device copy), through
    the readers the consistency check uses; at saves: rare."""
    from pipeline.checkpoint import all_ok
    from pipeline.consistency import partitions
    finite = torch.ones((), dtype=torch.bool, device=trainer.rt.device)
    for _, _, readers, _ in partitions(trainer):
        for read in readers:
            finite &= torch.isfinite(read()).all().to(finite.device)
    return all_ok(bool(finite), trainer.rt.device)
