"""Throughput of audio prep (``python -m data_prep.audio``) in seconds of audio per second, per core.

    python bench/bench_prep_audio.py [--files 60] [--seconds 5] [--workers 2] [--workdir runs/bench/prep_audio]

1. Generates ``--files`` clips of ``--seconds`` each, 44.1 kHz stereo 16-bit, alternating FLAC and WAV
   (amplitude-modulated harmonic tones with a pitch glide plus low noise, different per channel), and
   the same signals as 16 kHz mono 16-bit FLAC (the LibriSpeech case). Generation is not timed and is
   skipped when the files already exist.
2. prep 44.1k: times ``data_prep.audio.main([...])`` in this process writing the 44.1 kHz files into a
   fresh shard directory with ``--workers`` processes: worker spawn (each imports torch/torchaudio),
   read, decode, downmix, resample to 16 kHz, FLAC encode, tar, fsync, sha256, sidecars, manifest.
3. prep 16k: the same on the 16 kHz mono FLAC set: decoded to validate, bytes stored unchanged,
   torch never imported.
4. processor only: ``data_prep.audio.process_audio`` over the 44.1 kHz files in this process with one
   torch thread (torch already imported): the steady-state per-core cost, no spawn, no tar.
5. decode only: ``soundfile.read`` of the 44.1 kHz files, one process (the floor for any prep).

Each measurement is repeated ``--repeats`` times (interleaved) and the median is reported. "audio s/s"
is seconds of input audio per wall-clock second; "per core" divides by the processes used (the
workers for prep, 1 otherwise). Inputs are read from the page cache (just written or read).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    Stopwatch, add_run_args, add_workers_arg, clean_up, fmt, prep_parser, start_report, table, time_each, time_prep,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = prep_parser("audio", __doc__)
    p.add_argument("--files", type=int, default=60, help="clips to generate (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each clip (default: %(default)s)")
    p.add_argument("--rate", type=int, default=44100, help="sample rate of the stereo clips (default: %(default)s)")
    add_workers_arg(p, "audio")
    p.add_argument("--shard-size", type=int, default=20, help="data_prep.audio --shard-size (default: %(default)s)")
    add_run_args(p, "audio", "generated audio and shards")
    args = p.parse_args(argv)
    if args.files < 1 or args.seconds <= 0 or args.shard_size < 1 or args.repeats < 1 or args.workers < 0:
        p.error("--files, --shard-size and --repeats must be >= 1, --seconds > 0, --workers >= 0")
    return args


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def synth(rate: int, seconds: float, rng):
    """(frames, 2) float32: per channel, 5 harmonics of a gliding 100-250 Hz pitch with a 4 Hz
    syllable-like envelope, plus noise at -50 dB; peak about 0.5."""
    import numpy as np
    t = np.arange(round(rate * seconds)) / rate
    channels = []
    for _ in range(2):
        f0 = rng.uniform(100, 250) * (1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.2, 0.5) * t))
        phase = 2 * np.pi * np.cumsum(f0) / rate
        voice = sum(np.sin(k * phase) / k for k in range(1, 6))
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6.3)) ** 2
        channels.append(0.25 * voice * envelope + 0.003 * rng.standard_normal(len(t)))
    return np.stack(channels, axis=1).astype(np.float32)


def make_inputs(root: Path, files: int, seconds: float, rate: int, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """``files`` stereo clips at ``rate`` (FLAC/WAV alternating) and the same as 16 kHz mono FLAC."""
    import numpy as np
    import soundfile
    import torch
    from torchaudio.functional import resample
    rng = np.random.default_rng(seed)
    stereo, mono16k = [], []
    for i in range(files):
        wav = synth(rate, seconds, rng)  # always drawn, so file i does not depend on what exists
        path = root / f"{rate}_stereo" / f"clip{i:05d}.{'flac' if i % 2 == 0 else 'wav'}"
        path16 = root / "16000_mono" / f"clip{i:05d}.flac"
        for p, data, r in ((path, wav, rate), (path16, None, 16000)):
            if not p.exists():
                p.parent.mkdir(parents=True, exist_ok=True)
                if data is None:
                    data = resample(torch.from_numpy(wav.mean(1)), rate, 16000).numpy()
                soundfile.write(p, data, r, subtype="PCM_16")
        stereo.append(path)
        mono16k.append(path16)
    return stereo, mono16k


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------

def run_prep(raw: Path, out: Path, workers: int, shard_size: int) -> tuple[float, dict]:
    """Seconds for one data_prep.audio run into an empty ``out``, and its manifest."""
    from data_prep import audio

    return time_prep(audio.main, ["--input", str(raw), "--shard-size", str(shard_size), "--workers", str(workers)],
                     out)


def run_processor(paths: list[Path]) -> float:
    """Seconds for the item processor over every file, this process, one torch thread."""
    import torch
    from data_prep import audio
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return time_each(lambda p: audio.process_audio(str(p), p.name, audio.Utterance(), audio.Options()), paths)
    finally:
        torch.set_num_threads(threads)


def run_decode(paths: list[Path]) -> float:
    """Seconds for soundfile to read and decode every file, one process."""
    import soundfile
    return time_each(lambda p: soundfile.read(io.BytesIO(p.read_bytes()), dtype="float32", always_2d=True), paths)


def main(argv=None) -> int:
    args = parse_args(argv)
    start_report()
    work = args.workdir
    raw = work / f"raw-{args.files}x{args.seconds:g}s"

    with Stopwatch() as gen:
        stereo, mono16k = make_inputs(raw, args.files, args.seconds, args.rate)
    audio_s = args.files * round(args.rate * args.seconds) / args.rate
    in_mb = sum(p.stat().st_size for p in stereo) / 1e6
    print(f"inputs: {len(stereo)} clips x {args.seconds:g} s = {audio_s:.0f} s of audio; {args.rate} Hz stereo "
          f"16-bit FLAC/WAV {in_mb:.1f} MB, 16 kHz mono FLAC "
          f"{sum(p.stat().st_size for p in mono16k) / 1e6:.1f} MB, in {raw} (ready in {gen.seconds:.1f}s)",
          flush=True)

    workers = args.workers or len(os.sched_getaffinity(0))
    times: dict[str, list[float]] = {k: [] for k in ("prep", "prep16", "proc", "decode")}
    manifest = {}
    for r in range(args.repeats):  # interleaved, so background load hits each alike
        seconds, manifest = run_prep(stereo[0].parent, work / "shards", workers, args.shard_size)
        times["prep"].append(seconds)
        times["prep16"].append(run_prep(mono16k[0].parent, work / "shards16", workers, args.shard_size)[0])
        times["proc"].append(run_processor(stereo))
        times["decode"].append(run_decode(stereo))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    totals = manifest["totals"]
    print(f"prep output: {totals['shards']} shards, {totals['samples']} samples, {totals['hours'] * 3600:.1f} s "
          f"of audio, {totals['bytes'] / 1e6:.1f} MB, {totals['skipped']} skipped", flush=True)

    def row(name, key, cores):
        s = statistics.median(times[key])
        return [name, fmt(s), fmt(audio_s / s), fmt(audio_s / s / cores)]
    print()
    print(table(["measurement", "seconds (median)", "audio s/s", "audio s/s per core"], [
        row(f"data_prep.audio, {args.rate} Hz stereo -> 16 kHz, {workers} worker(s)", "prep", workers),
        row(f"data_prep.audio, 16 kHz mono FLAC (stored as is), {workers} worker(s)", "prep16", workers),
        row("item processor only, 1 process, 1 torch thread", "proc", 1),
        row(f"soundfile decode only ({args.rate} Hz stereo), 1 process", "decode", 1),
    ]))
    clean_up(args.keep, raw, work / "shards", work / "shards16")
    print(json.dumps({"audio_s": audio_s, "workers": workers,
                      **{f"{key}_s": statistics.median(values) for key, values in times.items()},
                      "prep_audio_s_per_s": audio_s / statistics.median(times["prep"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
