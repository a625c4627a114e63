"""Class labels of text documents: ``python -m data_prep.text --label-field NAME`` on .jsonl records.

A label is one document's class, so it needs blocks that never hold two documents: --label-field requires
--break-mode complete_doc (a long document's blocks each carry its label). The label is the record's NAME
field, a string or an integer (stored as its decimal text). Every block gets json "label" (the name) and a
``cls`` member, the index of the name in the sorted class names that the manifest lists as "classes".

A document whose record lacks the field, or holds null, an empty string or anything other than a string
or an integer, is skipped: not tokenised, counted in the totals' "unlabelled_documents" and listed in the
manifest's "skipped" (its file, with reason "document at byte B: ..."). Inputs without any labelled
document (a misspelt NAME) are an error, found before the tokenizer is trained.
"""
from __future__ import annotations

import argparse
from typing import NamedTuple, Sequence

from data_prep import core

STAT = "unlabelled_documents"  # the per-shard count of documents skipped for want of a label


class LabelSpec(NamedTuple):
    """What a worker labels blocks with; its repr (part of each shard's fingerprint) names every class."""

    field: str
    classes: tuple[str, ...]  # sorted


def check_options(args: argparse.Namespace) -> None:
    """--label-field needs --break-mode complete_doc and a field other than the text's (checked before any work)."""
    if args.label_field is None:
        return
    if args.break_mode != "complete_doc":
        raise core.PrepError(
            f"--label-field {args.label_field} needs --break-mode complete_doc: with --break-mode {args.break_mode} "
            f"a block can hold the end of one document and the start of the next, so it has no single label. Add "
            f"--break-mode complete_doc (one document per block; a long document is cut into several blocks, each "
            f"with its label)")
    if args.label_field == args.jsonl_field:
        raise core.PrepError(f"--label-field {args.label_field} is the text field (--jsonl-field): name the field "
                             f"that holds each document's class")


def check_inputs(label_field: str | None, files: Sequence) -> None:
    """--label-field reads .jsonl records: refuse plain-text inputs (``files``: TextFile), which have none."""
    plain = [f.rel for f in files if f.fmt != "jsonl"] if label_field is not None else []
    if plain:
        more = f" and {len(plain) - 3} more" if len(plain) > 3 else ""
        raise core.PrepError(f"--label-field {label_field} reads a field of .jsonl records, but {', '.join(plain[:3])}"
                             f"{more} hold plain text without labels: give only .jsonl (.jsonl.gz) inputs, or drop "
                             f"--label-field")


def document_label(record: dict | None, field: str) -> tuple[str | None, str]:
    """Pure: ``(class name, "")`` from a document's JSON record, or ``(None, why it has no label)``."""
    value = (record or {}).get(field)
    if value is None:
        return None, f"no label: field {field!r} is missing or null"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, f"label field {field!r} holds a {type(value).__name__}, not a string or an integer"
    if not str(value).strip():
        return None, f"label field {field!r} is empty"
    return str(value), ""


def labelled_doc(doc, record: dict | None, field: str, counts: dict, skipped: list | None):
    """``doc`` (a text.Doc) with its ``label``, or None for a document without one: counted under STAT
    and, if ``skipped`` is given, listed there."""
    label, problem = document_label(record, field)
    if label is not None:
        return doc._replace(label=label)
    counts[STAT] += 1
    if skipped is not None:
        skipped.append({"path": doc.rel, "reason": f"document at byte {doc.byte}: {problem}"})
    return None


def check_found(spec: LabelSpec, skipped: list[dict]) -> None:
    """PrepError when no document has a label (a misspelt --label-field, most likely)."""
    if not spec.classes:
        example = f", e.g. {skipped[0]['path']} {skipped[0]['reason']}" if skipped else ""
        raise core.PrepError(f"no document has a label in field {spec.field!r} ({len(skipped)} documents without "
                             f"one{example}): check --label-field")


def block_class(label: str, index: dict[str, int]) -> core.ClassLabel:
    """The class of a block whose document has ``label``; ``index`` maps the class names to their indices."""
    if label not in index:
        raise RuntimeError(f"document label {label!r} is not among the classes read before the shards were written: "
                           f"an input changed during the run; run the prep again")
    return core.ClassLabel(index[label], label)


def summary(manifest: dict) -> list[str]:
    """The console report's line about labels (none for unlabelled shards)."""
    if "classes" not in manifest:
        return []
    return [f"  {len(manifest['classes'])} classes from --label-field {manifest['params']['label_field']}; "
            f"{manifest['totals'][STAT]:,} documents without a label skipped"]
