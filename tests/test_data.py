"""The shard stream under damaged data: unreadable shards and undecodable samples are logged and
skipped, deterministically (exact resume still holds); hopeless data is a clear error, not a hang."""

from __future__ import annotations

import io
import logging
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from pipeline.config import DataConfig
from pipeline.data import STREAM_KEY, DataError, make_loader, resolve_shards
from pipeline.experiment import load_experiment


def vision():
    return load_experiment(str(ROOT / "configs/vision_tiny.yaml")).make_modality()


def with_garbage_image(src: str, dst: Path) -> str:
    """A copy of a shard whose first image holds bytes no decoder accepts; returns that sample's key."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        bad = None
        for member in tin.getmembers():
            data = tin.extractfile(member).read()
            if bad is None and member.name.endswith((".jpg", ".jpeg", ".png", ".webp")):
                bad, data = member.name.rsplit(".", 1)[0], b"this is not an image"
            member.size = len(data)
            tout.addfile(member, io.BytesIO(data))
    assert bad is not None
    return bad


def damaged(tiny_shards: Path, tmp_path: Path) -> tuple[list[str], str, str]:
    """All shards copied, then damaged as a file system might during a run: one truncated half-way,
    one deleted, one with a garbage sample. (At start-up, resolve_shards rejects shards whose size
    differs from the manifest.)"""
    paths = []
    for i, src in enumerate(resolve_shards(str(tiny_shards))):
        dst = tmp_path / Path(src).name
        shutil.copy(src, dst)
        paths.append(str(dst))
    truncated = paths[1]
    data = Path(truncated).read_bytes()
    Path(truncated).write_bytes(data[: len(data) // 2])
    bad_key = with_garbage_image(resolve_shards(str(tiny_shards))[2], Path(paths[2]))
    Path(paths[3]).unlink()
    return paths, truncated, bad_key


def take(paths, n, start=0, positions=None, modality=None, **data):
    cfg = DataConfig(workers=0, shuffle_buffer=4, **data)
    loader = make_loader(paths, modality or vision(), cfg, 4, seed=0, dp_rank=0, dp=1, start_batch=start,
                         positions=positions)
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_damaged_shards_and_samples_are_logged_and_skipped(tiny_shards, tmp_path, caplog):
    paths, truncated, bad_key = damaged(tiny_shards, tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        batches = take(paths, 16)  # two passes over the 8 shards
    text = caplog.text
    assert f"shard {paths[3]} is unreadable after 0 samples (FileNotFoundError" in text
    assert f"of {truncated} (ValueError: sample" in text  # its last sample lost its image
    assert f"skipped sample {bad_key} of {paths[2]} (UnidentifiedImageError" in text
    assert all(b["image"].shape[0] == 4 for b in batches)
    again = take(paths, 16)  # deterministic: the same batches...
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"]) for a, b in zip(batches, again))
    stream, position = batches[9][STREAM_KEY].tolist()  # what a checkpoint after 10 batches saves
    assert stream == 0 and position > 40  # more raw samples than 10 x 4 examples: some were skipped
    resumed = take(paths, 6, start=10, positions=[position])  # ...and a resume continues exactly
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(batches[10:], resumed))


def test_only_damaged_data_is_a_clear_error_not_a_hang(tiny_shards, tmp_path):
    paths, _, _ = damaged(tiny_shards, tmp_path)
    for p in paths:
        Path(p).write_bytes(b"garbage" * 100)
    with pytest.raises(DataError, match=r"yielded no sample in a whole pass"):
        take(paths, 1)


def test_too_many_bad_samples_in_a_row_stop_the_run(tiny_shards, tmp_path):
    paths, _, bad_key = damaged(tiny_shards, tmp_path)
    with pytest.raises(DataError, match=rf"1 samples in a row failed to decode \(data.max_bad_samples=0\); the last, {bad_key}"):
        take(paths, 16, max_bad_samples=0)


def test_a_modality_that_drops_every_sample_is_a_clear_error_not_a_hang(tiny_shards):
    modality = vision()
    modality.example = lambda sample, rng: None  # e.g. every clip shorter than model.min_samples
    with pytest.raises(DataError, match=r"none of the 32 samples of a whole pass gave a training example"):
        take(resolve_shards(str(tiny_shards)), 1, modality=modality)


def copied_manifest(tiny_shards: Path, tmp_path: Path) -> tuple[Path, dict]:
    import json
    data = tmp_path / "shards"
    shutil.copytree(tiny_shards, data)
    return data, json.loads((data / "manifest.json").read_text())


def test_a_shard_listed_with_no_samples_that_holds_some_is_refused(tiny_shards, tmp_path):
    """samples: 0 is what data_prep writes for a shard whose every input was skipped (an empty tar); an edited or
    stale entry that says so of a full shard would silently drop it."""
    import json
    from pipeline.config import ConfigError
    data, manifest = copied_manifest(tiny_shards, tmp_path)
    manifest["shards"][2]["samples"] = 0
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=rf"lists \['{manifest['shards'][2]['name']}'\] with 0 samples, but the "
                                          rf"file holds samples.*Re-create it with data_prep"):
        resolve_shards(str(data), vision())
    # a truly empty shard (every input skipped) is left out, as before
    empty = data / manifest["shards"][2]["name"]
    with tarfile.open(empty, "w"):
        pass
    manifest["shards"][2]["bytes"] = empty.stat().st_size
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert len(resolve_shards(str(data), vision())) == len(manifest["shards"]) - 1


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_a_shard_listed_under_two_names_is_refused(tiny_shards, tmp_path, link):
    """A second name of one shard file (a link beside it, listed as another shard) would be read twice per pass."""
    import json
    from pipeline.config import ConfigError
    data, manifest = copied_manifest(tiny_shards, tmp_path)
    first = manifest["shards"][0]
    alias = data / "alias-000.tar"
    (alias.symlink_to if link == "symlink" else alias.hardlink_to)(data / first["name"])
    manifest["shards"].append({**first, "name": alias.name})
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=rf"shards '{first['name']}' and 'alias-000.tar' are the same file"):
        resolve_shards(str(data), vision())


def test_no_inode_numbers_means_no_alias_check(tiny_shards, tmp_path, monkeypatch):
    """Some FUSE and SMB mounts report inode 0 for every file: shards there are not taken for aliases of each other."""
    import os
    from data_prep import core
    real = os.stat
    monkeypatch.setattr(core.os, "stat", lambda p, *a, **k: os.stat_result((*real(p, *a, **k)[:1], 0,
                                                                          *real(p, *a, **k)[2:10])))
    assert len(resolve_shards(str(tiny_shards), vision())) == 8
