"""slurm/*.sh on a real SLURM cluster (one node, started here): completion, preemption + requeue with
exact resume, a killed rank, scancel, and the data-prep job array. The suite installs Debian's slurm-wlm and
munge packages when they are missing (as root) and skips, with the reason, only where SLURM cannot run."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from pipeline.checkpoint import file_crc32

# The tiny preset on 2 CPU ranks; the GPU-node defaults of the scripts are overridden on the command line.
CPU_JOB = ["-N1", "-n2", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=30"]
TINY = ["--config", "configs/vision_tiny.yaml", "train.steps=12", "train.log_every=1", "train.save_every=0",
        "train.micro_batch_size=4", "train.warmup_steps=2", "data.workers=1"]
TEST_JOB_NAME = "d2v-slurm-test"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    from slurm.cluster import LocalSlurm, Unavailable, ensure_installed
    try:
        ensure_installed()
        cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
        cluster.start()
    except Unavailable as exc:
        pytest.skip(f"cannot run a SLURM cluster on this machine: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


def job_env() -> dict:
    """The jobs run this interpreter's python (sbatch passes the environment on)."""
    return {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}


def submit_training(slurm, shards, out: Path, log: str | None, extra=()) -> str:
    output = [f"--output={log}"] if log else []
    args = [*CPU_JOB, f"--job-name={TEST_JOB_NAME}", *output, "slurm/pretrain_large.sh", *TINY,
            f"data.manifest={shards}", f"train.output_dir={out}", *extra]
    return slurm.sbatch(args, cwd=ROOT, env=job_env())


def read_losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec["loss"] for rec in map(json.loads, lines)}


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_until(condition, timeout: float, what: str, slurm, job_id: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        state = slurm.job(job_id).get("JobState")
        assert state not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), f"job ended ({state}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def full_run(slurm, tiny_shards, tmp_path_factory):
    """The uninterrupted run, logging to the scripts' default place, slurm/logs/<job name>-<job id>.out."""
    out = tmp_path_factory.mktemp("full")
    job_id = submit_training(slurm, tiny_shards, out, log=None)
    log = ROOT / f"slurm/logs/{TEST_JOB_NAME}-{job_id}.out"
    try:
        record = slurm.wait_done(job_id, timeout=240)[0]
        text = log.read_text() if log.exists() else ""
        yield out, record, text, log.exists()
    finally:
        log.unlink(missing_ok=True)


def test_job_completes_with_a_checkpoint_and_prints_its_layout(full_run):
    out, record, text, log_in_default_place = full_run
    assert log_in_default_place, "no log in slurm/logs/<job name>-<job id>.out"
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", (record, text[-3000:])
    assert (out / "checkpoints/step_00000012/COMPLETE").is_file()
    assert (out / "checkpoints/latest").read_text() == "step_00000012"
    assert sorted(read_losses(out)) == list(range(1, 13))
    lines = [ln for ln in text.splitlines() if " INFO " in ln]
    assert "layout: nodes=1 ranks=2 tp=1 dp=2 global_batch=8" in lines[0], text[-3000:]
    assert lines[1].split(" INFO ")[1].startswith("config: {")  # the effective config, overrides applied:
    assert '"steps": 12' in lines[1] and '"log_every": 1' in lines[1] and f'"output_dir": "{out}"' in lines[1]


