"""Text prep: plain text and JSON Lines (optionally gzip'd) -> sentencepiece token blocks in WebDataset shards.

    python -m data_prep.text --input PATH [PATH ...] --output OUT [--vocab-size 50000] [--block-size 512]
                             [--break-mode {full_sentences,complete_doc}] [--workers 8]

Every sample is one block of exactly --block-size token ids, made from the shard's documents in
corpus order, each document's ids followed by </s>. --break-mode says how (fairseq's
sample_break_mode of the same name):
  full_sentences  (default; RoBERTa "full-sentences" packing) the documents are one stream, cut every
                  --block-size tokens: blocks cross document boundaries; no <s>. Only the last block of
                  a shard is partial: it is filled up with <pad> (id 0).
  complete_doc    (the released data2vec text recipe: tokens_per_sample 512, sample_break_mode
                  complete_doc) a block never crosses a document boundary and never holds two documents:
                  <s> (id 1), then at most --block-size - 1 tokens of one document, then <pad> up to
                  --block-size. A document longer than that is cut into consecutive pieces of
                  --block-size - 1 tokens, one block each (fairseq keeps such a sentence whole in an
                  oversized block that training then drops; here no token is lost).
Either way every document is stored exactly once and <pad> only ends a block. A sample:
  __key__  "<shard>_<block>" ("%09d_%09d"): shard number, block number within the shard
  u16|i32  the ids as raw little-endian uint16 (vocabulary <= 65536) or int32; no header, no pickle
  json     {"doc", "offset", "docs", "path", "byte", "pad"}: the block's tokens (after its <s>, if any)
           start at token "offset" of the shard's document number "doc" (counting the shard's non-empty
           documents from 0; its ids and </s>), which begins at byte "byte" of file "path" (uncompressed
           bytes for .gz); "docs" documents have tokens in it (always 1 for complete_doc); "pad" <pad>
           tokens end it; with --label-field also "label", the document's class
  cls      with --label-field only: the label's index, as ASCII text, in the manifest's sorted "classes"
OUT/spm.model is the sentencepiece model, with fixed special ids <pad>=0 <s>=1 </s>=2 <unk>=3
<mask>=4; OUT/manifest.json has its sha256 and vocabulary size, the break mode, the dtype, the
block size and counts per shard and in total: "tokens" are the stored tokens other than <pad>
(<s> included, so tokens + pad_tokens = samples x block size; with complete_doc the documents'
own tokens are tokens - samples).

Inputs are files or directories (searched recursively, in sorted order) of .txt, .jsonl, .txt.gz
and .jsonl.gz files, read as one stream in the order given. The stream is cut into byte ranges of
about --shard-size blocks of text; a document belongs to the range holding its first byte, and each
range becomes one shard, so output does not depend on --workers and a re-run keeps complete shards
(and the model). A .gz file is decompressed once to measure it, then from its start by every shard
that reads part of it: prefer many gzip files of up to ~1 GB to one huge one.

The model is trained with byte fallback on a bounded sample; its normalisation (nmt_nfkc: NFKC,
whitespace runs collapsed, control and zero-width characters dropped) is the only change to the
text, so decoding a document's ids gives sp.decode(sp.encode(document)). <mask> is a control
symbol: a literal "<mask>" in the corpus is encoded as ordinary text, never as id 4.
"""
from __future__ import annotations

import argparse
import bisect
import codecs
import gzip
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from data_prep import core, text_labels

SPECIAL_IDS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".txt.gz": "txt", ".jsonl.gz": "jsonl"}
BREAK_MODES = ("full_sentences", "complete_doc")  # fairseq sample_break_mode names; the first is the default
TOKEN_DTYPES = {"u16": "<u2", "i32": "<i4"}  # sample field -> little-endian numpy dtype
STAT_KEYS = ("documents", "empty_documents", "invalid_json_lines", "invalid_utf8_documents",
             "invalid_utf8_bytes", "text_bytes", "tokens", "pad_tokens")
PACKING = {  # the manifest's params.packing, one line per --break-mode
    "full_sentences": "full-sentences: </s> after each document; last block per shard padded",
    "complete_doc": "complete_doc: <s>, then at most block_size-1 tokens of one document (</s> after it), "
                    "padded; a longer document cut into several blocks",
}
MODEL_FILE = "spm.model"
BLOCK_KEY_FORMAT = "%09d_%09d"
# sentencepiece's unigram result depends on its thread count, so it is fixed rather than --workers
TRAIN_THREADS = 16
MAX_SENTENCE_CHARS = 4096  # training sentences are cut to this (sentencepiece skips longer ones)
SAMPLE_WINDOW_BYTES = 16 << 10  # the training sample is read in evenly spaced windows of about this
MAX_SAMPLE_WINDOWS = 1024
ESTIMATE_BYTES = 1 << 20  # text encoded to estimate bytes per token (for --shard-size)
ENCODE_BATCH_BYTES = 1 << 20
SCAN_BYTES_PER_WORKER = 64 << 20  # --label-field reads the labels in parallel only above this per worker
_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")
_SURROGATE = re.compile("[\ud800-\udfff]")


class Segment(NamedTuple):
    """Bytes ``[start, end)`` of one (uncompressed) input file; picklable, with a stable repr."""

    path: str
    rel: str
    fmt: str  # "txt" or "jsonl"
    gz: bool
    start: int
    end: int


class Doc(NamedTuple):
    text: str
    rel: str
    byte: int  # offset of the document's first byte in the (uncompressed) file
    label: str | None = None  # with --label-field: the document's class


class ModelRef(NamedTuple):
    """The model a worker loads; its repr (part of each shard's fingerprint) names the content, not OUT."""

    sha256: str
    path: str

    def __repr__(self) -> str:
        return f"ModelRef(sha256={self.sha256!r})"


@dataclass(frozen=True)
class TextFile:
    path: Path  # absolute
    rel: str  # as reported (the input as given, plus the path below it)
    fmt: str
    gz: bool
    size: int = 0  # uncompressed bytes
    stamp: str = ""


