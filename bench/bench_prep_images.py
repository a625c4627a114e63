"""Throughput of image prep (``python -m data_prep.images``) against the raw write speed of the same disk.

    python bench/bench_prep_images.py [--count 2000] [--size 256] [--workers 2] [--workdir runs/bench/prep_images]

1. Generates ``--count`` real JPEG files (``--size`` square, gradient + shapes + sensor-like noise, so
   they compress like photos rather than like flat synthetic art) in 4 class folders. Generation is
   not timed and is skipped when the files already exist.
2. prep: times ``data_prep.images.main([...])`` in this process (its worker pool is spawned inside the
   timed region) writing the files into a fresh shard directory: read, full decode (validation),
   tar with .jpg/.cls/.json members, fsync, sha256 of each shard, sidecars and manifest.
3. raw write: the same disk, the same bytes written the same way: one tar per shard holding members of
   exactly the input file sizes filled with random bytes, fsync, rename; one process; no decode and
   no hashing. This is the ceiling for the write side of prep.
4. decode only: Pillow ``open`` + ``load`` of every input file in one process (no writing), the CPU
   side of prep for one worker.

Each measurement is repeated ``--repeats`` times and the median is reported. Input MB/s is bytes of
input JPEG files per second (1 MB = 1e6 bytes). Inputs are read from the page cache (they were just
written or read), as are the random bytes of the raw write.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import statistics
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    Stopwatch, add_run_args, add_workers_arg, clean_up, fmt, prep_parser, start_report, table, time_each, time_prep,
)

CLASSES = ("ellipse", "rectangle", "triangle", "stripes")


def parse_args(argv=None) -> argparse.Namespace:
    p = prep_parser("images", __doc__)
    p.add_argument("--count", type=int, default=2000, help="JPEG files to generate and shard (default: %(default)s)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default: %(default)s)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the generated files (default: %(default)s)")
    add_workers_arg(p, "images")
    p.add_argument("--shard-size", type=int, default=250,
                   help="data_prep.images --shard-size, also the raw write's files per tar (default: %(default)s)")
    add_run_args(p, "images", "generated images and shards",
                 workdir_help="scratch directory on the disk to measure, relative to the repository root")
    args = p.parse_args(argv)
    if args.count < 1 or args.size < 8 or args.shard_size < 1 or args.repeats < 1:
        p.error("--count, --shard-size and --repeats must be >= 1 and --size >= 8")
    return args


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def synth_jpeg(size: int, quality: int, rng) -> bytes:
    """A photo-like JPEG: vertical colour gradient, a few filled shapes, Gaussian noise (sigma 8)."""
    import numpy as np
    from PIL import Image, ImageDraw

    c0, c1 = rng.integers(0, 256, (2, 3)).astype(np.float32)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    img = Image.fromarray(np.broadcast_to(c0 + (c1 - c0) * t, (size, size, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
        w, h = (int(v) for v in rng.integers(size // 5, size // 2, 2))
        x1, y1 = x0 + w, y0 + h
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 8.0, (size, size, 3)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_inputs(root: Path, count: int, size: int, quality: int, seed: int = 0) -> list[Path]:
    """``count`` JPEG files in class folders (deterministic; existing files are kept)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = root / CLASSES[i % len(CLASSES)] / f"{i:06d}.jpg"
        data = synth_jpeg(size, quality, rng)  # always drawn, so file i does not depend on what exists
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------

def run_prep(raw: Path, out: Path, workers: int, shard_size: int) -> tuple[float, dict]:
    """Seconds for one data_prep.images run into an empty ``out``, and its manifest."""
    from data_prep import images

    argv = ["--input", str(raw), "--shard-size", str(shard_size), "--workers", str(workers)]
    return time_prep(images.main, argv, out, quiet_stdout=False)


def run_raw_write(out: Path, sizes: list[int], shard_size: int, seed: int = 0) -> float:
    """Seconds to write tars of random members of the given sizes, each fsynced then renamed."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rnd = random.Random(seed)
    payloads = [rnd.randbytes(n) for n in sizes]  # made before the clock starts
    with Stopwatch() as sw:
        for s, start in enumerate(range(0, len(payloads), shard_size)):
            final = out / f"raw-{s:06d}.tar"
            tmp = out / f".raw-{s:06d}.tar.tmp"
            with open(tmp, "wb") as f:
                with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                    for i, data in enumerate(payloads[start:start + shard_size], start):
                        info = tarfile.TarInfo(f"{i:09d}.jpg")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
    return sw.seconds


def run_decode(paths: list[Path]) -> float:
    """Seconds for Pillow to read and fully decode every file, one process."""
    from PIL import Image

    def decode(path: Path) -> None:
        with Image.open(io.BytesIO(path.read_bytes())) as img:
            img.load()
    return time_each(decode, paths)


def main(argv=None) -> int:
    args = parse_args(argv)
    start_report()
    work = args.workdir
    raw = work / f"raw-{args.count}x{args.size}-q{args.quality}"

    with Stopwatch() as gen:
        paths = make_inputs(raw, args.count, args.size, args.quality)
    sizes = [p.stat().st_size for p in paths]
    total = sum(sizes)
    print(f"inputs: {len(paths)} JPEG {args.size}x{args.size} q{args.quality}, {total / 1e6:.1f} MB "
          f"(mean {total / len(paths) / 1e3:.1f} kB) in {raw} (ready in {gen.seconds:.1f}s)", flush=True)

    prep_t, raw_t, dec_t, manifest = [], [], [], {}
    for r in range(args.repeats):  # interleaved, so background load hits each alike
        seconds, manifest = run_prep(raw, work / "shards", args.workers, args.shard_size)
        prep_t.append(seconds)
        raw_t.append(run_raw_write(work / "raw_write", sizes, args.shard_size, seed=r))
        dec_t.append(run_decode(paths))
        print(f"round {r + 1}: prep {prep_t[-1]:.2f}s, raw write {raw_t[-1]:.2f}s, decode {dec_t[-1]:.2f}s",
              flush=True)
    totals = manifest["totals"]
    shard_bytes = totals["bytes"]
    print(f"prep output: {totals['shards']} shards, {totals['samples']} samples, {shard_bytes / 1e6:.1f} MB, "
          f"{totals['skipped']} skipped", flush=True)

    prep_s, raw_s, dec_s = (statistics.median(t) for t in (prep_t, raw_t, dec_t))
    raw_mbs = total / raw_s / 1e6

    def row(name, seconds):
        mbs = total / seconds / 1e6
        return [name, fmt(seconds), fmt(len(paths) / seconds), fmt(mbs), fmt(mbs / raw_mbs)]
    workers = args.workers or len(os.sched_getaffinity(0))
    print()
    print(table(["measurement", "seconds (median)", "images/s", "input MB/s", "vs raw write"], [
        row(f"data_prep.images, {workers} worker(s)", prep_s),
        row("raw write: same bytes as tar + fsync, 1 process", raw_s),
        row("Pillow full decode only, 1 process", dec_s),
    ]))
    print(f"\nprep / raw write: {raw_s / prep_s:.3f} (prep reaches {100 * raw_s / prep_s:.1f}% of the disk's "
          f"write speed); shards are {shard_bytes / total:.3f}x the input bytes")
    clean_up(args.keep, raw, work / "shards", work / "raw_write")
    print(json.dumps({"images": len(paths), "input_bytes": total, "workers": workers, "prep_s": prep_s,
                      "raw_write_s": raw_s, "decode_s": dec_s, "prep_vs_raw_write": raw_s / prep_s}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
