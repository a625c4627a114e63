"""The GPU path: bf16 student, fp32 EMA teacher, NCCL, a CUDA device. Skipped (with the reason) without a GPU,
so the first machine with one runs these unchanged."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import ROOT, torchrun

NO_GPU = "needs a CUDA GPU; this machine has none (torch.cuda.is_available() is False)"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)]


def test_device_choice_is_bf16_nccl_cuda():
    from pipeline.distributed import choose_device
    choice = choose_device("auto")
    assert (choice.device_type, choice.dtype, choice.backend) == ("cuda", torch.bfloat16, "nccl")


@pytest.mark.parametrize("teacher", ["reference", "autocast"])
def test_gpu_training_bf16_student_fp32_teacher(teacher, tiny_shards, tmp_path):
    """One GPU rank (or as many as the machine has, up to 2): loss falls; the teacher's EMA state is fp32, and
    the partitions its forward gathers are bf16 where it computes under autocast, else fp32 (vision v1: fp32, as
    the release; README, the sharded teacher)."""
    nproc = min(2, torch.cuda.device_count())
    report = tmp_path / "gpu.json"
    proc = torchrun([str(ROOT / "tests/dist/gpu_check.py"), str(report), str(tiny_shards),
                     f"train.teacher_precision={teacher}"], nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(report.read_text())
    assert r["device"].startswith("cuda") and r["backend"] == "nccl"
    assert r["student_dtype"] == "torch.bfloat16"
    assert set(r["teacher_dtypes"]) == {"torch.float32"}
    assert r["teacher_autocast"] == (teacher == "autocast")
    assert set(r["teacher_gathered_dtypes"]) == {"torch.bfloat16" if r["teacher_autocast"] else "torch.float32"}
    assert r["losses"][-1] < r["losses"][0]
    assert r["teacher_moved"] > 0


def run_entry_point(preset: str, shards, out, steps: int, extra=()):
    proc = torchrun(["-m", "pipeline.train", "--config", f"configs/{preset}.yaml", f"data.manifest={shards}",
                     f"train.output_dir={out}", f"train.steps={steps}", "train.log_every=1", "train.save_every=2",
                     "train.micro_batch_size=4", "data.workers=1", *extra], nproc=1, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(out) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("modality", ["vision", "speech", "text"])
def test_gpu_entry_point_checkpoint_and_resume(modality, tiny_shards, tiny_audio_shards, tiny_text_shards, tmp_path):
    """The real entry point on one GPU per modality: bf16 steps, a checkpoint, a resume from it that goes on as an
    uninterrupted run does (to bf16 kernel noise), and the saved checkpoint loads into pipeline.evaluate's backbone."""
    shards = {"vision": tiny_shards, "speech": tiny_audio_shards, "text": tiny_text_shards}[modality]
    full, split = tmp_path / "full", tmp_path / "split"
    first = run_entry_point(f"{modality}_tiny", shards, full, 4)
    assert "device=cuda" in first.stdout and "dtype=bfloat16" in first.stdout
    run_entry_point(f"{modality}_tiny", shards, split, 4, ["train.stop_after=2"])
    assert "resumed from" in run_entry_point(f"{modality}_tiny", shards, split, 4).stdout
    a, b = losses(full), losses(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert abs(a[step] - b[step]) <= 0.02 * abs(a[step]) + 1e-4, (step, a[step], b[step])
    from pipeline.features import load_backbone
    cfg, model = load_backbone(split / "checkpoints/step_00000004", "teacher")
    assert cfg.modality == modality and sum(p.numel() for p in model.parameters()) > 0


def test_gpu_layerdrop(tiny_shards, tmp_path):
    """Layerdrop on GPU: skipped blocks' gradients are cleared, the loss stays finite over a few steps."""
    run_entry_point("vision_tiny", tiny_shards, tmp_path, 4, ["encoder.layerdrop=0.5"])
    assert all(math.isfinite(v) for v in losses(tmp_path).values())


def test_gpu_one_visible_device_with_local_rank_1(tiny_shards, tmp_path):
    """As srun --gpus-per-task=1 starts a node's second task: LOCAL_RANK=1 (SLURM_LOCALID) and one visible device.
    The rank binds device 0 and names it in LOCAL_RANK for DeepSpeed; before, it died with 'invalid device ordinal'
    (tests/test_gpu_path.py forces the same on a CPU)."""
    import os
    import subprocess
    import sys

    from pipeline.distributed import free_port, source_tree_env
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    env = source_tree_env(ROOT, RANK="0", WORLD_SIZE="1", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2",
                          CUDA_VISIBLE_DEVICES=first, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", "configs/vision_tiny.yaml",
                           f"data.manifest={tiny_shards}", f"train.output_dir={tmp_path}", "train.steps=2",
                           "train.micro_batch_size=4", "data.workers=1"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "device=cuda:0" in proc.stdout


def test_gpu_feature_monitor_on_vision(tiny_shards, tmp_path):
    """eval.every=1 on a GPU: the monitor pools features on the device (a CPU tensor there raised at the first
    evaluation, on every rank of a vision or speech run)."""
    run_entry_point("vision_tiny", tiny_shards, tmp_path, 2,
                    ["eval.every=1", f"eval.train=[{tiny_shards}]", f"eval.eval=[{tiny_shards.parent / 'raw'}]",
                     "eval.batch_size=5", "eval.probe=both"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/knn_top1" in r] == [1, 2]
    assert all(0 <= r["eval/linear_top1"] <= 1 for r in records if "eval/linear_top1" in r)


def test_gpu_sincos_positions_exact_under_bf16_zero_init(single_process_group, monkeypatch):
    """data2vec 2.0's sin-cos table built under a bf16 zero.Init on the GPU, as the trainer builds it: fp32, on the
    device, within fp32 rounding of the exact table (built in bf16 arithmetic it was 1.1e-2 off)."""
    import deepspeed

    from pipeline.distributed import skip_shm_comm_build
    from pipeline.modalities.vision import sincos_positions, sincos_table
    monkeypatch.setenv("LOCAL_RANK", "0")
    skip_shm_comm_build()
    config = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
    with deepspeed.zero.Init(config_dict_or_path=config):
        table = sincos_positions(768, 14)
    exact = torch.from_numpy(sincos_table(768, 14))
    error = (table.double().cpu() - exact).abs().max().item()
    print(f"sin-cos table under bf16 zero.Init on {table.device}: max error {error:.3g}")
    assert table.device.type == "cuda" and table.dtype == torch.float32 and error < 1e-6
