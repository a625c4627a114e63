"""Speech batching: how much of the decoded audio is trained on, fixed batches vs length buckets.

    python bench/bench_speech_batching.py [--clips 200000] [--min-s 2] [--max-s 20] [--batch 8]
                                          [--max-tokens 3800000] [--windows 64,256,1024]

Clip lengths are drawn uniformly from [--min-s, --max-s] seconds at 16 kHz (a LibriSpeech-like spread;
no audio is decoded). A batch crops every clip to its shortest (no padding, as the reference), so the
audio trained on is clips x shortest and the rest of what was decoded is discarded.

- fixed: --batch consecutive clips of the (already shuffled) stream per batch, as with data.max_tokens=0.
- bucketed: the data stream's rule for data.max_tokens (pipeline.modalities.speech.length_batches):
  each window of data.bucket_window clips sorted longest first and cut so that clips x longest stays
  within --max-tokens samples; one row per window size.

Reported per rule: the fraction of decoded audio trained on, clips per batch (mean, min, max) and the
audio trained per batch as a fraction of --max-tokens. Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import command_line, machine_info, now, table  # noqa: E402

RATE = 16000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/bench_speech_batching.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=200000, help="simulated clips (default: %(default)s)")
    p.add_argument("--min-s", type=float, default=2.0, help="shortest clip, seconds (default: %(default)s)")
    p.add_argument("--max-s", type=float, default=20.0, help="longest clip, seconds (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="clips per fixed batch (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=3800000, help="data.max_tokens (default: %(default)s)")
    p.add_argument("--windows", default="64,256,1024", help="data.bucket_window sizes (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def clip_lengths(args: argparse.Namespace) -> list[int]:
    rng = random.Random(args.seed)
    return [round(rng.uniform(args.min_s, args.max_s) * RATE) for _ in range(args.clips)]


def fixed_batches(lengths: list[int], size: int) -> list[list[int]]:
    return [lengths[i:i + size] for i in range(0, len(lengths) - size + 1, size)]


def bucketed_batches(lengths: list[int], max_tokens: int, window: int) -> list[list[int]]:
    from pipeline.modalities.speech import length_batches
    batches = []
    for start in range(0, len(lengths), window):
        pool = lengths[start:start + window]
        batches += [[pool[i] for i in batch] for batch in length_batches(pool, max_tokens)]
    return batches


def figures(batches: list[list[int]], max_tokens: int) -> dict:
    decoded = sum(sum(b) for b in batches)
    trained = [len(b) * min(b) for b in batches]
    clips = [len(b) for b in batches]
    return {"trained_fraction": sum(trained) / decoded, "clips_mean": sum(clips) / len(clips),
            "clips_min": min(clips), "clips_max": max(clips),
            "budget_fill": sum(trained) / len(trained) / max_tokens}


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"machine: {machine_info()}\ndate: {now()}\ncommand: {command_line()}", flush=True)
    lengths = clip_lengths(args)
    results = {"fixed": figures(fixed_batches(lengths, args.batch), args.max_tokens)}
    for window in (int(w) for w in args.windows.split(",")):
        results[f"bucketed_w{window}"] = figures(bucketed_batches(lengths, args.max_tokens, window), args.max_tokens)
    rows = [[name, f"{r['trained_fraction']:.3f}", f"{1 - r['trained_fraction']:.3f}", f"{r['clips_mean']:.1f}",
             f"{r['clips_min']}-{r['clips_max']}", f"{r['budget_fill']:.3f}"] for name, r in results.items()]
    print(f"\n{args.clips} clips uniform on {args.min_s:g}-{args.max_s:g} s at 16 kHz; fixed: {args.batch} clips per "
          f"batch; bucketed: max_tokens={args.max_tokens}, window = data.bucket_window")
    print(table(["batching", "trained / decoded", "discarded", "clips per batch (mean)", "clips (min-max)",
                 "trained audio / max_tokens"], rows))
    print(json.dumps({"clips": args.clips, "min_s": args.min_s, "max_s": args.max_s, "batch": args.batch,
                      "max_tokens": args.max_tokens, **{k: {m: round(v, 4) for m, v in r.items()}
                                                       for k, r in results.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