def test_preemption_saves_at_an_agreed_step_requeues_and_resumes_exactly(slurm, tiny_shards, full_run, tmp_path):
    out, log = tmp_path / "split", tmp_path / "split.out"
    job_id = submit_training(slurm, tiny_shards, out, log=str(log))
    wait_until(lambda: logged_steps(out) >= 1, 180, "a logged step", slurm, job_id)
    slurm.run(["scancel", "--signal=USR2", job_id])  # what --signal=USR2@600 sends before the time limit
    record = slurm.wait_done(job_id, timeout=240)[0]
    text = log.read_text()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", (record, text[-4000:])
    assert record["Restarts"] == "1", record  # requeued once, not failed
    assert re.search(r"run 1: .*\n(.*\n)*.*run 2: ", text), text[-4000:]

    stop = int(re.search(r"INFO requeue at step (\d+)", text).group(1))
    assert 1 <= stop < 12, stop  # the signal landed mid-run
    ckpt = out / f"checkpoints/step_{stop:08d}"
    marker = json.loads((ckpt / "COMPLETE").read_text())
    crcs = marker.pop("crc32")  # one CRC-32 per rank file, checked on resume
    assert marker == {"step": stop, "world_size": 2, "tp": 1, "dp": 2, "shard": 2, "grid": [[0, 0], [0, 1]]}
    assert crcs == [file_crc32(ckpt / f"d2v_rank{rank:05d}.pt") for rank in (0, 1)]
    for rank in (0, 1):  # every rank wrote its part of the checkpoint at that step
        own = torch.load(ckpt / f"d2v_rank{rank:05d}.pt", map_location="cpu", weights_only=True)
        assert own["step"] == stop and own["moments"] == ["exp_avg", "exp_avg_sq"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["COMPLETE", "config.json", "d2v_rank00000.pt", "d2v_rank00001.pt"]
    assert f"resumed from {ckpt} at step {stop}" in text

    full_out = full_run[0]
    a, b = read_losses(full_out), read_losses(out)
    assert sorted(b) == sorted(a) == list(range(1, 13))
    for step in a:
        assert float(a[step]).hex() == float(b[step]).hex(), (step, a[step], b[step])
    assert (out / "checkpoints/latest").read_text() == "step_00000012"


def test_a_killed_rank_fails_the_job_promptly_and_is_named(slurm, tiny_shards, tmp_path):
    out, log = tmp_path / "killed", tmp_path / "killed.out"
    job_id = submit_training(slurm, tiny_shards, out, log=str(log), extra=["train.steps=100000"])
    wait_until(lambda: logged_steps(out) >= 1, 180, "a logged step", slurm, job_id)
    pid = slurm.task_pid(job_id, rank=1, marker="pipeline.train")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    record = slurm.wait_done(job_id, timeout=120)[0]
    elapsed = time.monotonic() - killed
    text = log.read_text()
    assert elapsed < 60, elapsed
    assert record["JobState"] == "FAILED" and record["ExitCode"] != "0:0", record
    assert re.search(r"task 1: Killed", text), text[-4000:]


def test_scancel_saves_a_checkpoint_and_is_not_requeued(slurm, tiny_shards, tmp_path):
    """SIGTERM reaches every process of the step (DataLoader workers too): the ranks still agree and save,
    and a cancelled job stays cancelled (only SIGUSR2 asks for a requeue)."""
    out, log = tmp_path / "cancelled", tmp_path / "cancelled.out"
    job_id = submit_training(slurm, tiny_shards, out, log=str(log), extra=["train.steps=100000"])
    wait_until(lambda: logged_steps(out) >= 2, 180, "two logged steps", slurm, job_id)
    slurm.run(["scancel", job_id])
    record = slurm.wait_done(job_id, timeout=120)[0]
    text = log.read_text()
    assert record["JobState"] == "CANCELLED" and record["Restarts"] == "0", record
    stop = int(re.search(r"checkpoint saved: .*step_(\d+)", text).group(1))
    assert json.loads((out / f"checkpoints/step_{stop:08d}/COMPLETE").read_text())["step"] == stop
    assert "requeueing" not in text
    time.sleep(2)
    assert slurm.job(job_id)["JobState"] == "CANCELLED"


def make_raw_images(root: Path) -> Path:
    from pipeline.demo import make_images
    return make_images(root / "raw", count=30, size=40, seed=1)


def shard_samples(out: Path) -> dict[str, list[tuple[str, int]]]:
    """{shard name: [(member, size), ...]} for every shard the manifest lists."""
    manifest = json.loads((out / "manifest.json").read_text())
    samples = {}
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            samples[shard["name"]] = [(m.name, m.size) for m in tar.getmembers()]
    return samples


def test_prep_array_job_equals_a_single_process_run(slurm, tmp_path):
    from data_prep import images
    raw = make_raw_images(tmp_path)
    array_out, single_out = tmp_path / "array", tmp_path / "single"
    job_id = slurm.sbatch(["--array=0-2", "--ntasks=1", "--cpus-per-task=1", "--time=10",
                           f"--output={tmp_path}/prep-%A_%a.out", "slurm/prep_shards.sh", "images",
                           "--input", str(raw), "--output", str(array_out), "--shard-size", "4"],
                          cwd=ROOT, env=job_env())
    tasks = slurm.wait_done(job_id, timeout=180)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("prep-*.out")))
    assert len(tasks) == 3 and all(t["JobState"] == "COMPLETED" and t["ExitCode"] == "0:0" for t in tasks), logs

    parts = [json.loads(p.read_text()) for p in sorted(array_out.glob("manifest.task-*-of-00003.json"))]
    names = [[s["name"] for s in part["shards"]] for part in parts]
    assert [len(n) for n in names] == [2, 3, 3], names  # 8 shards, disjoint contiguous ranges
    assert sorted(sum(names, [])) == [f"images-{i:06d}.tar" for i in range(8)]

    images.main(["--input", str(raw), "--output", str(single_out), "--shard-size", "4", "--quiet"])
    merged = json.loads((array_out / "manifest.json").read_text())
    single = json.loads((single_out / "manifest.json").read_text())
    assert merged["shards"] == single["shards"]  # names, sample counts, sizes and sha256
    assert merged["totals"] == single["totals"] and merged["totals"]["samples"] == 30
    assert shard_samples(array_out) == shard_samples(single_out)
