"""Small real-text corpora for the text-prep tests, with the documents each file holds.

The text is the docstrings of Python standard-library modules (present wherever the tests run),
plus hand-made edge cases: invalid UTF-8, a byte order mark, CRLF endings, empty and
whitespace-only documents, bad JSON records, a lone-surrogate JSON escape, a literal "<mask>",
non-ASCII text and a line longer than sentencepiece's sentence limit. Every file is built here
byte by byte, so the expected documents (text, file, byte offset) come from the fixture, not from
the code under test.
"""
from __future__ import annotations

import gzip
import importlib
import inspect
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

MODULES = ("argparse", "collections", "csv", "datetime", "decimal", "email.message", "fractions", "functools",
           "inspect", "itertools", "json", "logging", "pathlib", "random", "shutil", "string", "tarfile",
           "textwrap", "unittest", "zipfile", "os", "re", "subprocess", "threading", "http.client", "urllib.parse",
           "statistics", "typing", "enum", "dataclasses", "configparser", "optparse", "smtplib", "ftplib",
           "imaplib", "xml.dom.minidom", "pprint", "heapq", "difflib", "calendar", "ipaddress", "mailbox")
UNICODE = ["Café crème, naïve façade — “quoted” ‘text’ …", "日本語のテキストと中文文本。",
           "Emoji 🙂 and ﬁ ligature, Ｆｕｌｌ width", "Ελληνικά και Русский текст",
           "a literal <mask> and </s> in the text are just text"]


@dataclass(frozen=True)
class Expected:
    text: str  # the document as decoded (U+FFFD for invalid bytes), before sentencepiece's normalisation
    rel: str  # the file as the prep reports it (input as given / path below it)
    byte: int  # offset of the document's first byte in the uncompressed file


@dataclass
class TextCorpus:
    root: Path
    docs: list[Expected] = field(default_factory=list)  # non-empty documents in corpus order
    empty: int = 0  # empty after strip, or after sentencepiece's normalisation (zero-width space)
    invalid_json: int = 0
    invalid_utf8_docs: int = 0
    invalid_utf8_bytes: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # rel -> reason
    plain: set[str] = field(default_factory=set)  # texts safe for an NFKC + whitespace comparison
    vanishing: set[str] = field(default_factory=set)  # non-empty texts that sentencepiece normalises to nothing


def docstrings() -> list[str]:
    """Distinct docstrings (> 40 characters) of stdlib modules, classes and functions, sorted."""
    found = set()
    for name in MODULES:
        module = importlib.import_module(name)
        for obj in [module, *(v for k, v in sorted(vars(module).items()) if not k.startswith("_"))]:
            if inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj):
                text = inspect.getdoc(obj)
                if text and len(text) > 40 and text.isascii():
                    found.add(text)
    return sorted(found)


class _File:
    """Bytes of one input file, written document by document, recording the expectations."""

    def __init__(self, corpus: TextCorpus, name: str):
        self.corpus, self.name, self.rel = corpus, name, (corpus.root / name).as_posix()
        self.buf = bytearray()

    def add(self, raw: bytes, text: str | None, end: bytes = b"\n", plain: bool = False) -> None:
        """One document's raw bytes; ``text`` None: an empty document (counted, not stored)."""
        if text is None:
            self.corpus.empty += 1
        else:
            self.corpus.docs.append(Expected(text, self.rel, len(self.buf)))
            if plain:
                self.corpus.plain.add(text)
        self.buf += raw + end

    def raw(self, data: bytes) -> None:
        """Bytes that are not a document (paragraph separators)."""
        self.buf += data

    def write(self, gz: bool = False) -> None:
        path = self.corpus.root / self.name
        path.parent.mkdir(parents=True, exist_ok=True)
        if gz:
            with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as z:
                z.write(bytes(self.buf))
        else:
            path.write_bytes(bytes(self.buf))


def _flat(text: str) -> str:
    return " ".join(text.split())


