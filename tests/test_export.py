"""python -m pipeline.export: a TP x ZeRO-3 checkpoint consolidated on one process, without the original
world size, loads into TP=1 models that reproduce the live job's outputs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT, torchrun
from pipeline.distributed import model_parallel_config
from pipeline.experiment import build_experiment
from pipeline.model.data2vec import Backbone, Student
from pipeline.objective import teacher_targets

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("preset, shards, tp, nproc", [
    ("configs/text_tiny.yaml", "tiny_text_shards", 2, 4),  # TP 2 x DP 2: vocabulary-parallel embedding
    ("configs/vision_tiny.yaml", "tiny_shards", 2, 2),  # TP 2: heads split, relative position bias split
])
def test_consolidated_tp_zero3_checkpoint_reproduces_outputs(single_process_group, request, tmp_path, preset,
                                                             shards, tp, nproc):
    manifest = request.getfixturevalue(shards)
    proc = torchrun([str(ROOT / "tests/dist/export_check.py"), str(tmp_path), preset, str(manifest), str(tp)],
                    nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    live = torch.load(tmp_path / "outputs.pt", weights_only=True)
    out = tmp_path / "consolidated.pt"
    cli = subprocess.run([sys.executable, "-m", "pipeline.export", live["ckpt"], "-o", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    exported = torch.load(out, weights_only=True)
    cfg = build_experiment(exported["config"])
    cfg.parallel.tp = 1
    modality = cfg.make_modality()
    mp = model_parallel_config(1)
    student, teacher = Student(modality, cfg.encoder, mp).eval(), Backbone(modality, cfg.encoder, mp).eval()
    student.load_state_dict(exported["student"], strict=False)
    teacher.load_state_dict(exported["teacher"], strict=False)
    assert set(exported["student"]) == {n for n, _ in student.named_parameters()}
    assert set(exported["teacher"]) == {n for n, _ in teacher.named_parameters()}
    with torch.no_grad():
        targets = teacher_targets(teacher(live["batch"]), cfg.objective)
        predictions = student(live["batch"], live["mask"])
    torch.testing.assert_close(targets, live["targets"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(predictions, live["predictions"], rtol=1e-4, atol=1e-4)
    assert exported["step"] == 3


def test_export_rejects_an_incomplete_checkpoint(tmp_path):
    (tmp_path / "step_00000001").mkdir()
    cli = subprocess.run([sys.executable, "-m", "pipeline.export", str(tmp_path / "step_00000001"), "-o",
                          str(tmp_path / "x.pt")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "not a complete checkpoint" in cli.stderr
