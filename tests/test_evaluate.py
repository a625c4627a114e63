"""pipeline.embed and pipeline.evaluate on tiny models of each modality, and the probes against hand-made cases."""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from conftest import ROOT
from pipeline.distributed import model_parallel_config
from pipeline.experiment import experiment_dict, load_experiment
from pipeline.model.data2vec import Backbone, Student
from pipeline.probes import choose_l2, knn_top1, linear_top1


def tiny_export(tmp_path, modality: str, overrides=()) -> str:
    """A --format pt export of a randomly initialised tiny model (what python -m pipeline.export writes)."""
    cfg = load_experiment(ROOT / f"configs/{modality}_tiny.yaml", list(overrides))
    torch.manual_seed(1)
    student = Student(cfg.make_modality(), cfg.encoder, model_parallel_config(1))
    teacher = Backbone(cfg.make_modality(), cfg.encoder, model_parallel_config(1))
    path = tmp_path / f"{modality}.pt"
    torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(), "config": experiment_dict(cfg),
                "step": 0}, path)
    return str(path)


def run(main, argv, capsys) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_knn_is_dinos_weighted_vote():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.8, 0.6]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    query = torch.tensor([[0.8, 0.55]])  # nearest is the class-1 point at (0.8, 0.6), but class 0 has two close ones
    sims = torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    weight = [sum(math.exp(sims[0, i].item() / 0.07) for i in range(5) if labels[i] == c) for c in (0, 1)]
    want = int(np.argmax(weight))
    assert knn_top1(train, labels, query, torch.tensor([want]), k=5) == 1.0
    assert knn_top1(train, labels, query, torch.tensor([1 - want]), k=5) == 0.0
    assert knn_top1(train, labels, query, torch.tensor([1]), k=1) == 1.0  # k=1: the single nearest


def test_linear_probe_separates_and_chooses_its_penalty_on_the_train_split_only():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=gen) * 3
    y = torch.arange(3).repeat(40)
    x = centres[y] + torch.randn(len(y), 16, generator=gen)
    result = linear_top1(x[:90], y[:90], x[90:], y[90:])
    assert result["top1"] == 1.0
    scrambled = y[90:][torch.randperm(30, generator=gen)]  # eval labels never reach the choice of L2
    assert linear_top1(x[:90], y[:90], x[90:], scrambled)["l2"] == result["l2"] == choose_l2(x[:90], y[:90], 3)


def test_vision_embed_and_evaluate(tmp_path, capsys):
    from pipeline import embed, evaluate
    from pipeline.demo import make_images
    ckpt = tiny_export(tmp_path, "vision")
    train, test = make_images(tmp_path / "train", count=24, size=40, seed=0), make_images(tmp_path / "eval", 12, 40, 1)
    out = tmp_path / "f.npz"
    assert embed.main([ckpt, "--input", str(train), "--output", str(out), "--layers", "--quiet"]) == 0
    found = np.load(out)
    assert found["features"].shape == (24, 64) and found["layers"].shape == (24, 5, 64)
    assert np.allclose(found["layers"][:, -1], found["features"])
    assert sorted(set(found["labels"])) == sorted({p.parent.name for p in train.rglob("*.png")} |
                                                  {p.parent.name for p in train.rglob("*.jpg")})
    result = run(evaluate.main, [ckpt, "--train", str(train), "--eval", str(test), "--json", "--quiet"], capsys)
    assert result["n_train"] == 24 and result["n_eval"] == 12 and result["classes"] >= 2
    assert 0 <= result["linear_top1"] <= 1 and 0 <= result["knn_top1"] <= 1
    baseline = run(evaluate.main, [ckpt, "--train", str(train), "--eval", str(test), "--json", "--quiet",
                                   "--random-init", "--probe", "knn"], capsys)
    assert baseline["weights"] == "random_init" and "linear_top1" not in baseline


