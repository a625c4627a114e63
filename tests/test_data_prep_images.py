"""Image data prep: the pure item processor, and the shared shard writer end to end.

Shards are checked with independent readers (webdataset, tarfile, hashlib), never
with the code under test.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from data_prep import core, images

try:  # tests/ is a plain directory (rootdir on sys.path) or a package
    from image_fixtures import ImageTree, make_tree
except ImportError:
    from tests.image_fixtures import ImageTree, make_tree

REPO = Path(__file__).resolve().parents[1]
IMAGE_KEYS = ("jpg", "png", "webp")


# ----------------------------------------------------------------------------- helpers


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_main(argv: list[str]) -> tuple[core.PrepReport, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        report = images.main([*argv, "--quiet"])
    return report, out.getvalue()


def prep(tree: ImageTree, out: Path, *extra: str) -> tuple[core.PrepReport, str]:
    return run_main(["--input", str(tree.root), "--output", str(out), "--shard-size", "3", *extra])


def wds_samples(out: Path) -> list[dict]:
    import webdataset as wds

    urls = [s["path"] for s in core.read_manifest(out)["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False))


def tar_members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root (not following links) with its content hash and mtime."""
    snap = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        data = sha(p.read_bytes()) if p.is_file() and not p.is_symlink() else None
        snap[p.relative_to(root).as_posix()] = (data, st.st_mtime_ns)
    return snap


def file_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> ImageTree:
    base = tmp_path_factory.mktemp("tree")
    return make_tree(base / "in", base / "outside")


@pytest.fixture(scope="module")
def prepared(tree, tmp_path_factory):
    """One single-worker run over the class tree, shared by read-only tests."""
    base = tmp_path_factory.mktemp("run")
    before = snapshot(tree.root.parent)
    report, stdout = prep(tree, base / "out")
    return base, base / "out", report, stdout, before


# ----------------------------------------------------------------------------- item processor


def test_processor_keeps_original_bytes_under_detected_format(tree):
    label = images.ClassLabel(1, "dog")
    for rel, good in tree.good.items():
        sample = images.image_sample(tree.data[rel], rel, label)
        assert sample[good.ext] == tree.data[rel], rel
        assert not {k for k in IMAGE_KEYS if k != good.ext} & set(sample)
        assert sample["cls"] == "1"
        assert sample["json"] == {"path": rel, "label": "dog", "width": good.size[0],
                                  "height": good.size[1], "mode": good.mode}


def test_processor_rejects_bad_input_with_reason(tree):
    for rel, reason in tree.bad.items():
        if reason in ("unsupported extension", "outside input directory"):
            continue  # decided by discovery, not by the processor
        with pytest.raises(core.SkipItem, match=f"^{reason}"):
            images.image_sample(tree.data[rel], rel, None)


def test_truncated_images_are_not_silently_accepted(tree, monkeypatch):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        images.image_sample(tree.data["cat/truncated.jpg"], "cat/truncated.jpg", None)


