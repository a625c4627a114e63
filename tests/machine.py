"""Run a script or module as if on another kind of machine: ``python -m machine [-m] TARGET ARGS...``.

The machine is read from the environment, so that ``conftest.torchrun(..., machine=...)`` can put every
rank on it:

- ``D2V_MACHINE_CPU_FP16=0``: a CPU whose oneDNN has no fp16 (e.g. a Xeon with AVX-512 but no
  AVX512-FP16/AMX, or an AMD EPYC). DeepSpeed's CPU accelerator then answers ``is_fp16_supported()`` with
  None, which changes what ``deepspeed.zero.Init`` builds. ``=1``: a CPU whose oneDNN has fp16.
- unset: whatever this machine is.

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


def apply_from_environment() -> None:
    fp16 = os.environ.get("D2V_MACHINE_CPU_FP16")
    if fp16 is not None:
        force_cpu_fp16(fp16 == "1")


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
