"""A text model's tokenizer is recorded and checked (issue 27, item 4): every text checkpoint and export records the
shards' sentencepiece model (sha256, size, special ids) and carries the model; resume, init.from, embed, evaluate and
export refuse another model of the same vocabulary size with one line naming both; model.*_id must be the shards'."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from pipeline.distributed import source_tree_env
from pipeline import vocab


TRAIN = ["--config", "configs/text_tiny.yaml", "model.vocab_size=1000", "data.workers=0", "train.micro_batch_size=2",
         "train.steps=2", "train.save_every=2", "train.log_every=1"]


def call(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args`` as its ``main`` in this process (no interpreter start-up to pay): exit code,
    stdout and stderr. For runs that stop before any process group (pipeline.train is kept from starting one)."""
    import contextlib
    import importlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = importlib.import_module(module).main(list(args))
    return subprocess.CompletedProcess([module, *args], rc, out.getvalue(), err.getvalue())


@pytest.fixture
def refused(monkeypatch):
    """pipeline.train in this process, which must refuse before any process group."""
    from pipeline import distributed
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(distributed, "init_runtime", lambda *a, **k: pytest.fail("a process group was started"))

    def train(shards: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
        return call("pipeline.train", *TRAIN, f"data.manifest={shards}", f"train.output_dir={out}", *extra)
    return train


@pytest.fixture(scope="module")
def other_shards(tiny_text_shards, tmp_path_factory) -> Path:
    """The same documents under another sentencepiece model of the same size (unigram, where the first is BPE)."""
    from data_prep import text
    out = tmp_path_factory.mktemp("other_text") / "shards"
    raw = tiny_text_shards.parent / "raw"
    text.main(["--input", str(raw), "--output", str(out), "--vocab-size", "1000", "--block-size", "64",
               "--shard-size", "100", "--model-type", "unigram", "--quiet"])
    return out


@pytest.fixture(scope="module")
def trained(tiny_text_shards, tmp_path_factory) -> Path:
    """A text run of two steps on the first shards: its checkpoint directory."""
    out = tmp_path_factory.mktemp("text_run")
    env = source_tree_env(ROOT, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", *TRAIN, f"data.manifest={tiny_text_shards}",
                           f"train.output_dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "checkpoints" / "step_00000002"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_naming_both(proc: subprocess.CompletedProcess, first: str, second: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert first[:12] in lines[0] and second[:12] in lines[0], lines[0]
    return lines[0]


def test_the_two_models_differ_only_in_their_pieces(tiny_text_shards, other_shards):
    """The premise: the same vocabulary size and special ids, so only the identity can tell them apart."""
    a, b = vocab.of_model_file(tiny_text_shards / "spm.model"), vocab.of_model_file(other_shards / "spm.model")
    assert a.vocab_size == b.vocab_size == 1000 and a.special_ids == b.special_ids == vocab.FIXED_IDS
    assert a.sha256 != b.sha256
    assert vocab.of_manifest(json.loads((tiny_text_shards / "manifest.json").read_text()), "m") == a


def test_a_text_checkpoint_records_and_carries_its_tokenizer(trained, tiny_text_shards):
    recorded = json.loads((trained / vocab.IDENTITY_FILE).read_text())
    assert recorded["sha256"] == sha256(tiny_text_shards / "spm.model")
    assert recorded["special_ids"] == vocab.FIXED_IDS and recorded["vocab_size"] == 1000
    assert sha256(trained / vocab.MODEL_FILE) == recorded["sha256"]


def test_resume_on_shards_of_another_tokenizer_is_refused(trained, tiny_text_shards, other_shards, refused):
    proc = refused(other_shards, trained.parent.parent, "train.steps=4")
    line = one_line_naming_both(proc, sha256(tiny_text_shards / "spm.model"), sha256(other_shards / "spm.model"))
    assert f"checkpoint {trained}" in line and str(other_shards) in line


def test_init_from_an_export_of_another_tokenizer_is_refused(trained, tiny_text_shards, other_shards, tmp_path,
                                                            refused):
    export = tmp_path / "run.pt"
    done = call("pipeline.export", str(trained), "--output", str(export))
    assert done.returncode == 0, done.stderr[-2000:]
    proc = refused(other_shards, tmp_path / "warm", f"init.from={export}")
    line = one_line_naming_both(proc, sha256(tiny_text_shards / "spm.model"), sha256(other_shards / "spm.model"))
    assert f"init.from={export}" in line and "--spm-model" in line
    hf_dir = tmp_path / "hf"
    done = call("pipeline.export", str(trained), "--format", "hf", "--output", str(hf_dir))
    assert done.returncode == 0, done.stderr[-2000:]
    proc = refused(other_shards, tmp_path / "warm_hf", f"init.from={hf_dir}")
    one_line_naming_both(proc, sha256(tiny_text_shards / "spm.model"), sha256(other_shards / "spm.model"))


def test_export_ships_the_checkpoints_own_tokenizer_and_refuses_another(trained, tiny_text_shards, other_shards,
                                                                     tmp_path):
    # the shards' spm.model replaced after training (re-made data): the export still ships the trained one
    data = tmp_path / "data"
    shutil.copytree(tiny_text_shards, data)
    shutil.copy(other_shards / "spm.model", data / "spm.model")
    moved = tmp_path / "ckpt"
    shutil.copytree(trained, moved)
    config = json.loads((moved / "config.json").read_text())
    config["data"]["manifest"] = str(data)
    (moved / "config.json").write_text(json.dumps(config))
    hf_dir = tmp_path / "hf"
    done = call("pipeline.export", str(moved), "--format", "hf", "--output", str(hf_dir))
    assert done.returncode == 0, done.stderr[-2000:]
    assert sha256(vocab.shipped_model(hf_dir)) == sha256(tiny_text_shards / "spm.model")
    proc = call("pipeline.export", str(moved), "--format", "hf", "--output", str(tmp_path / "hf2"),
                "--spm-model", str(other_shards / "spm.model"))
    one_line_naming_both(proc, sha256(tiny_text_shards / "spm.model"), sha256(other_shards / "spm.model"))
    # and a checkpoint without its copy (made before copies were kept) takes the one beside data.manifest: compared
    (moved / vocab.MODEL_FILE).unlink()
    proc = call("pipeline.export", str(moved), "--format", "hf", "--output", str(tmp_path / "hf3"))
    one_line_naming_both(proc, sha256(tiny_text_shards / "spm.model"), sha256(other_shards / "spm.model"))


def test_embed_and_evaluate_refuse_inputs_of_another_tokenizer(trained, tiny_text_shards, other_shards, tmp_path):
    first, second = sha256(tiny_text_shards / "spm.model"), sha256(other_shards / "spm.model")
    text = tmp_path / "lines.jsonl"
    text.write_text("".join(json.dumps({"text": f"line {i} of text", "label": str(i % 2)}) + "\n" for i in range(6)))
    out = tmp_path / "f.npz"
    proc = call("pipeline.embed", str(trained), "--input", str(text), "--output", str(out), "--quiet",
                "--spm-model", str(other_shards / "spm.model"))
    one_line_naming_both(proc, first, second)
    proc = call("pipeline.embed", str(trained), "--input", str(other_shards), "--output", str(out), "--quiet")
    one_line_naming_both(proc, first, second)
    proc = call("pipeline.evaluate", str(trained), "--train", str(text), "--eval", str(text), "--quiet",
                "--spm-model", str(other_shards / "spm.model"))
    one_line_naming_both(proc, first, second)
    done = call("pipeline.embed", str(trained), "--input", str(text), "--output", str(out), "--quiet")  # its own
    assert done.returncode == 0 and out.is_file(), done.stderr[-2000:]


def test_eval_inputs_of_another_tokenizer_are_refused_before_launch(tiny_text_shards, other_shards, tmp_path,
                                                                    refused):
    proc = refused(tiny_text_shards, tmp_path / "run", "eval.every=1", f"eval.train=[{other_shards}]",
                 f"eval.eval=[{other_shards}]")
    one_line_naming_both(proc, sha256(other_shards / "spm.model"), sha256(tiny_text_shards / "spm.model"))


def test_special_ids_other_than_the_shards_are_refused(tiny_text_shards, tmp_path, refused):
    proc = refused(tiny_text_shards, tmp_path / "run", "model.mask_id=5")
    assert proc.returncode == 2 and "model.mask_id=5 but the tokenizer's mask is 4: set model.mask_id=4" in \
        proc.stderr, proc.stderr[-2000:]


def test_a_manifest_whose_model_was_replaced_is_refused(tiny_text_shards, other_shards, tmp_path, refused):
    data = tmp_path / "data"
    shutil.copytree(tiny_text_shards, data)
    shutil.copy(other_shards / "spm.model", data / "spm.model")
    proc = refused(data, tmp_path / "run")
    line = one_line_naming_both(proc, sha256(tiny_text_shards / "spm.model"), sha256(other_shards / "spm.model"))
    assert "re-run data_prep.text" in line