def test_processor_resize_flattens_alpha_on_white():
    rgba = Image.new("RGBA", (80, 40), (0, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    sample = images.image_sample(buf.getvalue(), "a.png", None, resize=20, quality=90)
    out = Image.open(io.BytesIO(sample["jpg"]))
    assert (out.format, out.mode, out.size) == ("JPEG", "RGB", (40, 20))
    assert out.convert("L").getextrema()[0] > 240  # transparent -> white, not black
    assert "cls" not in sample and sample["json"]["label"] is None


# ----------------------------------------------------------------------------- end to end


def test_every_good_image_is_in_the_shards_exactly_once(prepared, tree):
    _, out, _, _, _ = prepared
    samples = wds_samples(out)
    by_hash: dict[str, int] = {}
    for s in samples:
        (ext,) = [k for k in IMAGE_KEYS if k in s]
        by_hash[sha(s[ext])] = by_hash.get(sha(s[ext]), 0) + 1
        meta = json.loads(s["json"])
        assert tree.good[meta["path"]].ext == ext
        assert sha(tree.data[meta["path"]]) == sha(s[ext])
    assert by_hash == {sha(tree.data[rel]): 1 for rel in tree.good}
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys) and all(len(k) == 9 and k.isdigit() for k in keys)


def test_labels_match_class_folders(prepared):
    _, out, _, _, _ = prepared
    manifest = core.read_manifest(out)
    assert manifest["classes"] == ["cat", "dog"]
    for s in wds_samples(out):
        meta = json.loads(s["json"])
        assert meta["label"] == meta["path"].split("/")[0]
        assert s["cls"].decode("ascii") == str(manifest["classes"].index(meta["label"]))


def test_bad_files_are_skipped_with_reasons_and_reported(prepared, tree):
    _, out, report, stdout, _ = prepared
    skipped = {s["path"]: s["reason"] for s in report.manifest["skipped"]}
    assert set(skipped) == set(tree.bad)
    for rel, reason in tree.bad.items():
        assert skipped[rel].startswith(reason), (rel, skipped[rel])
    assert report.manifest["totals"]["skipped"] == len(tree.bad)
    assert f"{len(tree.bad)} skipped" in stdout
    assert "cat/truncated.jpg" in stdout


def test_manifest_and_sidecars_match_the_files(prepared, tree):
    _, out, _, _, _ = prepared
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == 1 and manifest["modality"] == "image" and manifest["name"] == "images"
    assert manifest["params"]["shard_size"] == 3 and manifest["params"]["resize"] is None
    for rec in manifest["shards"]:
        data = (out / rec["name"]).read_bytes()
        sidecar = json.loads((out / f".{rec['name']}.json").read_text())
        assert rec["sha256"] == sidecar["sha256"] == sha(data)
        assert rec["bytes"] == sidecar["bytes"] == len(data)
        keys = {m.name.split(".", 1)[0] for m in tar_members(out / rec["name"])}
        assert rec["samples"] == sidecar["samples"] == len(keys)
    totals = manifest["totals"]
    assert totals["samples"] == len(tree.good) == sum(r["samples"] for r in manifest["shards"])
    assert totals["shards"] == len(manifest["shards"])
    assert core.read_manifest(out, verify=True)["dir"] == str(out.resolve())


def test_shards_are_deterministic_tars(prepared):
    _, out, _, _, _ = prepared
    for rec in core.read_manifest(out)["shards"]:
        for m in tar_members(Path(rec["path"])):
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)


def test_nothing_is_written_outside_out_and_no_temp_files(prepared, tree):
    base, out, report, _, before = prepared
    assert snapshot(tree.root.parent) == before
    assert [p.name for p in base.iterdir()] == ["out"]
    names = {p.name for p in out.iterdir()}
    shards = {s["name"] for s in report.manifest["shards"]}
    assert names == shards | {f".{n}.json" for n in shards} | {"manifest.json"}


def test_flat_folder_has_no_labels(tmp_path):
    tree = make_tree(tmp_path / "in", tmp_path / "outside", flat=True)
    report, _ = prep(tree, tmp_path / "out")
    assert report.manifest["classes"] is None and report.manifest["params"]["layout"] == "flat"
    samples = wds_samples(tmp_path / "out")
    assert sorted(json.loads(s["json"])["path"] for s in samples) == sorted(tree.good)
    assert all("cls" not in s and json.loads(s["json"])["label"] is None for s in samples)
    assert {s["path"] for s in report.manifest["skipped"]} == set(tree.bad)


def test_rerun_reuses_complete_shards_and_redoes_broken_ones(tree, tmp_path):
    out = tmp_path / "out"
    first, _ = prep(tree, out)
    original = file_bytes(out)
    names = [s["name"] for s in first.manifest["shards"]]
    assert len(names) >= 4
    mtimes = {n: (out / n).stat().st_mtime_ns for n in names}
    (out / names[0]).unlink()  # deleted tar
    broken = bytearray(original[names[1]])
    broken[600] ^= 0xFF  # same size, different content: only the sha256 catches it
    (out / names[1]).write_bytes(bytes(broken))
    (out / f".{names[2]}.tmp-99999").write_bytes(b"left by a killed run")
    (out / f".{names[3]}.json.tmp-99999").write_text("{")

    second, stdout = prep(tree, out)
    assert f"2 written, {len(names) - 2} reused" in stdout
    assert file_bytes(out) == original  # repaired, temps gone, manifest identical
    assert all((out / n).stat().st_mtime_ns == mtimes[n] for n in names[2:])
    assert second.manifest == first.manifest


def test_changed_options_rewrite_instead_of_reusing(tree, tmp_path):
    out = tmp_path / "out"
    prep(tree, out)
    report, _ = prep(tree, out, "--resize", "24")
    assert report.reused == 0 and report.written == report.manifest["totals"]["shards"]


def test_resize_shrinks_the_shorter_side(tree, tmp_path):
    report, _ = prep(tree, tmp_path / "out", "--resize", "24", "--quality", "90")
    assert report.manifest["params"]["resize"] == 24
    samples = wds_samples(tmp_path / "out")
    assert len(samples) == len(tree.good)
    for s in samples:
        assert "png" not in s and "webp" not in s
        img = Image.open(io.BytesIO(s["jpg"]))
        meta = json.loads(s["json"])
        src = tree.good[meta["path"]].size
        assert (img.format, img.mode, min(img.size)) == ("JPEG", "RGB", 24)
        assert abs(img.width / img.height - src[0] / src[1]) < 0.05
        assert (meta["width"], meta["height"], meta["mode"]) == (*img.size, "RGB")


