"""No host syncs in the training step outside log steps (issue #14 item 3), counted on CPU where they are free.

A GPU step that reads a device value on the host (``.item()``, ``bool(tensor)``, boolean indexing, ``nonzero``)
stops the host until the device catches up, so the host can no longer queue work ahead and ZeRO-3's prefetching
stalls; so does each call of ZeRO-3's per-parameter partition accessors, which wait for its reduce stream.
tests/dist/host_syncs.py runs the loop's step between log steps for every modality (grad_accum 2, text
with padding) and for data2vec 2.0 (vision_tiny_v2: clones, visible positions, the decoder, the CLS loss) under a
dispatch mode that records each such operation and whose code asked for it.
"""

from __future__ import annotations

import json

from conftest import ROOT, torchrun


def test_no_host_syncs_between_log_steps(tmp_path):
    out = tmp_path / "syncs.json"
    proc = torchrun([str(ROOT / "tests/dist/host_syncs.py"), str(out)], nproc=1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report) == {"vision", "speech", "text", "vision_v2"}
    for modality, r in report.items():
        ours = {k: n for k, n in r["reads"].items() if k.startswith("pipeline ")}
        assert not ours, (modality, ours)
        # DeepSpeed's own, once per optimizer step: is_invalid_grad_norm(bool(...)) in its gradient clipping
        deepspeed = sum(n for k, n in r["reads"].items() if k.startswith("deepspeed "))
        assert deepspeed <= 2, (modality, r["reads"])  # 2 optimizer steps counted
        # no per-parameter ZeRO-3 accessor (the EMA reads cached views of the fp32 masters)
        assert not r["reduce_stream_waits"], (modality, r["reduce_stream_waits"])
        # one learning rate per optimizer group: torch >= 2.10 zips them strictly and fails the first step where
        # DeepSpeed dropped an empty group (text and speech decay every parameter: no exempt group)
        rates, groups = r["lr_rates_and_groups"]
        assert rates == groups, (modality, rates, groups)
