"""The one shard writer shared by image, audio and text prep.

A modality supplies a list of ``WorkItem`` and a pure, module-level item processor
``process_fn(*item.args) -> sample`` that raises ``SkipItem(reason)`` for bad input.
This module does the rest: deterministic shard assignment, parallel workers, atomic
and resumable tar writing, per-shard sidecars and the manifest.

Sample dict returned by a processor: ``{field: value}`` where ``field`` becomes the
tar member suffix (``jpg``, ``cls``, ``json`` ...) and ``value`` is bytes, str, int or
a JSON-able dict/list. Reserved fields: ``__key__`` is ignored (the key comes from the
WorkItem); ``__stats__`` is a dict of numbers summed per shard (shard records and
sidecars) and into the manifest totals, not written to the tar. A processor may also
return a list of samples (e.g. pieces of a long recording); each one's ``__suffix__``
(letters, digits, ``_``, ``-``) is appended to the item's key; a list entry holding only
``__stats__`` adds to the stats without writing a sample.

Layout of ``OUT``:
    <name>-000000.tar ...        WebDataset shards, shard i = items[i*S:(i+1)*S]
    .<name>-000000.tar.json      sidecar record (samples, bytes, sha256, skipped, inputs)
    manifest.json                see ``write_shards``

Importable without torch: the training code uses ``read_manifest``.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from tqdm import tqdm

FORMAT = 1
MANIFEST = "manifest.json"
KEY_FORMAT = "%09d"
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")  # no dots: WebDataset splits key/field at the first dot
_FIELD_RE = re.compile(r"[A-Za-z0-9_.-]+")
_RESERVED = {"format", "modality", "name", "shards", "totals", "params", "skipped", "task"}
_BASE_TOTALS = ("shards", "samples", "bytes", "skipped")
_STATS_RESERVED = {"name", "sha256", *_BASE_TOTALS}


class SkipItem(Exception):
    """Raised by an item processor for bad input; ``str(exc)`` is the short human reason."""


class PrepError(ValueError):
    """A problem with the user's inputs or options; entry points print it without a traceback."""


@dataclass(frozen=True)
class WorkItem:
    """One input item. Must be picklable (it travels to worker processes)."""

    key: str  # the sample's __key__, normally item_key(global index)
    source: str  # human identifier (e.g. relative path) used in the skipped list
    args: tuple  # positional arguments of process_fn
    stamp: str = ""  # cheap change detector (e.g. "size:mtime_ns"); part of the shard fingerprint


@dataclass(frozen=True)
class ShardResult:
    name: str
    samples: int
    bytes: int
    sha256: str
    skipped: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    reused: bool = False

    def record(self) -> dict:
        return {"name": self.name, "samples": self.samples, "bytes": self.bytes, "sha256": self.sha256,
                **self.stats}


@dataclass
class PrepReport:
    """What ``write_shards`` did; ``summary()`` is the console report."""

    manifest: dict
    path: Path
    written: int
    reused: int

    def summary(self, max_skipped: int = 10) -> str:
        totals, skipped = self.manifest["totals"], self.manifest["skipped"]
        lines = [
            f"{self.manifest['name']}: {totals['shards']} shards ({self.written} written, "
            f"{self.reused} reused), {totals['samples']} samples, {totals['bytes'] / 1e6:.1f} MB, "
            f"{totals['skipped']} skipped -> {self.path}"
        ]
        lines += [f"  skipped {s['path']}: {s['reason']}" for s in skipped[:max_skipped]]
        if len(skipped) > max_skipped:
            lines.append(f"  ... and {len(skipped) - max_skipped} more skipped (see {self.path.name})")
        return "\n".join(lines)


@dataclass(frozen=True)
class _ShardJob:
    name: str  # tar file name
    out_dir: Path
    items: list
    process_fn: Callable[..., dict]


# ----------------------------------------------------------------------------- names


def check_name(name: str) -> str:
    """Return ``name`` if it is safe as a shard-name prefix, else raise PrepError."""
    if not _NAME_RE.fullmatch(name or "") or name.startswith(".") or ".." in name:
        raise PrepError(
            f"invalid dataset name {name!r}: use only letters, digits, '_', '.' and '-' "
            "(not starting with '.', no '..')"
        )
    return name


def shard_filename(name: str, index: int) -> str:
    return f"{name}-{index:06d}.tar"


def item_key(index: int) -> str:
    """Sample key for the item at ``index`` of the sorted input list."""
    return KEY_FORMAT % index


