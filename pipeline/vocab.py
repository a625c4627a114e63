"""The identity of a text model's tokenizer: which sentencepiece model its ids mean.

A text model is only usable with the sentencepiece model its shards were made with: another model of the
same size (BPE against unigram, or another corpus) gives other ids to the same text. The identity is the
model file's sha256, its vocabulary size and its special ids (pad, bos, eos, unk, mask).

- data_prep.text records it in the shards' manifest (``tokenizer``), with the model as ``spm.model``;
- a text run writes it into every checkpoint (``d2v_tokenizer.json``) with a copy of the model (``spm.model``);
- ``export --format pt`` keeps it as the ``tokenizer`` entry, ``--format hf`` ships the model as
  ``spiece.model`` (its sha256 is the identity's);
- resume, ``init.from``, ``embed``, ``evaluate``, ``export`` and the eval inputs compare the identities
  they meet, and refuse a mismatch with one line naming both.

A source made before identities were recorded has none: it is used as before, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("pipeline")

IDENTITY_FILE = "d2v_tokenizer.json"  # in a checkpoint directory (not HF's tokenizer.json)
MODEL_FILE = "spm.model"  # the model: next to a manifest (data_prep.text) and copied into each checkpoint
HF_MODEL_FILES = ("spiece.model", "sentencepiece.bpe.model", MODEL_FILE)  # what an HF directory may ship
ROLES = {"<pad>": "pad", "<s>": "bos", "</s>": "eos", "<unk>": "unk", "<mask>": "mask"}  # piece -> role
FIXED_IDS = {"pad": 0, "bos": 1, "eos": 2, "unk": 3, "mask": 4}  # data_prep.text's layout (always enforced)


class TokenizerMismatch(ValueError):
    """Two things meant to share a tokenizer do not."""


@dataclass(frozen=True)
class Identity:
    sha256: str
    vocab_size: int
    special_ids: dict  # role -> id (pad, bos, eos, unk, mask)

    def describe(self) -> str:
        ids = " ".join(f"{role}={self.special_ids.get(role)}" for role in FIXED_IDS)
        return f"sentencepiece model sha256 {self.sha256[:12]} ({self.vocab_size} pieces; {ids})"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d, origin: str) -> Identity:
        try:
            return cls(str(d["sha256"]), int(d["vocab_size"]), {str(k): int(v) for k, v in d["special_ids"].items()})
        except (TypeError, KeyError, ValueError, AttributeError):
            raise TokenizerMismatch(f"{origin}: the recorded tokenizer identity is malformed ({str(d)[:120]})") from None


def of_model_bytes(data: bytes, origin: str) -> Identity:
    """The identity of a sentencepiece model's bytes (its special ids as the model defines them)."""
    import sentencepiece
    try:
        sp = sentencepiece.SentencePieceProcessor(model_proto=data)
    except (RuntimeError, OSError, TypeError) as exc:
        raise TokenizerMismatch(f"{origin} is not a sentencepiece model: {str(exc).strip()[:150]}") from None
    mask = sp.piece_to_id("<mask>")
    ids = {"pad": sp.pad_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(),
           "mask": mask if sp.id_to_piece(mask) == "<mask>" else -1}
    return Identity(hashlib.sha256(data).hexdigest(), sp.vocab_size(), ids)


def of_model_file(path: Path) -> Identity:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TokenizerMismatch(f"{path}: cannot read the sentencepiece model ({exc.strerror or exc})") from None
    return of_model_bytes(data, str(path))


def of_manifest(info: dict, origin: str) -> Identity | None:
    """What a data_prep manifest records of its tokenizer (None: a manifest of no text shards)."""
    tok = info.get("tokenizer")
    if not isinstance(tok, dict) or "sha256" not in tok:
        return None
    pieces = tok.get("special_ids") or {piece: FIXED_IDS[role] for piece, role in ROLES.items()}
    return Identity.from_dict({"sha256": tok["sha256"], "vocab_size": tok.get("vocab_size"),
                               "special_ids": {ROLES.get(p, p): i for p, i in pieces.items()}}, origin)


def of_config(model_cfg) -> dict:
    """The special ids a text model config uses (model.pad_id ...)."""
    return {role: getattr(model_cfg, f"{role}_id") for role in FIXED_IDS}


