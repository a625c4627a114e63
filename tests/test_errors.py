"""Bad input gets a clear error (exit 2, a message saying what to change), before any process group."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from argparse import Namespace

import pytest

from conftest import ROOT
from pipeline.config import ConfigError
from pipeline.train import prepare

TINY = str(ROOT / "configs/vision_tiny.yaml")
NO_CHECKPOINTS = tempfile.mkdtemp(prefix="d2v-test-output-")


def run_prepare(monkeypatch, overrides, world_size=2, resume=None, no_resume=False):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.chdir(ROOT)
    overrides = [f"train.output_dir={NO_CHECKPOINTS}", *overrides]  # not the preset's runs/ directory
    return prepare(Namespace(config=TINY, overrides=overrides, resume=resume, no_resume=no_resume))


def test_valid_setup_passes(monkeypatch, tiny_shards):
    cfg, choice, ds, shards, env = run_prepare(monkeypatch, [f"data.manifest={tiny_shards}"])
    assert len(shards) == 8 and env.world_size == 2


@pytest.mark.parametrize("overrides, world, message", [
    (["data.manifest=/no/such/dir"], 2, "does not exist"),
    (["data.manifest="], 2, "data.manifest is empty"),
    (["data.workers=8"], 2, "need at least 16"),
    (["parallel.tp=2", "encoder.heads=4"], 3, "world size 3 is not divisible by parallel.tp=2"),
    (["parallel.tp=3"], 3, "encoder.heads=4 is not divisible by parallel.tp=3"),
    (["parallel.shard=3", "data.workers=1"], 4, "parallel.shard=3 does not divide the data-parallel size 4"),
    (["parallel.shard=-1"], 2, "parallel.shard=-1 must be >= 0"),
    (["train.setps=3"], 2, "unknown config key 'train.setps'. Did you mean 'train.steps'"),
    (["objective.top_k=9"], 2, "objective.top_k=9 exceeds encoder.depth=4"),
    (["train.precision=bf16"], 2, "needs a GPU"),
    (["train.ds_config=/no/such.json"], 2, "does not exist"),
    (["collapse.action=skip", "train.grad_accum=2"], 2, "collapse.action=skip skips whole optimizer steps"),
    (["collapse.max_position_share=0"], 2, "collapse.max_position_share must be in (0, 1]"),
    (["eval.every=100"], 2, "eval.every=100 needs labelled inputs: set eval.train"),
    (["eval.every=100", "eval.train=[/no/such/dir]", "eval.eval=[/no/such/dir]"], 2,
     "eval input /no/such/dir does not exist (eval.train / eval.eval)"),
    (["eval.probe=svm"], 2, "eval.probe='svm' is not valid; choose one of 'knn', 'both'"),
    (["parallel.timeout_s=10"], 2, "parallel.timeout_s=10 must be >= 60"),
    (["train.check_consistency_every=-1"], 2, "train.check_consistency_every must be >= 0"),
])
def test_bad_setup_is_rejected(monkeypatch, tiny_shards, overrides, world, message):
    overrides = [f"data.manifest={tiny_shards}", *overrides] if not overrides[0].startswith("data.manifest") else overrides
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        run_prepare(monkeypatch, overrides, world)


def test_zero_offload_with_hybrid_sharding_is_rejected_before_any_process_group(monkeypatch, tiny_shards, tmp_path):
    """DeepSpeed's offload_optimizer copies gradients to the host before the replicas' all-reduce could run."""
    ds = json.loads((ROOT / "ds_configs/zero3.json").read_text())
    ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    (tmp_path / "offload.json").write_text(json.dumps(ds))
    args = [f"data.manifest={tiny_shards}", f"train.ds_config={tmp_path / 'offload.json'}", "data.workers=1"]
    with pytest.raises(ConfigError, match=r"offload_optimizer \(device cpu\) with parallel\.shard"):
        run_prepare(monkeypatch, [*args, "parallel.shard=1"])
    run_prepare(monkeypatch, args)  # plain ZeRO-3: DeepSpeed's own offload path


def test_a_recursive_yaml_anchor_is_one_line(tmp_path):
    from pipeline.experiment import load_experiment
    (tmp_path / "loop.yaml").write_text("modality: vision\ntrain: &t {again: *t}\n")
    with pytest.raises(ConfigError, match="an anchor refers to itself"):
        load_experiment(tmp_path / "loop.yaml")


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    from pipeline.checkpoint import atomic_write

    def full_disk(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        atomic_write(tmp_path / "d2v_rank00000.pt", full_disk)
    assert list(tmp_path.iterdir()) == []


def test_unresumable_checkpoint_is_rejected_before_any_process_group(monkeypatch, tiny_shards, tmp_path):
    ckpt = tmp_path / "checkpoints/step_00000004"
    ckpt.mkdir(parents=True)
    args = [f"data.manifest={tiny_shards}", f"train.output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        run_prepare(monkeypatch, args, resume=str(ckpt))
    (ckpt / "COMPLETE").write_text(json.dumps({"step": 4, "world_size": 4, "tp": 2, "dp": 2,
                                               "grid": [[0, 0], [1, 0], [0, 1], [1, 1]]}))
    with pytest.raises(ConfigError, match=r"tensor parallel size 2; this job has parallel\.tp=1\. Resume with "
                                          r"parallel\.tp=2 \(any number of data-parallel ranks\)"):
        run_prepare(monkeypatch, args)  # found as the latest checkpoint: resuming is the default
    run_prepare(monkeypatch, [*args, "parallel.tp=2", "encoder.heads=4"])  # any DP size with the same TP
    with pytest.raises(ConfigError, match=r"--no-resume: .* already holds checkpoints of another run \(latest "
                                          r"step_00000004\); a fresh run there would mix with them"):
        run_prepare(monkeypatch, args, no_resume=True)


def test_empty_shard_list(monkeypatch, tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"format": 1, "modality": "image", "name": "images", "shards": [], "totals": {}, "params": {}, "skipped": []}))
    with pytest.raises(ConfigError, match="lists no shards"):
        run_prepare(monkeypatch, [f"data.manifest={tmp_path}"])


def test_deepspeed_batch_contradiction(monkeypatch, tiny_shards, tmp_path):
    ds = json.loads((ROOT / "ds_configs/zero3.json").read_text())
    ds["train_batch_size"] = 999
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match=r"train_batch_size=999 but the experiment needs 32"):
        run_prepare(monkeypatch, [f"data.manifest={tiny_shards}", f"train.ds_config={tmp_path / 'ds.json'}"])
    ds.pop("train_batch_size")
    ds["optimizer"] = {"type": "AdamW"}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match="'optimizer' section"):
        run_prepare(monkeypatch, [f"data.manifest={tiny_shards}", f"train.ds_config={tmp_path / 'ds.json'}"])


def test_cli_error_is_one_clear_line_not_a_traceback(tiny_shards):
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", TINY, f"data.manifest={tiny_shards}",
                           "data.workers=64"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "WORLD_SIZE": "2", "RANK": "0", "HOME": "/tmp"})
    assert proc.returncode == 2
    assert "error: 8 shard(s) for 2 data-parallel rank(s) x 64 worker(s): need at least 128" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("module", ["pipeline.train", "pipeline.demo", "data_prep.images"])
def test_help(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "usage" in proc.stdout


def test_shards_of_another_modality_or_tokenizer_are_rejected(monkeypatch, tiny_shards, tiny_text_shards):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.chdir(ROOT)
    text = str(ROOT / "configs/text_tiny.yaml")
    with pytest.raises(ConfigError, match="holds 'image' shards but modality=text trains on 'text' shards"):
        prepare(Namespace(config=text, overrides=[f"data.manifest={tiny_shards}"], resume=None))
    with pytest.raises(ConfigError, match="has 1000 pieces but model.vocab_size=2000: set model.vocab_size=1000"):
        prepare(Namespace(config=text, overrides=[f"data.manifest={tiny_text_shards}", "model.vocab_size=2000"],
                          resume=None))
    prepare(Namespace(config=text, overrides=[f"data.manifest={tiny_text_shards}"], resume=None))