def resolve_workers(workers: int) -> int:
    """``workers`` if positive, else the number of CPUs this process may use."""
    if workers > 0:
        return workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- input files


def input_root(input_dir: str | os.PathLike) -> Path:
    """``input_dir`` resolved; PrepError if it is not a directory."""
    root = Path(input_dir)
    if not root.is_dir():
        raise PrepError(f"input directory not found: {root}")
    return root.resolve()


def walk_files(root: Path, skipped: list) -> Iterator[tuple[Path, str]]:
    """``(path, relative posix path)`` of every file below the resolved ``root``, in ``os.walk`` order.

    Follows symlinks that stay inside ``root`` and skips hidden directories; directories and files
    outside ``root``, and directories listed already, go to ``skipped`` instead.
    """
    seen = {root}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable_dir(root, skipped)):
        dirnames[:] = _enter_dirs(root, Path(dirpath), dirnames, seen, skipped)
        for name in filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            real = resolved(path)
            if real is None:
                skipped.append({"path": rel, "reason": "symlink loop or unresolvable link"})
            elif real.is_relative_to(root):
                yield path, rel
            else:
                skipped.append({"path": rel, "reason": "outside input directory"})


def resolved(path: Path) -> Path | None:
    """``path.resolve()``, or None for a symlink loop or a link that cannot be followed."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # RuntimeError: "Symlink loop from ..."
        return None


def unreadable_dir(root: Path, skipped: list):
    """``os.walk``'s onerror: a directory that cannot be listed goes to ``skipped`` (os.walk drops it silently)."""
    def record(exc: OSError) -> None:
        where = Path(exc.filename) if exc.filename else root
        rel = where.relative_to(root).as_posix() if where.is_relative_to(root) else str(where)
        skipped.append({"path": rel, "reason": f"unreadable directory: {exc.strerror or exc}"})
    return record


def _enter_dirs(root: Path, parent: Path, names: list[str], seen: set, skipped: list) -> list[str]:
    keep = []
    for name in sorted(names):
        if name.startswith("."):
            continue
        real = resolved(parent / name)
        rel = (parent / name).relative_to(root).as_posix()
        if real is None:
            skipped.append({"path": rel, "reason": "symlink loop or unresolvable link"})
        elif not real.is_relative_to(root):
            skipped.append({"path": rel, "reason": "outside input directory"})
        elif real in seen:
            skipped.append({"path": rel, "reason": "directory already listed (symlink)"})
        else:
            seen.add(real)
            keep.append(name)
    return keep


def check_output_outside(output: Path, input_dir: Path) -> Path:
    """``output`` resolved; PrepError if it lies inside ``input_dir``."""
    out = output.resolve()
    if out.is_relative_to(input_dir.resolve()):
        raise PrepError(f"output directory {output} must not be inside the input directory {input_dir}")
    return out


def file_items(files: Sequence[tuple[Path, str, Any]], *options: Any,
               labels: Sequence[ClassLabel | None] | None = None) -> list[WorkItem]:
    """One WorkItem per ``(path, rel, meta)`` of the sorted ``files``: key = its index,
    args = ``(str(path), rel, meta, *options)``, stamp = ``file_stamp(path)``. With ``labels`` (one per
    file), a file's label is its last argument; without, the arguments (and so the shard fingerprints)
    are those of unlabelled prep."""
    tails = [()] * len(files) if labels is None else [(label,) for label in labels]
    return [
        WorkItem(item_key(i), rel, (str(path), rel, meta, *options, *tail), file_stamp(path))
        for i, ((path, rel, meta), tail) in enumerate(zip(files, tails, strict=True))
    ]


def file_stamp(path: Path) -> str:
    """``stat_stamp`` of ``path``, or "" if it cannot be stat'ed."""
    try:
        return stat_stamp(path.stat())
    except OSError:
        return ""


def stat_stamp(st: os.stat_result) -> str:
    """Cheap change detector of a file: "size:mtime_ns"."""
    return f"{st.st_size}:{st.st_mtime_ns}"


def read_input(path: str) -> bytes:
    """The bytes of an input file, for an item processor; SkipItem if it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SkipItem(f"unreadable: {exc.strerror or exc}") from None


# ----------------------------------------------------------------------------- class folders


LAYOUTS = ("auto", "classes", "flat")


class ClassLabel(NamedTuple):
    """A sample's class: ``index`` (its ``cls`` member) in the sorted class names, and ``name`` (json "label")."""

    index: int
    name: str


