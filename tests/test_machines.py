"""The user's machine is not ours: each machine-dependent behaviour, forced to the other case.

- oneDNN with and without fp16 (DeepSpeed's dtype choice under zero.Init): forced in every rank
  through tests/machine.py, whatever this machine's CPU is;
- no C++ compiler (DeepSpeed would JIT-compile its shared-memory comm op), an ASCII-only locale, a
  hostname that does not resolve: all at once, through the real entry point;
- a small /dev/shm (containers): refused before any process group starts;
- numactl installed (DeepSpeed's CPU accelerator would run it once per backward): never run, through the entry point.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, torchrun
from pipeline.config import ConfigError
from pipeline.distributed import source_tree_env

ASCII_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}


@pytest.mark.distributed
def test_dtypes_come_from_the_deepspeed_config_on_either_cpu(tmp_path):
    """fp32 (CPU) or bf16 (GPU) student and an fp32 teacher (bf16 where it computes under the student's bf16
    autocast), whatever is_fp16_supported() answers."""
    report = tmp_path / "dtypes.json"
    proc = torchrun([str(ROOT / "tests/dist/dtype_check.py"), str(report)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(report.read_text())
    for kind in ("cpu-fp16", "cpu-no-fp16"):
        assert r[kind]["torch.float32"] == {"student": ["torch.float32"], "teacher": ["torch.float32"],
                                            "autocast teacher": ["torch.float32"]}, kind
        assert r[kind]["torch.bfloat16"] == {"student": ["torch.bfloat16"], "teacher": ["torch.float32"],
                                             "autocast teacher": ["torch.bfloat16"]}, kind
    # what the trainer's old call, zero.Init(dtype=torch.float32), builds where oneDNN lacks fp16
    assert r["cpu-no-fp16"]["old_call_dtype_float32"] == ["torch.bfloat16"]


def bare_machine_env(tmp_path) -> dict:
    """No compiler DeepSpeed could use, an empty extension cache, ASCII locale, no oneDNN fp16; and numactl installed
    (a server's): a stand-in on PATH that notes every run in numactl.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    numactl = bin_dir / "numactl"
    numactl.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'numactl.log'}\n"
                       "printf 'available: 1 nodes (0)\\nnode 0 cpus: 0 1\\n'\n")
    numactl.chmod(0o755)
    return {**ASCII_LOCALE, "CC": "/nonexistent/cc", "CXX": "/nonexistent/c++",
            "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"), "D2V_MACHINE_CPU_FP16": "0",
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def unresolvable_hostname() -> tuple[str, ...]:
    """A UTS namespace whose hostname resolves nowhere (needs root and util-linux's unshare)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return ()
    probe = subprocess.run(["unshare", "-u", "true"], capture_output=True)
    if probe.returncode:
        return ()
    return ("unshare", "-u", "sh", "-c", 'hostname d2v-no-such-host.invalid && exec "$@"', "sh")


@pytest.mark.distributed
def test_entry_point_on_a_bare_machine(tiny_shards, tmp_path):
    """The main job's entry point on 2 ranks: no oneDNN fp16, no C++ compiler, ASCII locale, a hostname
    that does not resolve (where a UTS namespace can be made), a run directory with a non-ASCII name, and numactl
    installed, which DeepSpeed's CPU accelerator would run once per backward without LOCAL_SIZE."""
    out = tmp_path / "run_é"
    args = [str(ROOT / "tests/machine.py"), "-m", "pipeline.train", "--config", "configs/vision_tiny.yaml",
            f"data.manifest={tiny_shards}", f"train.output_dir={out}", "train.steps=2", "train.log_every=1",
            "train.micro_batch_size=4", "data.workers=1"]
    wrap = unresolvable_hostname()
    proc = torchrun(args, env=bare_machine_env(tmp_path), wrap=wrap)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "dtype=float32" in log and "done at step 2" in log
    assert "built successfully" not in log  # DeepSpeed's shm comm op was not compiled
    assert not (tmp_path / "numactl.log").exists()  # no subprocess per step
    assert not (tmp_path / "torch_extensions").exists() or not any((tmp_path / "torch_extensions").iterdir())
    os_out = os.fsencode(str(out))  # the checkpoint landed under the non-ASCII directory name
    assert os.path.isdir(os.path.join(os_out, b"checkpoints", b"step_00000002"))
    if wrap:  # the hostname really did not resolve (gloo says so, and falls back to loopback)
        assert "Unable to resolve hostname" in log


def test_image_prep_under_an_ascii_locale_keeps_every_file_name(tmp_path):
    """Non-ASCII and non-UTF-8 file names under LC_ALL=C: prep succeeds, and the manifest's records give
    back the exact bytes of each name."""
    from pipeline.demo import make_images
    raw = make_images(tmp_path / "raw", count=4, size=40, seed=0)
    first = sorted(p for p in raw.rglob("*") if p.is_file())[0]
    first.rename(first.with_name("café_日本" + first.suffix))
    names = {b"caf\xc3\xa9_\xe6\x97\xa5\xe6\x9c\xac" + first.suffix.encode(), b"broken_\xff.jpg"}
    with open(os.path.join(os.fsencode(str(first.parent)), b"broken_\xff.jpg"), "wb") as f:
        f.write(b"not an image")
    out = tmp_path / "shards"
    proc = subprocess.run([sys.executable, "-m", "data_prep.images", "--input", str(raw), "--output", str(out),
                           "--shard-size", "2", "--quiet"], cwd=ROOT, capture_output=True,
                          env=source_tree_env(ROOT, **ASCII_LOCALE))
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    manifest = json.loads((out / "manifest.json").read_bytes().decode("utf-8"))
    skipped = {os.fsencode(Path(s["path"]).name) for s in manifest["skipped"]}
    assert b"broken_\xff.jpg" in skipped
    import tarfile
    recorded = set()
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    rec = json.loads(tar.extractfile(member).read().decode("utf-8"))
                    recorded.add(os.fsencode(Path(rec["path"]).name))
    assert names - {b"broken_\xff.jpg"} <= recorded


