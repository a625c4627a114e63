"""Throughput of text prep (``python -m data_prep.text``) beside sentencepiece's own encode speed.

    python bench/bench_prep_text.py [--mb 8] [--vocab-size 16000] [--workers 2] [--workdir runs/bench/prep_text]

1. Corpus: the distinct text files of /usr/share/common-licenses and /usr/share/doc (copyright files,
   READMEs, changelogs, gzip'd ones decompressed), cut into paragraphs, one paragraph per line, repeated
   until ``--mb`` MB (1 MB = 1e6 bytes of UTF-8). Built once, not timed.
2. model: ``data_prep.text`` trains a BPE model of ``--vocab-size`` pieces on the corpus (timed once,
   reported for information; later runs reuse it through ``--spm-model``).
3. prep: ``data_prep.text.main`` with ``--spm-model`` into an empty directory, ``--workers`` processes:
   discovery, the small sample for the bytes-per-token estimate, reading, decoding, sentencepiece
   encoding, packing into blocks, tar writing (two members per block), fsync, sha256, manifest.
4. pack only: ``data_prep.text.encode_blocks`` over the same documents in this process: encode + pack
   + the block samples in memory, no tar (the CPU side of prep for one worker).
5. sp.encode: ``SentencePieceProcessor.encode`` of the same documents, batches of about 1 MB, one thread.

Each of 3-5 is repeated ``--repeats`` times and the median is reported, as MB of input text per second and,
for prep, per worker process (the machine's cores are shared with everything else running).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    Stopwatch, add_run_args, add_workers_arg, clean_up, fmt, prep_parser, start_report, table, time_prep,
)

SOURCES = (Path("/usr/share/common-licenses"), Path("/usr/share/doc"))


def parse_args(argv=None) -> argparse.Namespace:
    p = prep_parser("text", __doc__)
    p.add_argument("--mb", type=float, default=8.0, help="corpus size in MB of text (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=16000, help="BPE vocabulary size (default: %(default)s)")
    p.add_argument("--block-size", type=int, default=512, help="data_prep.text --block-size (default: %(default)s)")
    p.add_argument("--shard-size", type=int, default=500,
                   help="data_prep.text --shard-size in blocks (default: %(default)s)")
    add_workers_arg(p, "text")
    add_run_args(p, "text", "corpus, model and shards")
    args = p.parse_args(argv)
    if args.mb <= 0 or args.vocab_size < 300 or args.repeats < 1 or args.workers < 0:
        p.error("--mb must be > 0, --vocab-size >= 300, --repeats >= 1, --workers >= 0")
    return args


# ---------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------

def source_texts() -> list[str]:
    """Distinct text files under SOURCES (sorted), decoded leniently."""
    seen, texts = set(), []
    for root in SOURCES:
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            try:
                data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            except (OSError, EOFError):
                continue
            digest = hashlib.sha256(data).digest()
            if b"\0" in data[:4096] or digest in seen:  # binary, or a copy of a file already taken
                continue
            seen.add(digest)
            texts.append(data.decode("utf-8", "replace"))
    return texts


def make_corpus(path: Path, mb: float) -> tuple[list[str], int]:
    """One paragraph per line, repeated up to ``mb`` MB; returns the documents and their UTF-8 bytes."""
    paragraphs = [" ".join(p.split()) for text in source_texts() for p in text.split("\n\n")]
    paragraphs = [p for p in paragraphs if len(p) > 20]
    if not paragraphs:
        raise SystemExit(f"no text found under {', '.join(map(str, SOURCES))}")
    docs, size, target = [], 0, int(mb * 1e6)
    while size < target:
        for p in paragraphs:
            docs.append(p)
            size += len(p.encode("utf-8")) + 1
            if size >= target:
                break
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return docs, sum(len(d.encode("utf-8")) for d in docs)


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------

def run_prep(argv: list[str], out: Path) -> tuple[float, dict]:
    from data_prep import text
    return time_prep(text.main, argv, out)


def run_pack_only(model: Path, docs: list[str], block_size: int) -> float:
    import sentencepiece as spm
    from data_prep import text
    sp = spm.SentencePieceProcessor(model_file=str(model))
    items = [text.Doc(d, "corpus.txt", 0) for d in docs]
    with Stopwatch() as sw:
        for _ in text.encode_blocks(sp, items, block_size, "u16", text.new_counts()):
            pass
    return sw.seconds


def run_sp_encode(model: Path, docs: list[str]) -> float:
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(model))
    batches, batch, size = [], [], 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= 1 << 20:
            batches.append(batch)
            batch, size = [], 0
    batches.append(batch)
    with Stopwatch() as sw:
        for b in batches:
            sp.encode(b, num_threads=1)
    return sw.seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    start_report()
    work = args.workdir
    corpus = work / f"raw-{args.mb:g}MB" / "corpus.txt"
    with Stopwatch() as gen:
        docs, nbytes = make_corpus(corpus, args.mb)
    mb = nbytes / 1e6
    print(f"corpus: {len(docs)} documents, {mb:.2f} MB in {corpus} (ready in {gen.seconds:.1f}s)", flush=True)

    common = ["--input", str(corpus), "--block-size", str(args.block_size), "--shard-size", str(args.shard_size)]
    train_s, manifest = run_prep([*common, "--vocab-size", str(args.vocab_size), "--workers", str(args.workers)],
                                 work / "trained")
    model = work / "model.spm"
    shutil.copyfile(work / "trained" / "spm.model", model)
    tok = manifest["tokenizer"]
    print(f"model: BPE {tok['vocab_size']} pieces, {tok['bytes_per_token']:.2f} bytes/token; first run incl. "
          f"training on {tok['sample']['documents']} documents: {train_s:.1f}s", flush=True)

    workers = args.workers or len(os.sched_getaffinity(0))
    prep_t, pack_t, enc_t = [], [], []
    for r in range(args.repeats):  # interleaved, so background load hits each alike
        seconds, manifest = run_prep([*common, "--spm-model", str(model), "--workers", str(args.workers)],
                                     work / "shards")
        prep_t.append(seconds)
        pack_t.append(run_pack_only(model, docs, args.block_size))
        enc_t.append(run_sp_encode(model, docs))
        print(f"round {r + 1}: prep {prep_t[-1]:.2f}s, pack only {pack_t[-1]:.2f}s, sp.encode {enc_t[-1]:.2f}s",
              flush=True)
    t = manifest["totals"]
    print(f"prep output: {t['shards']} shards, {t['samples']} blocks, {t['tokens']} tokens, "
          f"{t['bytes'] / 1e6:.1f} MB of tar ({t['bytes'] / nbytes:.2f}x the text)", flush=True)

    prep_s, pack_s, enc_s = (statistics.median(x) for x in (prep_t, pack_t, enc_t))
    enc_mbs = mb / enc_s

    def row(name, seconds, procs):
        return [name, fmt(seconds), fmt(mb / seconds), fmt(mb / seconds / procs), fmt(mb / seconds / procs / enc_mbs)]
    print()
    print(table(["measurement", "seconds (median)", "text MB/s", "MB/s per process", "vs sp.encode"], [
        row(f"data_prep.text, {workers} worker(s), --spm-model", prep_s, workers),
        row("encode + pack only (no tar), 1 process", pack_s, 1),
        row("sentencepiece encode only, 1 process", enc_s, 1),
    ]))
    clean_up(args.keep, work)
    print(json.dumps({"text_mb": mb, "workers": workers, "prep_s": prep_s, "pack_only_s": pack_s, "sp_encode_s": enc_s,
                      "prep_mb_per_s": mb / prep_s, "prep_per_process_vs_sp_encode": mb / prep_s / workers / enc_mbs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