def manifest_identity(manifest: str | Path) -> Identity | None:
    """What a data_prep manifest (its file or directory) records of its tokenizer, from the JSON alone (the shards
    themselves are checked where they are read: resolve_shards)."""
    where = Path(manifest)
    where = where / "manifest.json" if where.is_dir() else where
    try:
        info = json.loads(where.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerMismatch(f"manifest {manifest} cannot be read: {exc}") from None
    return of_manifest(info, str(manifest))


def run_tokenizer(manifest: str) -> tuple[Identity | None, bytes | None]:
    """(identity, model bytes) of a run's text shards: the manifest's record, checked against the spm.model beside
    it (which a checkpoint copies). No model file there: (the record, None)."""
    recorded = manifest_identity(manifest)
    path = beside_manifest(manifest)  # a fixed name: nothing from the manifest names a file to read
    if recorded is None or path is None:
        return recorded, None
    data = path.read_bytes()
    found = of_model_bytes(data, str(path))
    check(recorded, f"data.manifest={manifest}", found, str(path),
          "the shards were made with another model than the one now beside them: restore it, or re-run data_prep.text")
    return recorded, data


def shard_dirs(paths) -> list[str]:
    """The data_prep shard directories among input paths (the others are raw files or folders)."""
    return [p for p in paths if Path(p).is_dir() and (Path(p) / "manifest.json").is_file()]


def mismatch(a: Identity, a_name: str, b: Identity, b_name: str) -> str | None:
    """One line naming both, or None when they are the same tokenizer."""
    if a == b:
        return None
    return f"{a_name} uses {a.describe()}, but {b_name} uses {b.describe()}"


def check(a: Identity | None, a_name: str, b: Identity | None, b_name: str, what_to_do: str) -> None:
    """Raise TokenizerMismatch if both are known and differ; warn if either is unknown (a source made before
    identities were recorded)."""
    if a is None or b is None:
        if a is not None or b is not None:
            log.warning("tokenizer not compared: %s records no sentencepiece identity (made before identities were "
                        "recorded, or another kind of tokenizer)", a_name if a is None else b_name)
        return
    problem = mismatch(a, a_name, b, b_name)
    if problem:
        raise TokenizerMismatch(f"{problem}: {what_to_do}")


def check_config(model_cfg, ident: Identity | None, origin: str) -> None:
    """model.*_id agree with the tokenizer's (the special ids the shards hold); vocab_size: Modality.check_manifest."""
    if ident is None:
        return
    ours = of_config(model_cfg)
    wrong = [f"model.{role}_id={ours[role]} but the tokenizer's {role} is {ident.special_ids.get(role)}"
             for role in FIXED_IDS if ours[role] != ident.special_ids.get(role)]
    if wrong:
        raise TokenizerMismatch(f"{origin}: {'; '.join(wrong)}: set " + " ".join(
            f"model.{role}_id={ident.special_ids.get(role)}" for role in FIXED_IDS if ours[role] !=
            ident.special_ids.get(role)))


# --------------------------------------------------------------------------------- what a source records

def of_source(source: Path) -> Identity | None:
    """The identity a model source records: a checkpoint directory (d2v_tokenizer.json), a .pt export (its
    ``tokenizer`` entry) or an HF directory (the sentencepiece model it ships). None: it records none."""
    source = Path(source)
    if source.is_dir():
        if (source / IDENTITY_FILE).is_file():
            return read_identity_file(source / IDENTITY_FILE)
        model = shipped_model(source)
        return of_model_file(model) if model else None
    import torch
    exported = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    return of_export(exported, str(source))


def of_export(exported: dict, origin: str) -> Identity | None:
    recorded = exported.get("tokenizer") if isinstance(exported, dict) else None
    return None if recorded is None else Identity.from_dict(recorded, origin)


def read_identity_file(path: Path) -> Identity:
    try:
        return Identity.from_dict(json.loads(Path(path).read_text("utf-8")), str(path))
    except (OSError, ValueError) as exc:
        if isinstance(exc, TokenizerMismatch):
            raise
        raise TokenizerMismatch(f"{path} cannot be read: {exc}") from None


def shipped_model(directory: Path) -> Path | None:
    """The sentencepiece model a checkpoint or HF directory carries (None: it carries none)."""
    return next((Path(directory) / n for n in HF_MODEL_FILES if (Path(directory) / n).is_file()), None)


def checkpoint_files(cfg) -> dict[str, bytes]:
    """The files a text run's checkpoints hold besides the weights: the shards' tokenizer identity, and the model
    itself when it is beside the manifest (export ships it). Other modalities: none."""
    if cfg.modality != "text":
        return {}
    if not cfg.data.manifest or not Path(cfg.data.manifest).exists():  # pipeline.train refuses this before launch:
        log.warning("data.manifest=%s does not exist: checkpoints will record no tokenizer", cfg.data.manifest)
        return {}  # a Trainer fed its batches directly (benchmarks, tests)
    identity, model = run_tokenizer(cfg.data.manifest)
    files = {}
    if identity is not None:
        files[IDENTITY_FILE] = json.dumps(identity.to_dict(), indent=1).encode()
    if model is not None:
        files[MODEL_FILE] = model
    return files


# --------------------------------------------------------------------------------- before a run starts

REMAKE = "re-make the shards with the model it was trained with (python -m data_prep.text --spm-model {model})"


def check_run(cfg, resume: Path | None) -> None:
    """Before any process group, for text: the checkpoint to resume, init.from, eval.spm_model and the eval shard
    directories all use the training shards' tokenizer."""
    if cfg.modality != "text":
        return
    run, _ = run_tokenizer(cfg.data.manifest)
    shards = f"the shards (data.manifest={cfg.data.manifest})"
    if resume is not None:
        check(of_source(resume), f"checkpoint {resume}", run, shards,
              "resume it with the shards it was trained on (data.manifest), or start a new train.output_dir")
    if cfg.init.from_ and resume is None:  # (a resumed run does not use init.from)
        source = Path(cfg.init.from_)
        check(of_source(source), f"init.from={source}", run, shards,
              "a warm start needs the source's tokenizer: " + REMAKE.format(model=source_model_hint(source)))
    if cfg.eval.every:
        check_eval_inputs(cfg, run, shards)


def check_eval_inputs(cfg, run: Identity | None, shards: str) -> None:
    e = cfg.eval
    if e.spm_model:
        check(of_model_file(Path(e.spm_model)), f"eval.spm_model={e.spm_model}", run, shards,
              "set eval.spm_model to the shards' spm.model (or leave it empty)")
    for path in shard_dirs([*e.train, *e.eval]):
        check(manifest_identity(path), f"eval input {path}", run, shards,
              "make the eval shards with the training shards' model (python -m data_prep.text --spm-model ...)")


def source_model_hint(source: Path) -> str:
    """Where the model a source was trained with can be found, for the error's advice."""
    if source.is_dir():
        shipped = shipped_model(source)
        if shipped is not None:
            return str(shipped)
    return "<the sentencepiece model it was trained with>"


# --------------------------------------------------------------------------------- embed, evaluate, export

def model_for(cfg, source: Path, given: str | None, inputs: list[str] = ()) -> str | None:
    """pipeline.embed / evaluate / export of a text model: the sentencepiece model to tokenise with (``given``, else
    the one ``source`` ships, else spm.model beside its data.manifest), checked against the tokenizer ``source``
    records, as is every shard directory among ``inputs``. Other modalities: ``given``."""
    if cfg.modality != "text":
        return given
    source = Path(source)
    recorded = of_source(source)
    named = f"model {source}"
    shipped = shipped_model(source) if source.is_dir() else None
    chosen = given or shipped or beside_manifest(cfg.data.manifest)
    if chosen is not None:
        label = (f"--spm-model {given}" if given else f"{chosen} (the spm.model beside data.manifest)"
                 if not shipped else str(chosen))
        check(recorded, named, of_model_file(Path(chosen)), label,
              f"pass --spm-model with the model {source} was trained with" + (f" ({shipped})" if shipped else ""))
    for path in shard_dirs(inputs):
        check(recorded, named, manifest_identity(path), f"the shards {path}",
              "give shards made with its model (python -m data_prep.text --spm-model ...)")
    return None if chosen is None else str(chosen)


def beside_manifest(manifest: str) -> Path | None:
    """The sentencepiece model data_prep.text wrote next to a run's shards (OUT/spm.model), if it is there."""
    if not manifest:
        return None
    path = Path(manifest)
    path = (path if path.is_dir() else path.parent) / MODEL_FILE
    return path if path.is_file() else None
