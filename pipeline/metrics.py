"""One log line per interval (console), the same record as JSONL, and TensorBoard scalars (rank 0)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger("pipeline")
# What a step reports, as one small device tensor (all ranks agree on it): read on the host only at log steps
# (and one step late for the stop flags and the collapse alarm), so the step never waits for the device.
SUMMARY = ("loss", "target_std", "prediction_std", "position_share", "masked_fraction", "samples", "positions",
           "stop", "requeue")
AVERAGED = SUMMARY[:5]  # over micro-batches and over the log interval; samples and positions add up


def summary_values(summary: torch.Tensor | list[float]) -> dict[str, float]:
    """A SUMMARY as named floats (reading a device tensor waits for the device: at log steps, or in tests)."""
    values = summary.tolist() if torch.is_tensor(summary) else summary
    return dict(zip(SUMMARY, values))


def step_summary(micro: list[torch.Tensor]) -> torch.Tensor:
    """An optimizer step's SUMMARY from its micro-batches': means, sums, and any flag."""
    stacked = torch.stack(micro)
    n = len(AVERAGED)
    return torch.cat([stacked[:, :n].mean(0), stacked[:, n:n + 2].sum(0), stacked[:, n + 2:].amax(0)])


def drop_records_after(path: Path, step: int) -> None:
    """A resumed run restarts at its checkpoint's step: the records a crashed run wrote past that step are
    replaced by the resumed run's (as TensorBoard's purge_step does), so every step appears once. A line
    cut by the crash is dropped too."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            keep = json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
        log.info("metrics.jsonl: dropped %d record(s) after step %d, which this run redoes", dropped, step)


class MetricsLogger:
    """``flops(samples, positions)``: model FLOPs of a step that trained ``samples`` samples of ``positions``
    positions in all; ``devices``: the ranks sharing them (TFLOP/s per device)."""

    def __init__(self, output: Path, enabled: bool, start_step: int = 0,
                 flops: Callable[[float, float], float] = lambda samples, positions: 0.0, devices: int = 1):
        self.enabled, self.flops, self.devices = enabled, flops, devices
        self.pending: list[torch.Tensor] = []  # the interval's step summaries, still on the device
        self.current: dict[str, float] = {}
        self.extra: dict[str, float] = {}  # figures measured at the logged step (evaluation)
        self.last_time = time.perf_counter()
        self.jsonl = self.tb = None
        if enabled:
            output.mkdir(parents=True, exist_ok=True)
            drop_records_after(output / "metrics.jsonl", start_step)
            self.jsonl = open(output / "metrics.jsonl", "a", encoding="utf-8")
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(output / "tensorboard"), purge_step=start_step + 1)
            except ImportError:  # tensorboard is a declared dependency; keep training if it is missing
                log.warning("tensorboard is not installed: no TensorBoard scalars")
            except UnicodeError as exc:  # its writer encodes paths as strict UTF-8
                log.warning("TensorBoard cannot write under %r in this locale (%s): no TensorBoard scalars, "
                            "metrics.jsonl still has every record; run with LANG=C.UTF-8 to get them",
                            str(output), exc)

    def record(self, summary: torch.Tensor, lr: float, tau: float) -> None:
        """A step's SUMMARY (left on the device until flush) and its schedules."""
        if self.enabled:
            self.pending.append(summary)
        self.current = {"lr": float(lr), "tau": float(tau)}  # schedules: the logged step's

    def flush(self, step: int, total_steps: int) -> dict | None:
        """Read the interval's summaries (the one wait for the device in a log interval) and log them."""
        now = time.perf_counter()
        elapsed = max(now - self.last_time, 1e-9)
        self.last_time = now
        rows, extra, self.pending, self.extra = self.pending, self.extra, [], {}
        if not rows:
            return None
        steps = [summary_values(values) for values in torch.stack(rows).tolist()]
        samples, positions = sum(r["samples"] for r in steps), sum(r["positions"] for r in steps)
        flops = sum(self.flops(r["samples"], r["positions"]) for r in steps)
        rec = {key: interval_mean([r[key] for r in steps]) for key in AVERAGED}
        rec.update(self.current, **extra)
        rec.update(step=step, samples_per_s=samples / elapsed, tokens_per_s=positions / elapsed,
                   tflops=flops / elapsed / 1e12, tflops_per_device=flops / elapsed / 1e12 / self.devices)
        log.info("step %d/%d | loss %s | lr %.3e | tau %.5f | target_std %s | pred_std %s | pos_share %s | "
                 "masked %s | %.1f samples/s | %.0f tokens/s | %.3f TFLOP/s (%.3f per device)%s",
                 step, total_steps, shown(rec["loss"], 4), rec["lr"], rec["tau"], shown(rec["target_std"]),
                 shown(rec["prediction_std"]), shown(rec["position_share"]), shown(rec["masked_fraction"]),
                 rec["samples_per_s"], rec["tokens_per_s"], rec["tflops"], rec["tflops_per_device"],
                 "".join(f" | {k} {v:.4f}" for k, v in rec.items() if "/" in k))
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in rec.items():
                if key != "step" and value is not None:
                    self.tb.add_scalar(key if "/" in key else f"train/{key}", value, step)
            self.tb.flush()
        return rec

    def add(self, figures: dict[str, float], seconds: float = 0.0) -> None:
        """Figures measured at the step about to be logged (``eval/knn_top1``, ...): they join its log line,
        JSONL record and TensorBoard scalars under their own names. ``seconds`` spent measuring them are left
        out of the interval's throughput."""
        self.extra.update(figures)
        self.last_time += seconds

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def interval_mean(values: list[float]) -> float | None:
    """Mean of the finite values (position_share is NaN for a batch with fewer than 2 rows per position)."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else None


def shown(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
