"""Text data prep: document reading, block packing, the sentencepiece model, and the shards end to end.

Shards are read with independent readers (webdataset, tarfile, hashlib) and decoded with
sentencepiece directly; the expected documents come from tests/text_fixtures.py, which builds
every input file byte by byte.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from data_prep import core, text, text_labels

try:  # tests/ is a plain directory (rootdir on sys.path) or a package
    from text_fixtures import TextCorpus, make_line_corpus, make_paragraph_corpus
except ImportError:
    from tests.text_fixtures import TextCorpus, make_line_corpus, make_paragraph_corpus

REPO = Path(__file__).resolve().parents[1]
PAD, BOS, EOS, UNK, MASK = 0, 1, 2, 3, 4
VOCAB, BLOCK = "600", 64
OPTIONS = ["--vocab-size", VOCAB, "--block-size", str(BLOCK), "--shard-size", "40", "--quiet"]


# ----------------------------------------------------------------------------- helpers


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_main(argv: list[str]) -> tuple[core.PrepReport, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        report = text.main(argv)
    return report, out.getvalue()


def prep(corpus: TextCorpus, out: Path, *extra: str) -> tuple[core.PrepReport, str]:
    return run_main(["--input", str(corpus.root), "--output", str(out), *OPTIONS, *extra])


def error_of(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        text.main([*argv, "--quiet"])
    return str(exc.value.code)


def shard_blocks(out: Path) -> dict[str, list[tuple[str, np.ndarray, dict]]]:
    """shard path -> [(key, ids, metadata)] in tar order, read with webdataset."""
    import webdataset as wds

    manifest = core.read_manifest(out)
    field, dtype = manifest["field"], {"u16": "<u2", "i32": "<i4"}[manifest["field"]]
    blocks: dict[str, list] = {s["path"]: [] for s in manifest["shards"]}
    for s in wds.WebDataset([s["path"] for s in manifest["shards"]], shardshuffle=False):
        blocks[s["__url__"]].append((s["__key__"], np.frombuffer(s[field], dtype=dtype), json.loads(s["json"])))
    return blocks


def snapshot(root: Path) -> dict[str, tuple]:
    return {p.relative_to(root).as_posix(): (sha(p.read_bytes()) if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def file_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def check_round_trip(out: Path, corpus: TextCorpus) -> None:
    """Every non-empty document exactly once, in corpus order, shard by shard; blocks exact; metadata right."""
    manifest = core.read_manifest(out)
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    block = manifest["block_size"]
    blocks = shard_blocks(out)
    first = 0  # index in corpus.docs of the shard's first document
    for s, rec in enumerate(manifest["shards"]):
        docs = corpus.docs[first:first + rec["documents"]]
        encoded = [sp.encode(d.text) for d in docs]
        expected = [t for ids in encoded for t in [*ids, EOS]]
        assert len(blocks[rec["path"]]) == rec["samples"] == -(-len(expected) // block)
        stream = []
        for k, (key, ids, meta) in enumerate(blocks[rec["path"]]):
            assert key == f"{s:09d}_{k:09d}" and len(ids) == block
            stream += ids.tolist()
        assert stream == expected + [PAD] * (len(stream) - len(expected))  # last block padded, nothing else
        assert rec["tokens"] == len(expected) and rec["pad_tokens"] == len(stream) - len(expected) < block
        pieces = np.split(np.array(expected), np.flatnonzero(np.array(expected) == EOS) + 1)[:-1]
        assert len(pieces) == len(docs)
        for doc, piece in zip(docs, pieces):  # decoded text = the document after sentencepiece's normalisation
            decoded = sp.decode(piece[:-1].tolist())
            assert decoded == sp.decode(sp.encode(doc.text)) and decoded
            if doc.text in corpus.plain:  # NFKC + whitespace collapsing, and no <unk> (byte fallback)
                assert decoded == " ".join(unicodedata.normalize("NFKC", doc.text).split())
        check_block_metadata(blocks[rec["path"]], docs, encoded, block, len(stream) - len(expected))
        first += rec["documents"]
    assert first == len(corpus.docs)


def check_block_metadata(blocks, docs, encoded, block: int, pad: int) -> None:
    starts = np.cumsum([0] + [len(ids) + 1 for ids in encoded])
    for k, (_, _, meta) in enumerate(blocks):
        pos = k * block
        d = int(np.searchsorted(starts, pos, "right")) - 1
        spanned = int(np.searchsorted(starts[:-1], pos + block, "left")) - d
        last = k == len(blocks) - 1
        assert meta == {"doc": d, "offset": int(pos - starts[d]), "docs": spanned, "path": docs[d].rel,
                        "byte": docs[d].byte, "pad": pad if last else 0}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> TextCorpus:
    return make_line_corpus(tmp_path_factory.mktemp("text") / "in")


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    """One single-worker run over the line corpus, shared by read-only tests."""
    base = tmp_path_factory.mktemp("run")
    before = snapshot(corpus.root.parent)
    report, stdout = prep(corpus, base / "out")
    return base, base / "out", report, stdout, before


# ----------------------------------------------------------------------------- reading and packing


def test_decoding_counts_invalid_utf8_and_rejects_bad_json_records():
    counts = text.new_counts()
    assert text.doc_text(b"a\xe2\x82 b\xff", "txt", "text", counts) == "a\ufffd b\ufffd"
    assert (counts["invalid_utf8_documents"], counts["invalid_utf8_bytes"]) == (1, 3)
    assert text.doc_text('{"body": "x"}'.encode(), "jsonl", "body", counts) == "x"
    for bad in (b"{", b'{"text": null}', b'"text"', b'{"other": "x"}'):
        assert text.doc_text(bad, "jsonl", "text", counts) is None
    assert counts["invalid_json_lines"] == 4
    for empty in (b"", b" \t", "\u3000".encode(), b'{"text": "  "}'):
        assert text.doc_text(empty, "jsonl" if empty.startswith(b"{") else "txt", "text", counts) is None
    assert counts["empty_documents"] == 4
    assert text.doc_text("\ufeffhi".encode(), "txt", "text", counts, at_file_start=True) == "hi"


@pytest.mark.parametrize("which", ["line", "paragraph"])
def test_byte_ranges_partition_the_documents(tmp_path, which):
    """Cut each file at random offsets: every document is read by exactly one range, in order."""
    corpus = (make_line_corpus if which == "line" else make_paragraph_corpus)(tmp_path / "in")
    files, _ = text.discover([corpus.root])
    files, _ = text.measure(files, 1)
    rng = random.Random(0)
    for f in files:
        want = [(d.text, d.byte) for d in corpus.docs if d.rel == f.rel]
        whole = text.Corpus([f])
        for trial in range(12):
            cuts = sorted({0, f.size, *(rng.randrange(f.size) for _ in range(rng.choice([1, 5, 40])))})
            if trial == 0:  # every offset around the 9000-space line and some line ends
                cuts = sorted(set(range(0, f.size, 997)) | {0, f.size})
            got, counts = [], text.new_counts()
            with text._Opener() as opener:
                for a, b in zip(cuts, cuts[1:]):
                    docs = text.iter_documents(whole.segments(a, b), which, "text", counts, opener)
                    got += [(d.text, d.byte) for d in docs if d.text not in corpus.vanishing]
            assert got == want, (f.rel, cuts)
            assert counts["text_bytes"] > 0


def test_packer_matches_a_plain_list_reference():
    rng = random.Random(1)
    docs = [[rng.randrange(5, 100) for _ in range(rng.choice([0, 1, 3, 7, 20]) or 1)] for _ in range(200)]
    for block in (1, 2, 7, 64):
        packer = text.BlockPacker(block, EOS, PAD)
        out = []
        for i, ids in enumerate(docs):
            out += packer.add(ids, text.Doc("", "f", i))
        out += packer.finish()
        stream = [t for ids in docs for t in [*ids, EOS]]
        pad = -len(stream) % block
        ref = stream + [PAD] * pad
        assert [b.tolist() for b, _ in out] == [ref[i:i + block] for i in range(0, len(ref), block)]
        check_block_metadata([(None, None, m) for _, m in out], [text.Doc("", "f", i) for i in range(len(docs))],
                             docs, block, pad)


def test_token_field_is_uint16_only_when_every_id_fits():
    assert text.token_field(600) == text.token_field(65536) == "u16"
    assert text.token_field(65537) == text.token_field(250_000) == "i32"


# ----------------------------------------------------------------------------- end to end


def test_round_trip_gives_back_every_document_once_in_order(prepared, corpus):
    _, out, report, _, _ = prepared
    assert report.manifest["totals"]["shards"] >= 8  # several shards, each checked on its own
    check_round_trip(out, corpus)


def test_special_ids_are_fixed_and_never_come_from_text(prepared):
    _, out, _, _, _ = prepared
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    assert [sp.id_to_piece(i) for i in range(5)] == ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.piece_to_id("<mask>")) == (0, 1, 2, 3, 4)
    assert MASK not in sp.encode("a literal <mask> here") and sp.vocab_size() == int(VOCAB)
    ids = np.concatenate([b for blocks in shard_blocks(out).values() for _, b, _ in blocks])
    assert not set(np.unique(ids).tolist()) & {BOS, UNK, MASK}  # <pad> only fills the last blocks (checked above)
    assert ids.max() < sp.vocab_size()


def test_manifest_counts_and_model(prepared, corpus):
    _, out, report, stdout, _ = prepared
    m = json.loads((out / "manifest.json").read_text())
    assert m == report.manifest and m["modality"] == "text"
    assert (m["block_size"], m["field"], m["dtype"]) == (BLOCK, "u16", "uint16")
    assert m["break_mode"] == m["params"]["break_mode"] == "full_sentences"  # the default
    tok = m["tokenizer"]
    assert tok["sha256"] == sha((out / "spm.model").read_bytes()) and tok["vocab_size"] == int(VOCAB)
    assert (tok["model_type"], tok["trained"], tok["special_ids"]) == ("bpe", True, text.SPECIAL_IDS)
    t = m["totals"]
    assert t["documents"] == len(corpus.docs) and t["empty_documents"] == corpus.empty
    assert t["invalid_json_lines"] == corpus.invalid_json
    assert (t["invalid_utf8_documents"], t["invalid_utf8_bytes"]) == (corpus.invalid_utf8_docs,
                                                                      corpus.invalid_utf8_bytes)
    assert t["tokens"] + t["pad_tokens"] == t["samples"] * BLOCK
    for key in text.STAT_KEYS:
        assert t[key] == sum(s[key] for s in m["shards"]), key
    assert {s["path"]: s["reason"] for s in m["skipped"]} == corpus.skipped
    assert f"{t['documents']:,} documents" in stdout and f"{corpus.empty} empty documents" in stdout
    assert m["params"]["chunk_bytes"] > 0 and m["params"]["doc_mode"] == "line"
    # a byte range inside the long line of a.txt holds no document start: a shard of 0 blocks, counted
    assert any(s["samples"] == s["documents"] == 0 for s in m["shards"])
    for rec in m["shards"]:
        data = (out / rec["name"]).read_bytes()
        sidecar = json.loads((out / f".{rec['name']}.json").read_text())
        assert rec["sha256"] == sidecar["sha256"] == sha(data) and rec["bytes"] == len(data)
    assert core.read_manifest(out, verify=True)["dir"] == str(out.resolve())


def test_nothing_is_written_outside_out_and_no_temp_files(prepared, corpus):
    base, out, report, _, before = prepared
    assert snapshot(corpus.root.parent) == before
    assert [p.name for p in base.iterdir()] == ["out"]
    shards = {s["name"] for s in report.manifest["shards"]}
    expected = shards | {f".{n}.json" for n in shards} | {"manifest.json", "spm.model", ".spm.model.json"}
    assert {p.name for p in out.iterdir()} == expected


def test_paragraph_mode_round_trip(tmp_path):
    corpus = make_paragraph_corpus(tmp_path / "in")
    report, _ = prep(corpus, tmp_path / "out", "--doc-mode", "paragraph", "--model-type", "unigram")
    assert report.manifest["tokenizer"]["model_type"] == "unigram"
    assert report.manifest["totals"]["empty_documents"] == corpus.empty == 2
    check_round_trip(tmp_path / "out", corpus)


def test_rerun_reuses_model_and_complete_shards(corpus, tmp_path):
    out = tmp_path / "out"
    first, _ = prep(corpus, out)
    original = file_bytes(out)
    names = [s["name"] for s in first.manifest["shards"]]
    model_mtime = (out / "spm.model").stat().st_mtime_ns
    (out / names[0]).unlink()
    broken = bytearray(original[names[1]])
    broken[700] ^= 0xFF  # same size: only the sha256 catches it
    (out / names[1]).write_bytes(bytes(broken))
    (out / f".{names[2]}.tmp-99999").write_bytes(b"left by a killed run")
    (out / ".spm.model.tmp-99999").write_bytes(b"left by a killed run")

    second, stdout = prep(corpus, out)
    assert f"2 written, {len(names) - 2} reused" in stdout
    assert file_bytes(out) == original and second.manifest == first.manifest
    assert (out / "spm.model").stat().st_mtime_ns == model_mtime  # not retrained
    report, _ = prep(corpus, out, "--block-size", "32")  # changed options: every shard rewritten
    assert report.reused == 0 and report.manifest["block_size"] == 32


def test_workers_give_byte_identical_output(prepared, corpus, tmp_path):
    _, out, _, _, _ = prepared
    cmd = [sys.executable, "-m", "data_prep.text", "--input", str(corpus.root), "--output", str(tmp_path / "two"),
           *OPTIONS, "--workers", "2"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "documents" in done.stdout
    assert file_bytes(tmp_path / "two") == file_bytes(out)


def test_int32_blocks_when_the_vocabulary_exceeds_uint16(corpus, prepared, tmp_path, monkeypatch):
    _, out, _, _, _ = prepared
    monkeypatch.setattr(text, "token_field", lambda vocab_size: "i32")
    report, _ = prep(corpus, tmp_path / "out")
    assert (report.manifest["field"], report.manifest["dtype"]) == ("i32", "int32")
    wide, narrow = shard_blocks(tmp_path / "out"), shard_blocks(out)
    assert len(wide) == len(narrow)
    for (_, w), (_, n) in zip(sorted(wide.items()), sorted(narrow.items())):
        assert [b.dtype.str for _, b, _ in w] == ["<i4"] * len(w)
        assert [b.tolist() for _, b, _ in w] == [b.tolist() for _, b, _ in n]


def test_given_model_is_reused_and_gives_the_same_shards(prepared, corpus, tmp_path):
    _, out, first, _, _ = prepared
    report, _ = prep(corpus, tmp_path / "out", "--spm-model", str(out / "spm.model"), "--vocab-size", "999")
    tok = report.manifest["tokenizer"]
    assert tok["trained"] is False and tok["sha256"] == first.manifest["tokenizer"]["sha256"]
    assert (tmp_path / "out" / "spm.model").read_bytes() == (out / "spm.model").read_bytes()
    for rec in report.manifest["shards"]:
        assert (tmp_path / "out" / rec["name"]).read_bytes() == (out / rec["name"]).read_bytes()


def test_given_model_with_other_special_ids_is_rejected(corpus, tmp_path):
    model = io.BytesIO()
    lines = [d.text for d in corpus.docs[:200]]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=400, minloglevel=2)
    (tmp_path / "default.model").write_bytes(model.getvalue())  # sentencepiece's defaults: unk=0 bos=1 eos=2
    message = error_of(["--input", str(corpus.root), "--output", str(tmp_path / "out"),
                        "--spm-model", str(tmp_path / "default.model")])
    assert message.startswith("error: ") and "special token ids differ" in message
    assert "<pad> is missing, not 0" in message and "<unk> is id 0, not 3" in message
    (tmp_path / "junk.model").write_bytes(b"not a model")
    message = error_of(["--input", str(corpus.root), "--output", str(tmp_path / "out"),
                        "--spm-model", str(tmp_path / "junk.model")])
    assert "is not a sentencepiece model" in message
    assert not (tmp_path / "out" / "spm.model").exists()


def test_too_large_vocabulary_names_the_largest_that_works(corpus, tmp_path, capsys):
    argv = ["--input", str(corpus.root / "a.txt"), "--output", str(tmp_path / "out"), "--vocab-size", "60000",
            "--block-size", "64"]
    message = error_of(argv)
    assert message.startswith("error: --vocab-size 60000 is too large for the training sample")
    assert "INTERNAL" not in message and "trainer_interface" not in message
    largest = int(message.split("the largest vocabulary it supports is ")[1].split(".")[0])
    assert 600 < largest < 60000
    report, _ = run_main([*argv, "--allow-smaller-vocab", "--quiet"])
    assert f"using {largest}" in capsys.readouterr().err
    assert report.manifest["tokenizer"]["vocab_size"] == largest
    small = error_of([*argv[:-4], "--vocab-size", "100"])
    assert "--vocab-size 100 is too small" in small and "Use --vocab-size" in small


@pytest.mark.parametrize("case", ["missing", "unsupported", "no_text", "out_inside", "wrong_field"])
def test_clear_errors_without_traceback(tmp_path, case):
    src = tmp_path / "src"
    src.mkdir()
    (src / "readme.md").write_text("no text input here")
    target = src
    if case == "unsupported":
        target = src / "readme.md"
    elif case == "missing":
        target = src / "nope.txt"
    elif case == "wrong_field":
        (src / "a.jsonl").write_text('{"body": "some text"}\n' * 3)
    elif case == "out_inside":
        (src / "a.txt").write_text("some text\n")
    out = src / "shards" if case == "out_inside" else tmp_path / "out"
    message = error_of(["--input", str(target), "--output", str(out)])
    assert message.startswith("error: ")
    assert {"missing": "input not found", "unsupported": "unsupported input file", "no_text": "no text found",
            "out_inside": "must not be inside", "wrong_field": "had no string field 'text'"}[case] in message
    assert not (src / "shards").exists() and not (tmp_path / "out").exists()


def test_help_lists_every_option():
    done = subprocess.run([sys.executable, "-m", "data_prep.text", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0
    for option in ("--input", "--output", "--name", "--vocab-size", "--allow-smaller-vocab", "--model-type",
                   "--byte-fallback", "--spm-model", "--sample-docs", "--sample-bytes", "--block-size",
                   "--break-mode", "--doc-mode", "--jsonl-field", "--shard-size", "--workers", "--quiet"):
        assert option in done.stdout, option


def test_sample_is_bounded_and_spread_over_the_corpus(corpus):
    files, _ = text.measure(text.discover([corpus.root])[0], 1)
    whole = text.Corpus(files)
    texts, info = text.sample_documents(whole, "line", "text", max_docs=10**6, max_bytes=40_000)
    assert info["windows"] == 2 and 40_000 <= info["bytes"] < 60_000  # each window stops after its share
    all_texts = [d.text for d in corpus.docs]
    texts = [t for t in texts if t not in corpus.vanishing]
    positions = [all_texts.index(t) for t in texts]
    assert positions == sorted(positions) and positions[-1] > len(all_texts) // 2  # not just the start
    texts, info = text.sample_documents(whole, "line", "text", max_docs=25, max_bytes=10**9)
    assert len(texts) == 25 and info["windows"] == 1  # the first 25 (one of them vanishes when encoded)
    assert [t for t in texts if t not in corpus.vanishing] == all_texts[:24]
    gz = [f for f in files if f.gz]
    with gzip.open(gz[0].path, "rb") as fh:
        assert gz[0].size == len(fh.read())


# ----------------------------------------------------------------------------- --break-mode complete_doc


def complete_doc_reference(docs: list[list[int]], block: int) -> list[tuple[list[int], dict]]:
    """fairseq's complete_doc with one sentence per document, then <s> prepended, in plain lists: each
    document's ids + </s> in pieces of block - 1 tokens, one block each, padded to ``block``."""
    out = []
    for d, ids in enumerate(docs):
        unit = [*ids, EOS]
        for offset in range(0, len(unit), block - 1):
            piece = unit[offset:offset + block - 1]
            pad = block - 1 - len(piece)
            out.append(([BOS, *piece] + [PAD] * pad,
                        {"doc": d, "offset": offset, "docs": 1, "path": "f", "byte": d, "pad": pad}))
    return out


