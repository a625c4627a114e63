"""The whole experiment config: one dataclass per component, filled from a YAML preset + overrides."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import (ConfigError, DataConfig, EncoderConfig, ParallelConfig, TrainConfig, apply_overrides,
                             build_dataclass, config_dict, field_help, load_yaml, require)
from pipeline.ema import EMAConfig
from pipeline.methods import METHODS
from pipeline.modalities import MODALITIES
from pipeline.model.decoder import DecoderConfig
from pipeline.monitor import EvalConfig
from pipeline.objective import CollapseConfig, ObjectiveConfig
from pipeline.warm_start import InitConfig


@dataclass
class ExperimentConfig:
    modality: str
    model: Any  # the modality's own config dataclass
    method: str = "data2vec"  # 'data2vec' (v1) or 'data2vec2' (data2vec 2.0)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def make_modality(self):
        return MODALITIES[self.modality](self.model, visible_only=METHODS[self.method].visible_only)

    def make_method(self, modality=None):
        return METHODS[self.method](self, modality or self.make_modality())


SECTIONS = {"encoder": EncoderConfig, "objective": ObjectiveConfig, "ema": EMAConfig, "collapse": CollapseConfig,
            "data": DataConfig, "train": TrainConfig, "parallel": ParallelConfig, "init": InitConfig,
            "eval": EvalConfig, "decoder": DecoderConfig}


def build_experiment(raw: dict) -> ExperimentConfig:
    raw = dict(raw)
    name = raw.pop("modality", None)
    require(name in MODALITIES, f"'modality' must be one of {sorted(MODALITIES)}, got {name!r}")
    method = raw.pop("method", "data2vec")
    require(method in METHODS, f"'method' must be one of {sorted(METHODS)} (data2vec: v1; data2vec2: data2vec 2.0), "
                               f"got {method!r}")
    model = build_dataclass(MODALITIES[name].Config, raw.pop("model", {}), "model")
    unknown = set(raw) - set(SECTIONS)
    require(not unknown, f"unknown config section(s) {sorted(unknown)}; valid: modality, method, model, "
                         f"{', '.join(SECTIONS)}")
    sections = {key: build_dataclass(cls, raw.get(key, {}), key) for key, cls in SECTIONS.items()}
    cfg = ExperimentConfig(modality=name, model=model, method=method, **sections)
    check_consistency(cfg)
    return cfg


def check_consistency(cfg: ExperimentConfig) -> None:
    """Cross-component rules (each component validated its own fields already)."""
    enc = cfg.encoder
    problems = METHODS[cfg.method].problems(cfg)
    require(not problems, f"method: {cfg.method}: " + "; ".join(problems))
    require(cfg.objective.top_k <= enc.depth,
            f"objective.top_k={cfg.objective.top_k} exceeds encoder.depth={enc.depth}")
    require(enc.heads % cfg.parallel.tp == 0,
            f"encoder.heads={enc.heads} is not divisible by parallel.tp={cfg.parallel.tp}")
    require(cfg.collapse.action != "skip" or cfg.train.grad_accum == 1,
            "collapse.action=skip skips whole optimizer steps and needs train.grad_accum=1; use 'log' or 'stop'")
    require(enc.ffn_dim % cfg.parallel.tp == 0,
            f"encoder.ffn_dim={enc.ffn_dim} is not divisible by parallel.tp={cfg.parallel.tp}")
    if cfg.data.max_tokens:
        require(cfg.modality == "speech",
                f"data.max_tokens={cfg.data.max_tokens} (length-bucketed batches) is for modality=speech only; "
                f"{cfg.modality} examples all have one length: set data.max_tokens=0 and use train.micro_batch_size")
        require(cfg.data.max_tokens >= cfg.model.max_samples,
                f"data.max_tokens={cfg.data.max_tokens} is below model.max_samples={cfg.model.max_samples}: a "
                f"full-length clip would not fit in a batch. Raise data.max_tokens or lower model.max_samples")


def load_experiment(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    return build_experiment(apply_overrides(load_yaml(path), list(overrides)))


def experiment_dict(cfg: ExperimentConfig) -> dict:
    return config_dict(cfg)


def config_help() -> str:
    """Every config key with its default and help text, per section (for --help)."""
    lines = ["config keys (set in the YAML preset or override as key.sub=value):",
             f"  method (default \"data2vec\"): the pretraining method, one of {', '.join(sorted(METHODS))} "
             f"(data2vec2: data2vec 2.0, with the [decoder] section)"]
    for modality in MODALITIES.values():
        lines.append(f"  [model] for modality={modality.name}")
        lines += [f"    {k} (default {json.dumps(d)}): {h}" for k, d, h in field_help(modality.Config, "model")]
    for key, cls in SECTIONS.items():
        lines.append(f"  [{key}]")
        lines += [f"    {k} (default {json.dumps(d)}): {h}" for k, d, h in field_help(cls, key)]
    return "\n".join(lines)


__all__ = ["ExperimentConfig", "ConfigError", "build_experiment", "load_experiment", "config_help"]
