"""Start a new run from existing weights (``init.from``): a transformers Data2Vec directory or our export.

The source holds whole (TP=1) tensors. Each rank cuts its tensor-parallel slice (megatron's contiguous
chunks on the parameter's split dim) and its ZeRO-3 partition of that slice, and writes it as the student's
fp32 master and working partitions, exactly as a resume writes saved partitions; the teacher starts as a
copy of the student, as in any new run. Optimizer moments, LR schedule and data position start fresh.
Parameters the source does not have (the student's regression head, when starting from an HF backbone or
a teacher) keep their own initialisation.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import ConfigError, doc, one_of, require

log = logging.getLogger("pipeline")


@dataclass
class InitConfig:
    from_: str = doc("start a new run from these weights (ignored when the run resumes from its own checkpoint): "
                     "a transformers Data2Vec directory (python -m pipeline.export --format hf, or a released "
                     "data2vec model saved with save_pretrained) or a consolidated export (.pt, --format pt). "
                     "Student and teacher start from them at any parallel.tp and data-parallel size; the optimizer, "
                     "schedule and data start fresh. Empty: random initialisation", "", key="from")
    weights: str = doc("with a .pt export: start from its 'student' (default) or its EMA 'teacher' (an HF directory "
                       "holds the one set it was exported with)", "student")
    strict: bool = doc("every backbone parameter must come from init.from, and nothing there may be left unused "
                       "(an HF task model's wrapper prefix and head are understood); false: load what matches, keep "
                       "the rest of this model's initialisation, and log both counts at WARNING", True)

    def __post_init__(self):
        one_of("init.weights", self.weights, ("student", "teacher"))


def check_source(cfg) -> None:
    """Before any process group: ``init.from`` exists and is an HF directory of this modality or a .pt file."""
    from pipeline import hf
    source = cfg.init.from_
    if not source:
        return
    path = Path(source)
    if path.is_dir():
        config = path / "config.json"
        require(config.is_file(), f"init.from={source} is a directory without config.json: not a transformers "
                                  f"model directory (python -m pipeline.export --format hf writes one)")
        try:
            theirs = json.loads(config.read_text("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"init.from={source}: config.json is not valid JSON ({exc})") from None
        want = hf.HF_MODEL_TYPE[cfg.modality]
        require(theirs.get("model_type") == want, f"init.from={source} holds a {theirs.get('model_type')!r} model; "
                                                  f"modality={cfg.modality} starts from a {want!r} model "
                                                  f"({hf.HF_MODEL_CLASS[cfg.modality]})")
        problems = hf.architecture_mismatch(cfg, theirs)
        require(not problems, f"init.from={source} is another architecture than this config: {'; '.join(problems)}. "
                              f"Set encoder.* / model.* to match it")
        require(any((path / name).is_file() for name in HF_WEIGHT_FILES),
                f"init.from={source} has no {' or '.join(HF_WEIGHT_FILES)}")
        require(cfg.init.weights == "student",
                f"init.weights={cfg.init.weights} applies to .pt exports, which hold student and teacher; the HF "
                f"directory {source} holds the one set it was exported with (python -m pipeline.export --format hf "
                f"--weights teacher|student): drop init.weights")
        check_hf_keys(cfg, hf_weight_keys(path), source, theirs)
        return
    require(path.is_file() and path.suffix == ".pt",
            f"init.from={source} is neither a transformers model directory nor a .pt export "
            f"(python -m pipeline.export CKPT --format hf|pt writes them)")
    check_export(cfg, path)


# modality -> the prefix of the backbone in transformers' task models (Data2VecVisionForImageClassification, ...)
HF_TASK_PREFIX = {"vision": "data2vec_vision.", "speech": "data2vec_audio.", "text": "data2vec_text."}
# parts of an HF base model that a data2vec backbone has not: RoBERTa's pooler; BEiT's mean-pooling LayerNorm
# (use_mean_pooling=True, fine-tuned models: fc_norm), whose model then has no final LayerNorm of its own
HF_UNUSED = {"text": ("pooler.",), "vision": ("pooler.",)}
HF_POOLED_AWAY = {"vision": ("layernorm.weight", "layernorm.bias")}  # absent with use_mean_pooling=True


def hf_weight_keys(path: Path) -> list[str]:
    """The tensor names of an HF directory's weights, without reading the tensors (safetensors' header)."""
    try:
        if (path / "model.safetensors").is_file():
            from safetensors import safe_open
            with safe_open(str(path / "model.safetensors"), framework="pt") as f:
                return list(f.keys())
        return list(torch.load(path / "pytorch_model.bin", map_location="meta", weights_only=True))
    except Exception as exc:  # noqa: BLE001 - their errors never name the file
        raise ConfigError(f"init.from={path}: its weights file cannot be read ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:150] if str(exc) else 'empty or damaged'})") from None


def unwrap_hf(cfg, state: dict) -> tuple[dict, list[str]]:
    """An HF state (or its key set, as a dict) as its base model's: a task model's backbone prefix stripped.
    -> (the base model's entries, the names left out: a task model's head, the base model's unused parts)."""
    prefix = HF_TASK_PREFIX[cfg.modality]
    wrapped = any(k.startswith(prefix) for k in state)
    base = {k[len(prefix):] if wrapped else k: v for k, v in state.items() if not wrapped or k.startswith(prefix)}
    unused = HF_UNUSED.get(cfg.modality, ())
    left = sorted(k for k in state if wrapped and not k.startswith(prefix)) + sorted(k for k in base
                                                                                       if k.startswith(unused))
    return {k: v for k, v in base.items() if not k.startswith(unused)}, left


def optional_hf_names(cfg, theirs: dict) -> set[str]:
    """HF names a source may lack by its own architecture: with use_mean_pooling=True (BEiT's fine-tuning) the
    final LayerNorm is the pooler's, left out; ours then keeps its initialisation, as BEiT's fc_norm starts fresh."""
    return set(HF_POOLED_AWAY.get(cfg.modality, ())) if theirs.get("use_mean_pooling") else set()


def check_hf_keys(cfg, keys: list[str], source: str, theirs: dict) -> None:
    """Before any process group: the HF weights map onto every backbone parameter, and every tensor is used (or
    init.strict=false)."""
    from pipeline import hf
    base, _ = unwrap_hf(cfg, dict.fromkeys(keys))
    expected = set(hf.name_map(cfg).values()) | ({hf.TEXT_TOKEN_TYPES} if cfg.modality == "text" else set())
    missing = expected - set(base) - {hf.TEXT_TOKEN_TYPES} - optional_hf_names(cfg, theirs)
    report_mismatch(cfg, source, sorted(missing), sorted(set(base) - expected))


def report_mismatch(cfg, source: str, missing: list[str], unexpected: list[str]) -> None:
    """ConfigError naming what does not map, unless init.strict=false (then the caller loads what matches)."""
    if (missing or unexpected) and cfg.init.strict:
        raise ConfigError(f"init.from={source} does not map onto this model: {len(missing)} parameter(s) missing "
                          f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}. Check that it is a "
                          f"{cfg.modality} data2vec model of this architecture, or set init.strict=false to load what "
                          f"matches and keep this model's own initialisation for the rest")


