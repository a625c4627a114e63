"""Run under torchrun on 4 ranks: TP 2 x DP 2 with hybrid sharding (parallel.shard=1: 2 replicas), vision_tiny.

1. Three optimizer steps with train.check_consistency_every=1: replicas hold equal partitions and the parameters
   megatron does not split stay bit-identical on tensor-parallel peers (no error).
2. One bit flipped in one copy at a time (a student master, working or teacher partition on one replica; a duplicated
   parameter on one TP rank of both replicas), compared bit for bit; and a duplicated parameter scaled by 1.01 on one
   TP rank, compared to the run-time tolerance (TP_RTOL): every rank raises ConsistencyError with the same line.
3. collapse.action=skip at TP 2 where one TP rank's targets are half the other's and the threshold lies between: both
   TP peers take the same decision (before the statistics were agreed over TP, one skipped while its peer went into
   the backward's collectives, and the job hung until the process-group timeout).

Each rank writes OUT/rank<R>.json: {"check_ms", "cases": {case: message or null}, "skipped": [...]}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from dp_equivalence import GLOBAL_BATCH, global_batches  # tests/dist, this script's directory
from pipeline.consistency import TP_RTOL, ConsistencyError, check, check_due
from pipeline.distributed import choose_device, init_runtime, load_ds_config, shutdown
from pipeline.ema import zero3_master_partition
from pipeline.experiment import load_experiment
from pipeline.metrics import summary_values
from pipeline.trainer import Trainer


def feed(trainer, cfg, rt, steps: int) -> None:
    micro = GLOBAL_BATCH // rt.dp
    lo = rt.dp_rank * micro
    trainer.batches = ({"image": images[lo:lo + micro], "mask": masks[lo:lo + micro]}
                       for images, masks in global_batches(cfg, steps))


def flip_lowest_bit(part: torch.Tensor) -> None:
    """The smallest change a value can take: its lowest mantissa bit."""
    bits = part.view(-1)[:1].view(torch.int32)
    bits.bitwise_xor_(1)


def corruption_cases(trainer) -> dict:
    """case -> (ranks that flip, the partition they flip)."""
    module = trainer.engine.module
    params = dict(module.named_parameters())
    split = next(n for n, p in params.items() if getattr(p, "tensor_model_parallel", False) and n.startswith("backbone."))
    whole = next(n for n, p in params.items() if not getattr(p, "tensor_model_parallel", False) and "norm" in n)
    teacher = dict(zip(trainer.ema.names, trainer.ema.teacher_parts))
    return {
        f"replica master {split}": ((2,), lambda: zero3_master_partition(params[split])),
        f"replica working {whole}": ((2,), lambda: params[whole].ds_tensor.data),
        f"replica teacher {split}": ((3,), lambda: teacher[split.removeprefix("backbone.")]),
        f"tp master {whole}": ((1, 3), lambda: zero3_master_partition(params[whole])),
        f"tp scaled master {whole}": ((1, 3), lambda: zero3_master_partition(params[whole])),  # beyond TP_RTOL
    }


def main() -> None:
    out = Path(sys.argv[1])
    rt = init_runtime(2, choose_device("fp32"), timeout_s=60, shard=1)
    cfg = load_experiment("configs/vision_tiny.yaml", [
        "train.warmup_steps=0", "train.lr=0.005", "train.schedule=constant", "train.output_dir=/unused",
        "parallel.tp=2", "parallel.shard=1", "train.check_consistency_every=1", "train.steps=8",
        "encoder.dropout=0.1"])  # dropout drawn alike on TP peers, unlike on replicas
    cfg.train.micro_batch_size = GLOBAL_BATCH // rt.dp
    trainer = Trainer(cfg, rt, load_ds_config(cfg.train.ds_config), [])
    feed(trainer, cfg, rt, 8)
    check_due(trainer, start=True)
    for _ in range(3):
        trainer.optimizer_step()
        check_due(trainer)
    check(trainer, tp_rtol=0)  # the parameters TP peers both hold: bit-identical after the steps (gloo)
    began = time.perf_counter()
    for _ in range(5):
        check(trainer)
    report = {"check_ms": 1000 * (time.perf_counter() - began) / 5, "cases": {}}
    for case, (ranks, partition) in corruption_cases(trainer).items():
        part = partition().detach()
        kept = part.clone()
        if rt.rank in ranks and "scaled" in case:
            part.mul_(1.01)
        elif rt.rank in ranks:
            flip_lowest_bit(part)
        try:
            check(trainer, tp_rtol=0 if "scaled" not in case else TP_RTOL)
            report["cases"][case] = None
        except ConsistencyError as exc:
            report["cases"][case] = str(exc)
        with torch.no_grad():
            part.copy_(kept)
    check(trainer)  # all restored
    report["skipped"] = collapse_decisions(trainer, cfg, rt)
    (out / f"rank{rt.rank}.json").write_text(json.dumps(report))
    shutdown()


def collapse_decisions(trainer, cfg, rt) -> list[bool]:
    """Two steps under collapse.action=skip where TP rank 1 sees targets half as spread as TP rank 0's."""
    target_std = summary_values(trainer.optimizer_step()["summary"].tolist())["target_std"]
    cfg.collapse.action, cfg.collapse.after_steps = "skip", 0
    cfg.collapse.min_target_std = 0.75 * target_std  # rank 0's targets above it, rank 1's (x 0.5) below
    if rt.tp_rank == 1:
        original = trainer.teacher_targets
        trainer.teacher_targets = lambda inputs: original(inputs) * 0.5
    return [trainer.optimizer_step()["skipped"] for _ in range(2)]


if __name__ == "__main__":
    main()