class Corpus:
    """The input files as one stream of bytes, in order; ``segments`` maps a range onto the files."""

    def __init__(self, files: Sequence[TextFile]):
        self.files = list(files)
        self._stamps = {str(f.path): f.stamp for f in self.files}
        self.starts = [0]
        for f in self.files:
            self.starts.append(self.starts[-1] + f.size)
        self.size = self.starts[-1]

    def segments(self, a: int, b: int) -> tuple[Segment, ...]:
        out = []
        i = max(0, bisect.bisect_right(self.starts, a) - 1)
        while i < len(self.files) and self.starts[i] < b:
            f, lo = self.files[i], self.starts[i]
            s, e = max(a, lo), min(b, lo + f.size)
            if s < e:
                out.append(Segment(str(f.path), f.rel, f.fmt, f.gz, s - lo, e - lo))
            i += 1
        return tuple(out)

    def stamps(self, segments: Sequence[Segment]) -> str:
        return ";".join(self._stamps[s.path] for s in segments)


@dataclass
class Tokenizer:
    """The model in OUT/spm.model and what the manifest says about it."""

    path: Path
    sha256: str
    vocab_size: int
    bytes_per_token: float
    record: dict
    # (tokens, documents) pairs: how many of the documents bytes_per_token was measured on have that many
    # tokens (ids + </s>); None for a model cached before this was recorded
    doc_lengths: tuple[tuple[int, int], ...] | None = None


# ----------------------------------------------------------------------------- reading documents


def _count_and_replace(exc: UnicodeDecodeError) -> tuple[str, int]:
    _replaced[0] += exc.end - exc.start
    return "\ufffd", exc.end


_replaced = [0]  # bytes replaced in this process (read around each decode)
codecs.register_error("data_prep.text.replace", _count_and_replace)


class _Opener:
    """Keeps the last opened file, so reading forward through one gzip file decompresses it once."""

    def __init__(self):
        self.key, self.handle = None, None

    def get(self, path: str, gz: bool):
        if self.key != path:
            self.close()
            self.handle = gzip.open(path, "rb") if gz else open(path, "rb")
            self.key = path
        return self.handle

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
        self.key, self.handle = None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def new_counts(*extra: str) -> dict[str, int]:
    """Zeroed STAT_KEYS, and the ``extra`` keys (with --label-field: text_labels.STAT)."""
    return dict.fromkeys((*STAT_KEYS, *extra), 0)


def iter_documents(segments: Iterable[Segment], doc_mode: str, jsonl_field: str, counts: dict,
                   opener: _Opener, label_field: str | None = None, skipped: list | None = None) -> Iterator[Doc]:
    """The non-empty documents whose first byte lies in the segments, in order; the rest are counted.

    ``.txt``: one document per line (``doc_mode="line"``) or per run of non-blank lines
    (``"paragraph"``, lines joined with "\\n"); ``.jsonl``: the string ``jsonl_field`` of the JSON
    object on each line. Invalid UTF-8 is replaced with U+FFFD and counted. With ``label_field``, each
    document's ``label`` is that field of its record; one without is left out, counted and listed in
    ``skipped`` (see ``text_labels.labelled_doc``).
    """
    for seg in segments:
        f = opener.get(seg.path, seg.gz)
        paragraphs = seg.fmt == "txt" and doc_mode == "paragraph"
        raw_docs = _paragraphs(f, seg.start, seg.end) if paragraphs else _lines(f, seg.start, seg.end)
        for byte, raw in raw_docs:
            counts["text_bytes"] += len(raw)
            found = read_doc(raw, seg.fmt, jsonl_field, counts, at_file_start=byte == 0)
            if found is None:
                continue
            doc = Doc(found[0], seg.rel, byte)
            if label_field is not None:
                doc = text_labels.labelled_doc(doc, found[1], label_field, counts, skipped)
            if doc is not None:
                yield doc


def _lines(f, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line without its terminator) of the lines starting in [start, end)."""
    if start == 0:
        f.seek(0)
        pos = 0
    else:  # the line holding byte start-1 belongs to the range before
        f.seek(start - 1)
        pos = start - 1 + len(f.readline())
    while pos < end:
        line = f.readline()
        if not line:
            return
        yield pos, line.rstrip(b"\r\n")
        pos += len(line)


def _paragraphs(f, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, lines joined by "\\n") of the runs of non-blank lines whose first line starts in [start, end).

    A blank line holds only ASCII whitespace."""
    pos, prev_blank = _paragraph_entry(f, start)
    lines: list[bytes] | None = None
    first = 0
    while lines is not None or pos < end:
        line = f.readline()
        if not line:
            break
        if not line.strip():
            if lines is not None:
                yield first, b"\n".join(lines)
                lines = None
            prev_blank = True
        else:
            if lines is not None:
                lines.append(line.rstrip(b"\r\n"))
            elif prev_blank:  # a paragraph starts here (else: the tail of one owned by the range before)
                if pos >= end:
                    break
                lines, first = [line.rstrip(b"\r\n")], pos
            prev_blank = False
        pos += len(line)
    if lines is not None:
        yield first, b"\n".join(lines)


def _paragraph_entry(f, start: int) -> tuple[int, bool]:
    """Seek ``f`` to the first line start p >= start; return p and whether the line before p is blank."""
    if start == 0:
        f.seek(0)
        return 0, True
    look = 4096
    while True:  # look back far enough to see the whole line before p, or a non-blank byte of it
        a = max(0, start - look)
        f.seek(a)
        head = f.read(start - a)
        rest = b"" if head.endswith(b"\n") else f.readline()
        p = start + len(rest)
        before = head + rest  # bytes [a, p)
        if not before.endswith(b"\n"):  # end of file: nothing starts in the range
            return p, True
        body = before[:-1]
        nl = body.rfind(b"\n")
        if body[nl + 1:].strip():
            return p, False
        if nl >= 0 or a == 0:
            return p, True
        look *= 16  # a whitespace-only stretch longer than we looked at: look further (rare)


def doc_text(raw: bytes, fmt: str, jsonl_field: str, counts: dict, at_file_start: bool = False) -> str | None:
    """Pure: one raw document -> its text, or None (counted) if it is empty or not a valid JSON record."""
    found = read_doc(raw, fmt, jsonl_field, counts, at_file_start)
    return None if found is None else found[0]


def read_doc(raw: bytes, fmt: str, jsonl_field: str, counts: dict,
             at_file_start: bool = False) -> tuple[str, dict | None] | None:
    """Pure: one raw document -> (its text, its JSON record or None for .txt), or None (counted) if it is
    empty or not a valid JSON record."""
    text, record = _decode(raw, counts), None
    if at_file_start and text.startswith("\ufeff"):
        text = text[1:]  # byte order mark
    if fmt == "jsonl" and text.strip():
        found = _json_doc(text, jsonl_field, counts)
        if found is None:
            counts["invalid_json_lines"] += 1
            return None
        text, record = found
    if not text.strip():
        counts["empty_documents"] += 1
        return None
    return text, record


