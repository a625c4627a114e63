"""Audio data prep: the pure item processor, and end-to-end runs through the shared shard writer.

The prepared audio is checked with independent readers (soundfile on the shard bytes, webdataset,
tarfile, hashlib) against the analytic signals the fixtures wrote, never against the code under test.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from data_prep import audio, core

try:  # tests/ is a plain directory (rootdir on sys.path) or a package
    from audio_fixtures import TRANSCRIPTS, AudioTree, Good, chirp, make_tree, sine, tone_file
except ImportError:
    from tests.audio_fixtures import TRANSCRIPTS, AudioTree, Good, chirp, make_tree, sine, tone_file

REPO = Path(__file__).resolve().parents[1]
SR = 16000
META_KEYS = {"path", "duration", "samples", "orig_sample_rate", "orig_channels", "speaker", "chapter",
             "utterance", "transcript", "piece", "clipped"}


# ----------------------------------------------------------------------------- helpers


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode(flac: bytes) -> np.ndarray:
    """Independent decode of stored bytes: must be 16 kHz mono FLAC PCM_16."""
    info = soundfile.info(io.BytesIO(flac))
    assert (info.format, info.subtype, info.samplerate, info.channels) == ("FLAC", "PCM_16", SR, 1)
    wav, rate = soundfile.read(io.BytesIO(flac), dtype="float64")
    assert rate == SR and wav.ndim == 1
    return wav


def expected_16k(good: Good, n: int) -> np.ndarray | None:
    """The analytic mono signal at 16 kHz (mean of the channels), or None for a chirp."""
    if not good.tones:
        return None
    return sum(sine(a, f, SR, n) for a, f in good.tones) / len(good.tones)


def peak_hz(wav: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return float(np.argmax(spectrum) * SR / len(wav))


def run_main(argv: list[str]) -> tuple[core.PrepReport, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        report = audio.main([*argv, "--quiet"])
    return report, out.getvalue()


def prep(tree: AudioTree, out: Path, *extra: str) -> tuple[core.PrepReport, str]:
    return run_main(["--input", str(tree.root), "--output", str(out), "--shard-size", "3", *extra])


def wds_samples(out: Path) -> list[dict]:
    import webdataset as wds

    urls = [s["path"] for s in core.read_manifest(out)["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False))


def by_path(samples: list[dict]) -> dict[str, list[tuple[dict, bytes]]]:
    found: dict[str, list] = {}
    for s in samples:
        meta = json.loads(s["json"])
        found.setdefault(meta["path"], []).append((meta, s["flac"], s["__key__"]))
    return found


def file_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> AudioTree:
    return make_tree(tmp_path_factory.mktemp("audio") / "in")


@pytest.fixture(scope="module")
def prepared(tree, tmp_path_factory):
    """One single-worker run over the whole tree, shared by read-only tests."""
    base = tmp_path_factory.mktemp("run")
    before = {p: p.stat().st_mtime_ns for p in tree.root.rglob("*")}
    report, stdout = prep(tree, base / "out")
    return base, base / "out", report, stdout, before


# ----------------------------------------------------------------------------- item processor


def test_processor_outputs_16k_mono_with_duration_and_signal_preserved(tree):
    for rel, good in tree.good.items():
        (sample,) = audio.audio_samples(tree.data[rel], rel)
        wav = decode(sample["flac"])
        assert abs(len(wav) / SR - good.seconds) <= 1 / SR, rel
        meta = sample["json"]
        assert set(meta) == META_KEYS
        assert (meta["samples"], meta["duration"]) == (len(wav), len(wav) / SR)
        assert (meta["orig_sample_rate"], meta["orig_channels"]) == (good.rate, good.channels), rel
        assert meta["piece"] is None and meta["clipped"] is good.clipped, rel
        assert sample["__stats__"] == {"seconds": len(wav) / SR, "hours": len(wav) / SR / 3600}
        ref = expected_16k(good, len(wav))
        if ref is not None and not good.clipped and "u8" not in rel:
            inner = slice(64, -64)  # resampling filters ring at the edges
            assert np.abs(wav[inner] - ref[inner]).max() < 1e-3, rel


def test_resampled_1khz_sine_keeps_its_frequency(tree):
    for rel, good in tree.good.items():
        if good.tones and all(f == 1000 for _, f in good.tones):
            (sample,) = audio.audio_samples(tree.data[rel], rel)
            assert abs(peak_hz(decode(sample["flac"])) - 1000) < 3, (rel, good.rate)


def test_downmix_is_the_mean_of_the_channels(tree):
    rel = "misc/tone_44k1_stereo_16bit.wav"  # 0.6 sin(1 kHz) left, 0.4 sin(3 kHz) right
    wav = decode(audio.audio_samples(tree.data[rel], rel)[0]["flac"])
    spectrum = np.abs(np.fft.rfft(wav)) * 2 / len(wav)
    assert spectrum[1000] == pytest.approx(0.3, abs=0.01) and spectrum[3000] == pytest.approx(0.2, abs=0.01)


def test_chirp_survives_resampling(tree):
    rel = "misc/chirp_48k_mono_24bit.wav"
    wav = decode(audio.audio_samples(tree.data[rel], rel)[0]["flac"])
    ref = chirp(SR, len(wav))
    assert np.abs(wav[64:-64] - ref[64:-64]).max() < 1e-3


def test_16k_mono_flac_is_copied_byte_for_byte(tree):
    rel = "LibriSpeech/train-clean-100/103/1240/103-1240-0000.flac"
    (sample,) = audio.audio_samples(tree.data[rel], rel)
    assert sample["flac"] == tree.data[rel]
    # 16 kHz mono 16-bit WAV is not resampled either: the samples come through exactly
    data, _ = tone_file(((0.25, 440),), SR, 0.5, "WAV", "PCM_16")
    (sample,) = audio.audio_samples(data, "x.wav")
    assert np.array_equal(soundfile.read(io.BytesIO(sample["flac"]), dtype="int16")[0],
                          soundfile.read(io.BytesIO(data), dtype="int16")[0])


def test_float_beyond_full_scale_is_clipped_and_flagged(tree):
    rel = "misc/loud_16k_float.wav"
    (sample,) = audio.audio_samples(tree.data[rel], rel)
    pcm, _ = soundfile.read(io.BytesIO(sample["flac"]), dtype="int16")
    assert sample["json"]["clipped"] is True
    assert pcm.max() == 32767 and pcm.min() == -32768  # saturated, not wrapped around
    assert np.all(np.sign(pcm[np.abs(pcm) > 1000]) == np.sign(sine(1.5, 1000, SR, len(pcm)))[np.abs(pcm) > 1000])


def test_processor_rejects_bad_input_with_reason(tree):
    for rel, reason in tree.bad.items():
        if reason == "unsupported extension":
            continue  # decided by discovery, not by the processor
        with pytest.raises(core.SkipItem, match=f"^{reason}"):
            audio.audio_samples(tree.data[rel], rel)


def test_min_and_max_seconds_skip_with_reasons():
    data, _ = tone_file(((0.5, 1000),), 22050, 2.5, "WAV", "PCM_16")
    with pytest.raises(core.SkipItem, match="^too short"):
        audio.audio_samples(data, "a.wav", opts=audio.Options(min_seconds=3.0))
    with pytest.raises(core.SkipItem, match="^too long"):
        audio.audio_samples(data, "a.wav", opts=audio.Options(max_seconds=2.0))
    (whole,) = audio.audio_samples(data, "a.wav", opts=audio.Options(min_seconds=2.5, max_seconds=2.5))
    assert whole["json"]["samples"] == 40000


@pytest.mark.parametrize("min_seconds,expected", [(0.0, [16000, 16000, 8000]), (0.6, [16000, 16000])])
def test_split_long_cuts_consecutive_pieces(min_seconds, expected):
    data, _ = tone_file(((0.5, 1000),), 44100, 2.5, "FLAC", "PCM_16")
    opts = audio.Options(min_seconds=min_seconds, max_seconds=1.0, split_long=True)
    pieces = audio.audio_samples(data, "long.flac", opts=opts)
    assert [p["json"]["samples"] for p in pieces] == expected
    assert [p["json"]["piece"] for p in pieces] == list(range(len(expected)))
    assert [p["__suffix__"] for p in pieces] == [f"_p{i:05d}" for i in range(len(expected))]
    whole = decode(audio.audio_samples(data, "long.flac")[0]["flac"])
    joined = np.concatenate([decode(p["flac"]) for p in pieces])
    assert np.array_equal(joined, whole[: len(joined)])  # consecutive, nothing lost or repeated


def test_transcripts_and_ids_come_from_the_librispeech_layout(tree):
    found = audio.discover(tree.root)
    utts = {rel: utt for _, rel, utt in found.files}
    for rel, good in tree.good.items():
        assert utts[rel] == audio.Utterance(good.speaker, good.chapter, good.utterance, good.transcript), rel
    assert found.transcripts == len(TRANSCRIPTS)
    assert not any(rel.endswith(".trans.txt") for rel in utts)


# ----------------------------------------------------------------------------- end to end


def test_every_good_file_is_in_the_shards_exactly_once(prepared, tree):
    _, out, _, _, _ = prepared
    samples = wds_samples(out)
    found = by_path(samples)
    assert sorted(found) == sorted(tree.good)
    for rel, [(meta, flac, key)] in found.items():
        good = tree.good[rel]
        wav = decode(flac)
        assert abs(len(wav) / SR - good.seconds) <= 1 / SR, rel
        assert meta["samples"] == len(wav) and meta["transcript"] == good.transcript, rel
        assert (meta["speaker"], meta["chapter"], meta["utterance"]) == (good.speaker, good.chapter,
                                                                         good.utterance), rel
        assert len(key) == 9 and key.isdigit()
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys)


def test_bad_files_are_skipped_with_reasons_and_reported(prepared, tree):
    _, _, report, stdout, _ = prepared
    skipped = {s["path"]: s["reason"] for s in report.manifest["skipped"]}
    assert set(skipped) == set(tree.bad)
    for rel, reason in tree.bad.items():
        assert skipped[rel].startswith(reason), (rel, skipped[rel])
    assert f"{len(tree.bad)} skipped" in stdout and "bad/truncated.flac" in stdout


def test_manifest_hours_add_up(prepared, tree):
    _, out, _, stdout, _ = prepared
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["modality"] == "audio" and manifest["sample_rate"] == SR
    assert manifest["params"]["min_seconds"] == 0.0 and manifest["params"]["max_seconds"] is None
    seconds = sum(len(decode(s["flac"])) for s in wds_samples(out)) / SR
    totals = manifest["totals"]
    assert totals["seconds"] == pytest.approx(seconds, rel=1e-12)
    assert totals["hours"] == pytest.approx(seconds / 3600, rel=1e-12)
    assert sum(s["hours"] for s in manifest["shards"]) == pytest.approx(totals["hours"], rel=1e-12)
    assert seconds == pytest.approx(sum(g.seconds for g in tree.good.values()), abs=len(tree.good) / SR)
    for rec in manifest["shards"]:
        with_dur = [json.loads(s["json"])["duration"] for s in wds_samples(out) if s["__url__"].endswith(rec["name"])]
        assert rec["seconds"] == pytest.approx(sum(with_dur)) and rec["samples"] == len(with_dur)
        sidecar = json.loads((out / f".{rec['name']}.json").read_text())
        assert sidecar["sha256"] == rec["sha256"] == sha((out / rec["name"]).read_bytes())
        assert sidecar["stats"].get("hours", 0) == rec["hours"]  # an all-skipped shard has no stats
    assert f"{totals['hours']:.3f} hours" in stdout
    assert core.read_manifest(out, verify=True)["totals"] == totals


def test_nothing_is_written_outside_out(prepared, tree):
    base, out, report, _, before = prepared
    assert {p: p.stat().st_mtime_ns for p in tree.root.rglob("*")} == before
    assert [p.name for p in base.iterdir()] == ["out"]
    shards = {s["name"] for s in report.manifest["shards"]}
    assert {p.name for p in out.iterdir()} == shards | {f".{n}.json" for n in shards} | {"manifest.json"}


def test_length_options_end_to_end(tree, tmp_path):
    report, _ = prep(tree, tmp_path / "drop", "--min-seconds", "0.7", "--max-seconds", "1.25")
    reasons = {s["path"]: s["reason"] for s in report.manifest["skipped"]}
    kept = by_path(wds_samples(tmp_path / "drop"))
    for rel, good in tree.good.items():
        if good.seconds < 0.7:
            assert reasons[rel].startswith("too short"), rel
        elif good.seconds > 1.25:
            assert reasons[rel].startswith("too long"), rel
        else:
            assert rel in kept, rel

    report, _ = prep(tree, tmp_path / "split", "--min-seconds", "0.7", "--max-seconds", "1.0", "--split-long")
    kept = by_path(wds_samples(tmp_path / "split"))
    rel = "LibriSpeech/train-clean-100/103/1240/103-1240-0001.flac"  # 2.5 s -> 1.0 + 1.0 (+ 0.5 dropped)
    pieces = sorted(kept[rel], key=lambda m: m[0]["piece"])
    assert [(m["piece"], m["samples"]) for m, _, _ in pieces] == [(0, 16000), (1, 16000)]
    assert [k.split("_")[1] for _, _, k in pieces] == ["p00000", "p00001"]
    assert all(m["transcript"] == TRANSCRIPTS["103-1240-0001"] for m, _, _ in pieces)
    unsplit = kept["misc/tone_44k1_stereo_16bit.wav"]  # exactly 1.0 s: not split
    assert [(m["piece"], len(k)) for m, _, k in unsplit] == [(None, 9)]
    assert report.manifest["totals"]["samples"] == sum(len(v) for v in kept.values())


def test_rerun_reuses_shards_and_many_workers_give_identical_bytes(prepared, tree, tmp_path):
    _, out, first, _, _ = prepared
    again, stdout = prep(tree, out)
    assert again.reused == first.manifest["totals"]["shards"] and again.manifest == first.manifest
    # the real entry point, so spawned workers must import data_prep.audio themselves
    cmd = [sys.executable, "-m", "data_prep.audio", "--input", str(tree.root), "--output",
           str(tmp_path / "two"), "--shard-size", "3", "--workers", "2", "--quiet"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert file_bytes(tmp_path / "two") == file_bytes(out)


@pytest.mark.parametrize("extra,message", [
    (["--split-long"], "--split-long needs --max-seconds"),
    (["--min-seconds", "2", "--max-seconds", "1"], "is above --max-seconds"),
])
def test_inconsistent_options_are_clear_errors(tree, tmp_path, extra, message):
    with pytest.raises(SystemExit) as exc:
        audio.main(["--input", str(tree.root), "--output", str(tmp_path / "out"), "--quiet", *extra])
    assert str(exc.value.code).startswith("error: ") and message in str(exc.value.code)
    assert not (tmp_path / "out").exists()


def test_help_documents_every_option():
    done = subprocess.run([sys.executable, "-m", "data_prep.audio", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for option in ("--input", "--output", "--name", "--shard-size", "--workers", "--min-seconds",
                   "--max-seconds", "--split-long", "--format", "--quiet"):
        assert option in done.stdout


# ----------------------------------------------------------------------------- class-folder labels


@pytest.fixture(scope="module")
def class_tree(tmp_path_factory) -> Path:
    """dog/ and cat/ folders of clips (cat/long.wav: 2.5 s, split into pieces) and a clip outside them."""
    root = tmp_path_factory.mktemp("classes") / "in"
    clips = {"dog/a.wav": (22050, 0.6), "dog/deeper/b.flac": (16000, 0.5), "cat/c.wav": (44100, 0.7),
             "cat/long.wav": (16000, 2.5), "stray.wav": (16000, 0.5)}
    for rel, (rate, seconds) in clips.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        fmt = "FLAC" if rel.endswith(".flac") else "WAV"
        (root / rel).write_bytes(tone_file(((0.5, 440),), rate, seconds, fmt, "PCM_16")[0])
    return root


def test_class_folder_tree_gives_labelled_shards_and_pieces_keep_their_label(class_tree, tmp_path):
    report, stdout = run_main(["--input", str(class_tree), "--output", str(tmp_path / "out"), "--layout", "classes",
                               "--max-seconds", "1", "--split-long"])
    manifest = core.read_manifest(tmp_path / "out")
    assert manifest["classes"] == ["cat", "dog"] and manifest["params"]["layout"] == "classes"
    assert {s["path"]: s["reason"] for s in manifest["skipped"]} == {"stray.wav": "not inside a class folder"}
    samples = wds_samples(tmp_path / "out")
    labels = {}
    for s in samples:
        meta = json.loads(s["json"])
        assert meta["label"] == meta["path"].split("/")[0] and set(meta) == META_KEYS | {"label"}
        assert s["cls"].decode("ascii") == str(manifest["classes"].index(meta["label"]))
        labels.setdefault(meta["path"], []).append(meta["label"])
    assert labels == {"cat/c.wav": ["cat"], "cat/long.wav": ["cat"] * 3, "dog/a.wav": ["dog"],
                      "dog/deeper/b.flac": ["dog"]}  # 2.5 s in 1 s pieces: 3 samples, each labelled
    assert report.manifest["totals"]["samples"] == len(samples) == 6 and "1 skipped" in stdout


def test_layout_auto_decides_as_for_images_and_flat_is_the_default(class_tree, tree, tmp_path):
    assert audio.discover(class_tree, "auto").classes is None  # stray.wav at the top level: flat
    only_folders = shutil.copytree(class_tree, tmp_path / "in", ignore=lambda d, names: ["stray.wav"])
    found = audio.discover(only_folders, "auto")
    assert found.classes == ["cat", "dog"] and [label.name for label in found.labels] == ["cat", "cat", "dog", "dog"]
    default = audio.discover(tree.root)  # only folders at its top level, yet unlabelled: LibriSpeech looks alike
    assert default.classes is None and default.labels is None
    assert "--layout" in audio.build_parser().format_help()


def test_unlabelled_shards_carry_no_label(prepared):
    _, out, report, _, _ = prepared
    assert "classes" not in report.manifest and "layout" not in report.manifest["params"]
    for s in wds_samples(out):
        assert "cls" not in s and set(json.loads(s["json"])) == META_KEYS
