"""The full bf16 data2vec step of each Base preset on one GPU: throughput, MFU and peak memory vs the planner.

    python bench/bench_gpu_step.py [--size base|tiny] [--modality all|vision|speech|text] [--steps 10]
                                   [--json OUT.json]

Per modality, in a process of its own: ``pipeline.trainer.Trainer`` on one rank (ZeRO-3 student and fp32
EMA teacher, the dtypes the machine's device choice gives: bf16 autocast on a GPU) fed one synthetic batch of
the preset's per-GPU size (vision 64 images of 224 x 224, speech the clips of 20 s that fit data.max_tokens,
text 16 blocks of 512 tokens); ``optimizer_step()`` is the whole step (teacher forward, student forward and
backward, AdamW, EMA). Figures: the median step time over ``--steps`` after ``--warmup``, samples/s, model
TFLOP/s (``Trainer.flops_per_sample``), MFU against the device's nominal dense bf16 peak (when known) and
against a measured bf16 matmul, and the peak memory torch allocated against ``pipeline.plan``'s peak for the
same layout (1 GPU, TP 1, the same micro batch, without its allowance for the CUDA context). ``--size tiny`` runs the tiny presets: a quick check of the
script itself, on CPU too. Ends with one JSON line (also written to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO_ROOT, fmt, matmul_peak, table  # noqa: E402

MODALITIES = ("vision", "speech", "text")
# nominal dense bf16 tensor-core peaks (TFLOP/s, SXM parts): the MFU denominator when the device is known
NOMINAL_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/bench_gpu_step.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("base", "tiny"), default="base", help="which presets (default: %(default)s)")
    p.add_argument("--modality", choices=("all", *MODALITIES), default="all")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing, profile 3 steps per modality (torch.profiler): DIR/<preset>_profile.txt, the "
                        "top operators by host and by device time, and the device-busy share of the step")
    return p.parse_args(argv)


def micro_batch(cfg) -> int:
    """The preset's per-GPU batch: speech presets give a token budget, which holds this many full-length clips."""
    if cfg.data.max_tokens:
        return max(1, cfg.data.max_tokens // cfg.model.max_samples)
    return cfg.train.micro_batch_size


def nominal_peak(device_name: str) -> float | None:
    return next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in device_name), None)


def measure(modality: str, size: str, steps: int, warmup: int, profile: str | None = None) -> dict:
    """One modality's figures (runs in its own process: one process group each)."""
    import torch

    from bench.bench_train import synthetic_batch as sequence_batch
    from bench.bench_train_vision import build_ours, rates, synthetic_batch as image_batch, timed_rounds
    from pipeline import distributed
    from pipeline.experiment import load_experiment
    from pipeline.plan import plan

    os.chdir(REPO_ROOT)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_step_") as tmp:
        cfg = load_experiment(f"configs/{modality}_{size}.yaml", [f"train.output_dir={tmp}", "train.grad_accum=1"])
        micro = micro_batch(cfg)
        cfg.train.micro_batch_size, cfg.data.max_tokens = micro, 0
        batch = image_batch(cfg) if modality == "vision" else sequence_batch(cfg, modality)
        positions = batch["mask"].shape[1]
        trainer = build_ours(cfg, batch)
        device = str(trainer.rt.device)
        gpu = device.startswith("cuda")
        try:
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            results = timed_rounds({"step": trainer.optimizer_step}, steps, warmup, device)
            peak_bytes = torch.cuda.max_memory_allocated() if gpu else None
            busy = profile_steps(trainer.optimizer_step, Path(profile) / f"{modality}_{size}_profile.txt",
                                 gpu) if profile else None
            flops = trainer.flops_per_sample(positions)
            dtype = str(trainer.rt.choice.dtype).replace("torch.", "")
        finally:
            distributed.shutdown()
    name = torch.cuda.get_device_name() if gpu else "cpu"
    # a large product on a GPU: 2048^3 in bf16 read 327-427 TFLOP/s on an H200, 8192^3 731-788
    measured_peak = matmul_peak(8192 if gpu else 2048, device=device)["best_tflops"]
    r = rates(results["step"][0], micro, flops, measured_peak)
    nominal = nominal_peak(name) if gpu else None
    planned = plan(cfg, world=1, tp=1, micro=micro, overhead_gb=0.0, suggest=False).peak  # allocations only
    return {"modality": modality, "preset": f"{modality}_{size}", "device": name, "dtype": dtype, "micro_batch": micro,
            "positions": positions, "step_s": r["step_s"], "samples_per_s": r["samples_per_s"],
            "tflops": r["tflops"], "mfu": r["tflops"] / nominal if nominal else None,
            "pct_matmul_peak": r["pct_peak"], "matmul_peak_tflops": measured_peak,
            "peak_memory_gib": peak_bytes / 2 ** 30 if peak_bytes is not None else None,
            "planned_peak_gib": planned / 2 ** 30,
            "memory_vs_plan": peak_bytes / planned if peak_bytes is not None else None, "device_busy": busy}


def profile_steps(step, out: Path, gpu: bool, steps: int = 3) -> float | None:
    """Profile ``steps`` calls of ``step``; write the top operators by self host time and by self device time
    to ``out``. -> the share of the wall time the device spent in kernels (None on the CPU)."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if gpu:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    # kernels only (operators carry their kernels' time too): the sum torch's own table prints as "Self CUDA total"
    device_s = sum(e.self_device_time_total for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation) / 1e6
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        f.write(f"{steps} steps, {wall:.3f} s wall" + (f", {device_s:.3f} s in device kernels" if gpu else "") + "\n\n")
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60) + "\n\n")
        if gpu:
            f.write(events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=60) + "\n")
    return device_s / wall if gpu else None


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.environ.get("D2V_BENCH_ONE"):  # the per-modality child
        print(json.dumps(measure(args.modality, args.size, args.steps, args.warmup, args.profile)))
        return 0
    rows = []
    for modality in MODALITIES if args.modality == "all" else (args.modality,):
        cmd = [sys.executable, __file__, "--size", args.size, "--modality", modality, "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
        if args.profile:
            cmd += ["--profile", str(Path(args.profile).resolve())]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, "D2V_BENCH_ONE": "1"}, capture_output=True,
                              text=True)
        if proc.returncode:
            print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
            rows.append({"modality": modality, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(table(["preset", "device", "batch", "s/step", "samples/s", "TFLOP/s", "MFU", "% matmul", "peak GiB",
                 "plan GiB"],
                [[r.get("preset", r["modality"]), r.get("device", "-"), r.get("micro_batch", "-"), fmt(r.get("step_s")),
                  fmt(r.get("samples_per_s")), fmt(r.get("tflops")), fmt(r.get("mfu")), fmt(r.get("pct_matmul_peak")),
                  fmt(r.get("peak_memory_gib")), fmt(r.get("planned_peak_gib"))] for r in rows]))
    summary = {"steps": rows, "ok": all("error" not in r for r in rows)}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
