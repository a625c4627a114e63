"""Hostile input and faults: a failing rank ends the job fast (DataLoader workers included), and a sample
that would crash collate is skipped and counted like any other bad sample."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, torchrun
from pipeline.config import DataConfig
from pipeline.data import ShardStream
from pipeline.experiment import load_experiment
from pipeline.distributed import source_tree_env

FAST = 150  # seconds: a job that has not ended by then is hanging (torchrun itself waits 30 s before SIGKILL)


def run_until_it_ends(args: list[str], env: dict | None = None) -> tuple[int | None, float, str]:
    start = time.monotonic()
    try:
        proc = torchrun(args, env=env, timeout=FAST)
        return proc.returncode, time.monotonic() - start, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        return None, time.monotonic() - start, (exc.stdout or "") + (exc.stderr or "")


def train_args(manifest, out, preset="configs/vision_tiny.yaml", workers=2) -> list[str]:
    return [str(ROOT / "tests/machine.py"), "-m", "pipeline.train", "--config", preset, f"data.manifest={manifest}",
            f"train.output_dir={out}", "train.steps=50", "train.micro_batch_size=2", f"data.workers={workers}",
            "train.save_every=0"]


@pytest.mark.distributed
def test_a_rank_that_fails_in_collate_ends_the_job_fast(tiny_shards, tmp_path):
    """Collate raises inside a DataLoader worker of rank 1 (workers=2): rank 1 must exit at once and the
    launcher stop rank 0, which sits in a ZeRO-3 collective waiting for rank 1."""
    rc, seconds, log = run_until_it_ends(train_args(tiny_shards, tmp_path / "run"), env={"D2V_FAULT_COLLATE": "1:3"})
    assert rc is not None, f"still running after {FAST} s (hang):\n{log[-3000:]}"
    print(f"collate fault: the job ended in {seconds:.1f} s")
    assert rc != 0 and "injected fault" in log and "rank 1 of 2 failed" in log, log[-3000:]


@pytest.mark.distributed
def test_a_diverged_replica_stops_the_run_without_a_checkpoint(tiny_shards, tmp_path):
    """Hybrid sharding (parallel.shard=1, 2 replicas): rank 1 flips one bit of a partition after step 5. The check
    of step 6 (train.check_consistency_every=3) stops both ranks with one line naming the parameter and the ranks;
    the checkpoint of step 4 stays the latest (the one of step 8 is never written) and nothing logs "done"."""
    out = tmp_path / "run"
    args = [*train_args(tiny_shards, out, workers=1), "parallel.shard=1", "train.save_every=4", "train.steps=20",
            "train.check_consistency_every=3", "train.log_every=1"]
    rc, seconds, log = run_until_it_ends(args, env={"D2V_FAULT_FLIP": "1:5"})
    assert rc is not None, f"still running after {FAST} s (hang):\n{log[-3000:]}"
    print(f"diverged replica: the job ended in {seconds:.1f} s")
    assert rc != 0 and "consistency: replicas and tensor-parallel peers hold equal copies" in log, log[-3000:]
    assert "stopped: ranks 0 and 1, hybrid-sharding replicas" in log and "at step 6" in log, log[-3000:]
    assert "done at step" not in log and "rank 0 of 2 failed" not in log, log[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")) == ["step_00000004"]


def step_dirs(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))


@pytest.mark.distributed
@pytest.mark.parametrize("policy, limit, steps_seen", [("skip", 3, 3), ("stop", 20, 1)])
def test_a_non_finite_loss_stops_the_run_and_keeps_the_good_checkpoint(tiny_shards, tmp_path, policy, limit,
                                                                       steps_seen):
    """train.lr=1e30: step 1 applies a huge (finite) update, every later loss is NaN and DeepSpeed skips each
    update. Before: no alarm, every step counted, checkpoints of NaN steps written (pruning deleting the good ones)
    and the run ended "done" with rc 0. Now: train.nonfinite=skip skips train.nonfinite_limit steps in a row and then
    stops; =stop stops at the first; both exit non-zero with one line naming the last good checkpoint, which
    stays the latest."""
    out = tmp_path / "run"
    args = [*train_args(tiny_shards, out, workers=1), "train.lr=1e30", "train.save_every=1", "train.steps=20",
            "train.log_every=1", f"train.nonfinite={policy}", f"train.nonfinite_limit={limit}"]
    rc, seconds, log = run_until_it_ends(args)
    assert rc is not None, f"still running after {FAST} s (hang):\n{log[-3000:]}"
    assert rc != 0 and "done at step" not in log, log[-3000:]
    assert log.count("DeepSpeed skipped the update") == steps_seen, log[-3000:]
    assert "stopped: step 2: the gradient norm is not finite" in log, log[-3000:]
    assert f"The last checkpoint, {out / 'checkpoints' / 'step_00000001'}, precedes it" in log, log[-3000:]
    assert step_dirs(out) == ["step_00000001"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]  # skipped steps are not recorded


@pytest.mark.distributed
def test_a_non_finite_weight_is_never_saved(tiny_shards, tmp_path):
    """A weight turns inf on rank 1 after step 4 (D2V_FAULT_INF): the save of step 4 is refused on every rank, the
    run exits non-zero naming step_2 as the last good checkpoint, and step_2 is not pruned (keep_checkpoints=1)."""
    out = tmp_path / "run"
    args = [*train_args(tiny_shards, out, workers=1), "train.save_every=2", "train.steps=20",
            "train.keep_checkpoints=1"]
    rc, seconds, log = run_until_it_ends(args, env={"D2V_FAULT_INF": "1:4"})
    assert rc is not None, f"still running after {FAST} s (hang):\n{log[-3000:]}"
    assert rc != 0 and "stopped: step 4: a student or teacher weight is not finite; not saved" in log, log[-3000:]
    assert f"The last checkpoint, {out / 'checkpoints' / 'step_00000002'}, precedes it" in log, log[-3000:]
    assert step_dirs(out) == ["step_00000002"]


@pytest.mark.distributed
def test_hopeless_data_with_workers_ends_the_job_fast(tiny_shards, tmp_path):
    """Every shard garbage (sizes intact, so start-up accepts them), workers=2: a clear DataError, then exit."""
    shards = tmp_path / "shards"
    shards.mkdir()
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    for shard in manifest["shards"]:
        size = (tiny_shards / shard["name"]).stat().st_size
        (shards / shard["name"]).write_bytes((b"garbage!" * (size // 8 + 1))[:size])
    (shards / "manifest.json").write_text(json.dumps(manifest))
    rc, seconds, log = run_until_it_ends(train_args(shards, tmp_path / "run"))
    assert rc is not None, f"still running after {FAST} s (hang):\n{log[-3000:]}"
    print(f"hopeless data: the job ended in {seconds:.1f} s")
    assert rc != 0 and "DataError" in log and "yielded no sample in a whole pass" in log, log[-3000:]


def text_shard(path: Path, lengths: list[int]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, n in enumerate(lengths):
            for ext, data in (("u16", np.arange(5, 5 + n, dtype="<u2").tobytes()), ("json", b"{}")):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_a_text_block_a_token_short_is_skipped_not_a_collate_crash(tmp_path, caplog):
    modality = load_experiment(str(ROOT / "configs/text_tiny.yaml")).make_modality()
    lengths = [64] * 5 + [63] + [64] * 10
    text_shard(tmp_path / "text-000000.tar", lengths)
    cfg = DataConfig(workers=0, shuffle_buffer=1, max_bad_samples=3)
    stream = iter(ShardStream([str(tmp_path / "text-000000.tar")], modality, cfg, 4, 0, 0, 1))
    batches = [next(stream) for _ in range(3)]  # 12 good blocks of the 15
    assert all(b["tokens"].shape == (4, 64) for b in batches)
    assert "differ from this stream's first example" in caplog.text and "000005" in caplog.text


# --------------------------------------------------------------------------- data prep never dies on one file

def run_prep(module: str, raw: Path, out: Path, *extra: str, env: dict | None = None):
    import sys
    return subprocess.run([sys.executable, "-m", module, "--input", str(raw), "--output", str(out), "--quiet", *extra],
                          cwd=ROOT, capture_output=True, env=source_tree_env(ROOT, **(env or {})))


def skipped(out: Path) -> dict[str, str]:
    manifest = json.loads((out / "manifest.json").read_bytes().decode("utf-8"))
    return {s["path"]: s["reason"] for s in manifest["skipped"]}


@pytest.mark.parametrize("module", ["data_prep.images", "data_prep.audio", "data_prep.text"])
def test_symlink_loops_and_non_utf8_names_are_skipped_entries(module, tmp_path):
    """loop1 -> loop2 -> loop1 (as files and as a directory) and a name with byte 0xff: prep goes on,
    lists each, and prints without crashing under a UTF-8 locale."""
    import os
    from pipeline.demo import make_clips, make_corpus, make_images
    make = {"data_prep.images": lambda r: make_images(r, count=4, size=40, seed=0),
            "data_prep.audio": lambda r: make_clips(r, count=3, seed=0),
            "data_prep.text": make_corpus}[module]
    raw = make(tmp_path / "raw")
    (raw / "loop1.png").symlink_to(raw / "loop2.png")
    (raw / "loop2.png").symlink_to(raw / "loop1.png")
    (raw / "dirloop").symlink_to(raw / "dirloop")
    for name in (b"bad\xff.bin", b"doc\xff.txt" if module == "data_prep.text" else b"bad\xff.wav"):
        with open(os.path.join(os.fsencode(str(raw)), name), "wb") as f:  # .bin: skipped; the other: read
            f.write(b"\x00\x01 not a valid file of any kind \xff\n")
    extra = ["--vocab-size", "400", "--block-size", "32", "--shard-size", "100"] if module == "data_prep.text" else []
    proc = run_prep(module, raw, tmp_path / "out", *extra, env={"LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"})
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    reasons = skipped(tmp_path / "out")
    loops = [p for p, r in reasons.items() if "symlink loop" in r]
    assert any("loop1" in p for p in loops) and any("dirloop" in p for p in loops), reasons
    assert any(os.fsencode(p).endswith(b"bad\xff.bin") for p in reasons), reasons


def flac_declaring(tmp_path: Path, total_samples: int) -> bytes:
    """A real 1 s FLAC whose STREAMINFO claims ``total_samples`` samples (36-bit field)."""
    import soundfile
    buf = io.BytesIO()
    soundfile.write(buf, np.zeros(16000, dtype=np.int16), 16000, format="FLAC", subtype="PCM_16")
    data = bytearray(buf.getvalue())
    assert data[:4] == b"fLaC"
    field = int.from_bytes(data[18:26], "big")  # 20 bits rate, 3 channels, 5 bits per sample, 36 total samples
    field = (field & ~((1 << 36) - 1)) | total_samples
    data[18:26] = field.to_bytes(8, "big")
    return bytes(data)


def test_a_flac_declaring_2_to_the_36_samples_is_skipped_before_decoding(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "good.flac").write_bytes(flac_declaring(tmp_path, 16000))
    (raw / "bomb.flac").write_bytes(flac_declaring(tmp_path, (1 << 36) - 1))
    proc = run_prep("data_prep.audio", raw, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    assert "--max-file-seconds" in skipped(tmp_path / "out")["bomb.flac"]


def png_declaring(width: int, height: int) -> bytes:
    """A PNG header (IHDR) declaring width x height, with a tiny IDAT: what a 164 KB bomb looks like to open()."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_a_13000_square_png_is_refused_by_prep_and_by_training(tmp_path):
    import random

    from pipeline.demo import make_images
    raw = make_images(tmp_path / "raw", count=2, size=40, seed=0)
    (raw / "huge.png").write_bytes(png_declaring(13000, 13000))
    proc = run_prep("data_prep.images", raw, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    assert "too many pixels: 13000x13000" in skipped(tmp_path / "out")["huge.png"]
    vision = load_experiment(str(ROOT / "configs/vision_tiny.yaml")).make_modality()
    with pytest.raises(ValueError, match="over model.max_pixels"):
        vision.example({"png": png_declaring(13000, 13000), "__key__": "x"}, random.Random(0))


def test_a_folder_of_only_bad_files_is_an_error_unless_allowed(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jpg").write_bytes(b"not an image")
    proc = run_prep("data_prep.images", raw, tmp_path / "out")
    assert proc.returncode != 0 and b"no sample was written" in proc.stderr and b"--allow-empty" in proc.stderr
    assert "a.jpg" in skipped(tmp_path / "out")  # the manifest still says why
    assert run_prep("data_prep.images", raw, tmp_path / "out2", "--allow-empty").returncode == 0


def test_an_unreadable_directory_is_listed(tmp_path, monkeypatch):
    """os.walk drops a directory it cannot list without a word; root can read anything, so the failure
    is forced at os.scandir."""
    import os

    from data_prep import images
    from pipeline.demo import make_images
    raw = make_images(tmp_path / "raw", count=4, size=40, seed=0)
    locked = sorted(p for p in raw.iterdir() if p.is_dir())[0]
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    images.main(["--input", str(raw), "--output", str(tmp_path / "out"), "--quiet"])
    assert skipped(tmp_path / "out")[locked.name] == "unreadable directory: Permission denied"


def test_a_second_prep_into_the_same_output_is_refused_naming_the_holder(tmp_path):
    import fcntl
    import os

    from pipeline.demo import make_images
    raw = make_images(tmp_path / "raw", count=2, size=40, seed=0)
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".manifest.json.lock", "w") as held:
        held.write("4242")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = run_prep("data_prep.images", raw, out)
    assert proc.returncode != 0 and b"another data prep (pid 4242)" in proc.stderr, proc.stderr
    assert run_prep("data_prep.images", raw, out).returncode == 0  # the lock died with its holder
    assert os.path.isfile(out / "manifest.json")


# --------------------------------------------------------------------------- manifests and shards

def test_manifest_duplicates_and_nesting_are_clear_errors(tiny_shards, tmp_path):
    from data_prep.core import read_manifest
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    manifest["shards"].append(manifest["shards"][0])
    (tmp_path / "dup.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="listed more than once"):
        read_manifest(tmp_path / "dup.json")
    (tmp_path / "deep.json").write_text("[" * 100_000)
    with pytest.raises(ValueError, match="RecursionError"):
        read_manifest(tmp_path / "deep.json")


def test_sha256_verification_names_a_changed_shard(tiny_shards, tmp_path):
    import shutil

    from pipeline.data import DataError
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    victim = sorted(shards.glob("*.tar"))[0]
    data = bytearray(victim.read_bytes())
    data[600] ^= 0xFF  # same size: the start-up size check passes
    victim.write_bytes(bytes(data))
    modality = load_experiment(str(ROOT / "configs/vision_tiny.yaml")).make_modality()
    paths = [str(p) for p in sorted(shards.glob("*.tar"))]
    cfg = DataConfig(manifest=str(shards), workers=0, shuffle_buffer=1, verify="sha256")
    with pytest.raises(DataError, match=f"shard {victim}.*sha256"):
        for _ in ShardStream([str(victim)] + paths[1:], modality, cfg, 2, 0, 0, 1):
            pass
    ok = DataConfig(manifest=str(shards), workers=0, shuffle_buffer=1, verify="sha256")
    assert next(iter(ShardStream(paths[1:], modality, ok, 2, 0, 0, 1)))["image"].shape[0] == 2


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("text, phrase", [
    ("train:\n  lr: [1, 2\n", "invalid YAML"),
    ("train: !!python/object/apply:os.system ['echo pwned']\n", "invalid YAML"),  # refused, never run
    ("train:\n  lr: 0.1\ntrain:\n  steps: 5\n", "line 4: key 'train' appears twice"),
])
def test_bad_yaml_is_one_line_with_file_and_line(tmp_path, capsys, text, phrase):
    from pipeline import train
    path = tmp_path / "bad.yaml"
    path.write_text("modality: vision\n" + text)
    assert train.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path}, line " in err and phrase in err, err


def test_a_binary_config_file_is_a_clear_error(tmp_path, capsys):
    from pipeline import train
    path = tmp_path / "model.pt"
    path.write_bytes(bytes(range(256)) * 4)
    assert train.main(["--config", str(path)]) == 2
    assert "not a UTF-8 text file" in capsys.readouterr().err


@pytest.mark.parametrize("override", [
    "train.lr=.inf", "train.min_lr=.inf", "train.eps=-1", "train.weight_decay=.nan", "objective.beta=.inf",
    "encoder.layer_norm_eps=-1", "encoder.depth=100000000", "train.steps=1000000000000000000000",
    "model.image_size=400000", "train.output_dir=",
])
def test_absurd_values_are_rejected_before_any_process_group(override):
    from pipeline.config import ConfigError
    with pytest.raises(ConfigError):
        load_experiment(str(ROOT / "configs/vision_tiny.yaml"), [override])


# --------------------------------------------------------------------------- logs

def test_metrics_after_a_resume_hold_each_step_once(tmp_path):
    from pipeline.metrics import drop_records_after
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 27)) + '{"step": 27, "lo')
    drop_records_after(path, 20)  # the checkpoint the run resumes from is step 20
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == list(range(1, 21))


