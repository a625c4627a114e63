"""One log line per interval (console), the same record as JSONL, and TensorBoard scalars (rank 0)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

log = logging.getLogger("pipeline")
AVERAGED = ("loss", "target_std", "prediction_std", "position_share")


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
    def __init__(self, output: Path, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.extra: dict[str, float] = {}  # figures measured at the logged step (evaluation)
        self.current: dict[str, float] = {}
        self.count = 0
        self.samples = self.tokens = self.flops = 0.0
        self.devices = 1
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

    def record(self, step: int, metrics: dict, samples: int, tokens: int, flops: float, devices: int) -> None:
        for key in AVERAGED:  # averaged over the interval (position_share: its steps with a value)
            value = float(metrics[key])
            if not math.isnan(value):
                self.sums[key] = self.sums.get(key, 0.0) + value
                self.counts[key] = self.counts.get(key, 0) + 1
        self.current = {"lr": float(metrics["lr"]), "tau": float(metrics["tau"])}  # schedules: the logged step's
        self.count += 1
        self.samples += samples
        self.tokens += tokens
        self.flops += flops
        self.devices = devices

    def flush(self, step: int, total_steps: int) -> dict | None:
        now = time.perf_counter()
        elapsed = max(now - self.last_time, 1e-9)
        if self.count == 0:
            return None
        rec = {**{k: self.sums[k] / self.counts[k] if k in self.sums else None for k in AVERAGED}, **self.current,
               **self.extra}
        rec.update(step=step, samples_per_s=self.samples / elapsed, tokens_per_s=self.tokens / elapsed,
                   tflops=self.flops / elapsed / 1e12, tflops_per_device=self.flops / elapsed / 1e12 / self.devices)
        self.sums, self.counts, self.extra, self.count, self.samples, self.tokens, self.flops = {}, {}, {}, 0, 0.0, 0.0, 0.0
        self.last_time = now
        if self.enabled:
            log.info("step %d/%d | loss %.4f | lr %.3e | tau %.5f | target_std %.3f | pred_std %.3f | pos_share %s | "
                     "%.1f samples/s | %.0f tokens/s | %.3f TFLOP/s (%.3f per device)%s",
                     step, total_steps, rec["loss"], rec["lr"], rec["tau"], rec["target_std"], rec["prediction_std"],
                     "n/a" if rec["position_share"] is None else f"{rec['position_share']:.3f}",
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