def test_doc_blocker_matches_a_plain_list_reference():
    rng = random.Random(2)
    for block in (2, 3, 7, 64):
        room = block - 1  # lengths (ids + </s>) around every piece boundary, and random ones
        lengths = [1, 2, room - 1, room, room + 1, 2 * room - 1, 2 * room, 2 * room + 1, 5 * room + 3]
        lengths += [rng.randrange(1, 4 * block) for _ in range(50)]
        docs = [[rng.randrange(5, 100) for _ in range(max(n - 1, 1))] for n in lengths]  # >= 1 id, as encoded
        blocker = text.DocBlocker(block, BOS, EOS, PAD)
        out = []
        for i, ids in enumerate(docs):
            out += blocker.add(ids, text.Doc("", "f", i))
        assert blocker.finish() == [] and blocker.documents == len(docs)
        assert [(b.tolist(), m) for b, m in out] == complete_doc_reference(docs, block)
        assert all(b.dtype == np.int32 and b.shape == (block,) for b, _ in out)
    with pytest.raises(ValueError, match="unknown break mode"):
        text.packer_for("complete", 64, spm.SentencePieceProcessor())


def check_complete_doc_round_trip(out: Path, corpus: TextCorpus) -> dict[int, int]:
    """complete_doc shards: <s> first, then one document's tokens, <pad> only at the end; every document
    once, in order, split into pieces of block - 1 tokens with nothing lost; counts and metadata right.
    Returns {blocks per document: documents}."""
    manifest = core.read_manifest(out)
    assert manifest["break_mode"] == manifest["params"]["break_mode"] == "complete_doc"
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    block = manifest["block_size"]
    blocks = shard_blocks(out)
    first, spread = 0, {}
    for s, rec in enumerate(manifest["shards"]):
        docs = corpus.docs[first:first + rec["documents"]]
        pieces: dict[int, list] = {}
        for k, (key, ids, meta) in enumerate(blocks[rec["path"]]):
            ids = ids.tolist()
            assert key == f"{s:09d}_{k:09d}" and len(ids) == block
            assert ids[0] == BOS and BOS not in ids[1:]
            n = block - meta["pad"]  # tokens before the padding
            assert ids[n:] == [PAD] * meta["pad"] and PAD not in ids[:n] and n >= 2
            assert EOS not in ids[1:n - 1]  # never a document boundary inside a block
            assert meta["docs"] == 1 and (meta["path"], meta["byte"]) == (docs[meta["doc"]].rel,
                                                                          docs[meta["doc"]].byte)
            pieces.setdefault(meta["doc"], []).append((meta["offset"], ids[1:n]))
        assert list(pieces) == list(range(len(docs)))  # each document, in order, its blocks together
        expected_tokens = 0
        for d, doc in enumerate(docs):
            ids = sp.encode(doc.text)
            assert [off for off, _ in pieces[d]] == list(range(0, len(ids) + 1, block - 1))
            unit = [t for _, piece in pieces[d] for t in piece]
            assert unit == [*ids, EOS]  # no token lost, only the last piece ends with </s>
            assert all(len(piece) == block - 1 for _, piece in pieces[d][:-1])
            assert sp.decode(unit[:-1]) == sp.decode(sp.encode(doc.text)) and unit[:-1]
            expected_tokens += len(ids) + 1
            spread[len(pieces[d])] = spread.get(len(pieces[d]), 0) + 1
        samples = len(blocks[rec["path"]])
        assert rec["samples"] == samples == sum(len(p) for p in pieces.values())
        assert rec["tokens"] == expected_tokens + samples  # <s> counted; <pad> not
        assert rec["tokens"] + rec["pad_tokens"] == samples * block
        assert rec["pad_tokens"] == sum(m["pad"] for _, _, m in blocks[rec["path"]])
        first += rec["documents"]
    assert first == len(corpus.docs)
    return spread


