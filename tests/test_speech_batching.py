"""Speech length-bucketed batches (data.max_tokens): the budget, sorted neighbours, exact resume and
no example lost or repeated across windows; the key is refused for other modalities."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import ROOT
from pipeline.config import ConfigError, DataConfig
from pipeline.data import STREAM_KEY, make_loader, pack_position, resolve_shards, unpack_position
from pipeline.experiment import load_experiment
from pipeline.modalities.speech import Speech, length_batches

MAX_TOKENS = 100000  # 2 clips of 3 s, 6 of 1 s


class Tapped(Speech):
    """Speech whose batches also carry each clip's uncropped length and its example seed (unique per raw sample)."""

    def collate(self, examples):
        return {**super().collate(examples), "lengths": torch.tensor([ex["audio"].numel() for ex in examples]),
                "seeds": torch.tensor([ex["seed"] for ex in examples])}


def tapped() -> Tapped:
    cfg = load_experiment(ROOT / "configs/speech_tiny.yaml", ["model.max_samples=48000"])  # 1-3 s clips: 1-3 s
    return Tapped(cfg.model)


def batches(shards, n, workers=0, start=0, positions=None, max_tokens=MAX_TOKENS, window=10, batch_size=4):
    cfg = DataConfig(workers=workers, shuffle_buffer=4, max_tokens=max_tokens, bucket_window=window)
    loader = make_loader(resolve_shards(str(shards)), tapped(), cfg, batch_size, seed=3, dp_rank=0, dp=1,
                         start_batch=start, positions=positions)
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_length_batches_keep_the_budget_and_sorted_neighbours():
    rng = random.Random(0)
    lengths = [rng.randrange(32000, 320001) for _ in range(500)]
    cut = length_batches(lengths, 3800000)
    assert sorted(i for b in cut for i in b) == list(range(500))  # a partition of the window
    order = [i for b in cut for i in b]
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)  # batches are runs of the sorted order
    for b, after in zip(cut, cut[1:] + [None]):
        assert len(b) * lengths[b[0]] <= 3800000  # clips x longest within the budget
        if after:  # greedy: the next clip would not have fitted
            assert (len(b) + 1) * lengths[b[0]] > 3800000
    assert length_batches([5000, 10], 4000) == [[0], [1]]  # an over-budget clip still forms a batch alone


def test_bucketed_stream_batches_respect_the_budget_and_crop_little(tiny_audio_shards):
    got = batches(tiny_audio_shards, 16)
    sizes = {b["audio"].shape[0] for b in got}
    assert len(sizes) > 1  # the clip count varies with the lengths
    kept = decoded = 0
    for b in got:
        lengths = b["lengths"].tolist()
        assert lengths == sorted(lengths, reverse=True)
        assert len(lengths) * lengths[0] <= MAX_TOKENS
        assert b["audio"].shape[1] == lengths[-1] and b["mask"].shape[0] == len(lengths)  # cropped to the shortest
        kept, decoded = kept + len(lengths) * lengths[-1], decoded + sum(lengths)
    fixed = batches(tiny_audio_shards, 8, max_tokens=0)  # the same clips, 4 per batch in stream order
    fixed_kept = sum(b["audio"].numel() for b in fixed) / sum(b["lengths"].sum().item() for b in fixed)
    assert kept / decoded > fixed_kept + 0.1


@pytest.mark.parametrize("workers", [0, 2])
def test_bucketed_stream_resumes_exactly(tiny_audio_shards, workers):
    total = 14
    straight = batches(tiny_audio_shards, total, workers=workers)
    mid_window = 0
    for k in (3, 8):
        positions = [0] * max(workers, 1)
        for b in straight[:k]:  # what the trainer keeps (and a checkpoint saves) after k batches
            stream, position = b[STREAM_KEY].tolist()
            positions[stream] = position
        mid_window += sum(unpack_position(p)[1] > 0 for p in positions)
        resumed = batches(tiny_audio_shards, total - k, workers=workers, start=k, positions=positions)
        for a, b in zip(straight[k:], resumed):
            assert set(a) == set(b)
            assert all(torch.equal(a[key], b[key]) for key in a), k
    assert mid_window  # some resume started inside a window: its batches taken were dropped, not re-sent