def test_small_shared_memory_is_refused_before_any_process_group(tiny_shards, tmp_path, monkeypatch, capsys):
    """A container's 64 MB /dev/shm cannot carry the loader's batches: a clear error, no process group."""
    from pipeline import data, distributed, train
    monkeypatch.setattr(distributed, "init_runtime", lambda *a, **k: pytest.fail("a process group was started"))
    real = shutil.disk_usage
    monkeypatch.setattr(data.shutil, "disk_usage",
                        lambda path: real(path)._replace(free=64 * 2 ** 20) if str(path) == data.SHARED_MEMORY
                        else real(path))
    if not os.path.isdir(data.SHARED_MEMORY):
        pytest.skip("no /dev/shm on this system: nothing to check")
    base = ["--config", "configs/vision_base.yaml", f"data.manifest={tiny_shards}", f"train.output_dir={tmp_path}",
            "data.workers=4", "train.micro_batch_size=64", "model.image_size=224"]
    assert train.main(base) == 2
    err = capsys.readouterr().err
    assert "/dev/shm has 64 MiB free" in err and "--shm-size" in err and "data.workers=0" in err
    # workers=0 passes no batch through shared memory: the same layout is accepted up to the next check
    data.check_shared_memory(data.DataConfig(workers=0), 10 ** 9, 64, 8)


def test_each_rank_drives_a_device_it_can_see():
    """All 8 GPUs of a node visible (torchrun): local rank k drives device k. One GPU per task (srun
    --gpus-per-task=1 / --gpu-bind): every rank sees only its own, device 0, whatever its local rank."""
    from pipeline.distributed import device_index
    assert [device_index(k, 8) for k in range(8)] == list(range(8))
    assert [device_index(k, 1) for k in range(8)] == [0] * 8
    assert device_index(3, 2) == 1


def test_packages_on_the_users_pythonpath_reach_every_launched_process(tmp_path, monkeypatch):
    """A machine whose packages live on PYTHONPATH (wheels unpacked into a folder, as on the GPU machine) keeps
    them in the processes the tests, benchmarks and demo launch: the repository goes first, the user's entries
    stay after it (they were dropped before, so no rank could import deepspeed there)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "users_own_package.py").write_text("WHERE = 'user site'\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    probe = (f"import pipeline, users_own_package, sys; "
             f"print(sys.path.index({str(ROOT)!r}) < sys.path.index({str(site)!r}))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                          env=source_tree_env(ROOT, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "True", proc.stdout


def test_a_micro_batch_the_hosts_memory_cannot_hold_is_refused_with_no_workers(tiny_shards, tmp_path, monkeypatch,
                                                                               capsys):
    """data.workers=0 passes nothing through /dev/shm, but the rank still holds its batches: a node with 2 GiB
    available refuses 4096 images of 224 px (about 2.3 GiB each batch) before any process group."""
    from pipeline import data, distributed, train
    monkeypatch.setattr(distributed, "init_runtime", lambda *a, **k: pytest.fail("a process group was started"))
    small = tmp_path / "meminfo"
    small.write_text("MemTotal:        4000000 kB\nMemAvailable:    2097152 kB\n")
    monkeypatch.setattr(data, "MEMINFO", str(small))
    monkeypatch.setattr(data, "CGROUP_MEMORY", str(tmp_path / "no-cgroup"))  # this machine's own limit left out
    base = ["--config", "configs/vision_base.yaml", f"data.manifest={tiny_shards}", f"train.output_dir={tmp_path}",
            "data.workers=0", "train.micro_batch_size=4096", "model.image_size=224"]
    assert train.main(base) == 2
    err = capsys.readouterr().err
    assert "2.0 GiB is available" in err and "lower train.micro_batch_size" in err, err
    # the same node holds a batch of 64 (and a node without /proc/meminfo is not checked)
    data.check_host_memory(data.DataConfig(workers=0), 602112, 64, 1, meminfo=str(small))
    data.check_host_memory(data.DataConfig(workers=0), 602112, 4096, 1, meminfo=str(tmp_path / "absent"))
    # a job's cgroup v2 limit (SLURM, docker --memory) binds below the node's MemAvailable: 1 GiB, half of it used
    group = tmp_path / "cgroup"
    group.mkdir()
    (group / "memory.max").write_text(f"{2 ** 30}\n")
    (group / "memory.current").write_text(f"{2 ** 29}\n")
    assert data.available_memory(str(small), str(group)) == 2 ** 29
    with pytest.raises(ConfigError, match="0.5 GiB is available"):
        data.check_host_memory(data.DataConfig(workers=0), 602112, 1024, 1, meminfo=str(small), cgroup=str(group))
    (group / "memory.max").write_text("max\n")
    assert data.available_memory(str(small), str(group)) == 2097152 * 1024