@dataclass
class Labelled:
    """Input files with the labels their layout gives (see ``label_by_folder``)."""

    files: list[tuple[Path, str, ClassLabel | None]]  # (path, relative posix path, label), in the given order
    classes: list[str] | None  # the sorted class names; None for the flat layout
    skipped: list[dict]  # {"path", "reason"}: files outside every class folder
    layout: str  # "classes" or "flat"


def label_by_folder(root: Path, files: Sequence[tuple[Path, str]], layout: str = "auto") -> Labelled:
    """Label ``files`` (``(path, rel)`` below the resolved ``root``) by ``layout``: "classes" is the
    DIR/<class>/<file> tree, labelled by the index of <class> in the sorted class folder names (a file
    outside them is skipped); "flat" gives no labels; "auto" picks one (see ``choose_layout``)."""
    layout = choose_layout(root, files, layout)
    if layout == "flat":
        return Labelled([(path, rel, None) for path, rel in files], None, [], layout)
    classes = class_names(root)
    labelled, skipped = _in_class_folders(files, classes)
    return Labelled(labelled, classes, skipped, layout)


def choose_layout(root: Path, files: Sequence[tuple[Path, str]], layout: str) -> str:
    """auto: "classes" when the top level has folders and none of ``files`` of its own, else "flat"."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if layout != "auto":
        return layout
    top_level_files = any("/" not in rel for _, rel in files)
    return "classes" if class_names(root) and not top_level_files else "flat"


def class_names(root: Path) -> list[str]:
    """The class folders of ``root``: its directories that are not hidden, sorted."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def labelled_sample(sample: dict, label: ClassLabel | None) -> dict:
    """``sample`` with its class, if it has one: ``cls`` (the index, as ASCII) and json "label" (the name)."""
    if label is not None:
        sample["cls"] = str(label.index)
        sample["json"]["label"] = label.name
    return sample


def _in_class_folders(files: Sequence[tuple[Path, str]], classes: list[str]) -> tuple[list, list[dict]]:
    index = {name: i for i, name in enumerate(classes)}
    labelled, skipped = [], []
    for path, rel in files:
        top, sep, _ = rel.partition("/")
        if not sep or top not in index:
            skipped.append({"path": rel, "reason": "not inside a class folder"})
        else:
            labelled.append((path, rel, ClassLabel(index[top], top)))
    return labelled, skipped


# ----------------------------------------------------------------------------- SLURM arrays


def task_items(items: Sequence, shard_size: int, task_index: int, num_tasks: int) -> tuple[list, int]:
    """The items of array task ``task_index`` and its first shard number.

    Shards are split into contiguous disjoint blocks, numbered exactly as in a single
    run, so ``merge_manifests`` over all tasks equals the single-run manifest.
    """
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise PrepError(f"task index {task_index} is not in [0, {num_tasks})")
    if shard_size < 1:
        raise PrepError(f"shard size must be >= 1, got {shard_size}")
    n_shards = math.ceil(len(items) / shard_size)
    first = n_shards * task_index // num_tasks
    stop = n_shards * (task_index + 1) // num_tasks
    return list(items[first * shard_size : stop * shard_size]), first


def task_manifest_name(task_index: int, num_tasks: int) -> str:
    """``manifest.json`` for a single run, else a per-task name for ``merge_manifests``."""
    if num_tasks == 1:
        return MANIFEST
    return f"manifest.task-{task_index:05d}-of-{num_tasks:05d}.json"


# ----------------------------------------------------------------------------- writing


