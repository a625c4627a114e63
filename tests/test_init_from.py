"""Strict warm starts (issue 27, item 2): init.from maps every backbone parameter or is refused before any process
group, naming what is missing or unused; transformers' task models are understood; init.weights is honoured or
refused for every source; init.strict=false loads what matches."""

from __future__ import annotations

from argparse import Namespace

import pytest
import torch

from conftest import ROOT
from pipeline.config import ConfigError
from pipeline.experiment import load_experiment
from pipeline.train import prepare
from pipeline.warm_start import source_state

transformers = pytest.importorskip("transformers")
TINY = str(ROOT / "configs/vision_tiny.yaml")


def prepared(monkeypatch, tmp_path, shards, *overrides):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.chdir(ROOT)
    args = [f"data.manifest={shards}", f"train.output_dir={tmp_path / 'out'}", *overrides]
    return prepare(Namespace(config=TINY, overrides=args, resume=None, no_resume=False))


def save_hf_model(directory, model_class="Data2VecVisionForImageClassification", drop=(), extra=None,
                  mean_pooling=False):
    """A transformers model of vision_tiny's architecture saved as an HF directory, optionally without the tensors
    whose names contain one of ``drop`` or with ``extra`` tensors."""
    from safetensors.torch import load_file, save_file

    from pipeline import hf
    cfg = load_experiment(TINY)
    config = hf.hf_config(cfg)
    config.num_labels = 3
    config.use_mean_pooling = mean_pooling
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config)
    model.save_pretrained(directory)
    state = load_file(str(directory / "model.safetensors"))
    state = {k: v for k, v in state.items() if not any(d in k for d in drop)}
    save_file({**state, **(extra or {})}, str(directory / "model.safetensors"))
    return model


def test_an_hf_task_model_starts_its_backbone(monkeypatch, tmp_path, tiny_shards):
    """Data2VecVisionForImageClassification.save_pretrained: every key has the data2vec_vision. prefix (before, it
    passed every check and trained from random weights, rc 0). Its backbone is taken, its classifier left out."""
    model = save_hf_model(tmp_path / "task")
    prepared(monkeypatch, tmp_path, tiny_shards, f"init.from={tmp_path / 'task'}")
    cfg = load_experiment(TINY, [f"init.from={tmp_path / 'task'}"])
    ours = source_state(cfg, 0)
    from pipeline import hf
    theirs = model.data2vec_vision.state_dict()
    names = hf.name_map(cfg)
    assert len(ours) == len(names) > 0
    for name, hf_name in names.items():
        assert torch.equal(ours[f"backbone.{name}"], theirs[hf_name]), name


def test_a_mean_pooling_task_model_starts_all_but_the_final_norm(monkeypatch, tmp_path, tiny_shards):
    """use_mean_pooling=True (BEiT fine-tuning, the released -ft1k models): the final LayerNorm is the pooler's, which
    a data2vec backbone has not; it is left out and ours keeps its initialisation, as BEiT's fc_norm starts fresh."""
    save_hf_model(tmp_path / "pooled", mean_pooling=True)
    prepared(monkeypatch, tmp_path, tiny_shards, f"init.from={tmp_path / 'pooled'}")
    cfg = load_experiment(TINY, [f"init.from={tmp_path / 'pooled'}"])
    from pipeline import hf
    absent = {f"backbone.{ours}" for ours, theirs in hf.name_map(cfg).items() if theirs.startswith("layernorm.")}
    assert len(absent) == 2 and set(source_state(cfg, 0)) == {f"backbone.{n}" for n in hf.name_map(cfg)} - absent


@pytest.mark.parametrize("drop, extra, message", [
    (("encoder.layer.1.",), None, r"parameter\(s\) missing \['encoder.layer.1."),
    ((), {"encoder.layer.9.attention.output.dense.weight": torch.zeros(2, 2)},
     r"1 unexpected \['encoder.layer.9.attention.output.dense.weight'\]"),
])
def test_partial_or_foreign_hf_weights_are_refused_before_launch(monkeypatch, tmp_path, tiny_shards, drop, extra,
                                                                  message):
    """A safetensors file missing a whole block (before: that block stayed random) or holding tensors this model
    has not (before: dropped without a word). init.strict=false accepts them."""
    save_hf_model(tmp_path / "hf", "Data2VecVisionModel", drop, extra)
    with pytest.raises(ConfigError, match=message):
        prepared(monkeypatch, tmp_path, tiny_shards, f"init.from={tmp_path / 'hf'}")
    prepared(monkeypatch, tmp_path, tiny_shards, f"init.from={tmp_path / 'hf'}", "init.strict=false")


def test_init_weights_teacher_is_refused_for_an_hf_directory(monkeypatch, tmp_path, tiny_shards):
    """Before: silently ignored (the directory's weights were loaded as if init.weights=student)."""
    save_hf_model(tmp_path / "hf", "Data2VecVisionModel")
    with pytest.raises(ConfigError, match="init.weights=teacher applies to .pt exports"):
        prepared(monkeypatch, tmp_path, tiny_shards, f"init.from={tmp_path / 'hf'}", "init.weights=teacher")


def test_a_pt_export_of_another_modality_or_without_the_weights_is_refused_before_launch(monkeypatch, tmp_path,
                                                                                          tiny_shards):
    torch.save({"student": {"backbone.x": torch.zeros(1)}, "config": {"modality": "speech"}}, tmp_path / "speech.pt")
    with pytest.raises(ConfigError, match="is a speech model; this run is modality=vision"):
        prepared(monkeypatch, tmp_path, tiny_shards, f"init.from={tmp_path / 'speech.pt'}")
    with pytest.raises(ConfigError, match="holds no 'teacher' weights"):
        prepared(monkeypatch, tmp_path, tiny_shards, f"init.from={tmp_path / 'speech.pt'}", "init.weights=teacher")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read as a .pt export"):
        prepared(monkeypatch, tmp_path, tiny_shards, f"init.from={tmp_path / 'garbage.pt'}")
