"""Training throughput of the full data2vec speech step against the machine's matmul peak.

    python bench/bench_train_speech.py [--channels 128 --dim 256 --depth 6 --heads 8 --ffn-dim 1024
                                        --seconds 2 --batch 4 --steps 8 --warmup 2] [key.sub=value ...]

``pipeline.trainer.Trainer`` on one rank (ZeRO-3 engines for student and teacher) fed one synthetic
batch of 16 kHz clips with span masks; each ``optimizer_step()`` is the whole data2vec step (teacher
forward on the clean clip, student forward on the masked clip + backward, AdamW, EMA update).
FLOPs per sample come from ``Trainer.flops_per_sample`` (conv feature encoder, positional convs,
projections, attention; 3x forward for the student, 1x for the teacher).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_train_vision import build_ours, rates, timed_rounds  # noqa: E402
from bench.common import REPO_ROOT, Stopwatch, command_line, fmt, machine_info, matmul_peak, now, table  # noqa: E402

SHAPE_OPTIONS = (("dim", "encoder.dim", 256), ("depth", "encoder.depth", 6), ("heads", "encoder.heads", 8),
                 ("ffn_dim", "encoder.ffn_dim", 1024), ("batch", "train.micro_batch_size", 4))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/bench_train_speech.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="configs/speech_tiny.yaml", help="experiment YAML (default: %(default)s)")
    p.add_argument("--channels", type=int, default=128, help="conv feature encoder channels (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=2.0, help="clip length (default: %(default)s)")
    for flag, key, default in SHAPE_OPTIONS:
        p.add_argument(f"--{flag.replace('_', '-')}", type=int, default=default, help=f"sets {key} (default: %(default)s)")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: %(default)s)")
    p.add_argument("overrides", nargs="*", help="more config overrides")
    return p.parse_args(argv)


def overrides(args, output_dir: str) -> list[str]:
    convs = [[args.channels, k, s] for _, k, s in
             [[0, 10, 5], [0, 3, 2], [0, 3, 2], [0, 3, 2], [0, 3, 2], [0, 2, 2], [0, 2, 2]]]
    samples = int(args.seconds * 16000)
    return [f"model.conv_layers={convs}", f"model.max_samples={samples}", f"model.min_samples={min(samples, 8000)}",
            "model.pos_conv_groups=16", *[f"{key}={getattr(args, flag)}" for flag, key, _ in SHAPE_OPTIONS],
            "train.grad_accum=1", f"train.output_dir={output_dir}", *args.overrides]


def synthetic_batch(cfg) -> dict:
    import torch

    from pipeline.modalities.speech import frames_for, span_mask
    samples, batch = cfg.model.max_samples, cfg.train.micro_batch_size
    audio = torch.randn(batch, samples, generator=torch.Generator().manual_seed(0))
    frames = frames_for(cfg.model.conv_layers, samples)
    return {"audio": audio, "mask": span_mask(batch, frames, cfg.model.mask_prob, cfg.model.mask_length,
                                             random.Random(0))}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.chdir(REPO_ROOT)
    from pipeline import distributed
    from pipeline.experiment import load_experiment

    with tempfile.TemporaryDirectory(prefix="bench_speech_") as tmp:
        cfg = load_experiment(args.preset, overrides(args, tmp))
        batch = synthetic_batch(cfg)
        frames = batch["mask"].shape[1]
        print(f"machine: {machine_info()}\ndate: {now()}\ncommand: {command_line()}", flush=True)
        print(f"shape: {args.seconds} s clips ({frames} frames, {int(batch['mask'][0].sum())} masked), conv channels "
              f"{args.channels}, dim {cfg.encoder.dim}, depth {cfg.encoder.depth}, batch {cfg.train.micro_batch_size}")
        peak_before = matmul_peak()
        with Stopwatch() as build:
            trainer = build_ours(cfg, batch)
        try:
            results = timed_rounds({"ours": trainer.optimizer_step}, args.steps, args.warmup, str(trainer.rt.device))
            flops = trainer.flops_per_sample(frames)
        finally:
            distributed.shutdown()
        peak_after = matmul_peak()
    peak = max(peak_before["best_tflops"], peak_after["best_tflops"])
    r = rates(results["ours"][0], cfg.train.micro_batch_size, flops, peak)
    print(f"Trainer built in {build.seconds:.1f}s; FLOPs per sample {flops / 1e9:.3f} GFLOP; "
          f"load avg now {os.getloadavg()[0]:.2f}")
    print(table(["", "s/step (median)", "samples/s", "audio s/s", "TFLOP/s", "% of peak"], [
        ["matmul peak", "-", "-", "-", fmt(peak, 3), "100"],
        ["ours (Trainer, ZeRO-3)", fmt(r["step_s"]), fmt(r["samples_per_s"]),
         fmt(r["samples_per_s"] * args.seconds), fmt(r["tflops"], 3), fmt(r["pct_peak"])]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