@pytest.fixture(scope="module")
def prepared_doc(corpus, prepared, tmp_path_factory):
    """A complete_doc run over the line corpus (reusing the default run's model)."""
    out = tmp_path_factory.mktemp("doc") / "out"
    report, stdout = prep(corpus, out, "--break-mode", "complete_doc")
    return out, report, stdout


def test_complete_doc_round_trip_and_long_documents_split(prepared_doc, corpus):
    out, report, stdout = prepared_doc
    spread = check_complete_doc_round_trip(out, corpus)
    assert max(spread) >= 10 and spread[1] > 100  # the > 4096-character line fills many blocks; most fit in one
    t, m = report.manifest["totals"], report.manifest
    assert m["params"]["packing"].startswith("complete_doc") and t["documents"] == len(corpus.docs)
    for key in text.STAT_KEYS:
        assert t[key] == sum(s[key] for s in m["shards"]), key
    assert "complete_doc" in stdout and f"{t['pad_tokens']:,} <pad>" in stdout
    assert json.loads((out / "manifest.json").read_text()) == m


def test_complete_doc_paragraph_mode_round_trip(tmp_path):
    corpus = make_paragraph_corpus(tmp_path / "in")
    prep(corpus, tmp_path / "out", "--doc-mode", "paragraph", "--break-mode", "complete_doc", "--block-size", "24")
    spread = check_complete_doc_round_trip(tmp_path / "out", corpus)
    assert len(spread) >= 5  # documents of 1, 2, 3 ... blocks