def test_many_workers_give_byte_identical_shards(tree, tmp_path):
    prep(tree, tmp_path / "one", "--shard-size", "2")
    # the real entry point, so spawned workers must import data_prep.images themselves
    cmd = [sys.executable, "-m", "data_prep.images", "--input", str(tree.root), "--output",
           str(tmp_path / "two"), "--shard-size", "2", "--workers", "2", "--quiet"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "skipped" in done.stdout
    assert file_bytes(tmp_path / "two") == file_bytes(tmp_path / "one")


def test_slurm_array_tasks_merge_into_the_single_run_manifest(tree, tmp_path, prepared):
    _, single_out, single, _, _ = prepared
    out = tmp_path / "out"
    for i in range(3):
        prep(tree, out, "--task-index", str(i), "--num-tasks", "3")
    with pytest.raises(core.PrepError, match="missing"):
        core.merge_manifests([out / core.task_manifest_name(0, 3)], out / "manifest.json")
    with contextlib.redirect_stdout(io.StringIO()):
        core.main(["merge", str(out)])
    merged = json.loads((out / "manifest.json").read_text())
    assert merged == single.manifest
    for rec in merged["shards"]:
        assert (out / rec["name"]).read_bytes() == (single_out / rec["name"]).read_bytes()


# ----------------------------------------------------------------------------- errors and safety


def test_unsafe_name_is_rejected(tree, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        images.main(["--input", str(tree.root), "--output", str(tmp_path / "out"), "--name", "../x"])
    assert exc.value.code == 2 and "invalid dataset name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(core.PrepError):
        core.write_shards([], images.process_image, tmp_path / "out", "a/b", modality="image")


@pytest.mark.parametrize("case", ["missing", "no_images", "out_inside"])
def test_clear_errors_without_traceback(tmp_path, case):
    src = tmp_path / "src"
    if case != "missing":
        src.mkdir()
        (src / "readme.txt").write_text("no images here")
    out = src / "shards" if case == "out_inside" else tmp_path / "out"
    if case == "out_inside":
        (src / "a.png").write_bytes(b"")
    with pytest.raises(SystemExit) as exc:
        images.main(["--input", str(src), "--output", str(out), "--quiet"])
    message = str(exc.value.code)
    assert message.startswith("error: ")
    assert {"missing": "not found", "no_images": "no supported image files",
            "out_inside": "must not be inside"}[case] in message
    assert not (tmp_path / "out").exists() and not (src / "shards").exists()


def _write_manifest(directory: Path, name: str, data: bytes = b"x" * 10) -> Path:
    record = {"name": name, "samples": 1, "bytes": len(data), "sha256": sha(data)}
    manifest = {"format": 1, "modality": "image", "name": "images", "shards": [record],
                "totals": {}, "params": {}, "skipped": []}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory / "manifest.json"


@pytest.mark.parametrize("name,match", [("../evil.tar", "unsafe"), ("sub/x.tar", "unsafe"),
                                        ("link.tar", "outside"), ("gone.tar", "missing")])
def test_read_manifest_rejects_unsafe_or_missing_shards(tmp_path, name, match):
    data_dir = tmp_path / "data"
    (data_dir / "sub").mkdir(parents=True)
    for target in (tmp_path / "evil.tar", data_dir / "sub" / "x.tar"):
        target.write_bytes(b"x" * 10)
    os.symlink(tmp_path / "evil.tar", data_dir / "link.tar")
    with pytest.raises(ValueError, match=match):
        core.read_manifest(_write_manifest(data_dir, name))


def test_read_manifest_accepts_a_good_one_and_checks_size(tmp_path):
    (tmp_path / "ok.tar").write_bytes(b"x" * 10)
    manifest = core.read_manifest(_write_manifest(tmp_path, "ok.tar"))
    assert manifest["shards"][0]["path"] == str(tmp_path.resolve() / "ok.tar")
    (tmp_path / "ok.tar").write_bytes(b"x" * 11)
    with pytest.raises(ValueError, match="size"):
        core.read_manifest(tmp_path)


def test_help_exits_zero_and_core_imports_without_torch():
    done = subprocess.run([sys.executable, "-m", "data_prep.images", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for option in ("--input", "--output", "--name", "--shard-size", "--workers", "--resize", "--quality"):
        assert option in done.stdout
    code = "import sys, data_prep.core; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