def check_export(cfg, path: Path) -> None:
    """Before any process group: a .pt export of this modality that holds init.weights."""
    try:
        exported = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch.load's errors never name the file
        raise ConfigError(f"init.from={path} cannot be read as a .pt export ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:150]})") from None
    require(isinstance(exported, dict) and isinstance(exported.get(cfg.init.weights), dict),
            f"init.from={path} holds no {cfg.init.weights!r} weights (python -m pipeline.export writes 'student' and "
            f"'teacher'); set init.weights or export again")
    theirs = (exported.get("config") or {}).get("modality")
    require(theirs in (None, cfg.modality), f"init.from={path} is a {theirs} model; this run is modality="
                                            f"{cfg.modality}")


HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def source_state(cfg, padded_vocab: int) -> dict[str, torch.Tensor]:
    """The source's whole tensors under our student parameter names (text embedding padded to
    ``padded_vocab`` rows: this run's tensor-parallel padding)."""
    from pipeline import hf
    path = Path(cfg.init.from_)
    if path.is_dir():
        state, _ = unwrap_hf(cfg, read_hf_weights(path))  # a task model's head is left out
        backbone = hf.from_hf(cfg, state, padded_vocab=padded_vocab, strict=False)
        return {f"backbone.{k}": v for k, v in backbone.items()}
    exported = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # every rank reads it: share pages
    if cfg.init.weights == "teacher":
        state = {f"backbone.{k}": v for k, v in exported["teacher"].items()}
    else:
        state = dict(exported["student"])
    tokens = "backbone.embed.tokens.weight"
    if tokens in state:  # the export keeps its own run's TP padding rows: re-pad for this run
        state[tokens] = hf.fit_vocab(state[tokens], cfg.model.vocab_size, padded_vocab)
    return state


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file
        return load_file(str(path / "model.safetensors"))
    return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)


