"""Run a script or module as if on another kind of machine: ``python -m machine [-m] TARGET ARGS...``.

The machine is read from the environment, so that ``conftest.torchrun(..., machine=...)`` can put every
rank on it:

- ``D2V_MACHINE_CPU_FP16=0``: a CPU whose oneDNN has no fp16 (e.g. a Xeon with AVX-512 but no
  AVX512-FP16/AMX, or an AMD EPYC). DeepSpeed's CPU accelerator then answers ``is_fp16_supported()`` with
  None, which changes what ``deepspeed.zero.Init`` builds. ``=1``: a CPU whose oneDNN has fp16.
- unset: whatever this machine is.
- ``D2V_FAULT_COLLATE=RANK:AFTER``: a fault, not a machine: collate raises in that rank after AFTER batches.
- ``D2V_FAULT_FLIP=RANK:STEP``: a fault: that rank flips one bit of a student partition after optimizer step STEP;
  ``D2V_FAULT_INF=RANK:STEP`` sets a value of it to inf instead.

The patch is applied before the target runs, in every rank, so the forced answer is the one every
DeepSpeed code path sees.
"""

from __future__ import annotations

import os
import runpy
import sys


def force_cpu_fp16(supported: bool) -> None:
    from deepspeed.accelerator import cpu_accelerator
    # the real method returns True, or None (not False) when oneDNN lacks fp16: mimic that exactly
    cpu_accelerator.CPU_Accelerator.is_fp16_supported = lambda self: True if supported else None


def fail_in_collate(rank: int, after: int) -> None:
    """Make the modality's collate raise in rank ``rank`` after ``after`` good batches (per DataLoader
    worker: the workers are forked with the patched class)."""
    from pipeline.modalities.base import Modality
    if int(os.environ.get("RANK", "0")) != rank:
        return
    original, calls = Modality.collate, [0]

    def collate(self, examples):
        calls[0] += 1
        if calls[0] > after:
            raise RuntimeError(f"injected fault: collate of batch {calls[0]} on rank {rank}")
        return original(self, examples)
    Modality.collate = collate


def flip_after_step(rank: int, step: int, value: float | None = None) -> None:
    """Rank ``rank`` flips the lowest bit of its first student master partition once optimizer step ``step`` is done
    (a replica that silently diverges: what train.check_consistency_every must catch), or sets its first element to
    ``value`` (inf: a weight that is no longer finite)."""
    import torch

    from pipeline.ema import zero3_master_partition
    from pipeline.trainer import Trainer
    if int(os.environ.get("RANK", "0")) != rank:
        return
    original = Trainer.optimizer_step

    def optimizer_step(self):
        out = original(self)
        if self.step == step:
            with torch.no_grad():
                part = zero3_master_partition(next(self.engine.module.parameters()))
                if value is None:
                    part.view(-1)[:1].view(torch.int32).bitwise_xor_(1)
                else:
                    part.view(-1)[0] = value
        return out
    Trainer.optimizer_step = optimizer_step


def apply_from_environment() -> None:
    fp16 = os.environ.get("D2V_MACHINE_CPU_FP16")
    if fp16 is not None:
        force_cpu_fp16(fp16 == "1")
    fault = os.environ.get("D2V_FAULT_COLLATE")  # "RANK:AFTER"
    if fault:
        rank, after = map(int, fault.split(":"))
        fail_in_collate(rank, after)
    flip = os.environ.get("D2V_FAULT_FLIP")  # "RANK:STEP"
    if flip:
        flip_after_step(*map(int, flip.split(":")))
    inf = os.environ.get("D2V_FAULT_INF")  # "RANK:STEP"
    if inf:
        flip_after_step(*map(int, inf.split(":")), value=float("inf"))


def main(argv: list[str]) -> None:
    apply_from_environment()
    if argv and argv[0] == "-m":
        module, args = argv[1], argv[2:]
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        script, args = argv[0], argv[1:]
        sys.argv = [script, *args]
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
