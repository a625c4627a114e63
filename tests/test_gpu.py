"""The GPU path: bf16 student, fp32 EMA teacher, NCCL, a CUDA device. Skipped (with the reason) without a GPU,
so the first machine with one runs these unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT, torchrun

NO_GPU = "needs a CUDA GPU; this machine has none (torch.cuda.is_available() is False)"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)]


def test_device_choice_is_bf16_nccl_cuda():
    from pipeline.distributed import choose_device
    choice = choose_device("auto")
    assert (choice.device_type, choice.dtype, choice.backend) == ("cuda", torch.bfloat16, "nccl")


def test_gpu_training_bf16_student_fp32_teacher(tiny_shards, tmp_path):
    """One GPU rank (or as many as the machine has, up to 2): loss falls, teacher partitions stay fp32."""
    nproc = min(2, torch.cuda.device_count())
    report = tmp_path / "gpu.json"
    proc = torchrun([str(ROOT / "tests/dist/gpu_check.py"), str(report), str(tiny_shards)], nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(report.read_text())
    assert r["device"].startswith("cuda") and r["backend"] == "nccl"
    assert r["student_dtype"] == "torch.bfloat16"
    assert set(r["teacher_dtypes"]) == {"torch.float32"}
    assert r["losses"][-1] < r["losses"][0]
    assert r["teacher_moved"] > 0