def test_speech_evaluate_from_class_folders_at_any_rate(tmp_path, capsys):
    from pipeline import evaluate
    from pipeline.demo import make_clips
    ckpt = tiny_export(tmp_path, "speech")
    train, test = make_clips(tmp_path / "train", count=12, seed=0), make_clips(tmp_path / "eval", count=8, seed=1)
    result = run(evaluate.main, [ckpt, "--train", str(train), "--eval", str(test), "--json", "--quiet",
                                 "--weights", "teacher"], capsys)
    assert (result["n_train"], result["n_eval"], result["classes"]) == (12, 8, 4)  # speaker0..3, 16/22.05/44.1 kHz


def topic_jsonl(path, n: int):
    """``n`` jsonl records of two alternating topics (field "topic"); returns ``path``."""
    with open(path, "w") as f:
        for i in range(n):
            topic = ("files and paths", "numbers and math")[i % 2]
            f.write(json.dumps({"text": f"example {i} about {topic}", "topic": topic}) + "\n")
    return path


def test_text_evaluate_from_jsonl_labels(tmp_path, tiny_text_shards, capsys):
    from pipeline import evaluate
    ckpt = tiny_export(tmp_path, "text", [f"data.manifest={tiny_text_shards}"])  # spm.model found next to it
    for split, n in (("train", 20), ("eval", 10)):
        topic_jsonl(tmp_path / f"{split}.jsonl", n)
    result = run(evaluate.main, [ckpt, "--train", str(tmp_path / "train.jsonl"), "--eval", str(tmp_path / "eval.jsonl"),
                                 "--label-field", "topic", "--json", "--quiet"], capsys)
    assert (result["n_train"], result["n_eval"], result["classes"]) == (20, 10, 2)


def test_speech_evaluate_from_labelled_shards(tmp_path, capsys):
    """data_prep.audio --layout classes shards: every clip labelled by its speaker folder."""
    from data_prep import audio
    from pipeline import evaluate
    from pipeline.demo import make_clips
    ckpt = tiny_export(tmp_path, "speech")
    for split, count, seed in (("train", 12, 0), ("eval", 8, 1)):
        raw = make_clips(tmp_path / split, count=count, seed=seed)
        audio.main(["--input", str(raw), "--output", str(tmp_path / f"{split}_shards"), "--layout", "classes",
                    "--quiet"])
    result = run(evaluate.main, [ckpt, "--train", str(tmp_path / "train_shards"), "--eval",
                                 str(tmp_path / "eval_shards"), "--json", "--quiet"], capsys)
    assert (result["n_train"], result["n_eval"], result["classes"]) == (12, 8, 4)


def test_text_evaluate_from_labelled_shards(tmp_path, tiny_text_shards, capsys):
    """data_prep.text --label-field shards, tokenized with the run's own sentencepiece model."""
    from data_prep import text
    from pipeline import evaluate
    ckpt = tiny_export(tmp_path, "text", [f"data.manifest={tiny_text_shards}"])
    for split, n in (("train", 20), ("eval", 10)):
        text.main(["--input", str(topic_jsonl(tmp_path / f"{split}.jsonl", n)), "--output", str(tmp_path / split),
                   "--spm-model", str(tiny_text_shards / "spm.model"), "--block-size", "64", "--break-mode",
                   "complete_doc", "--label-field", "topic", "--quiet"])
    result = run(evaluate.main, [ckpt, "--train", str(tmp_path / "train"), "--eval", str(tmp_path / "eval"),
                                 "--json", "--quiet"], capsys)
    assert (result["n_train"], result["n_eval"], result["classes"]) == (20, 10, 2)  # one block per document


def test_evaluate_says_what_is_missing(tmp_path, capsys):
    from pipeline import evaluate
    from pipeline.demo import make_images
    ckpt = tiny_export(tmp_path, "vision")
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in list(make_images(tmp_path / "src", count=4, size=40).rglob("*.png"))[:2]:
        (flat / p.name).write_bytes(p.read_bytes())
    assert evaluate.main([ckpt, "--train", str(flat), "--eval", str(flat), "--quiet"]) == 2
    assert "need labelled examples of at least 2 classes" in capsys.readouterr().err
