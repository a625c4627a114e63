"""A run's weights are its own (issue 27, item 1): one run per output directory, a rollback sets the abandoned
trajectory's checkpoints aside, a save never reports another run's files as saved, and resuming takes the newest
complete checkpoint whatever the ``latest`` pointer says."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, torchrun
from pipeline import checkpoint
from pipeline.distributed import source_tree_env
from pipeline.run_lock import LOCK_NAME, OutputDirInUse, claim

HOLD = "import sys, time; from pipeline.run_lock import claim; claim(sys.argv[1]); print('held', flush=True); time.sleep(600)"


def hold_lock(directory: Path) -> subprocess.Popen:
    """Another process holding ``directory``'s lock (until killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], cwd=ROOT, env=source_tree_env(ROOT),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_the_output_directory_lock_names_its_holder_and_dies_with_it(tiny_shards, tmp_path):
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(OutputDirInUse, match=rf"in use by another run \(pid {holder.pid} on "):
            claim(tmp_path)
        # the entry point refuses before any process group
        env = source_tree_env(ROOT, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        proc = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", "configs/vision_tiny.yaml",
                               f"data.manifest={tiny_shards}", f"train.output_dir={tmp_path}"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and f"pid {holder.pid}" in proc.stderr, proc.stderr[-2000:]
    finally:
        holder.kill()  # kill -9: the kernel releases the lock, the stale record stays
        holder.wait()
    fd, warning = claim(tmp_path)
    assert fd is not None and warning is None
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    os.close(fd)


def test_set_aside_never_keeps_a_damaged_step_under_its_name(tmp_path):
    """A second damaged step_10 while damaged_step_10 exists: set aside under a new name, not left in place (where a
    later save of step 10 took it for its own)."""
    for _ in range(3):
        (tmp_path / "step_00000010").mkdir()
        checkpoint.set_aside(tmp_path / "step_00000010")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged_step_00000010", "damaged_step_00000010-2",
                                                         "damaged_step_00000010-3"]


def test_resume_takes_the_newest_complete_checkpoint_whatever_latest_says(tmp_path):
    """A kill between step 2's COMPLETE and the pointer's update leaves ``latest`` at step 1."""
    for step in (1, 2):
        (tmp_path / checkpoint.tag_for(step)).mkdir()
        (tmp_path / checkpoint.tag_for(step) / checkpoint.COMPLETE).write_text(json.dumps({"step": step}))
    (tmp_path / checkpoint.LATEST).write_text(checkpoint.tag_for(1))
    assert checkpoint.find_latest(tmp_path).name == "step_00000002"


def md5s(ckpt: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(ckpt.glob("d2v_rank*.pt"))}


@pytest.mark.distributed
def test_a_rollback_resume_writes_its_own_checkpoints(tiny_shards, tmp_path):
    """Run A to step 9 (checkpoints 3, 6, 9), then run B from A's step 3 with another learning rate. Before: B
    logged "checkpoint saved: step_9" for A's files (same md5, A's config) and the run's newest checkpoint followed
    A. Now: A's steps 6 and 9 are set aside as superseded_step_N at B's start, and B writes its own."""
    out = tmp_path / "run"
    common = ["-m", "pipeline.train", "--config", "configs/vision_tiny.yaml", f"data.manifest={tiny_shards}",
              f"train.output_dir={out}", "train.steps=9", "train.save_every=3", "train.micro_batch_size=2",
              "data.workers=1", "train.keep_checkpoints=0"]
    first = torchrun(common)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    ckpts = out / "checkpoints"
    theirs = md5s(ckpts / "step_00000009")
    second = torchrun([*common[:2], "--resume", str(ckpts / "step_00000003"), *common[2:], "train.lr=1e-4"])
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    assert "set aside as superseded_step_00000006, superseded_step_00000009" in log, log[-3000:]
    assert f"checkpoint saved: {ckpts / 'step_00000009'}" in log, log[-3000:]
    assert md5s(ckpts / "superseded_step_00000009") == theirs != md5s(ckpts / "step_00000009")
    assert json.loads((ckpts / "step_00000009/config.json").read_text())["train"]["lr"] == 1e-4
    assert checkpoint.find_latest(ckpts).name == "step_00000009"


def test_a_malformed_crc32_list_is_one_clear_line(tmp_path):
    """Before: an IndexError traceback at resume."""
    (tmp_path / checkpoint.COMPLETE).write_text(json.dumps({"step": 1, "tp": 1, "dp": 2, "world_size": 2,
                                                            "grid": [[0, 0], [0, 1]], "crc32": [12345]}))
    with pytest.raises(checkpoint.DamagedCheckpoint, match=r"its crc32 list should hold 2 integers, one per rank"):
        checkpoint.read_complete(tmp_path)


@pytest.mark.distributed
def test_an_old_marker_with_a_missing_rank_file_is_agreed_on_by_every_rank(tiny_shards, tmp_path):
    """A COMPLETE without crc32 (the older format) and rank 1's file gone. Before: with resume_damaged=previous rank 1
    fell back while rank 0 loaded step 6 and trained (a 600 s hang); with error, rank 1 exited without naming the
    file. Now every rank checks the files it reads and all act on the first problem found."""
    import shutil
    out = tmp_path / "run"
    common = ["-m", "pipeline.train", "--config", "configs/vision_tiny.yaml", f"data.manifest={tiny_shards}",
              "train.save_every=3", "train.micro_batch_size=2", "data.workers=1", "parallel.timeout_s=60"]
    first = torchrun([*common, f"train.output_dir={out}", "train.steps=6"])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    step6 = out / "checkpoints/step_00000006"
    marker = json.loads((step6 / checkpoint.COMPLETE).read_text())
    del marker["crc32"]
    (step6 / checkpoint.COMPLETE).write_text(json.dumps(marker))
    (step6 / "d2v_rank00001.pt").unlink()
    shutil.copytree(out, tmp_path / "copy")
    stopped = torchrun([*common, f"train.output_dir={out}", "train.steps=8"], timeout=150)
    log = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0 and f"cannot resume: {step6 / 'd2v_rank00001.pt'} cannot be read" in log, log[-3000:]
    fallback = torchrun([*common, f"train.output_dir={tmp_path / 'copy'}", "train.steps=8",
                         "train.resume_damaged=previous"], timeout=150)
    log = fallback.stdout + fallback.stderr
    assert fallback.returncode == 0, log[-3000:]
    assert "set aside as damaged_step_00000006" in log and "resumed from" in log and "step_00000003 at step 3" in log
    assert checkpoint.find_latest(tmp_path / "copy/checkpoints").name == "step_00000008"


@pytest.mark.parametrize("where", ["/dev/null", "/proc/d2v-output"])
def test_an_unwritable_output_directory_is_refused_before_any_process_group(tiny_shards, where):
    """Before: found only after the process group started (by the first save, or the metrics log)."""
    env = source_tree_env(ROOT, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", "configs/vision_tiny.yaml",
                           f"data.manifest={tiny_shards}", f"train.output_dir={where}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"train.output_dir={where} cannot be written" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "layout:" not in proc.stdout