def make_line_corpus(root: Path) -> TextCorpus:
    """Line-mode corpus: a.txt, b.jsonl, c.txt.gz, d.jsonl.gz, e/f.txt (no final newline), notes.md."""
    corpus = TextCorpus(root)
    pool = [_flat(d) for d in docstrings()]
    a = _File(corpus, "a.txt")
    a.add("\ufeff".encode() + pool[0].encode(), pool[0])  # the byte order mark is not text
    a.add(b"Windows line ending here\r", "Windows line ending here", plain=True)
    a.add(b"", None)
    a.add(b"   \t ", None)
    a.add("\u3000".encode(), None)  # ideographic space: str.strip() removes it
    a.add("\u200b".encode(), None)  # zero-width space: sentencepiece's normalisation removes it
    corpus.vanishing.add("\u200b")
    a.add(b"caf\xe9 au lait \xff\xfe end", "caf\ufffd au lait \ufffd\ufffd end")
    corpus.invalid_utf8_docs += 1
    corpus.invalid_utf8_bytes += 3
    for text in UNICODE:
        a.add(text.encode(), text)
    a.add((" ".join(pool[1:40])).encode(), " ".join(pool[1:40]), plain=True)  # > 4096 characters
    for text in pool[40:160]:
        a.add(text.encode(), text, plain=True)
    a.write()

    b = _File(corpus, "b.jsonl")
    for text in pool[160:260]:
        b.add(json.dumps({"id": 1, "text": text}).encode(), text, plain=True)
    for bad in (b"not json {", b'{"title": "no text field"}', b'{"text": 5}', b"[1, 2]"):
        b.add(bad, None)
        corpus.empty -= 1
        corpus.invalid_json += 1
    b.add(b'{"text": ""}', None)
    b.add(b"", None)
    b.add(json.dumps({"text": "lone \ud800 surrogate"}).encode(), "lone \ufffd surrogate")
    b.add(b'{"text": "bad \xff byte"}', "bad \ufffd byte")
    corpus.invalid_utf8_docs += 2
    corpus.invalid_utf8_bytes += 2
    b.add(json.dumps({"text": "multi\nline\tjson text"}).encode(), "multi\nline\tjson text", plain=True)
    b.write()

    c = _File(corpus, "c.txt.gz")
    for text in pool[260:380]:
        c.add(text.encode(), text, plain=True)
    c.write(gz=True)

    d = _File(corpus, "d.jsonl.gz")
    for text in pool[380:460]:
        d.add(json.dumps({"text": text}, ensure_ascii=False).encode(), text, plain=True)
    d.write(gz=True)

    f = _File(corpus, "e/f.txt")
    for i, text in enumerate(pool[460:520]):
        f.add(text.encode(), text, end=b"" if i == 59 else b"\n", plain=True)
    f.write()

    (root / "notes.md").write_text("not an input format\n")
    corpus.skipped[(root / "notes.md").as_posix()] = "unsupported extension"
    return corpus


def make_paragraph_corpus(root: Path) -> TextCorpus:
    """Paragraph-mode corpus: p.txt and q.txt.gz, paragraphs separated by runs of blank lines."""
    corpus = TextCorpus(root)
    pool = docstrings()
    separators = [b"\n", b"\n\n", b"  \t\n", b"\r\n", b"\n" + b" " * 9000 + b"\n", b"\n \n\t\n"]
    for name, texts, gz in (("p.txt", pool[:150], False), ("q.txt.gz", pool[150:260], True)):
        f = _File(corpus, name)
        for i, text in enumerate(texts):
            lines = textwrap.wrap(_flat(text), 70) or [""]
            crlf = i % 7 == 3
            raw = (b"\r\n" if crlf else b"\n").join(line.encode() for line in lines)
            f.add(raw, "\n".join(lines), end=b"\r\n" if crlf else b"\n", plain=True)
            f.raw(separators[i % len(separators)])
            if i == 20:
                f.add("\u3000\n\u3000".encode(), None)  # whitespace-only lines that are not blank bytes
                f.raw(b"\n")
        f.write(gz=gz)
    return corpus