def write_shards(
    items: Sequence[WorkItem],
    process_fn: Callable[..., dict],
    out_dir: str | os.PathLike,
    name: str,
    *,
    modality: str,
    shard_size: int = 1000,
    workers: int = 1,
    params: dict | None = None,
    extra: dict | None = None,
    extra_totals: dict | None = None,
    pre_skipped: Sequence[dict] = (),
    shard_offset: int = 0,
    manifest_name: str = MANIFEST,
    task: dict | None = None,
    progress: bool = True,
    allow_empty: bool = False,
) -> PrepReport:
    """Write ``items`` as WebDataset shards into ``out_dir`` and write the manifest.

    Shard ``shard_offset + i`` holds ``items[i*shard_size:(i+1)*shard_size]`` minus the
    skipped ones. ``process_fn`` must be a module-level function (spawned workers
    import it). ``pre_skipped`` are ``{"path", "reason"}`` records found before
    processing (e.g. unsupported files). ``extra`` adds top-level manifest fields
    (e.g. ``classes``); ``extra_totals`` adds additive totals.

    Manifest: ``{"format": 1, "modality", "name", "shards": [{"name", "samples",
    "bytes", "sha256", **stats}], "totals": {"shards", "samples", "bytes", "skipped", ...},
    "params", **extra, "skipped": [{"path", "reason"}], "task"?}``.
    """
    check_name(name)
    _check_plain_filename(manifest_name)
    if shard_size < 1 or workers < 1 or shard_offset < 0:
        raise PrepError("shard_size and workers must be >= 1 and shard_offset >= 0")
    out = _prepare_out_dir(out_dir)
    with output_lock(out, manifest_name):
        _remove_stale_temps(out / manifest_name)
        jobs = [
            _ShardJob(shard_filename(name, shard_offset + i), out, list(items[s : s + shard_size]), process_fn)
            for i, s in enumerate(range(0, len(items), shard_size))
        ]
        results = _run_jobs(jobs, workers, desc=name, progress=progress)
        manifest = _build_manifest(
            results, modality=modality, name=name, params=params or {}, extra=extra or {},
            extra_totals=extra_totals or {}, pre_skipped=pre_skipped, task=task,
        )
        path = out / manifest_name
        atomic_write_json(path, manifest)
    if manifest["totals"]["samples"] == 0 and not allow_empty:
        raise PrepError(f"no sample was written: every input was skipped ({manifest['totals']['skipped']} listed with "
                        f"their reasons under 'skipped' in {path}). Fix the input, or pass --allow-empty")
    reused = sum(r.reused for r in results)
    return PrepReport(manifest, path, written=len(results) - reused, reused=reused)


@contextlib.contextmanager
def output_lock(out: Path, manifest_name: str) -> Iterator[None]:
    """One prep at a time per output manifest: a second one would delete the first's temp files. The lock
    (flock) dies with its holder, so a killed prep never leaves a stale one; SLURM array tasks each lock
    their own task manifest and run side by side."""
    import fcntl
    path = out / f".{manifest_name}.lock"
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise PrepError(f"another data prep (pid {holder}) is writing {manifest_name} in {out}; wait for it to "
                            f"finish, or use another --output") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:  # removed while still held: a prep that opened it meanwhile fails to lock it, not races
            path.unlink(missing_ok=True)
            fcntl.flock(f, fcntl.LOCK_UN)


def _prepare_out_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PrepError(f"output path exists and is not a directory: {out}")
    out.mkdir(parents=True, exist_ok=True)
    return out.resolve()


def _run_jobs(jobs: list[_ShardJob], workers: int, desc: str, progress: bool) -> list[ShardResult]:
    total = sum(len(j.items) for j in jobs)
    results = []
    with tqdm(total=total, unit="item", desc=desc, file=sys.stderr, disable=not progress) as bar:
        for job, result in zip(jobs, _imap_shards(jobs, workers)):
            results.append(result)
            bar.update(len(job.items))
    return results


def _imap_shards(jobs: list[_ShardJob], workers: int) -> Iterator[ShardResult]:
    if workers == 1 or len(jobs) <= 1:
        yield from map(_write_shard, jobs)
        return
    # spawn, not fork: safe with threads (tqdm, torch) in the parent and on every OS.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap(_write_shard, jobs, chunksize=1)


def _write_shard(job: _ShardJob) -> ShardResult:
    """Worker: reuse the shard if its tar matches its sidecar, else (re)write both."""
    tar_path = job.out_dir / job.name
    sidecar = sidecar_path(tar_path)
    _remove_stale_temps(tar_path)
    _remove_stale_temps(sidecar)
    fingerprint = _fingerprint(job.items, job.process_fn)
    reused = _reusable_result(tar_path, sidecar, fingerprint)
    if reused is not None:
        return reused
    sidecar.unlink(missing_ok=True)  # from now on the old record no longer describes the tar
    samples, skipped, stats = _write_tar_atomic(tar_path, job.items, job.process_fn)
    result = ShardResult(job.name, samples, tar_path.stat().st_size, sha256_file(tar_path), skipped, stats)
    # The sidecar is written after the tar rename, so its presence marks a complete shard.
    atomic_write_json(sidecar, {"format": FORMAT, **result.record(), "skipped": skipped,
                                "stats": stats, "inputs": fingerprint})
    return result