def _decode(raw: bytes, counts: dict) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        before = _replaced[0]
        text = raw.decode("utf-8", "data_prep.text.replace")
        counts["invalid_utf8_documents"] += 1
        counts["invalid_utf8_bytes"] += _replaced[0] - before
        return text


def _json_doc(line: str, field: str, counts: dict) -> tuple[str, dict] | None:
    """(the string ``field``, the record) of a JSON object, or None."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    text = record.get(field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        return None
    if _SURROGATE.search(text):  # a lone "\ud800" escape: not encodable, replace like invalid UTF-8
        text, n = _SURROGATE.subn("\ufffd", text)
        counts["invalid_utf8_documents"] += 1
        counts["invalid_utf8_bytes"] += n
    return text, record


# ----------------------------------------------------------------------------- packing


class BlockPacker:
    """full_sentences: concatenates documents (ids, then </s>) and cuts the stream into blocks of ``block_size``.

    ``add`` returns the blocks completed by a document as (int32 array, metadata); ``finish``
    returns the last, partial block filled up with ``pad_id`` (or nothing).
    """

    def __init__(self, block_size: int, eos_id: int, pad_id: int):
        self.block_size, self.eos_id, self.pad_id = block_size, eos_id, pad_id
        self.documents = 0  # documents added
        self._parts: list[np.ndarray] = []
        self._docs: list[tuple[int, Doc]] = []  # (stream start, doc) of the documents still buffered
        self._cut = 0  # stream position of the first buffered token
        self._stream = 0  # tokens added

    @property
    def pending(self) -> int:
        return self._stream - self._cut

    def add(self, ids: Sequence[int], doc: Doc) -> list[tuple[np.ndarray, dict]]:
        part = np.empty(len(ids) + 1, dtype=np.int32)
        part[:-1] = ids
        part[-1] = self.eos_id
        self._docs.append((self._stream, doc))
        self._parts.append(part)
        self._stream += len(part)
        self.documents += 1
        return self._cut_blocks() if self.pending >= self.block_size else []

    def finish(self) -> list[tuple[np.ndarray, dict]]:
        """The buffered tokens as one block padded to ``block_size``, or [] if none are left."""
        pad = -self.pending % self.block_size
        if not self.pending:
            return []
        self._parts.append(np.full(pad, self.pad_id, dtype=np.int32))
        self._stream += pad
        (block, meta), = self._cut_blocks()
        return [(block, {**meta, "pad": pad})]

    def _cut_blocks(self) -> list[tuple[np.ndarray, dict]]:
        B = self.block_size
        stream = np.concatenate(self._parts)
        n = len(stream) // B
        starts = np.array([s for s, _ in self._docs], dtype=np.int64)
        first_index = self.documents - len(self._docs)  # shard-local number of self._docs[0]
        blocks = []
        for i in range(n):
            pos = self._cut + i * B
            d = int(np.searchsorted(starts, pos, "right")) - 1  # document holding the block's first token
            spanned = int(np.searchsorted(starts, pos + B, "left")) - d
            start, doc = self._docs[d]
            meta = {"doc": first_index + d, "offset": pos - start, "docs": spanned, "path": doc.rel,
                    "byte": doc.byte, "pad": 0}
            blocks.append((stream[i * B:(i + 1) * B], meta))
        self._cut += n * B
        self._parts = [stream[n * B:]]
        keep = int(np.searchsorted(starts, self._cut, "right")) - 1  # documents that end before the cut go
        self._docs = self._docs[max(keep, 0):] if self.pending else []
        return blocks


class DocBlocker:
    """complete_doc: one document (ids, then </s>) per block, after <s>; a long one cut into several blocks.

    Each piece of at most ``block_size - 1`` tokens of one document becomes one block: ``bos_id``, the
    piece, ``pad_id`` up to ``block_size``. Mirrors fairseq's ``TokenBlockDataset(block_size - 1,
    break_mode="complete_doc")`` then ``PrependTokenDataset(bos)``, with each of our documents as a
    one-sentence fairseq document; fairseq would keep a sentence longer than the block whole (a block
    too long to train on), here it is cut. Same interface as ``BlockPacker``.
    """

    def __init__(self, block_size: int, bos_id: int, eos_id: int, pad_id: int):
        if block_size < 2:
            raise ValueError(f"complete_doc blocks need room for <s> and a token, got block_size={block_size}")
        self.block_size, self.bos_id, self.eos_id, self.pad_id = block_size, bos_id, eos_id, pad_id
        self.documents = 0  # documents added

    def add(self, ids: Sequence[int], doc: Doc) -> list[tuple[np.ndarray, dict]]:
        room = self.block_size - 1
        n = len(ids) + 1  # the document's tokens: its ids and </s>
        pieces = -(-n // room)
        flat = np.full(pieces * room, self.pad_id, dtype=np.int32)
        flat[:n - 1] = ids
        flat[n - 1] = self.eos_id
        blocks = np.empty((pieces, self.block_size), dtype=np.int32)  # (pieces, block_size)
        blocks[:, 0] = self.bos_id
        blocks[:, 1:] = flat.reshape(pieces, room)
        out = [(blocks[k], {"doc": self.documents, "offset": k * room, "docs": 1, "path": doc.rel,
                            "byte": doc.byte, "pad": max(0, (k + 1) * room - n)})
               for k in range(pieces)]
        self.documents += 1
        return out

    def finish(self) -> list[tuple[np.ndarray, dict]]:
        return []  # every block is complete (padded) as soon as its document is added


def packer_for(break_mode: str, block_size: int, sp) -> BlockPacker | DocBlocker:
    """The packer of ``break_mode`` with the model's special ids."""
    if break_mode == "full_sentences":
        return BlockPacker(block_size, sp.eos_id(), sp.pad_id())
    if break_mode == "complete_doc":
        return DocBlocker(block_size, sp.bos_id(), sp.eos_id(), sp.pad_id())
    raise ValueError(f"unknown break mode {break_mode!r}; expected one of {BREAK_MODES}")


def token_field(vocab_size: int) -> str:
    """``u16`` when every id fits in uint16 (vocabulary <= 65536), else ``i32``."""
    return "u16" if vocab_size <= 1 << 16 else "i32"