def test_no_example_is_lost_or_repeated_across_windows(tiny_audio_shards):
    window = 10  # a worker stream holds 24 clips per pass: windows also straddle the pass boundary
    plain = [s for b in batches(tiny_audio_shards, 40, max_tokens=0, batch_size=1) for s in b["seeds"].tolist()]
    seen, windows = [], 0
    for b in batches(tiny_audio_shards, 60, window=window):
        seen += b["seeds"].tolist()
        start, taken = unpack_position(b[STREAM_KEY][1].item())
        if taken == 0:  # the window's last batch: its end is a plain raw-sample count
            windows += 1
            assert sorted(seen) == sorted(plain[:windows * window]) and len(set(seen)) == len(seen)
        if windows == 4:
            break
    assert windows == 4


def test_positions_pack_into_one_int_that_reads_as_raw_samples_when_none_taken():
    assert pack_position(1234) == 1234 and unpack_position(1234) == (1234, 0)
    assert unpack_position(pack_position(987654321, 17)) == (987654321, 17)
    assert pack_position(2 ** 39, 2 ** 20) < 2 ** 63  # fits the int64 stream tensor


@pytest.mark.parametrize("preset", ["configs/text_tiny.yaml", "configs/vision_tiny.yaml"])
def test_max_tokens_is_refused_for_other_modalities(preset):
    with pytest.raises(ConfigError, match="modality=speech only"):
        load_experiment(ROOT / preset, ["data.max_tokens=100000"])
    with pytest.raises(ConfigError, match="no length-bucketed batching"):  # the stream refuses it as well
        make_loader(["x.tar"], load_experiment(ROOT / preset).make_modality(), DataConfig(max_tokens=100000), 4,
                    seed=0, dp_rank=0, dp=1)


def test_max_tokens_must_hold_a_full_length_clip():
    with pytest.raises(ConfigError, match="below model.max_samples=24000"):
        load_experiment(ROOT / "configs/speech_tiny.yaml", ["data.max_tokens=20000"])
    with pytest.raises(ConfigError, match="data.bucket_window"):
        DataConfig(bucket_window=0)


def train_speech(shards, out, extra=()):
    from conftest import torchrun
    args = ["-m", "pipeline.train", "--config", "configs/speech_tiny.yaml", f"data.manifest={shards}",
            f"train.output_dir={out}", "train.steps=6", "train.log_every=1", "train.save_every=3", "data.workers=2",
            "train.warmup_steps=2", "encoder.dropout=0.1", *extra]
    proc = torchrun(args, nproc=2)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.distributed
def test_bucketed_training_stops_and_resumes_bit_identically(tiny_audio_shards, tmp_path):
    """The trainer saves the packed stream positions (one int per stream, as before) and resumes mid-window."""
    import json
    full, split = tmp_path / "full", tmp_path / "split"
    train_speech(tiny_audio_shards, full)
    train_speech(tiny_audio_shards, split, ["train.stop_after=3"])
    positions = [torch.load(f, weights_only=True)["trainer"]["stream_positions"]
                 for f in sorted((split / "checkpoints/step_00000003").glob("d2v_rank*.pt"))]
    proc = train_speech(tiny_audio_shards, split)
    assert "resumed from" in proc.stdout + proc.stderr
    losses = [{r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())}
              for d in (full, split)]
    for step in range(4, 7):
        assert float(losses[0][step]).hex() == float(losses[1][step]).hex(), (step, losses)
    assert any(unpack_position(p)[1] for rank in positions for p in rank)  # it did resume inside a window
