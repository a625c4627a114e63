"""Training throughput of the full data2vec step for speech or text, against the machine's matmul peak.

    python bench/bench_train.py --modality speech [--dim 256 --depth 6 --heads 8 --ffn-dim 1024 --batch 4
                                                   --seconds 2 --channels 128] [key.sub=value ...]
    python bench/bench_train.py --modality text   [--dim 256 ... --batch 8 --tokens 256 --vocab 8000]

``pipeline.trainer.Trainer`` on one rank (a ZeRO-3 engine for the student, the ZeRO-3 teacher gathered by
pipeline.gather) fed one synthetic batch (16 kHz clips with span masks, or token blocks with BERT masking); each
``optimizer_step()`` is the whole data2vec step: teacher forward on the clean input, student forward on the masked
input + backward, AdamW, EMA update. FLOPs per sample come from ``Trainer.flops_per_sample`` (3x forward for the
student, 1x for the teacher). The vision benchmark, with its transformers peer, is bench/bench_train_vision.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_train_vision import build_ours, rates, timed_rounds  # noqa: E402
from bench.common import REPO_ROOT, Stopwatch, command_line, fmt, machine_info, matmul_peak, now, table  # noqa: E402

SHAPE_OPTIONS = (("dim", "encoder.dim", 256), ("depth", "encoder.depth", 6), ("heads", "encoder.heads", 8),
                 ("ffn_dim", "encoder.ffn_dim", 1024))
WAV2VEC_GEOMETRY = [(10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/bench_train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modality", choices=("speech", "text"), required=True)
    p.add_argument("--batch", type=int, default=None, help="micro batch (default: speech 4, text 8)")
    p.add_argument("--channels", type=int, default=128, help="speech: conv feature encoder channels")
    p.add_argument("--seconds", type=float, default=2.0, help="speech: clip length")
    p.add_argument("--tokens", type=int, default=256, help="text: block length")
    p.add_argument("--vocab", type=int, default=8000, help="text: vocabulary size")
    for flag, key, default in SHAPE_OPTIONS:
        p.add_argument(f"--{flag.replace('_', '-')}", type=int, default=default, help=f"sets {key} (default: %(default)s)")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: %(default)s)")
    p.add_argument("overrides", nargs="*", help="more config overrides")
    args = p.parse_args(argv)
    args.batch = args.batch or {"speech": 4, "text": 8}[args.modality]
    return args


def modality_overrides(args) -> list[str]:
    if args.modality == "speech":
        samples = int(args.seconds * 16000)
        convs = [[args.channels, k, s] for k, s in WAV2VEC_GEOMETRY]
        return [f"model.conv_layers={convs}", f"model.max_samples={samples}", f"model.min_samples={min(samples, 8000)}",
                "model.pos_conv_groups=16"]
    return [f"model.vocab_size={args.vocab}", f"model.max_positions={args.tokens}"]


def synthetic_batch(cfg, modality: str) -> dict:
    import torch
    gen, rng, batch = torch.Generator().manual_seed(0), random.Random(0), cfg.train.micro_batch_size
    if modality == "speech":
        from pipeline.modalities.speech import frames_for
        samples = cfg.model.max_samples
        frames = frames_for(cfg.model.conv_layers, samples)
        return {"audio": torch.randn(batch, samples, generator=gen),
                "mask": cfg.make_modality().frame_mask(batch, frames, seed=0)}  # the preset's masking, its clones
    from pipeline.modalities.text import corrupt
    tokens = torch.randint(5, cfg.model.vocab_size, (batch, cfg.model.max_positions), generator=gen)
    pairs = [corrupt(t, cfg.model, rng) for t in tokens]
    return {"tokens": tokens, "student_tokens": torch.stack([p[0] for p in pairs]),
            "mask": torch.stack([p[1] for p in pairs])}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.chdir(REPO_ROOT)
    from pipeline import distributed
    from pipeline.experiment import load_experiment

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        shape = [f"{key}={getattr(args, flag)}" for flag, key, _ in SHAPE_OPTIONS]
        cfg = load_experiment(f"configs/{args.modality}_tiny.yaml", [
            *modality_overrides(args), *shape, f"train.micro_batch_size={args.batch}", "train.grad_accum=1",
            f"train.output_dir={tmp}", *args.overrides])
        batch = synthetic_batch(cfg, args.modality)
        positions, masked = batch["mask"].shape[1], int(batch["mask"].sum()) // args.batch
        print(f"machine: {machine_info()}\ndate: {now()}\ncommand: {command_line()}", flush=True)
        print(f"shape: {args.modality}, {positions} positions per sample (~{masked} with loss), dim {cfg.encoder.dim}, "
              f"depth {cfg.encoder.depth}, heads {cfg.encoder.heads}, ffn {cfg.encoder.ffn_dim}, batch {args.batch}")
        peak_before = matmul_peak()
        with Stopwatch() as build:
            trainer = build_ours(cfg, batch)
        try:
            results = timed_rounds({"ours": trainer.optimizer_step}, args.steps, args.warmup, str(trainer.rt.device))
            flops = trainer.flops_per_sample(positions)
        finally:
            distributed.shutdown()
        peak_after = matmul_peak()
    peak = max(peak_before["best_tflops"], peak_after["best_tflops"])
    r = rates(results["ours"][0], args.batch, flops, peak)
    unit, per_sample = ("audio s/s", args.seconds) if args.modality == "speech" else ("tokens/s", positions)
    print(f"Trainer built in {build.seconds:.1f}s; FLOPs per sample {flops / 1e9:.3f} GFLOP; "
          f"load avg now {os.getloadavg()[0]:.2f}")
    print(table(["", "s/step (median)", "samples/s", unit, "TFLOP/s", "% of peak"], [
        ["matmul peak", "-", "-", "-", fmt(peak, 3), "100"],
        ["ours (Trainer, ZeRO-3)", fmt(r["step_s"]), fmt(r["samples_per_s"]), fmt(r["samples_per_s"] * per_sample),
         fmt(r["tflops"], 3), fmt(r["pct_peak"])]]))
    print(json.dumps({"modality": args.modality, "peak_tflops": peak, **r}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