# ----------------------------------------------------------------------------- item processor


_MODELS: dict = {}


def _load_model(model: ModelRef):
    import sentencepiece as spm
    if model not in _MODELS:
        data = Path(model.path).read_bytes()
        if hashlib.sha256(data).hexdigest() != model.sha256:
            raise RuntimeError(f"{model.path} changed during the run")
        _MODELS.clear()
        _MODELS[model] = spm.SentencePieceProcessor(model_proto=data)
    return _MODELS[model]


def process_chunk(segments: tuple[Segment, ...], doc_mode: str, jsonl_field: str, model: ModelRef,
                  block_size: int, field: str, break_mode: str = "full_sentences",
                  labels: text_labels.LabelSpec | None = None) -> list[dict]:
    """Worker entry point: the documents of one byte range -> its blocks, then a stats-only dict."""
    sp = _load_model(model)
    label_field, classes = (None, None) if labels is None else labels
    counts = new_counts() if labels is None else new_counts(text_labels.STAT)
    with _Opener() as opener:
        docs = iter_documents(segments, doc_mode, jsonl_field, counts, opener, label_field)
        samples = list(encode_blocks(sp, docs, block_size, field, counts, break_mode, classes))
    return [*samples, {"__stats__": counts}]


def encode_blocks(sp, docs: Iterable[Doc], block_size: int, field: str, counts: dict,
                  break_mode: str = "full_sentences", classes: Sequence[str] | None = None) -> Iterator[dict]:
    """Pure (given the model): documents -> block samples; adds to counts' documents, tokens (not <pad>), pad_tokens.
    A labelled document's blocks carry its class among ``classes`` (``cls`` and json "label")."""
    packer = packer_for(break_mode, block_size, sp)
    dtype = TOKEN_DTYPES[field]
    index = {name: i for i, name in enumerate(classes or ())}
    j = pad = 0

    def samples(blocks, label: str | None = None):
        nonlocal j, pad
        for block, meta in blocks:
            pad += meta["pad"]
            sample = {"__suffix__": f"_{j:09d}", field: block.astype(dtype).tobytes(), "json": meta}
            yield sample if label is None else core.labelled_sample(sample, text_labels.block_class(label, index))
            j += 1

    for batch in _batches(docs):
        for doc, ids in zip(batch, sp.encode([d.text for d in batch], num_threads=1)):
            if not ids:  # e.g. only characters that normalisation removes
                counts["empty_documents"] += 1
                continue
            yield from samples(packer.add(ids, doc), doc.label)
    yield from samples(packer.finish())
    counts["documents"] += packer.documents
    counts["tokens"] += j * block_size - pad
    counts["pad_tokens"] += pad


def _batches(docs: Iterable[Doc]) -> Iterator[list[Doc]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if size >= ENCODE_BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# ----------------------------------------------------------------------------- discovery


def discover(inputs: Sequence[Path]) -> tuple[list[TextFile], list[dict]]:
    """Input files in order (each directory searched recursively, sorted) and what was skipped."""
    files, skipped, seen = [], [], set()
    for arg in inputs:
        if not arg.exists():
            raise core.PrepError(f"input not found: {arg}")
        if arg.is_dir():
            found, dir_skipped = _walk(arg)
            skipped += dir_skipped
        elif file_format(arg.name) is None:
            raise core.PrepError(f"unsupported input file {arg}: expected {', '.join(FORMATS)}")
        else:
            found = [(arg.resolve(), arg.as_posix())]
        for path, rel in found:
            if path in seen:
                skipped.append({"path": rel, "reason": "listed more than once"})
                continue
            seen.add(path)
            fmt, gz = file_format(path.name)
            files.append(TextFile(path, rel, fmt, gz))
    return files, skipped


def file_format(name: str) -> tuple[str, bool] | None:
    """("txt" | "jsonl", gzip'd) from a file name, or None if unsupported."""
    lower = name.lower()
    for ext in sorted(FORMATS, key=len, reverse=True):
        if lower.endswith(ext) and len(lower) > len(ext):
            return FORMATS[ext], ext.endswith(".gz")
    return None


def _walk(root: Path) -> tuple[list[tuple[Path, str]], list[dict]]:
    """Supported files under root, sorted by relative path; links leaving root are refused."""
    real_root = root.resolve()
    files, skipped, seen = [], [], {real_root}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=core.unreadable_dir(root, skipped)):
        keep = []
        for name in sorted(dirnames):
            real = core.resolved(Path(dirpath, name))
            if real is None:
                skipped.append({"path": Path(dirpath, name).as_posix(), "reason": "symlink loop or unresolvable link"})
                continue
            if name.startswith(".") or real in seen:
                continue
            if not real.is_relative_to(real_root):
                skipped.append({"path": Path(dirpath, name).as_posix(), "reason": "outside input directory"})
                continue
            seen.add(real)
            keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            path = Path(dirpath, name)
            rel = path.as_posix()
            real = core.resolved(path)
            if real is None:
                skipped.append({"path": rel, "reason": "symlink loop or unresolvable link"})
            elif not real.is_relative_to(real_root):
                skipped.append({"path": rel, "reason": "outside input directory"})
            elif file_format(name) is None:
                skipped.append({"path": rel, "reason": "unsupported extension"})
            elif not path.is_file():
                skipped.append({"path": rel, "reason": "not a regular file"})
            else:
                files.append((real, rel))
    files.sort(key=lambda f: f[1])
    return files, skipped


def measure(files: list[TextFile], workers: int) -> tuple[list[TextFile], list[dict]]:
    """Sizes (gzip files are decompressed once to count their bytes and check them) and stamps."""
    gz = [f for f in files if f.gz]
    if workers > 1 and len(gz) > 1:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(gz))) as pool:
            gz_sizes = dict(zip((f.path for f in gz), pool.map(_gzip_size, [str(f.path) for f in gz])))
    else:
        gz_sizes = {f.path: _gzip_size(str(f.path)) for f in gz}
    measured, skipped = [], []
    for f in files:
        try:
            st = f.path.stat()
            with open(f.path, "rb"):
                pass
        except OSError as exc:
            skipped.append({"path": f.rel, "reason": f"unreadable: {exc.strerror or exc}"})
            continue
        size, problem = gz_sizes[f.path] if f.gz else (st.st_size, None)
        if problem:
            skipped.append({"path": f.rel, "reason": problem})
            continue
        measured.append(TextFile(f.path, f.rel, f.fmt, f.gz, size, core.stat_stamp(st)))
    return measured, skipped