def test_complete_doc_shards_hold_about_shard_size_blocks(prepared_doc, prepared):
    """Shards are sized from the sample's document lengths: about --shard-size blocks each, as full_sentences."""
    for manifest in (prepared_doc[1].manifest, prepared[2].manifest):
        samples = sorted(s["samples"] for s in manifest["shards"] if s["samples"])
        assert 30 <= samples[len(samples) // 2] <= 55, samples  # --shard-size 40
    sidecar = json.loads((prepared_doc[0] / ".spm.model.json").read_text())
    lengths = {int(t): n for t, n in sidecar["doc_lengths"]}
    assert sum(lengths.values()) > 400 and max(lengths) > 1000  # the sample's documents, the long line too


def test_chunk_bytes_counts_complete_doc_blocks_per_document():
    # 100 documents of 10 tokens and 10 of 130, 2 bytes per token: 2000 + 2600 bytes of text
    tok = text.Tokenizer(Path("m"), "", 600, 2.0, {}, ((10, 100), (130, 10)))
    assert text.chunk_bytes(tok, 40, 64, "full_sentences") == 40 * 64 * 2  # full blocks
    # complete_doc, 63 tokens per block: 100 + 10 x 3 blocks for 4600 bytes -> 40 blocks' worth
    assert text.chunk_bytes(tok, 40, 64, "complete_doc") == round(40 * 4600 / 130)
    assert text.chunk_bytes(tok, 40, 2, "complete_doc") == 40 * 4600 // 2300  # 1 token per block


def test_complete_doc_shards_of_mostly_padding_still_hold_about_shard_size_blocks(corpus, tmp_path):
    report, _ = prep(corpus, tmp_path / "out", "--break-mode", "complete_doc", "--block-size", "512")
    t = report.manifest["totals"]
    assert t["pad_tokens"] > 0.6 * t["samples"] * 512  # most documents are far shorter than a block
    samples = sorted(s["samples"] for s in report.manifest["shards"] if s["samples"])
    assert 30 <= samples[len(samples) // 2] <= 50, samples  # --shard-size 40


def test_complete_doc_rerun_workers_and_mode_switches(corpus, prepared, prepared_doc, tmp_path):
    """Resumable, deterministic across --workers, and the mode is part of every shard's fingerprint."""
    out = tmp_path / "out"
    first, _ = run_main(["--input", str(corpus.root), "--output", str(out), *OPTIONS, "--break-mode",
                         "complete_doc", "--workers", "2"])
    assert file_bytes(out) == file_bytes(prepared_doc[0]) and first.manifest == prepared_doc[1].manifest
    names = [s["name"] for s in first.manifest["shards"]]
    (out / names[3]).unlink()
    (out / f".{names[4]}.json").unlink()  # a tar without its sidecar is not known to be complete
    (out / f".{names[5]}.tmp-99999").write_bytes(b"left by a killed run")
    second, stdout = prep(corpus, out, "--break-mode", "complete_doc")
    assert f"2 written, {len(names) - 2} reused" in stdout
    assert file_bytes(out) == file_bytes(prepared_doc[0]) and second.manifest == first.manifest

    switched, _ = prep(corpus, out)  # the default, full_sentences: every shard rewritten
    assert switched.reused == 0 and switched.manifest["break_mode"] == "full_sentences"
    want = file_bytes(prepared[1])  # (complete_doc's further shards stay in OUT, listed by no manifest)
    assert {k: v for k, v in file_bytes(out).items() if k in want} == want
    explicit, _ = prep(corpus, out, "--break-mode", "full_sentences")
    assert explicit.reused == len(explicit.manifest["shards"]) and explicit.manifest == prepared[2].manifest


def test_complete_doc_with_a_model_cached_before_document_lengths(corpus, prepared, prepared_doc, tmp_path):
    """An output whose model sidecar predates doc_lengths: full_sentences reuses it as is; complete_doc
    measures the sample again (the model comes out the same) and sizes shards as a fresh run."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "spm.model").write_bytes((prepared[1] / "spm.model").read_bytes())
    sidecar = json.loads((prepared[1] / ".spm.model.json").read_text())
    del sidecar["doc_lengths"]
    (out / ".spm.model.json").write_text(json.dumps(sidecar))
    prep(corpus, out)
    assert "doc_lengths" not in json.loads((out / ".spm.model.json").read_text())  # reused, not retrained
    report, _ = prep(corpus, out, "--break-mode", "complete_doc")
    assert report.manifest == prepared_doc[1].manifest
    assert (out / "spm.model").read_bytes() == (prepared[1] / "spm.model").read_bytes()
    assert json.loads((out / ".spm.model.json").read_text())["doc_lengths"]


# ----------------------------------------------------------------------------- --label-field


NO_FIELD = "no label: field 'topic' is missing or null"
TOPICS = [  # (record, its label, or why it has none)
    ({"text": "Open the file, read its lines and close it again.", "topic": "files"}, "files", None),
    ({"text": " ".join(f"The sum of {i} and {i + 1} is {2 * i + 1}." for i in range(12)), "topic": "math"}, "math",
     None),  # several blocks of 16 tokens
    ({"text": "An integer label is stored as its decimal text.", "topic": 7}, "7", None),
    ({"text": "A record without the field."}, None, NO_FIELD),
    ({"text": "A record whose label is null.", "topic": None}, None, NO_FIELD),
    ({"text": "A record whose label is empty.", "topic": " "}, None, "label field 'topic' is empty"),
    ({"text": "A record whose label is a list.", "topic": ["x"]}, None,
     "label field 'topic' holds a list, not a string or an integer"),
    ({"text": "A record whose label is a boolean.", "topic": True}, None,
     "label field 'topic' holds a bool, not a string or an integer"),
    ({"text": "Paths name files in folders.", "topic": "files"}, "files", None),
]


def write_topics(path: Path) -> list[tuple[int, str | None, str | None]]:
    """TOPICS as a .jsonl file -> (byte offset, label, reason) per record."""
    lines = [json.dumps(record).encode() + b"\n" for record, _, _ in TOPICS]
    path.write_bytes(b"".join(lines))
    offsets = np.cumsum([0] + [len(line) for line in lines[:-1]])
    return [(int(byte), label, reason) for byte, (_, label, reason) in zip(offsets, TOPICS)]


def tar_samples(path: Path) -> list[dict]:
    """{field: bytes} per sample of one tar, read with tarfile."""
    found: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, _, field = member.name.partition(".")
            found.setdefault(key, {})[field] = tar.extractfile(member).read()
    return list(found.values())


def test_label_field_gives_labelled_complete_doc_blocks_and_lists_unlabelled_documents(prepared, tmp_path):
    path = tmp_path / "topics.jsonl"
    records = write_topics(path)
    _, stdout = run_main(["--input", str(path), "--output", str(tmp_path / "out"), "--spm-model",
                          str(prepared[1] / "spm.model"), "--block-size", "16", "--break-mode", "complete_doc",
                          "--label-field", "topic", "--quiet"])
    m = core.read_manifest(tmp_path / "out")
    assert m["classes"] == ["7", "files", "math"] and m["params"]["label_field"] == "topic"
    labels = {byte: label for byte, label, _ in records if label is not None}
    samples = [s for shard in m["shards"] for s in tar_samples(Path(shard["path"]))]
    blocks_of = {}
    for s in samples:
        meta = json.loads(s["json"])
        assert meta["label"] == labels[meta["byte"]] and s["cls"] == str(m["classes"].index(meta["label"])).encode()
        blocks_of[meta["byte"]] = blocks_of.get(meta["byte"], 0) + 1
    assert set(blocks_of) == set(labels) and blocks_of[records[1][0]] > 1  # every block of "math" is labelled
    assert m["skipped"] == [{"path": str(path), "reason": f"document at byte {byte}: {reason}"}
                            for byte, _, reason in records if reason is not None]
    t = m["totals"]
    assert (t["documents"], t["unlabelled_documents"], t["skipped"], t["samples"]) == (4, 5, 5, len(samples))
    assert "3 classes from --label-field topic; 5 documents without a label skipped" in stdout


def test_label_scan_in_parallel_ranges_finds_the_same(tmp_path, monkeypatch):
    """Every document is in exactly one of the workers' byte ranges: the same classes and skipped records."""
    for i in range(3):
        write_topics(tmp_path / f"topics{i}.jsonl")
    args = text.build_parser().parse_args(["--input", str(tmp_path), "--output", str(tmp_path / "out"),
                                           "--label-field", "topic", "--break-mode", "complete_doc"])
    corpus = text.Corpus(text.measure(text.discover(args.input)[0], 1)[0])
    one = text.scan_labels(args, corpus, 1, print)
    monkeypatch.setattr(text, "SCAN_BYTES_PER_WORKER", corpus.size // 5)  # ranges that cut files
    assert text.scan_labels(args, corpus, 2, print) == one
    assert one[0] == text_labels.LabelSpec("topic", ("7", "files", "math")) and len(one[1]) == 3 * 5


@pytest.mark.parametrize("options,message", [
    (["--label-field", "topic"], "--label-field topic needs --break-mode complete_doc"),
    (["--label-field", "topic", "--break-mode", "full_sentences"], "Add --break-mode complete_doc"),
    (["--label-field", "text", "--break-mode", "complete_doc"], "is the text field (--jsonl-field)"),
    (["--label-field", "nope", "--break-mode", "complete_doc"], "no document has a label in field 'nope'"),
])
def test_label_field_needs_complete_doc_and_a_present_field(tmp_path, options, message):
    write_topics(tmp_path / "topics.jsonl")
    error = error_of(["--input", str(tmp_path / "topics.jsonl"), "--output", str(tmp_path / "out"), *options])
    assert error.startswith("error: ") and message in error
    assert not (tmp_path / "out").exists()  # refused before any work


def test_label_field_refuses_plain_text_inputs(corpus, tmp_path):
    error = error_of(["--input", str(corpus.root), "--output", str(tmp_path / "out"), "--label-field", "topic",
                      "--break-mode", "complete_doc"])
    assert "hold plain text without labels: give only .jsonl (.jsonl.gz) inputs" in error
    assert not (tmp_path / "out").exists()


def test_unlabelled_blocks_carry_no_label(prepared_doc):
    out, report, _ = prepared_doc
    assert "classes" not in report.manifest and "label_field" not in report.manifest["params"]
    assert "unlabelled_documents" not in report.manifest["totals"]
    for tar in out.glob("*.tar"):
        assert all("cls" not in s and "label" not in json.loads(s["json"]) for s in tar_samples(tar))