# --------------------------------------------------------------------------- checkpoints that detect corruption

def train_one_rank(manifest, out, *extra):
    import sys
    args = [sys.executable, "-m", "pipeline.train", "--config", "configs/vision_tiny.yaml", f"data.manifest={manifest}",
            f"train.output_dir={out}", "train.micro_batch_size=2", "data.workers=0", "train.save_every=2",
            "train.log_every=1", *extra]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=source_tree_env(ROOT, OMP_NUM_THREADS="1"))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_checkpoint_is_caught_on_resume_and_export(tiny_shards, tmp_path):
    out = tmp_path / "run"
    first = train_one_rank(tiny_shards, out, "train.steps=4")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    ckpts = out / "checkpoints"
    damaged = ckpts / "step_00000004" / "d2v_rank00000.pt"
    flip_byte(damaged, damaged.stat().st_size // 2)  # inside the tensor data

    from pipeline import export
    assert export.main([str(damaged.parent), "--output", str(tmp_path / "x.pt")]) == 2
    assert not (tmp_path / "x.pt").exists()

    refused = train_one_rank(tiny_shards, out, "train.steps=6")
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert f"cannot resume: {damaged} does not match the CRC-32" in refused.stdout + refused.stderr

    fallback = train_one_rank(tiny_shards, out, "train.steps=6", "train.resume_damaged=previous")
    log = fallback.stdout + fallback.stderr
    assert fallback.returncode == 0, log[-3000:]
    assert "set aside as damaged_step_00000004" in log and "resumed from" in log and "step_00000002" in log
    assert (ckpts / "damaged_step_00000004").is_dir() and (ckpts / "step_00000006" / "COMPLETE").is_file()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # records 3 and 4 of the damaged run were replaced


@pytest.fixture(scope="module")
def two_step_run(tiny_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_steps") / "run"
    assert train_one_rank(tiny_shards, out, "train.steps=2").returncode == 0
    return out


@pytest.mark.parametrize("marker", ["garbage{", "5"])
def test_a_damaged_complete_marker_is_refused_before_any_process_group(tiny_shards, two_step_run, tmp_path, marker):
    out = tmp_path / "run"
    shutil.copytree(two_step_run, out)
    (out / "checkpoints" / "step_00000002" / "COMPLETE").write_text(marker)
    proc = train_one_rank(tiny_shards, out, "train.steps=4")
    assert proc.returncode == 2 and "COMPLETE" in proc.stderr and "step_00000002" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_truncated_rank_file_error_names_the_file(tmp_path):
    import torch

    from pipeline.checkpoint import DamagedCheckpoint, read_rank_file
    path = tmp_path / "d2v_rank00000.pt"
    torch.save({"x": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DamagedCheckpoint, match=str(path)):
        read_rank_file(path)


@pytest.mark.distributed
def test_a_frozen_rank_is_named_within_half_the_timeout(tiny_shards, tmp_path):
    """SIGSTOP on rank 1 mid-run. Before: the job ended only after the 600 s process-group timeout, and nothing named
    the frozen rank. Now rank 0's heartbeat finds rank 1 silent after parallel.timeout_s / 2 (30 s here), names it
    with its host and pid, and ends the job."""
    import os
    import signal

    import psutil
    out = tmp_path / "run"
    args = [*train_args(tiny_shards, out, workers=1), "train.steps=100000", "parallel.timeout_s=60", "train.log_every=1"]
    from pipeline.distributed import local_launch_command, source_tree_env
    proc = subprocess.Popen(local_launch_command(2, args), cwd=ROOT, env=source_tree_env(ROOT, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:  # wait for the first logged step
            lines.append(line)
            if " step 2/" in line:
                break
        ranks = {int(p.environ()["RANK"]): p for p in psutil.Process(proc.pid).children()}  # the launcher's own
        frozen = ranks[1].pid
        os.kill(frozen, signal.SIGSTOP)
        stopped = time.monotonic()
        rest, _ = proc.communicate(timeout=FAST)
        seconds = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = "".join(lines) + rest
    print(f"frozen rank: named and the job ended {seconds:.1f} s after SIGSTOP")
    assert proc.returncode != 0 and seconds < 90, log[-3000:]
    assert "rank 0 of 2: rank 1 (" in log and f"pid {frozen}) has not answered for" in log, log[-3000:]


@pytest.mark.distributed
def test_ranks_stop_with_a_checkpoint_when_their_launcher_is_killed(tiny_shards, tmp_path):
    """kill -9 of the torchrun agent. Before: the ranks trained on and saved, orphaned. Now each rank gets SIGTERM
    from the kernel when its parent dies (PR_SET_PDEATHSIG): they agree on a step, save there and exit."""
    import os
    import signal

    import psutil
    out = tmp_path / "run"
    args = [*train_args(tiny_shards, out, workers=1), "train.steps=100000", "train.log_every=1"]
    from pipeline.distributed import local_launch_command, source_tree_env
    proc = subprocess.Popen(local_launch_command(2, args), cwd=ROOT, env=source_tree_env(ROOT, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    ranks = []
    try:
        for line in proc.stdout:
            if " step 2/" in line:
                break
        ranks = psutil.Process(proc.pid).children()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        gone, alive = psutil.wait_procs(ranks, timeout=FAST)
    finally:
        for p in psutil.Process(os.getpid()).children(recursive=True):
            if p.pid in {r.pid for r in ranks}:
                p.kill()
    assert len(ranks) == 2 and not alive, alive
    assert step_dirs(out), "no checkpoint was saved"