def tp_slice(full: torch.Tensor, param: torch.nn.Parameter, tp: int, tp_rank: int) -> torch.Tensor:
    """This tensor-parallel rank's slice of a whole tensor (megatron splits into ``tp`` contiguous chunks)."""
    if getattr(param, "tensor_model_parallel", False) and getattr(param, "partition_dim", -1) >= 0:
        return torch.chunk(full, tp, dim=param.partition_dim)[tp_rank]
    return full


def warm_start(trainer) -> list[str]:
    """Write ``init.from`` into the student's partitions on every rank, then copy the student into the teacher.
    Returns the student parameters the source did not provide (they keep their initialisation)."""
    from pipeline.checkpoint import partition_sizes, repartition, set_student_state
    from pipeline.ema import zero3_master_partition
    cfg, rt = trainer.cfg, trainer.rt
    padded = cfg.model.padded_vocab(rt.tp) if cfg.modality == "text" else 0
    state = source_state(cfg, padded)
    student = trainer.engine.module
    sizes = partition_sizes(student)
    source = Path(cfg.init.from_)
    head_optional = source.is_dir() or cfg.init.weights == "teacher"  # backbone-only sources
    optional = set()
    if source.is_dir():  # names the HF architecture itself leaves out, in our terms
        from pipeline import hf
        absent = optional_hf_names(cfg, json.loads((source / "config.json").read_text("utf-8")))
        optional = {f"backbone.{ours}" for ours, theirs in hf.name_map(cfg).items() if theirs in absent}
    missing = [n for n, _ in student.named_parameters()
               if n not in state and n not in optional and (n.startswith("backbone.") or not head_optional)]
    unused = sorted(set(state) - {n for n, _ in student.named_parameters()})
    report_mismatch(cfg, cfg.init.from_, missing, unused)  # every rank reads the same files: all raise alike
    master, kept = {}, []
    for name, p in student.named_parameters():
        if name not in state:
            kept.append(name)
            master[name] = zero3_master_partition(p).detach().clone()
            continue
        piece = tp_slice(state[name].float(), p, rt.tp, rt.tp_rank)
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if tuple(piece.shape) != shape:
            raise ConfigError(f"init.from={cfg.init.from_}: {name} is {tuple(state[name].shape)} there, but this "
                              f"model's is {shape} on each of {rt.tp} tensor-parallel rank(s): the architecture "
                              f"differs (compare the source's config with encoder.* and model.*)")
        # the partition sizes are the shard group's (parallel.shard): the slice is the one of this rank's place in
        # it; its replicas (the same place in the other shard groups) take the same slice
        master[name] = repartition([piece.reshape(-1)], 0, sizes[name], rt.shard_rank)
    if (missing or unused) and trainer.rt.is_main:  # init.strict=false (report_mismatch refuses them otherwise)
        log.warning("init.from=%s, init.strict=false: %d of this model's parameters are not there and keep their own "
                    "initialisation %s; %d tensors there are not used %s", cfg.init.from_, len(missing), missing[:5],
                    len(unused), unused[:5])
    set_student_state(trainer.engine, trainer.scheduler.optimizer, master, {}, {})
    trainer.ema.copy_student()
    return kept
