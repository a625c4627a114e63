"""The cost of one train.check_consistency_every check against the training step, on CPU ranks.

    python bench/bench_consistency.py [--preset configs/vision_base.yaml] [--ranks 2] [--steps 4] [key=value ...]

Runs the preset's model with hybrid sharding over ``--ranks`` ranks (parallel.shard=1: every rank a replica, so the
check compares every partition: student master, working copy and teacher), times ``--steps`` optimizer steps and
as many checks (medians), and prints the check's share of the step time at the default interval. On a GPU the check
is a few memory-bound reductions per parameter plus two small all-gathers; the CPU share is an upper bound.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_train_vision import relaunch_under_torchrun, synthetic_batch  # noqa: E402
from bench.common import REPO_ROOT, command_line, machine_info, now  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", default="configs/vision_base.yaml", help="a vision preset (default: vision_base)")
    p.add_argument("--ranks", type=int, default=2, help="CPU ranks, each a replica (default 2)")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps and checks (default 4)")
    p.add_argument("--micro-batch", type=int, default=2, help="images per rank per step (default 2)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.image_size=128")
    args = p.parse_args(argv)
    if args.ranks < 2 or args.steps < 1:
        p.error("--ranks must be >= 2 (replicas to compare) and --steps >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        return relaunch_under_torchrun(args.ranks, argv, __file__)
    import itertools

    from pipeline import distributed
    from pipeline.consistency import check
    from pipeline.experiment import load_experiment
    from pipeline.trainer import Trainer
    os.chdir(REPO_ROOT)
    with tempfile.TemporaryDirectory(prefix="bench_consistency_") as tmp:
        cfg = load_experiment(args.preset, [f"train.micro_batch_size={args.micro_batch}", "train.grad_accum=1",
                                            "parallel.shard=1", f"train.output_dir={tmp}", *args.overrides])
        choice = distributed.choose_device(cfg.train.precision)
        rt = distributed.init_runtime(1, choice, cfg.parallel.timeout_s, shard=1)
        trainer = Trainer(cfg, rt, distributed.load_ds_config(cfg.train.ds_config), ["unused"])
        trainer.batches = itertools.repeat(synthetic_batch(cfg, cfg.train.seed))
        trainer.optimizer_step()  # warm-up
        steps, checks = [], []
        for _ in range(args.steps):
            began = time.perf_counter()
            trainer.optimizer_step()
            steps.append(time.perf_counter() - began)
            began = time.perf_counter()
            check(trainer)
            checks.append(time.perf_counter() - began)
        distributed.shutdown()
    if rt.is_main:
        step, each = statistics.median(steps), statistics.median(checks)
        every = cfg.train.check_consistency_every
        params = sum(p.ds_shape.numel() for p in trainer.engine.module.parameters())
        print(f"machine: {machine_info()}\ndate: {now()}\ncommand: {command_line()}")
        print(f"{args.preset}: {params / 1e6:.1f}M parameters, {args.ranks} ranks (replicas), micro-batch "
              f"{args.micro_batch}, {choice.device_type} {str(choice.dtype).replace('torch.', '')}")
        print(f"step {step * 1000:.0f} ms, check {each * 1000:.1f} ms (medians of {args.steps}): one check = "
              f"{each / step:.2%} of a step; every {every} steps (train.check_consistency_every) = "
              f"{each / (step * every):.3%} of the training time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
