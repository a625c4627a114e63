"""Tensor parallelism (TP=2 on 2 gloo CPU ranks) equals TP=1 for every modality: outputs, gradients, and
identical gradients of replicated parameters on both TP ranks. The per-rank work is tests/dist/tp_layers.py."""

from __future__ import annotations

import json
import re

import pytest

from conftest import ROOT, torchrun

pytestmark = pytest.mark.distributed

MODALITIES = ("vision", "speech", "text")
# Parameters split across TP ranks and the dim they are split on (megatron's partition_dim):
# column-parallel weight/bias on the output dim, row-parallel weight on the input dim (its bias is
# replicated), the vocabulary rows, and the vision relative position bias table by heads.
SPLIT = [(r"attn\.(query|key|value)\.(weight|bias)$", 0), (r"attn\.out\.weight$", 1),
         (r"ffn\.fc1\.(weight|bias)$", 0), (r"ffn\.fc2\.weight$", 1),
         (r"embed\.rel_pos_bias\.table$", 1), (r"embed\.tokens\.weight$", 0)]


def expected_dim(name: str) -> int | None:
    return next((dim for pattern, dim in SPLIT if re.search(pattern, name)), None)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("tp") / "tp_layers.json"
    proc = torchrun([str(ROOT / "tests/dist/tp_layers.py"), str(path)], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(path.read_text())


@pytest.mark.parametrize("kind", ["student", "teacher"])
@pytest.mark.parametrize("modality", MODALITIES)
def test_tp2_equals_tp1(report, modality, kind):
    assert report["world_size"] == 2 and report["tp"] == 2
    r = report[modality][kind]
    grads = r["grads"]

    # the layout: exactly the expected parameters are split, on the expected dim
    want_split = {n: expected_dim(n) for n in grads if expected_dim(n) is not None}
    assert r["split"] == want_split
    if modality == "vision":
        assert any(n.endswith("rel_pos_bias.table") for n in r["split"])
    if modality == "text":
        assert any(n.endswith("embed.tokens.weight") for n in r["split"])

    # (1) outputs: student predictions / teacher taps equal TP=1 to fp32 rounding, the same on both ranks
    out = r["output"]
    assert out["shape_ok"] and out["max_abs"] <= 1e-4 * max(out["scale"], 1.0), out
    assert r["output_same_on_tp_ranks"]
    oracle = r["tp1_vs_oracle"]  # the TP=1 reference itself agrees with the dense float64 oracle
    assert oracle["shape_ok"] and oracle["max_abs"] <= 1e-4 * max(oracle["scale"], 1.0), oracle

    # (2) gradients: gathered TP-split ones and replicated ones equal TP=1. Gradients that are zero in
    # exact arithmetic (key biases: softmax is shift-invariant) get a floor relative to the model's largest.
    assert r["no_grad_tp1"] == r["no_grad_tp2"]
    largest = max(g["scale"] for g in grads.values())
    assert largest > 0
    bad = {n: g for n, g in grads.items()
           if not g["shape_ok"] or g["max_abs"] > 2e-4 * max(g["scale"], 1e-2 * largest)}
    assert not bad, bad

    # (3) replicated parameters get bit-identical gradients on both TP ranks (DeepSpeed reduces over DP only)
    replicated = r["replicated_grad_rank_diff"]
    assert set(replicated) == set(grads) - set(want_split)
    assert any(re.search(r"attn\.out\.bias$", n) for n in replicated)  # row-parallel bias is replicated
    drift = {n: d for n, d in replicated.items() if d != 0.0}
    assert not drift, drift
