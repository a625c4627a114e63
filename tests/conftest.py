"""Shared test fixtures: a one-process gloo group with megatron-core parallel state (TP=1)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.distributed import local_launch_command, source_tree_env  # noqa: E402


def randomise(module, seed: int, scale: float = 0.2) -> dict:
    """Fill every parameter with seeded N(0, scale^2) values; return the weights as a float64 state dict."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return {k: v.detach().clone().double() for k, v in module.state_dict().items() if torch.is_tensor(v)}


@pytest.fixture(scope="session")
def single_process_group():
    """torch.distributed + megatron-core parallel state for one process, so parallel layers can be built."""
    from pipeline.distributed import single_process_parallel_state
    single_process_parallel_state()
    yield


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Real image files -> data_prep shards (8 shards of 4 images); returns the shard directory."""
    from data_prep import images
    from pipeline.demo import make_images
    root = tmp_path_factory.mktemp("tiny_data")
    raw = make_images(root / "raw", count=32, size=40, seed=0)
    out = root / "shards"
    report = images.main(["--input", str(raw), "--output", str(out), "--shard-size", "4", "--quiet"])
    assert report.manifest["totals"]["samples"] == 32
    return out


# Kinds of CPU machine a test can force on its ranks (tests/machine.py): oneDNN with and without fp16.
CPU_MACHINES = {"cpu-fp16": {"D2V_MACHINE_CPU_FP16": "1"}, "cpu-no-fp16": {"D2V_MACHINE_CPU_FP16": "0"}}


def torchrun(args: list[str], nproc: int = 2, timeout: int = 600, env: dict | None = None, cwd: Path = ROOT,
             machine: str | None = None, wrap: tuple[str, ...] = ()):
    """Run ``python -m torch.distributed.run --nproc_per_node N <args>`` and return the CompletedProcess.
    ``machine``: a key of CPU_MACHINES to run every rank as if on that kind of CPU (None: this machine).
    ``wrap``: a command prefix the launcher runs under (e.g. ``unshare -u ...``)."""
    import subprocess
    if machine is not None:
        env = {**CPU_MACHINES[machine], **(env or {})}
        args = [str(ROOT / "tests" / "machine.py"), *args]
    cmd = [*wrap, *local_launch_command(nproc, args)]
    full_env = source_tree_env(ROOT, OMP_NUM_THREADS="1", **(env or {}))
    # its own session, so that a job that outlives ``timeout`` is killed whole (ranks and workers too), not
    # just the launcher, and leaves nothing behind to slow the tests after it
    with subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from exc
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="session")
def tiny_audio_shards(tmp_path_factory) -> Path:
    """Synthetic spoken clips (WAV/FLAC at 16, 22.05, 44.1 kHz) -> data_prep.audio shards (8 of 3 clips)."""
    from data_prep import audio
    from pipeline.demo import make_clips
    root = tmp_path_factory.mktemp("tiny_audio")
    raw = make_clips(root / "raw", count=24, seed=0)
    out = root / "shards"
    report = audio.main(["--input", str(raw), "--output", str(out), "--shard-size", "3", "--quiet"])
    assert report.manifest["totals"]["samples"] == 24
    return out


@pytest.fixture(scope="session")
def tiny_text_shards(tmp_path_factory) -> Path:
    """Standard-library docstrings (.txt, .jsonl, .txt.gz) -> a 1000-piece tokenizer -> 64-token blocks."""
    from data_prep import text
    from pipeline.demo import make_corpus
    root = tmp_path_factory.mktemp("tiny_text")
    raw = make_corpus(root / "raw")
    out = root / "shards"
    report = text.main(["--input", str(raw), "--output", str(out), "--vocab-size", "1000", "--block-size", "64",
                        "--shard-size", "100", "--quiet"])
    assert report.manifest["tokenizer"]["vocab_size"] == 1000
    return out