def sidecar_path(tar_path: Path) -> Path:
    return tar_path.parent / f".{tar_path.name}.json"


def _temp_path(path: Path) -> Path:
    return path.parent / f".{path.name.lstrip('.')}.tmp-{os.getpid()}"


def _remove_stale_temps(path: Path) -> None:
    """Remove temp files left for ``path`` by killed runs (any pid)."""
    for stale in path.parent.glob(f".{path.name.lstrip('.')}.tmp-*"):
        stale.unlink(missing_ok=True)


def _fingerprint(items: list[WorkItem], process_fn: Callable) -> str:
    """Hash of what a shard is made from: processor, keys, sources, stamps and arguments."""
    spec = {
        "format": FORMAT,
        "fn": f"{process_fn.__module__}.{process_fn.__qualname__}",
        "items": [[i.key, i.source, i.stamp, repr(i.args)] for i in items],
    }
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


def _reusable_result(tar_path: Path, sidecar: Path, fingerprint: str) -> ShardResult | None:
    try:
        record = json.loads(sidecar.read_text("utf-8"))
        if record["inputs"] != fingerprint or tar_path.stat().st_size != record["bytes"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if sha256_file(tar_path) != record["sha256"]:
        return None
    return ShardResult(tar_path.name, record["samples"], record["bytes"], record["sha256"],
                       record["skipped"], record.get("stats", {}), reused=True)


def _write_tar_atomic(tar_path: Path, items: list[WorkItem], process_fn: Callable) -> tuple[int, list, dict]:
    with _atomic_file(tar_path) as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            return _fill_tar(tar, items, process_fn)


def _fill_tar(tar: tarfile.TarFile, items: list[WorkItem], process_fn: Callable) -> tuple[int, list, dict]:
    samples, skipped, stats = 0, [], {}
    for item in items:
        try:
            produced = process_fn(*item.args)
            produced = [dict(s) for s in produced] if isinstance(produced, list) else [dict(produced)]
        except SkipItem as exc:
            skipped.append({"path": item.source, "reason": str(exc) or "skipped"})
            continue
        except Exception as exc:  # a bug, not bad data: stop, naming the item
            raise RuntimeError(f"processing {item.source!r} failed: {exc!r}") from exc
        for sample in produced:
            stats_only = set(sample) == {"__stats__"}  # e.g. the counts of an item that yields no sample
            _add_stats(stats, sample.pop("__stats__", {}))
            if stats_only:
                continue
            for member, data in encode_sample(item.key + sample.pop("__suffix__", ""), sample):
                tar.addfile(_tarinfo(member, len(data)), io.BytesIO(data))
            samples += 1
    return samples, skipped, stats


def encode_sample(key: str, sample: dict) -> list[tuple[str, bytes]]:
    """Tar members ``(f"{key}.{field}", bytes)`` of one sample, in sorted field order."""
    if not _KEY_RE.fullmatch(key):
        raise ValueError(f"invalid sample key {key!r}")
    members = []
    for name in sorted(sample):
        if name.startswith("__"):
            continue
        if not _FIELD_RE.fullmatch(name):
            raise ValueError(f"invalid sample field {name!r}")
        members.append((f"{key}.{name}", _encode_value(sample[name])))
    if not members:
        raise ValueError(f"sample {key!r} has no fields")
    return members


def json_utf8(obj: Any, **kw) -> bytes:
    """JSON as UTF-8 bytes, lossless for file names that are not valid UTF-8 in this locale.

    Python decodes such names (any name that is not ASCII, under a C/POSIX locale) with surrogate escapes;
    those become JSON ``\\udcXX`` escapes here, which ``json.loads`` turns back into the same name, and
    ``os.fsencode`` into the same bytes. Everything else stays readable UTF-8.
    """
    return json.dumps(obj, ensure_ascii=False, **kw).encode("utf-8", "backslashreplace")


def _encode_value(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value).encode("ascii")
    if isinstance(value, (dict, list)):
        return json_utf8(value, sort_keys=True)
    raise TypeError(f"cannot encode sample value of type {type(value).__name__}")


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """Deterministic header: identical inputs give byte-identical shards."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_stats(acc: dict, stats: dict) -> None:
    for k, v in stats.items():
        if k in _STATS_RESERVED:
            raise ValueError(f"__stats__ key {k!r} clashes with a shard record or totals field")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"__stats__[{k!r}] must be a number, got {v!r}")
        acc[k] = acc.get(k, 0) + v


# ----------------------------------------------------------------------------- manifest


def _build_manifest(results: list[ShardResult], *, modality: str, name: str, params: dict, extra: dict,
                    extra_totals: dict, pre_skipped: Sequence[dict], task: dict | None) -> dict:
    clash = _RESERVED & set(extra)
    if clash:
        raise ValueError(f"extra manifest fields clash with reserved ones: {sorted(clash)}")
    skipped = _merge_skipped([list(pre_skipped)] + [r.skipped for r in results])
    stats: dict = {}
    for r in results:
        _add_stats(stats, r.stats)
    # a shard whose items were all skipped has no stats: zeros, so every record has every key
    records = [{**r.record(), **{k: r.stats.get(k, 0) for k in stats}} for r in results]
    manifest = {
        "format": FORMAT, "modality": modality, "name": name,
        "shards": records,
        "totals": _totals(records, skipped, {**stats, **extra_totals}),
        "params": params, **extra, "skipped": skipped,
    }
    if task is not None:
        manifest["task"] = task
    return manifest


def _totals(shards: list[dict], skipped: list, additive: dict) -> dict:
    return {"shards": len(shards), "samples": sum(s["samples"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards), "skipped": len(skipped), **additive}


def _merge_skipped(lists: list[list[dict]]) -> list[dict]:
    unique = {(s["path"], s["reason"]) for lst in lists for s in lst}
    return [{"path": p, "reason": r} for p, r in sorted(unique)]


@contextlib.contextmanager
def _atomic_file(path: Path, mode: str = "wb", **open_kw) -> Iterator[Any]:
    """A temp file for ``path``: fsynced and ``os.replace``d onto ``path`` on success, removed on failure."""
    tmp = _temp_path(path)
    try:
        with open(tmp, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temp file + ``os.replace`` (readers never see half a file)."""
    with _atomic_file(path) as f:
        f.write(json_utf8(obj, indent=1) + b"\n")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Like ``atomic_write_json``, for bytes."""
    with _atomic_file(path) as f:
        f.write(data)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_plain_filename(name: str) -> None:
    if not _NAME_RE.fullmatch(name or "") or ".." in name:
        raise PrepError(f"invalid manifest file name {name!r}")


# ----------------------------------------------------------------------------- reading


def read_manifest(path_or_dir: str | os.PathLike, *, verify: bool = False) -> dict:
    """Load and validate a manifest (a file, or a directory holding ``manifest.json``).

    Returns the manifest with ``"dir"`` (absolute) and an absolute ``"path"`` added to
    each shard. Raises ValueError for an unsafe shard name (path separator, ``..``,
    resolving outside the manifest's directory), a missing shard, a shard whose size
    differs from the manifest, or (``verify=True``) a sha256 mismatch.
    """
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / MANIFEST
    manifest = _load_manifest(path)
    base = path.parent.resolve()
    shards = [{**s, "path": str(_shard_path(base, s, path, verify))} for s in manifest["shards"]]
    _refuse_aliases(shards, path)
    return {**manifest, "shards": shards, "dir": str(base)}


def _refuse_aliases(shards: list[dict], manifest_path: Path) -> None:
    """Two names of one file (a symlink or a hard link) would be read twice as often as the other shards."""
    seen: dict[tuple[int, int], str] = {}
    for s in shards:
        st = os.stat(s["path"])
        if st.st_ino == 0:  # a file system without inode numbers (some FUSE and SMB mounts): nothing to compare
            continue
        first = seen.setdefault((st.st_dev, st.st_ino), s["name"])
        if first != s["name"]:
            raise ValueError(f"{manifest_path}: shards {first!r} and {s['name']!r} are the same file (a link): it "
                             f"would be read twice per pass; remove one of the two entries from the manifest, or re-create "
                             f"it with data_prep")


def _load_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"manifest not found: {path}") from None
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        raise ValueError(f"cannot read manifest {path}: {type(exc).__name__}: {str(exc)[:200]}; re-create it with "
                         f"data_prep (or python -m data_prep.core merge)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a format-{FORMAT} data_prep manifest")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(_valid_shard_record(s) for s in shards):
        raise ValueError(f"{path}: 'shards' must be a list of {{name, samples, bytes, sha256}}")
    names = [s["name"] for s in shards]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:  # a shard listed twice would be read twice as often as the others
        raise ValueError(f"{path}: shard(s) listed more than once: {duplicates[:5]}; re-create the manifest with "
                         f"data_prep")
    return manifest


def _valid_shard_record(s: Any) -> bool:
    return (isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("sha256"), str)
            and all(isinstance(s.get(k), int) and s[k] >= 0 for k in ("samples", "bytes")))


def _shard_path(base: Path, shard: dict, manifest_path: Path, verify: bool) -> Path:
    name = shard["name"]
    if not name or "/" in name or "\\" in name or ".." in name or os.sep in name:
        raise ValueError(f"{manifest_path}: unsafe shard name {name!r}")
    path = base / name
    if path.resolve().parent != base:
        raise ValueError(f"{manifest_path}: shard {name!r} resolves outside {base}")
    if not path.is_file():
        raise ValueError(f"{manifest_path}: shard {name!r} is missing")
    if path.stat().st_size != shard["bytes"]:
        raise ValueError(f"{manifest_path}: shard {name!r} size differs from the manifest (stale or partial)")
    if verify and sha256_file(path) != shard["sha256"]:
        raise ValueError(f"{manifest_path}: shard {name!r} sha256 differs from the manifest")
    return path


# ----------------------------------------------------------------------------- merging


def merge_manifests(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> dict:
    """Merge per-task manifests (same directory, same name/params) into ``out``.

    Shards must be disjoint; if the parts carry ``task`` records, all tasks must be present.
    """
    paths = [Path(p) for p in paths]
    out = Path(out)
    if not paths:
        raise PrepError("no manifests to merge")
    if any(p.resolve().parent != out.resolve().parent for p in paths):
        raise PrepError("merged manifest must be in the same directory as its parts")
    for p in paths:
        read_manifest(p)  # validates shard names and presence
    parts = [_load_manifest(p) for p in paths]
    _check_same_dataset(parts)
    _check_all_tasks(parts)
    shards = sorted((s for m in parts for s in m["shards"]), key=lambda s: s["name"])
    if len({s["name"] for s in shards}) != len(shards):
        raise PrepError("manifests to merge list the same shard more than once")
    skipped = _merge_skipped([m["skipped"] for m in parts])
    additive: dict = {}
    for m in parts:
        _add_stats(additive, {k: v for k, v in m["totals"].items() if k not in _BASE_TOTALS})
    merged = {**_identity(parts[0]), "shards": shards, "totals": _totals(shards, skipped, additive),
              "skipped": skipped}
    atomic_write_json(out, merged)
    return merged


def _identity(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in {"shards", "totals", "skipped", "task"}}


def _check_same_dataset(parts: list[dict]) -> None:
    first = _identity(parts[0])
    for m in parts[1:]:
        if _identity(m) != first:
            raise PrepError("manifests to merge differ in name, modality, params or extra fields")


def _check_all_tasks(parts: list[dict]) -> None:
    tasks = [m.get("task") for m in parts]
    if all(t is None for t in tasks):
        return
    if any(t is None for t in tasks) or len({t["count"] for t in tasks}) != 1:
        raise PrepError("manifests to merge come from different task arrays")
    missing = sorted(set(range(tasks[0]["count"])) - {t["index"] for t in tasks})
    if missing:
        raise PrepError(f"task manifests missing for task indices {missing}")


# ----------------------------------------------------------------------------- command line


def name_arg(value: str) -> str:
    """argparse type of --name: a valid shard-name prefix."""
    try:
        return check_name(value)
    except PrepError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def int_arg(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer >= ``low`` (and <= ``high`` if given)."""
    def parse(value: str) -> int:
        ok = value.lstrip("-").isdigit() and int(value) >= low and (high is None or int(value) <= high)
        if not ok:
            bound = f"in {low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {value!r}")
        return int(value)
    parse.__name__ = "int"
    return parse


def add_io_args(p: argparse.ArgumentParser, default_name: str, input_help: str,
                output_help: str = "directory for shards, sidecars and manifest.json; must not be inside DIR",
                input_metavar: str = "DIR", input_nargs: str | None = None) -> None:
    """--input, --output and --name."""
    p.add_argument("--input", type=Path, nargs=input_nargs, required=True, metavar=input_metavar, help=input_help)
    p.add_argument("--output", type=Path, required=True, metavar="OUT", help=output_help)
    p.add_argument("--name", type=name_arg, default=default_name,
                   help="shard prefix, OUT/<name>-000000.tar; letters, digits, _ . - (default: %(default)s)")


def add_shard_args(p: argparse.ArgumentParser, shard_size_help: str, default: int = 1000,
                   metavar: str = "N", worker_task: str = "writing") -> None:
    """--shard-size and --workers."""
    p.add_argument("--shard-size", type=int_arg(1), default=default, metavar=metavar, help=shard_size_help)
    p.add_argument("--workers", type=int_arg(0), default=1, metavar="N",
                   help=f"worker processes, each {worker_task} one shard at a time; 0 = all usable CPUs "
                        "(default: %(default)s)")
    p.add_argument("--allow-empty", action="store_true",
                   help="accept a run in which every input is skipped (by default that is an error, after the "
                        "manifest listing why each was skipped is written)")


def add_layout_arg(p: argparse.ArgumentParser, default: str = "auto", note: str = "") -> None:
    """--layout: how ``label_by_folder`` labels the input files."""
    p.add_argument("--layout", choices=LAYOUTS, default=default,
                   help="classes: DIR/<class>/<file>, each sample labelled by its class folder (a 'cls' member, "
                        "the index of <class> in the sorted class folder names, and json 'label'; the manifest "
                        "lists the 'classes'; files outside class folders are skipped); flat: no labels; auto: "
                        f"classes if DIR holds only folders at its top level, else flat{note} (default: %(default)s)")


def add_task_args(p: argparse.ArgumentParser) -> None:
    """--task-index and --num-tasks (SLURM arrays; see ``write_task_shards``)."""
    p.add_argument("--task-index", type=int_arg(0), default=0, metavar="I",
                   help="SLURM array task index (e.g. $SLURM_ARRAY_TASK_ID); writes a disjoint block of shards")
    p.add_argument("--num-tasks", type=int_arg(1), default=1, metavar="N",
                   help="SLURM array size; with N > 1 each task writes manifest.task-I-of-N.json, then "
                        "run `python -m data_prep.core merge OUT` (default: %(default)s)")


def check_task_args(args: argparse.Namespace) -> None:
    if args.task_index >= args.num_tasks:
        raise PrepError(f"--task-index {args.task_index} must be < --num-tasks {args.num_tasks}")


def write_task_shards(args: argparse.Namespace, items: Sequence[WorkItem], process_fn: Callable[..., dict],
                      out: Path, **kwargs: Any) -> PrepReport:
    """``write_shards`` of this array task's block of ``items``, as the options of
    ``add_io_args``, ``add_shard_args``, ``add_task_args`` and --quiet say."""
    items, first = task_items(items, args.shard_size, args.task_index, args.num_tasks)
    task = None
    if args.num_tasks > 1:
        task = {"index": args.task_index, "count": args.num_tasks, "first_shard": first,
                "num_shards": math.ceil(len(items) / args.shard_size)}
    return write_shards(
        items, process_fn, out, args.name, shard_size=args.shard_size, workers=resolve_workers(args.workers),
        shard_offset=first, manifest_name=task_manifest_name(args.task_index, args.num_tasks), task=task,
        progress=not args.quiet, allow_empty=args.allow_empty, **kwargs,
    )


def cli_run(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Any],
            argv: Sequence[str] | None) -> Any:
    """``run(parsed argv)``; a PrepError exits with its message and no traceback."""
    for stream in (sys.stdout, sys.stderr):  # a file name that is not valid UTF-8 prints as \xNN, not a crash
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except PrepError as exc:
        raise SystemExit(f"error: {exc}") from None


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m data_prep.core merge OUT``: merge SLURM array task manifests."""
    parser = argparse.ArgumentParser(prog="python -m data_prep.core", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="merge OUT/manifest.task-*.json into OUT/manifest.json")
    merge.add_argument("output", type=Path, help="directory holding the per-task manifests")
    args = parser.parse_args(argv)
    parts = sorted(args.output.glob("manifest.task-*.json"))
    try:
        merged = merge_manifests(parts, args.output / MANIFEST)
    except ValueError as exc:  # PrepError or an invalid part
        raise SystemExit(f"error: {exc}") from None
    totals = merged["totals"]
    print(f"merged {len(parts)} manifests: {totals['shards']} shards, {totals['samples']} samples, "
          f"{totals['skipped']} skipped -> {args.output / MANIFEST}")


if __name__ == "__main__":
    main()