def _gzip_size(path: str) -> tuple[int, str | None]:
    n = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                n += len(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        return 0, f"corrupt gzip: {exc}"
    return n, None


# ----------------------------------------------------------------------------- labels


def scan_labels(args: argparse.Namespace, corpus: Corpus, workers: int,
                log) -> tuple[text_labels.LabelSpec | None, list[dict]]:
    """With --label-field, read every document once, in up to ``workers`` byte ranges: the classes, and a
    skipped record per document without a label (see data_prep/text_labels.py). (None, []) without."""
    if args.label_field is None:
        return None, []
    log(f"reading the label field {args.label_field!r} of every document")
    n = max(1, min(workers, corpus.size // SCAN_BYTES_PER_WORKER))
    bounds = [i * corpus.size // n for i in range(n + 1)]
    jobs = [(corpus.segments(a, b), args.doc_mode, args.jsonl_field, args.label_field)
            for a, b in zip(bounds, bounds[1:])]
    if n > 1:
        with multiprocessing.get_context("spawn").Pool(n) as pool:
            found = pool.starmap(range_labels, jobs)
    else:
        found = [range_labels(*jobs[0])]
    skipped = [s for _, part in found for s in part]
    spec = text_labels.LabelSpec(args.label_field, tuple(sorted(set().union(*(names for names, _ in found)))))
    text_labels.check_found(spec, skipped)
    return spec, skipped


def range_labels(segments: tuple[Segment, ...], doc_mode: str, jsonl_field: str,
                 label_field: str) -> tuple[set[str], list[dict]]:
    """Worker: the labels of the documents starting in ``segments``, and the documents without one."""
    counts, skipped = new_counts(text_labels.STAT), []
    with _Opener() as opener:
        docs = iter_documents(segments, doc_mode, jsonl_field, counts, opener, label_field, skipped)
        return {doc.label for doc in docs}, skipped


# ----------------------------------------------------------------------------- sample and model


def sample_documents(corpus: Corpus, doc_mode: str, jsonl_field: str, max_docs: int,
                     max_bytes: int) -> tuple[list[str], dict]:
    """A bounded, deterministic training sample: documents from evenly spaced windows of the stream.

    With a corpus of at most ``max_bytes`` every document is taken (up to ``max_docs``); otherwise
    up to MAX_SAMPLE_WINDOWS windows, each reading its share of both limits from its start."""
    windows = 1 if corpus.size <= max_bytes else min(MAX_SAMPLE_WINDOWS, max(1, max_bytes // SAMPLE_WINDOW_BYTES))
    bounds = [i * corpus.size // windows for i in range(windows + 1)]
    docs_each, bytes_each = math.ceil(max_docs / windows), math.ceil(max_bytes / windows)
    texts, counts, total_bytes = [], new_counts(), 0
    with _Opener() as opener:
        for a, b in zip(bounds, bounds[1:]):
            n = size = 0
            for doc in iter_documents(corpus.segments(a, b), doc_mode, jsonl_field, counts, opener):
                texts.append(doc.text)
                n, size = n + 1, size + len(doc.text.encode("utf-8"))
                if n >= docs_each or size >= bytes_each or len(texts) >= max_docs:
                    break
            total_bytes += size
            if len(texts) >= max_docs or total_bytes >= max_bytes:
                break
    return texts, {"documents": len(texts), "bytes": total_bytes, "windows": windows,
                   "empty_documents": counts["empty_documents"], "invalid_json_lines": counts["invalid_json_lines"]}


def training_sentences(texts: Iterable[str]) -> Iterator[str]:
    """Documents -> lines of at most MAX_SENTENCE_CHARS characters (sentencepiece skips longer ones)."""
    for text in texts:
        for line in text.split("\n"):
            for i in range(0, len(line), MAX_SENTENCE_CHARS):
                piece = line[i:i + MAX_SENTENCE_CHARS]
                if piece.strip():
                    yield piece


def train_model(texts: Sequence[str], vocab_size: int, model_type: str, byte_fallback: bool,
                allow_smaller: bool = False, warn=None) -> bytes:
    """Train a sentencepiece model with the fixed special ids; clear errors for a bad vocabulary size.

    With ``allow_smaller``, a size the sample cannot support is lowered (with ``warn(message)``)
    to the largest that sentencepiece reports as possible."""
    for _ in range(4):
        try:
            return _train(texts, vocab_size, model_type, byte_fallback)
        except RuntimeError as exc:
            message = str(exc)
            high, small = _TOO_HIGH.search(message), _TOO_SMALL.search(message)
            size = f"{len(texts)} documents, {sum(len(t) for t in texts) / 1e6:.2f} M characters"
            if high and allow_smaller:
                lowered = int(high.group(2))
                if warn:
                    warn(f"warning: --vocab-size {vocab_size} is too large for the training sample ({size}); "
                         f"using {lowered}, the largest size sentencepiece reports as possible")
                vocab_size = lowered
                continue
            if high:
                raise core.PrepError(
                    f"--vocab-size {vocab_size} is too large for the training sample ({size}): the largest "
                    f"vocabulary it supports is {high.group(2)}. Use --vocab-size {high.group(2)} or less, a larger "
                    f"sample (--sample-docs, --sample-bytes) or more text, or --allow-smaller-vocab") from None
            if small:
                raise core.PrepError(
                    f"--vocab-size {vocab_size} is too small: the special tokens"
                    f"{', the 256 byte pieces' if byte_fallback else ''} and the characters of the sample need "
                    f"{small.group(2)} pieces. Use --vocab-size {small.group(2)} or more") from None
            raise core.PrepError(f"sentencepiece training failed ({size}, --vocab-size {vocab_size}, "
                                 f"--model-type {model_type}): {message.strip()}") from None
    raise core.PrepError(f"sentencepiece could not train a vocabulary of any size near {vocab_size}")


def _train(texts: Sequence[str], vocab_size: int, model_type: str, byte_fallback: bool) -> bytes:
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_sentences(texts), model_writer=buf, model_type=model_type,
        vocab_size=vocab_size, byte_fallback=byte_fallback, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        pad_piece="<pad>", bos_piece="<s>", eos_piece="</s>", unk_piece="<unk>",
        # a control symbol is never produced from text, so a literal "<mask>" in the corpus stays text
        control_symbols=["<mask>"], max_sentence_length=4 * MAX_SENTENCE_CHARS + 16,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=TRAIN_THREADS, minloglevel=2,
    )
    return buf.getvalue()


def load_model(data: bytes, origin: str):
    """A SentencePieceProcessor from model bytes, with the special ids checked."""
    import sentencepiece as spm
    try:
        sp = spm.SentencePieceProcessor(model_proto=data)
    except (RuntimeError, OSError, TypeError) as exc:
        raise core.PrepError(f"{origin} is not a sentencepiece model: {str(exc).strip()}") from None
    check_special_ids(sp, origin)
    return sp


def check_special_ids(sp, origin: str) -> None:
    """Raise PrepError unless <pad>=0 <s>=1 </s>=2 <unk>=3 <mask>=4 (pieces and roles)."""
    problems = []
    for piece, i in SPECIAL_IDS.items():
        if i >= sp.vocab_size() or sp.id_to_piece(i) != piece:
            found = sp.piece_to_id(piece)
            where = f"id {found}" if sp.id_to_piece(found) == piece else "missing"
            problems.append(f"{piece} is {where}, not {i}")
    roles = {"pad": (sp.pad_id(), 0), "bos": (sp.bos_id(), 1), "eos": (sp.eos_id(), 2), "unk": (sp.unk_id(), 3)}
    problems += [f"{name}_id is {got}, not {want}" for name, (got, want) in roles.items() if got != want]
    if problems:
        raise core.PrepError(
            f"{origin}: special token ids differ from the fixed layout "
            f"{' '.join(f'{p}={i}' for p, i in SPECIAL_IDS.items())}: {'; '.join(problems)}. Train a model with "
            f"pad_id=0 bos_id=1 eos_id=2 unk_id=3 control_symbols=<mask> (or omit --spm-model to train one here)")


def bytes_per_token(sp, texts: Sequence[str]) -> tuple[float, tuple[tuple[int, int], ...]]:
    """UTF-8 bytes per stored token (ids + one </s> per document), on up to ESTIMATE_BYTES of ``texts``,
    and the (tokens, documents) histogram of those documents' lengths (for ``chunk_bytes``)."""
    total = sum(len(t) for t in texts) or 1
    step = max(1, round(total / ESTIMATE_BYTES))
    chosen = list(texts[::step])
    lengths = [len(ids) + 1 for ids in sp.encode(chosen, num_threads=1)]
    bpt = round(sum(len(t.encode("utf-8")) for t in chosen) / max(sum(lengths), 1), 6)
    return bpt, tuple(sorted(Counter(lengths).items()))


def chunk_bytes(tok: Tokenizer, shard_size: int, block_size: int, break_mode: str) -> int:
    """Bytes of text per shard: about ``shard_size`` blocks' worth, as measured on the sample.

    full_sentences fills every block; complete_doc starts a block per document (and per further
    ``block_size - 1`` tokens of it), so its blocks per byte come from the sample's document lengths."""
    if break_mode == "full_sentences":
        return max(1, round(shard_size * block_size * tok.bytes_per_token))
    tokens = sum(t * n for t, n in tok.doc_lengths)
    blocks = sum(-(-t // (block_size - 1)) * n for t, n in tok.doc_lengths)
    return max(1, round(shard_size * tok.bytes_per_token * tokens / max(blocks, 1)))


def prepare_tokenizer(args: argparse.Namespace, corpus: Corpus, out: Path, log) -> Tokenizer:
    """Train (or take --spm-model) and write OUT/spm.model; a re-run with the same inputs reuses it."""
    for path in (out / MODEL_FILE, _model_sidecar(out)):
        core._remove_stale_temps(path)  # left by a killed run
    spec = _model_spec(args, corpus)
    cached = _cached_tokenizer(out, spec, need_lengths=args.break_mode != "full_sentences")
    if cached is not None:
        log(f"reusing {cached.path} (same inputs and options)")
        return cached
    if args.spm_model:
        try:
            data = args.spm_model.read_bytes()
        except OSError as exc:
            raise core.PrepError(f"cannot read --spm-model {args.spm_model}: {exc.strerror or exc}") from None
        load_model(data, str(args.spm_model))
        texts, sample = _sample(args, corpus, min(args.sample_bytes, ESTIMATE_BYTES))
    else:
        texts, sample = _sample(args, corpus, args.sample_bytes)
        log(f"training sentencepiece ({args.model_type}, vocabulary {args.vocab_size}) on {sample['documents']} "
            f"documents, {sample['bytes'] / 1e6:.1f} MB from {sample['windows']} window(s)")
        data = train_model(texts, args.vocab_size, args.model_type, args.byte_fallback,
                           args.allow_smaller_vocab, warn=lambda m: print(m, file=sys.stderr))
    sp = load_model(data, str(args.spm_model or "the trained model"))
    path = out / MODEL_FILE
    out.mkdir(parents=True, exist_ok=True)  # only now: a failed training leaves nothing behind
    if not path.is_file() or path.read_bytes() != data:
        core.atomic_write_bytes(path, data)
    model_type = None if args.spm_model else args.model_type
    tok = _tokenizer(path, data, sp, *bytes_per_token(sp, texts), sample, model_type)
    # written after the model, so its presence with a matching sha256 marks a complete model
    core.atomic_write_json(_model_sidecar(out), {"spec": spec, "sha256": tok.sha256,
                                                 "bytes_per_token": tok.bytes_per_token,
                                                 "doc_lengths": tok.doc_lengths, "record": tok.record})
    return tok


def _sample(args, corpus: Corpus, max_bytes: int) -> tuple[list[str], dict]:
    texts, sample = sample_documents(corpus, args.doc_mode, args.jsonl_field, args.sample_docs, max_bytes)
    if not texts:
        hint = (f"; {sample['invalid_json_lines']} JSON lines had no string field {args.jsonl_field!r} "
                f"(see --jsonl-field)" if sample["invalid_json_lines"] else "")
        raise core.PrepError(f"no non-empty documents found in the inputs ({sample['empty_documents']} empty){hint}")
    return texts, sample


def _tokenizer(path: Path, data: bytes, sp, bpt: float, doc_lengths: tuple, sample: dict,
               model_type: str | None) -> Tokenizer:
    """``model_type`` None: a given model (its type and normaliser are read from the model when possible)."""
    sha = hashlib.sha256(data).hexdigest()
    record = {"file": MODEL_FILE, "sha256": sha, "vocab_size": sp.vocab_size(), "trained": model_type is not None,
              **_model_spec_fields(data, model_type), "special_ids": dict(SPECIAL_IDS), "sample": sample,
              "bytes_per_token": bpt}
    return Tokenizer(path, sha, sp.vocab_size(), bpt, record, doc_lengths)


def _model_spec_fields(data: bytes, model_type: str | None) -> dict:
    try:  # the protobuf module bundled with sentencepiece needs the protobuf package
        from sentencepiece import sentencepiece_model_pb2 as pb
        proto = pb.ModelProto.FromString(data)
        return {"model_type": pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower(),
                "normalization": proto.normalizer_spec.name}
    except Exception:  # noqa: BLE001 - informational only
        return {"model_type": model_type or "unknown", "normalization": "nmt_nfkc" if model_type else "unknown"}


def _model_spec(args: argparse.Namespace, corpus: Corpus) -> dict:
    """What OUT/spm.model is made from: a re-run with an equal spec reuses it instead of retraining."""
    import sentencepiece as spm
    inputs = [[f.rel, f.size, f.stamp] for f in corpus.files]
    sample = {"doc_mode": args.doc_mode, "jsonl_field": args.jsonl_field, "sample_docs": args.sample_docs}
    if args.spm_model:
        try:
            given = core.sha256_file(args.spm_model)
        except OSError as exc:
            raise core.PrepError(f"cannot read --spm-model {args.spm_model}: {exc.strerror or exc}") from None
        return {"given_sha256": given, "sample_bytes": min(args.sample_bytes, ESTIMATE_BYTES), **sample,
                "inputs": inputs}
    return {"vocab_size": args.vocab_size, "model_type": args.model_type, "byte_fallback": args.byte_fallback,
            "allow_smaller_vocab": args.allow_smaller_vocab, "sample_bytes": args.sample_bytes, **sample,
            "train_threads": TRAIN_THREADS, "sentencepiece": spm.__version__, "inputs": inputs}


def _model_sidecar(out: Path) -> Path:
    return out / f".{MODEL_FILE}.json"


def _cached_tokenizer(out: Path, spec: dict, need_lengths: bool = False) -> Tokenizer | None:
    """The model of an earlier run with an equal spec; None if there is none (or, with ``need_lengths``,
    its sidecar predates the document-length histogram that complete_doc sizes shards with)."""
    path = out / MODEL_FILE
    try:
        record = json.loads(_model_sidecar(out).read_text("utf-8"))
        lengths = record.get("doc_lengths")
        if record["spec"] != spec or not path.is_file() or (need_lengths and lengths is None):
            return None
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            return None
        sp = load_model(data, str(path))
        return Tokenizer(path, record["sha256"], sp.vocab_size(), record["bytes_per_token"], record["record"],
                         None if lengths is None else tuple((int(t), int(n)) for t, n in lengths))
    except (OSError, ValueError, KeyError, TypeError, core.PrepError):
        return None


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep.text", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    core.add_io_args(p, "text", "files or directories (searched recursively, sorted; hidden folders ignored) of "
                                ".txt, .jsonl, .txt.gz, .jsonl.gz files, read in the order given",
                     "directory for shards, sidecars, spm.model and manifest.json; not inside an input",
                     input_metavar="PATH", input_nargs="+")
    p.add_argument("--vocab-size", type=core.int_arg(8), default=50000, metavar="N",
                   help="sentencepiece vocabulary size, special tokens included; ids are stored as uint16 up to "
                        "65536, else int32 (default: %(default)s, about RoBERTa's)")
    p.add_argument("--allow-smaller-vocab", action="store_true",
                   help="if the training sample cannot support --vocab-size, use the largest size it can, with a "
                        "warning (default: stop with an error naming that size)")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe",
                   help="sentencepiece algorithm (default: %(default)s)")
    p.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="add 256 byte pieces so rare characters become bytes instead of <unk> (default: on)")
    p.add_argument("--spm-model", type=Path, metavar="PATH",
                   help="use this sentencepiece model instead of training one; it must have <pad>=0 <s>=1 </s>=2 "
                        "<unk>=3 <mask>=4 (--vocab-size, --model-type, --byte-fallback are then ignored)")
    p.add_argument("--sample-docs", type=core.int_arg(1), default=1_000_000, metavar="N",
                   help="train on at most N documents (default: %(default)s)")
    p.add_argument("--sample-bytes", type=_size_arg, default=100_000_000, metavar="SIZE",
                   help="... and at most SIZE bytes of text, e.g. 500M or 2G. A corpus larger than this is sampled "
                        "from up to 1024 evenly spaced windows, not just its start (default: 100M)")
    p.add_argument("--block-size", type=core.int_arg(2), default=512, metavar="TOKENS",
                   help="tokens per block, </s> separators, <s> and <pad> included; the model's positions "
                        "(fairseq tokens_per_sample) (default: %(default)s)")
    p.add_argument("--break-mode", choices=BREAK_MODES, default=BREAK_MODES[0],
                   help="full_sentences: one stream of documents cut every --block-size tokens, across "
                        "documents, no <s> (RoBERTa); complete_doc: <s> + at most --block-size - 1 tokens of "
                        "one document per block, padded, a long document cut into several blocks (the "
                        "released data2vec text recipe; best with documents of several hundred tokens: "
                        "--doc-mode paragraph or .jsonl) (default: %(default)s)")
    p.add_argument("--doc-mode", choices=("line", "paragraph"), default="line",
                   help=".txt documents: one per line, or one per run of non-blank lines (default: %(default)s); "
                        ".jsonl files always hold one document per line")
    p.add_argument("--jsonl-field", default="text", metavar="KEY",
                   help="the string field of each JSON object that holds the text (default: %(default)s)")
    p.add_argument("--label-field", default=None, metavar="KEY",
                   help="label the blocks with this field of each .jsonl record (a string or an integer): json "
                        "'label' and a 'cls' index into the manifest's sorted 'classes'. Needs --break-mode "
                        "complete_doc (a block then holds one document) and .jsonl inputs only. A document "
                        "without the field (missing, null, empty, or not a string or an integer) is skipped, "
                        "counted and listed in the manifest's 'skipped'; no labelled document at all is an error. "
                        "Every document is read once more, before tokenizing, to collect the classes "
                        "(default: no labels)")
    core.add_shard_args(p, "about this many blocks per shard: the stream is cut every BLOCKS x --block-size x "
                           "(bytes per token measured on the sample) bytes of text; for complete_doc, every "
                           "BLOCKS x (bytes per block, from the sample's document lengths) (default: %(default)s)",
                        default=10000, metavar="BLOCKS", worker_task="encoding")
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress messages")
    return p


def _size_arg(value: str) -> int:
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", value.strip())
    if not match or int(match.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 500000, 500k, 100M or 2G, got {value!r}")
    return int(match.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match.group(2).lower()]


def run(args: argparse.Namespace) -> tuple[core.PrepReport, Tokenizer]:
    """Discover and measure the inputs, make the model, cut the stream into shards, write them."""
    text_labels.check_options(args)
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    found, skipped = discover(args.input)
    text_labels.check_inputs(args.label_field, found)
    out = _check_output(args.output, args.input)
    workers = core.resolve_workers(args.workers)
    files, unreadable = measure(found, workers)
    corpus = Corpus(files)
    if corpus.size == 0:
        raise core.PrepError(f"no text found in {' '.join(map(str, args.input))} "
                             f"(supported: {', '.join(FORMATS)}; {len(skipped + unreadable)} files skipped)")
    if out.exists() and not out.is_dir():
        raise core.PrepError(f"output path exists and is not a directory: {out}")
    labels, unlabelled = scan_labels(args, corpus, workers, log)
    tok = prepare_tokenizer(args, corpus, out, log)
    chunk = chunk_bytes(tok, args.shard_size, args.block_size, args.break_mode)
    field = token_field(tok.vocab_size)
    report = core.write_shards(
        _items(args, corpus, chunk, tok, field, labels), process_chunk, out, args.name, modality="text",
        shard_size=1, workers=workers, params=_params(args, chunk), pre_skipped=skipped + unreadable + unlabelled,
        progress=not args.quiet, allow_empty=args.allow_empty, extra=_extra(args, tok, field, labels),
    )
    return report, tok


def _items(args: argparse.Namespace, corpus: Corpus, chunk: int, tok: Tokenizer, field: str,
           labels: text_labels.LabelSpec | None) -> list[core.WorkItem]:
    """One item per ``chunk`` bytes of the corpus."""
    model = ModelRef(tok.sha256, str(tok.path))
    # process_chunk's arguments, part of each shard's fingerprint: the default mode is left out, so shards
    # written before --break-mode existed are still recognised as complete by a re-run (labels likewise)
    options = (args.block_size, field) + (() if args.break_mode == BREAK_MODES[0] else (args.break_mode,))
    options += () if labels is None else (labels,)
    return [
        core.WorkItem(core.item_key(k), f"text bytes {a}-{min(a + chunk, corpus.size)}",
                      (segs, args.doc_mode, args.jsonl_field, model, *options), corpus.stamps(segs))
        for k, a in enumerate(range(0, corpus.size, chunk))
        for segs in [corpus.segments(a, a + chunk)]
    ]


def _extra(args: argparse.Namespace, tok: Tokenizer, field: str, labels: text_labels.LabelSpec | None) -> dict:
    """The manifest's own fields; "classes" with --label-field only (an unlabelled manifest is as before)."""
    extra = {"tokenizer": tok.record, "block_size": args.block_size, "break_mode": args.break_mode,
             "field": field, "dtype": np.dtype(TOKEN_DTYPES[field]).name}
    return extra if labels is None else {**extra, "classes": list(labels.classes)}


def _check_output(output: Path, inputs: Sequence[Path]) -> Path:
    out = output.resolve()
    for arg in inputs:
        real = arg.resolve()
        if out == real or (arg.is_dir() and out.is_relative_to(real)):
            raise core.PrepError(f"output directory {output} must not be inside the input {arg}")
    return out


def _params(args: argparse.Namespace, chunk_bytes: int) -> dict:
    return {"inputs": [str(p.resolve()) for p in args.input], "doc_mode": args.doc_mode,
            "jsonl_field": args.jsonl_field, "block_size": args.block_size, "break_mode": args.break_mode,
            "shard_size": args.shard_size,
            "chunk_bytes": chunk_bytes, "vocab_size": args.vocab_size, "model_type": args.model_type,
            "byte_fallback": args.byte_fallback, "allow_smaller_vocab": args.allow_smaller_vocab,
            "spm_model": str(args.spm_model.resolve()) if args.spm_model else None,
            "sample_docs": args.sample_docs, "sample_bytes": args.sample_bytes,
            "key_format": BLOCK_KEY_FORMAT, "packing": PACKING[args.break_mode],
            **({} if args.label_field is None else {"label_field": args.label_field})}


def summary(report: core.PrepReport, tok: Tokenizer) -> str:
    m = report.manifest
    t = m["totals"]
    if m["break_mode"] == "complete_doc":
        share = t["pad_tokens"] / max(t["samples"] * m["block_size"], 1)
        packing = (f"complete_doc: <s> + one document's tokens per block; {t['pad_tokens']:,} <pad> "
                   f"({share:.0%} of the blocks)")
    else:
        packing = f"full_sentences; {t['pad_tokens']:,} <pad> filling the last block of each shard"
    return "\n".join([
        report.summary(),
        f"  {t['tokens']:,} tokens in {t['samples']:,} blocks of {m['block_size']} ({m['dtype']}) from "
        f"{t['documents']:,} documents, {t['text_bytes'] / 1e6:.1f} MB of text; {packing}",
        f"  {t['empty_documents']:,} empty documents, {t['invalid_json_lines']:,} invalid JSON lines, "
        f"{t['invalid_utf8_documents']:,} documents with invalid UTF-8 ({t['invalid_utf8_bytes']:,} bytes replaced)",
        f"  model {tok.path}: {tok.vocab_size} pieces ({tok.record['model_type']}), sha256 {tok.sha256[:16]}...",
        *text_labels.summary(m),
    ])


def main(argv: Sequence[str] | None = None) -> core.PrepReport:
    report, tok = core.cli_run(build_parser(), run, argv)
    print(summary(report, tok))
    return report


if __name__ == "__main__":
    # Import ourselves by module name so worker processes pickle
    # data_prep.text.process_chunk rather than __main__.process_chunk.
    from data_prep.text import main as _main

    _main()
