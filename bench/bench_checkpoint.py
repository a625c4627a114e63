"""Checkpoint size and save / resume / re-shard times on CPU gloo ranks.

    python bench/bench_checkpoint.py [--config configs/vision_base.yaml] [--save-ranks 2] [--resume-ranks 2,1]

Builds the real ``Trainer`` for the preset (fp32 on CPU, TP 1) on --save-ranks ranks, runs one
optimizer step on a synthetic batch (so the Adam moments exist) and times ``Trainer.save`` (every
rank writes its fp32 partitions of the student, both Adam moments and the teacher, fsyncs, and rank 0
writes the COMPLETE marker). It then times ``Trainer.resume`` from that checkpoint on each of
--resume-ranks (the same data-parallel size reads its own file; another size re-partitions from
memory-mapped files) and checks that the resumed run's next loss equals the uninterrupted run's
(dropout and drop-path off, so only the summation order differs between DP sizes).
Reported: bytes on disk per parameter (expected 16: four fp32 copies) and the slowest rank's time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO_ROOT, command_line, fmt, machine_info, now, table, torchrun_json  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/bench_checkpoint.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/vision_base.yaml", help="a vision preset (default: %(default)s)")
    p.add_argument("--save-ranks", type=int, default=2, help="ranks (= DP) of the saving run (default: %(default)s)")
    p.add_argument("--resume-ranks", default="2,1", help="ranks of each resuming run (default: %(default)s)")
    p.add_argument("--worker", choices=["save", "resume"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build(config: str, ckpt_root: Path):
    from bench.bench_train_vision import synthetic_batch
    from pipeline.distributed import choose_device, init_runtime, load_ds_config
    from pipeline.experiment import load_experiment
    from pipeline.trainer import Trainer
    # no dropout / drop-path: after a resume on another DP size only the summation order may differ
    cfg = load_experiment(config, ["train.micro_batch_size=2", "train.grad_accum=1", "train.warmup_steps=0",
                                   f"train.output_dir={ckpt_root.parent}", "encoder.dropout=0",
                                   "encoder.attn_dropout=0", "encoder.drop_path=0"])
    rt = init_runtime(1, choose_device("fp32"))
    trainer = Trainer(cfg, rt, load_ds_config(cfg.train.ds_config), [])
    trainer.ckpt_root = ckpt_root
    return trainer, rt, lambda: synthetic_batch(cfg, seed=rt.dp_rank)


def slowest(seconds: float) -> float:
    import torch
    import torch.distributed as dist
    t = torch.tensor([seconds])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def worker(args) -> None:
    from pipeline.distributed import shutdown
    trainer, rt, batch_for = build(args.config, Path(args.ckpt))
    report = {"params": sum(p.ds_numel for p in trainer.engine.module.parameters()), "dp": rt.dp}
    if args.worker == "save":
        trainer.batches = iter([batch_for()])
        trainer.optimizer_step()
        start = time.perf_counter()
        path = trainer.save()
        report["seconds"] = slowest(time.perf_counter() - start)
        report["bytes"] = sum(f.stat().st_size for f in path.iterdir())
        from pipeline.checkpoint import file_crc32, rank_file
        start = time.perf_counter()  # the CRC-32 that save() computes of the rank file it wrote
        file_crc32(rank_file(path, rt.rank))
        report["crc_seconds"] = slowest(time.perf_counter() - start)
    else:
        start = time.perf_counter()
        trainer.resume(None)
        report["seconds"] = slowest(time.perf_counter() - start)
    trainer.batches = iter([next_global_batch_share(args.config, args.save_ranks, rt)])
    from pipeline.metrics import summary_values
    report["next_loss"] = summary_values(trainer.optimizer_step()["summary"])["loss"]
    if rt.rank == 0:
        Path(args.out).write_text(json.dumps(report))
    shutdown()


def next_global_batch_share(config: str, save_ranks: int, rt) -> dict:
    """This rank's share of one fixed global batch (2 samples per saving rank), whatever the DP size, so
    the step after a resume must give the uninterrupted run's loss (up to summation order)."""
    import torch
    from bench.bench_train_vision import synthetic_batch
    from pipeline.experiment import load_experiment
    cfg = load_experiment(config, ["train.micro_batch_size=2"])
    parts = [synthetic_batch(cfg, seed=1000 + r) for r in range(save_ranks)]
    merged = {k: torch.cat([b[k] for b in parts]) for k in parts[0]}
    share = merged["image"].shape[0] // rt.dp
    return {k: v[rt.dp_rank * share:(rt.dp_rank + 1) * share] for k, v in merged.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    os.chdir(REPO_ROOT)
    me = str(Path(__file__).resolve())
    common = ["--config", args.config, "--save-ranks", str(args.save_ranks)]
    rows = []
    with tempfile.TemporaryDirectory(dir=REPO_ROOT / "runs" if (REPO_ROOT / "runs").is_dir() else None) as tmp:
        ckpt = Path(tmp) / "checkpoints"
        out = Path(tmp) / "save.json"
        saved = torchrun_json([me, "--worker", "save", "--ckpt", str(ckpt), "--out", str(out), *common],
                              args.save_ranks, out)
        per_param = saved["bytes"] / saved["params"]
        rows.append([f"save on DP {saved['dp']}", fmt(saved["seconds"]), fmt(saved["bytes"] / 2 ** 20),
                     fmt(per_param, 4), fmt(saved["next_loss"], 6), "-"])
        for ranks in [int(r) for r in args.resume_ranks.split(",")]:
            out = Path(tmp) / f"resume{ranks}.json"
            got = torchrun_json([me, "--worker", "resume", "--ckpt", str(ckpt), "--out", str(out), *common],
                                ranks, out)
            kind = "same DP" if ranks == args.save_ranks else "re-partitioned"
            rows.append([f"resume on DP {got['dp']} ({kind})", fmt(got["seconds"]), "-", "-",
                         fmt(got["next_loss"], 6), f"{abs(got['next_loss'] / saved['next_loss'] - 1):.1e}"])
    print(f"\n{now()} | {machine_info()}\n{command_line()}\n{args.config}: {saved['params'] / 1e6:.1f}M parameters, "
          f"micro-batch 2, fp32, ds_configs/zero3.json\n")
    print(table(["run", "seconds (slowest rank)", "MiB on disk", "bytes / parameter", "next-step loss",
                 "rel. diff vs uninterrupted"], rows))
    print(f"\nof the save: CRC-32 of the rank file {saved['crc_seconds']:.2f} s (slowest rank), "
          f"{saved['crc_seconds'] / saved['seconds']:.0%} of the save")
    print(json.dumps({"save_s": saved["seconds"], "crc_s": saved["crc_seconds"], "bytes": saved["bytes"],
                      "resume_s": {r[0]: float(r[1]) for r in rows[1:]}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
