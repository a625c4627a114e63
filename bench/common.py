"""Shared helpers for the benchmark scripts: repo path, timing, matmul peak, machine info, tables,
and the options and runs common to the data-prep benchmarks.

Imported as ``bench.common`` by ``bench/bench_*.py`` (each script puts the repository root on
``sys.path`` first, so ``python bench/<script>.py`` works from any directory).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]


def command_line() -> str:
    """The command as typed (relative to the repository root), for the report."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def sync(device: str = "cpu") -> None:
    """Wait for queued device work (a no-op on the CPU)."""
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def torchrun_json(args: Sequence[str], nproc: int, out: Path, timeout: int = 1200) -> dict:
    """Run ``args`` (a script and its options, which tell it to write JSON to ``out``) under torchrun on
    ``nproc`` CPU ranks, and return that JSON."""
    import json
    import subprocess
    from pipeline.distributed import local_launch_command, source_tree_env
    cmd = local_launch_command(nproc, args)
    env = source_tree_env(REPO_ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args[:2])} on {nproc} ranks failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(Path(out).read_text())


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 0, device: str = "cpu") -> list[float]:
    """Seconds per call of ``fn`` for ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``."""

    def __init__(self, device: str = "cpu"):
        self.device, self.seconds = device, 0.0

    def __enter__(self):
        sync(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.start
        return False


def time_each(fn: Callable[[object], object], items: Sequence) -> float:
    """Seconds for ``fn(item)`` over every item, one after the other."""
    with Stopwatch() as sw:
        for item in items:
            fn(item)
    return sw.seconds


def summarize(times: Sequence[float]) -> dict:
    return {"n": len(times), "total": sum(times), "mean": sum(times) / len(times),
            "median": statistics.median(times), "min": min(times), "max": max(times)}


# ---------------------------------------------------------------------------------------------
# Matmul peak
# ---------------------------------------------------------------------------------------------

def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def matmul_peak(n: int = 2048, repeats: int = 10, device: str | None = None, dtype=None) -> dict:
    """Achievable dense matmul rate: ``torch.matmul`` of two n x n matrices, 2*n^3 FLOPs per call.

    fp32 on the CPU, bf16 on a GPU (the dtypes the trainer computes in). Returns the best and the
    median rate in TFLOP/s; the best is the "peak" the training figures are compared against.
    """
    import torch
    device = device or default_device()
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_calls(lambda: torch.matmul(a, b), repeats=repeats, warmup=2, device=device)
    flops = 2.0 * n ** 3
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "device": device, "repeats": repeats,
            "best_tflops": flops / min(times) / 1e12, "median_tflops": flops / statistics.median(times) / 1e12}


# ---------------------------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info() -> str:
    import torch
    parts = [f"{os.cpu_count()} CPU cores ({cpu_model()})", f"torch {torch.__version__}",
             f"{torch.get_num_threads()} torch threads"]
    if torch.cuda.is_available():
        parts.insert(1, torch.cuda.get_device_name(0))
    else:
        parts.insert(1, "no GPU")
    try:
        parts.append(f"load avg {os.getloadavg()[0]:.2f}")
    except OSError:
        pass
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (also readable on a terminal), columns padded to equal width."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(r) for r in cells[1:])])


def fmt(value: float | None, digits: int = 3) -> str:
    """Significant-digit formatting that keeps small and large numbers readable."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


# ---------------------------------------------------------------------------------------------
# Data-prep benchmarks (bench/bench_prep_<modality>.py)
# ---------------------------------------------------------------------------------------------

def prep_parser(modality: str, doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"python bench/bench_prep_{modality}.py", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_workers_arg(p: argparse.ArgumentParser, modality: str) -> None:
    p.add_argument("--workers", type=int, default=2,
                   help=f"data_prep.{modality} --workers (default: %(default)s; 0 = all usable CPUs)")


def add_run_args(p: argparse.ArgumentParser, modality: str, keep_what: str,
                 workdir_help: str = "scratch directory, relative to the repository root") -> None:
    """--repeats, --workdir (default runs/bench/prep_<modality>) and --keep."""
    p.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the median is reported "
                                                          "(default: %(default)s)")
    p.add_argument("--workdir", type=Path, default=Path(f"runs/bench/prep_{modality}"),
                   help=f"{workdir_help} (default: %(default)s)")
    p.add_argument("--keep", action="store_true", help=f"keep the {keep_what} afterwards")


def start_report() -> None:
    """Work in the repository root (--workdir is relative to it); print the machine, date and command."""
    os.chdir(REPO_ROOT)
    print(f"machine: {machine_info()}\ndate: {now()}\ncommand: {command_line()}", flush=True)


def clean_up(keep: bool, *dirs: Path) -> None:
    """Remove the scratch ``dirs`` unless --keep was given."""
    if not keep:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def time_prep(main: Callable, argv: Sequence[str], out: Path, quiet_stdout: bool = True) -> tuple[float, dict]:
    """Seconds for one data-prep ``main([*argv, --output out, --quiet])`` into an empty ``out``, and its manifest."""
    shutil.rmtree(out, ignore_errors=True)  # a fresh output: otherwise prep reuses complete shards
    stdout = contextlib.redirect_stdout(io.StringIO()) if quiet_stdout else contextlib.nullcontext()
    with Stopwatch() as sw, stdout:
        report = main([*argv, "--output", str(out), "--quiet"])
    return sw.seconds, report.manifest


# ---------------------------------------------------------------------------------------------
# Running the public entry points (bench/bench_probe.py)
# ---------------------------------------------------------------------------------------------

def run_logged(cmd: Sequence[str], torchrun: int = 0, capture: bool = False) -> tuple[float, str]:
    """Run ``cmd`` from the repository root, printing it first (as ``+ python ...``); with ``torchrun=N`` the
    arguments (``-m module ...``) run under torchrun on N CPU ranks of this machine. Fails on a non-zero exit.
    -> (seconds, its stdout if ``capture``, else "": the output then goes to the terminal)."""
    import subprocess
    from pipeline.distributed import local_launch_command, source_tree_env
    if torchrun:
        cmd = local_launch_command(torchrun, list(cmd))
    shown = ["python" if c == sys.executable else c for c in cmd]
    print("+", " ".join(shlex.quote(str(c)) for c in shown), flush=True)
    env = source_tree_env(REPO_ROOT)
    with Stopwatch() as sw:
        proc = subprocess.run([str(c) for c in cmd], cwd=REPO_ROOT, env=env, text=True,
                              stdout=subprocess.PIPE if capture else None)
    if proc.returncode:
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(map(str, shown))}")
    return sw.seconds, proc.stdout or ""
