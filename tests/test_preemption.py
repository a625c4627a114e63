"""A signal that reaches one rank of a TP 2 x DP 2 job: every rank stops at the same step with one complete
checkpoint (no hang). With TP >= 2 there is one data-parallel group per TP rank; the stop decision must be
world-wide, not per group, or one group saves while the other runs the next step and the job hangs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT
from pipeline.distributed import local_launch_command, source_tree_env

pytestmark = pytest.mark.distributed


def rank_pids(launcher: int) -> dict[int, int]:
    """{RANK: pid} of the launcher's worker processes, read from /proc (Linux)."""
    pids = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher:
            env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
            if b"RANK" in env:
                pids[int(env[b"RANK"])] = int(entry.name)
    return pids


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks' pids through /proc (Linux)")
@pytest.mark.parametrize("target,sig,after,shard", [(1, signal.SIGTERM, r"step 3/", 0),
                                                    (2, signal.SIGUSR2, r"step 3/", 1),  # hybrid: 2 replicas
                                                    (3, signal.SIGTERM, r"layout: ", 0)],  # the last: during start-up
                         ids=["sigterm-rank1", "sigusr2-rank2-hybrid", "sigterm-rank3-start-up"])
def test_a_signal_to_one_rank_of_tp2_x_dp2_stops_every_rank_at_one_step(tiny_shards, tmp_path, target, sig, after,
                                                                        shard):
    out = tmp_path / "run"
    args = ["-m", "pipeline.train", "--config", "configs/vision_tiny.yaml", f"data.manifest={tiny_shards}",
            f"train.output_dir={out}", "parallel.tp=2", "train.steps=100000", "train.save_every=0",
            "train.log_every=1", "train.micro_batch_size=4", "data.workers=1", f"parallel.shard={shard}"]
    env = source_tree_env(ROOT, OMP_NUM_THREADS="1")
    log = tmp_path / "log.txt"
    with open(log, "w") as sink, subprocess.Popen(local_launch_command(4, args), cwd=ROOT, env=env, stdout=sink,
                                                   stderr=subprocess.STDOUT, start_new_session=True) as proc:
        try:
            deadline = time.monotonic() + 300
            while not re.search(after, log.read_text(errors="replace")):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
            pids = rank_pids(proc.pid)
            while sorted(pids) != [0, 1, 2, 3] and time.monotonic() < deadline:
                time.sleep(0.2)
                pids = rank_pids(proc.pid)
            assert sorted(pids) == [0, 1, 2, 3], pids
            os.kill(pids[target], sig)
            proc.wait(timeout=240)  # a hang (ranks stopping at different steps) times out here
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"the job hung after {sig.name} to rank {target}:\n" + log.read_text()[-3000:])
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    steps = sorted(p for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert len(steps) == 1 and (steps[0] / "COMPLETE").is_file(), steps
    marker = json.loads((steps[0] / "COMPLETE").read_text())
    assert len(marker["grid"]) == 4  # every rank's file, all at the one agreed step
    assert marker["shard"] == (shard or 2) and (not shard or "shard=1 replicas=2" in text), text[-2000:]
    status = "requeue" if sig == signal.SIGUSR2 else "preempted"
    assert re.search(rf"{status} at step {int(steps[0].name[5:])};", text), text[-2000:]
