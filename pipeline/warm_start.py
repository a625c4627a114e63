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
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import ConfigError, doc, one_of, require


@dataclass
class InitConfig:
    from_: str = doc("start a new run from these weights (ignored when the run resumes from its own checkpoint): "
                     "a transformers Data2Vec directory (python -m pipeline.export --format hf, or a released "
                     "data2vec model saved with save_pretrained) or a consolidated export (.pt, --format pt). "
                     "Student and teacher start from them at any parallel.tp and data-parallel size; the optimizer, "
                     "schedule and data start fresh. Empty: random initialisation", "", key="from")
    weights: str = doc("with a .pt export: start from its 'student' (default) or its EMA 'teacher'", "student")

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
        return
    require(path.is_file() and path.suffix == ".pt",
            f"init.from={source} is neither a transformers model directory nor a .pt export "
            f"(python -m pipeline.export CKPT --format hf|pt writes them)")


HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def source_state(cfg, padded_vocab: int) -> dict[str, torch.Tensor]:
    """The source's whole tensors under our student parameter names (text embedding padded to
    ``padded_vocab`` rows: this run's tensor-parallel padding)."""
    from pipeline import hf
    path = Path(cfg.init.from_)
    if path.is_dir():
        state = read_hf_weights(path)
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
    unused = sorted(set(state) - set(master))
    if unused:
        raise ConfigError(f"init.from={cfg.init.from_} has parameters this model lacks: {unused[:5]}")
    set_student_state(trainer.engine, trainer.scheduler.optimizer, master, {}, {})
    trainer.ema.copy_student()
    return kept
