"""Every shipped preset starts from the initialisation its code declares, under zero.Init, at any layout.

zero.Init partitions a module's parameters when that module's ``__init__`` returns; an init applied later
(by a parent) writes into an empty placeholder and is lost without an error. This happened to the text
position embedding (N(0, 1) instead of trunc_normal(0.02)) and made text pretraining collapse to
position. tests/dist/init_check.py builds every preset both ways with the same seed.
"""

from __future__ import annotations

import functools
import json
import math
import re

import pytest

from conftest import ROOT, torchrun
from pipeline.experiment import load_experiment


@functools.cache
def init_check_module():
    """tests/dist/init_check.py (a torchrun script), loaded once for its scaled_overrides."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("init_check", ROOT / "tests/dist/init_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scaled_overrides(preset: str) -> list[str]:
    return init_check_module().scaled_overrides(preset)

pytestmark = pytest.mark.distributed


def run_init_check(report_dir, tp: int, nproc: int, reference=None) -> list[dict]:
    report_dir.mkdir(exist_ok=True)
    args = [str(ROOT / "tests/dist/init_check.py"), str(report_dir), str(tp)]
    proc = torchrun(args + ([str(reference)] if reference else []), nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((report_dir / f"rank{r}.json").read_text()) for r in range(nproc)]


TRUNC_STD = 0.5376  # std of a unit normal truncated at +-1 (BEiT's trunc_normal_: a=-std, b=std)


def close(a: list[float], b: list[float]) -> bool:
    return all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-8) for x, y in zip(a, b))


def check_reports(reports: list[dict]) -> None:
    presets = {p for r in reports for p in r["presets"]}
    assert len(presets) == len(list((ROOT / "configs").glob("*.yaml")))  # every shipped preset
    for r in reports:
        for preset, rows in r["presets"].items():
            lost = {name: (row["plain"], row["zero"]) for name, row in rows.items() if not close(row["plain"], row["zero"])}
            assert not lost, f"{preset} (tp {r['tp']}, dp {r['dp']}): (mean, std, min, max) plain vs zero.Init: {lost}"
            # Same seed, same draws in the same order: the values are not just alike but identical.
            assert all(row["identical"] for row in rows.values()), [n for n, row in rows.items() if not row["identical"]]
            cfg = load_experiment(ROOT / preset, scaled_overrides(str(ROOT / preset)))  # as init_check built it
            for name, row in rows.items():  # the declared rule itself, read off the statistics
                if name.endswith("embed.positions.weight"):  # text, init_bert_params: normal(0.02), not truncated
                    assert 0.018 < row["zero"][1] < 0.022 and abs(row["zero"][3]) > 0.04, (preset, row)
                if name.endswith("embed.cls_token") and cfg.method == "data2vec2":  # fairseq's extra token: N(0, 1)
                    assert 0.7 < row["zero"][1] < 1.3, (preset, row)
                if name.endswith("embed.patch.weight") and cfg.method == "data2vec2":  # xavier_uniform, (D, C p p)
                    d, fan_in = cfg.encoder.dim, cfg.model.in_chans * cfg.model.patch_size ** 2
                    bound = math.sqrt(6 / (fan_in + d))
                    assert max(abs(row["zero"][2]), abs(row["zero"][3])) <= bound
                    assert abs(row["zero"][1] / (bound / math.sqrt(3)) - 1) < 0.1, (preset, row)
                match = re.search(r"blocks\.(\d+)\.(attn\.out|ffn\.fc2)\.weight$", name)
                if match and cfg.encoder.init == "beit":  # BEiT: output projections at 0.02 / sqrt(2 * layer_id), cut at 1 std
                    bound = 0.02 / math.sqrt(2 * (int(match.group(1)) + 1))
                    assert abs(row["zero"][1] / (TRUNC_STD * bound) - 1) < 0.1, (preset, name, row["zero"][1], bound)
                    assert max(abs(row["zero"][2]), abs(row["zero"][3])) <= bound * (1 + 1e-6), (preset, name, row)


@pytest.fixture(scope="module")
def tp1_dir(tmp_path_factory):
    """Every preset built at TP 1 on two ranks (the reports, and the TP 1 vision weights the TP 2 test compares)."""
    path = tmp_path_factory.mktemp("init") / "tp1"
    return path, run_init_check(path, tp=1, nproc=2)


def test_every_preset_keeps_its_init_under_zero3_on_two_ranks(tp1_dir):
    check_reports(tp1_dir[1])


def test_every_preset_keeps_its_init_under_tp2_x_zero3(tmp_path, tp1_dir):
    """TP 2 x DP 2 (4 ranks); megatron's CPU init draws the full weight and slices it, so the TP 2 slices put
    together equal the TP 1 weights exactly."""
    reports = run_init_check(tmp_path / "tp2", tp=2, nproc=4, reference=tp1_dir[0] / "tp1_vision.pt")
    check_reports(reports)
    for r in reports:
        assert r["tp_vs_tp1"] and all(r["tp_vs_tp1"].values()), r["tp_vs_tp1"]
