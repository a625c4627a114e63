"""Experiment configuration: small validated dataclasses per component, YAML presets, dotted overrides.

Every component owns its config dataclass (next to the code that uses it, or here when it is
shared). Presets in ``configs/*.yaml`` fill them; ``key.sub=value`` arguments override single
fields. Unknown keys and invalid values are rejected with a message that says what to change,
before any process group starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says how."""


def doc(text: str, default: Any = dataclasses.MISSING, key: str | None = None, **kw) -> Any:
    """A dataclass field with a help text (shown by ``python -m pipeline.train --help``). ``key``: the name
    the field has in YAML and overrides when that is a Python keyword (init.from -> field ``from_``)."""
    metadata = {"help": text, **({"key": key} if key else {})}
    if default is not dataclasses.MISSING and isinstance(default, (list, dict, tuple)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


def config_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def config_dict(obj: Any) -> Any:
    """A config dataclass tree as the plain dict its YAML would hold (config keys, lists copied)."""
    if dataclasses.is_dataclass(obj):
        return {config_key(f): config_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [config_dict(x) for x in obj]
    return obj


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def one_of(name: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = tuple(choices)
    require(value in choices, f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


@dataclass
class EncoderConfig:
    """The transformer encoder shared by every modality."""

    dim: int = doc("model width D", 768)
    depth: int = doc("number of transformer blocks", 12)
    heads: int = doc("attention heads (must divide dim, and be divisible by parallel.tp)", 12)
    ffn_dim: int = doc("hidden width of the feed-forward block", 3072)
    norm_first: bool = doc("pre-LN blocks (BEiT/data2vec vision) if true, post-LN (RoBERTa, wav2vec 2.0) if false", True)
    layer_scale_init: float = doc("initial value of the per-channel layer scale (BEiT); 0 disables it", 0.0)
    key_bias: bool = doc("bias on the key projection (BEiT has q and v biases only)", True)
    dropout: float = doc("dropout after attention and FFN (student only)", 0.0)
    attn_dropout: float = doc("dropout on attention probabilities (student only)", 0.0)
    drop_path: float = doc("stochastic depth rate, linearly increasing over depth (student only)", 0.0)
    layerdrop: float = doc("probability that the student skips a whole block in a forward pass (teacher never). "
                           "Every rank skips the same blocks in a micro-step: ZeRO-3 gathers parameters "
                           "collectively", 0.0)
    layer_norm_eps: float = doc("LayerNorm epsilon", 1e-6)
    init: str = doc("weight init: 'beit' (trunc_normal(0.02) cut at +-1 std, output projections scaled by "
                    "1/sqrt(2 x layer) in pre-LN stacks: BEiT/data2vec vision) or 'bert' (normal(0.02), padding rows "
                    "zero: fairseq init_bert_params, data2vec speech and text)", "beit")
    tap: str = doc("what each block gives the teacher's targets: 'block' (output after the residual, v1 vision) "
                   "or 'ffn' (FFN output before the last residual and post-LN, v1 speech/text)", "block")

    def __post_init__(self):
        require(self.dim > 0 and self.depth > 0 and self.heads > 0 and self.ffn_dim > 0,
                "encoder.dim, depth, heads and ffn_dim must be positive")
        require(self.dim % self.heads == 0, f"encoder.dim={self.dim} must be divisible by encoder.heads={self.heads}")
        require(self.depth <= 1024 and self.dim <= 65536 and self.ffn_dim <= 262144,
                "encoder.depth (<= 1024), dim (<= 65536) and ffn_dim (<= 262144) are beyond any model this trains")
        require(self.layer_norm_eps > 0, f"encoder.layer_norm_eps={self.layer_norm_eps} must be > 0")
        for name in ("dropout", "attn_dropout", "drop_path", "layerdrop"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, f"encoder.{name}={value} must be in [0, 1)")
        one_of("encoder.tap", self.tap, ("block", "ffn"))
        one_of("encoder.init", self.init, ("beit", "bert"))


@dataclass
class ParallelConfig:
    """How ranks are arranged. DP = world size / tp."""

    tp: int = doc("tensor-parallel size (megatron-core); must divide the world size and encoder.heads", 1)
    shard: int = doc("data-parallel ranks one ZeRO-3 partition spans: 0 = all of them (plain ZeRO-3); S = groups of S "
                     "consecutive data-parallel ranks (one node's: GPUs per node / tp), whose DP / S replicas "
                     "all-reduce their gradient partitions before each optimizer step (hybrid sharding: parameter "
                     "gathers stay inside a node, only that all-reduce crosses nodes, in train.grad_reduce's dtype)",
                     0)
    timeout_s: int = doc("seconds a collective waits for a peer before the rank fails and the launcher ends the job "
                         "(the process groups' timeout, NCCL's watchdog): above the longest time one rank works while "
                         "its peers wait (a checkpoint write, an evaluation), low enough that a hung node ends the job "
                         "soon", 600)

    def __post_init__(self):
        require(self.tp >= 1, f"parallel.tp={self.tp} must be >= 1")
        require(self.timeout_s >= 60, f"parallel.timeout_s={self.timeout_s} must be >= 60 (seconds): start-up and "
                                      f"checkpoint writes hold peers in collectives for longer than that")
        require(self.shard >= 0, f"parallel.shard={self.shard} must be >= 0 (0: shard over every data-parallel rank)")


@dataclass
class DataConfig:
    """Where the shards are and how they are streamed."""

    manifest: str = doc("path to a data_prep manifest.json (or the directory holding it)", "")
    workers: int = doc("DataLoader worker processes per rank (decode + augment + masking run there)", 2)
    shuffle_buffer: int = doc("samples held in each worker's shuffle buffer", 1000)
    prefetch: int = doc("batches prefetched per worker", 2)
    verify: str = doc("how shards are checked against the manifest: 'size' (at start-up; cheap) or 'sha256' (also "
                      "each shard's sha256, by the worker that reads it, when it first opens it: a mismatch stops "
                      "the run naming the shard; costs one extra read of each shard, once per worker)", "size")
    max_bad_samples: int = doc("samples in a row that may fail to decode (each is logged and skipped) before "
                               "the run stops with an error; 0: stop at the first", 100)
    max_tokens: int = doc("speech only: batches by a budget of audio samples instead of train.micro_batch_size "
                          "clips (fairseq's max_tokens; data2vec audio: 3800000 per GPU). Each worker stream sorts "
                          "a window of data.bucket_window examples by length and cuts it into batches whose clips x "
                          "longest clip stays within this budget (fairseq batch_by_size), emitted in a seeded "
                          "shuffled order; clips are still cropped to their batch's shortest, which now wastes "
                          "little. Must be >= model.max_samples. 0: off (train.micro_batch_size clips per batch)", 0)
    bucket_window: int = doc("with data.max_tokens: examples each worker stream pools and sorts by length before "
                             "cutting batches. Larger wastes less audio in the crops but holds about this many "
                             "decoded clips per worker (256 x 11 s mean: ~180 MB), and a resume re-decodes up to "
                             "one window", 256)

    def __post_init__(self):
        require(self.workers >= 0, "data.workers must be >= 0")
        require(self.max_tokens >= 0, "data.max_tokens must be >= 0 (0: fixed train.micro_batch_size batches)")
        require(1 <= self.bucket_window <= 65536, "data.bucket_window must be in [1, 65536]")
        require(self.max_bad_samples >= 0, "data.max_bad_samples must be >= 0")
        require(self.shuffle_buffer >= 1, "data.shuffle_buffer must be >= 1")
        require(self.prefetch >= 1, "data.prefetch must be >= 1")
        one_of("data.verify", self.verify, ("size", "sha256"))


@dataclass
class TrainConfig:
    """Optimisation, schedule, logging and checkpointing."""

    steps: int = doc("optimizer steps to run", 1000)
    micro_batch_size: int = doc("samples per rank per forward pass", 8)
    grad_accum: int = doc("micro-batches per optimizer step", 1)
    lr: float = doc("peak learning rate", 1e-3)
    min_lr: float = doc("learning rate at the end of the decay (cosine, tri_stage)", 1e-6)
    warmup_steps: int = doc("linear warmup steps", 0)
    schedule: str = doc("'cosine' (warmup then cosine decay to min_lr), 'constant' (warmup then constant) or "
                        "'tri_stage' (fairseq's, used by data2vec speech and text: linear warmup from "
                        "lr x init_lr_scale, hold lr for hold_steps, then exponential decay to min_lr at train.steps)",
                        "cosine")
    hold_steps: int = doc("tri_stage: steps at the peak lr after the warmup", 0)
    init_lr_scale: float = doc("tri_stage: the warmup starts at lr x this", 0.01)
    weight_decay: float = doc("AdamW weight decay (which parameters it spares: train.decay_exempt)", 0.05)
    decay_exempt: str = doc("parameters weight decay spares: 'reference' (the released recipe: with data2vec v1 'beit' "
                            "for vision, 'none' for speech and text; with data2vec 2.0 'bias'), 'beit' (1-D "
                            "parameters, biases and cls_token; mask_token and the relative position table decay), "
                            "'none' (every parameter decays, as fairseq data2vec v1 audio and text), '1d' (1-D "
                            "parameters, biases, cls/mask tokens and the relative position table) or 'bias' (1-D "
                            "parameters and biases: fairseq data2vec 2.0)", "reference")
    betas: list = doc("AdamW betas", [0.9, 0.999])
    eps: float = doc("AdamW epsilon", 1e-8)
    grad_clip: float = doc("clip the global gradient norm to this (0: no clipping); written into the DeepSpeed "
                           "config as gradient_clipping", 0.0)
    grad_reduce: str = doc("dtype of the data-parallel gradient reduce-scatter when the student computes in bf16: "
                           "'fp32' (DeepSpeed's communication_data_type: sums over hundreds of ranks keep fp32 "
                           "precision, as Megatron-LM and torchtitan reduce; twice the gradient bytes) or 'compute' "
                           "(bf16, half the bytes: fairseq's half-precision all-reduce). fp32 runs reduce in fp32. "
                           "With parallel.shard, also the dtype of the gradient all-reduce over replicas",
                           "fp32")
    seed: int = doc("seed for initialisation, data order, augmentation and masks", 0)
    precision: str = doc("'auto' (bf16 on GPU, fp32 on CPU), 'bf16' or 'fp32'. The EMA teacher is always fp32", "auto")
    teacher_precision: str = doc("how the teacher computes when the student runs bf16 (its weights and EMA stay "
                                 "fp32): 'autocast' (bf16 matmuls, like fairseq's fp16 teacher for data2vec speech "
                                 "and text), 'fp32' (outside autocast, like BEiT's teacher for data2vec vision; "
                                 "slower) or 'reference' (the release: with data2vec v1 fp32 for vision, autocast "
                                 "for speech and text; with data2vec 2.0 autocast)", "reference")
    activation_checkpointing: bool = doc("keep only each block's input for the student's backward and recompute the "
                                         "block then (torch.utils.checkpoint, dropout masks replayed): the block "
                                         "activations shrink to one block's plus an (s, b, D) tensor per block, for "
                                         "about one more student forward of compute. pipeline.plan counts it", False)
    nvtx: bool = doc("DeepSpeed's NVTX ranges around its ZeRO-3 functions, for an nsys profile; off (the default) "
                     "skips their range push and pop (about 900 per step at depth 6; the wrapper call stays)", False)
    ds_config: str = doc("DeepSpeed JSON (ZeRO-3); batch keys must agree with this section", "ds_configs/zero3.json")
    output_dir: str = doc("checkpoints, logs and TensorBoard events go here", "runs/default")
    log_every: int = doc("steps between log lines", 10)
    save_every: int = doc("steps between checkpoints (0: only the final one)", 1000)
    keep_checkpoints: int = doc("complete checkpoints to keep (older ones are deleted; 0 keeps all)", 3)
    stop_after: int = doc("end this run (with a checkpoint) once this step is reached; the schedule still "
                          "targets train.steps and a later run resumes (0: run to train.steps)", 0)
    resume_damaged: str = doc("a checkpoint whose files fail their CRC-32 (or cannot be read) on resume: 'error' "
                              "(stop, naming the file) or 'previous' (set it aside as damaged_step_N, warn, and "
                              "resume from the newest older complete checkpoint)", "error")
    nonfinite: str = doc("a step whose gradient norm is not finite (NaN or inf: DeepSpeed then skips its update): "
                         "'skip' it (not counted: no EMA update, no log record, no checkpoint) and stop after "
                         "train.nonfinite_limit such steps in a row, as the released fp16 recipes skip overflowed "
                         "steps until fairseq's loss scale reaches its minimum (about 20 in a row); or 'stop' at the "
                         "first. Either stop exits non-zero, and no checkpoint holding a non-finite weight is written "
                         "(so none prunes the last good one)", "skip")
    nonfinite_limit: int = doc("with train.nonfinite=skip: stop after this many non-finite steps in a row", 20)
    check_consistency_every: int = doc("steps between checks that what must be equal across ranks is (hybrid "
                                       "sharding's replicas: student and teacher partitions; tensor-parallel peers: "
                                       "the parameters they both hold), also once at the start; a difference stops "
                                       "the run without a checkpoint, naming the parameter and ranks. Nothing to "
                                       "check (and no cost) at parallel.tp=1 without parallel.shard. 0: off", 100)

    def __post_init__(self):
        require(self.steps >= 1, "train.steps must be >= 1")
        require(self.micro_batch_size >= 1, "train.micro_batch_size must be >= 1")
        require(self.grad_accum >= 1, "train.grad_accum must be >= 1")
        require(self.lr > 0 and self.min_lr >= 0, "train.lr must be > 0 and train.min_lr >= 0")
        require(self.warmup_steps >= 0, "train.warmup_steps must be >= 0")
        one_of("train.schedule", self.schedule, ("cosine", "constant", "tri_stage"))
        if self.schedule == "tri_stage":
            require(0 < self.min_lr <= self.lr, "train.schedule=tri_stage decays exponentially to train.min_lr: "
                                                "set 0 < train.min_lr <= train.lr (data2vec: lr x 0.01)")
            require(self.warmup_steps + self.hold_steps < self.steps,
                    f"train.warmup_steps + train.hold_steps ({self.warmup_steps} + {self.hold_steps}) must be below "
                    f"train.steps={self.steps}: the rest is the decay stage")
            require(0 < self.init_lr_scale <= 1, "train.init_lr_scale must be in (0, 1]")
        require(self.hold_steps >= 0, "train.hold_steps must be >= 0")
        require(self.eps > 0, f"train.eps={self.eps} must be > 0 (AdamW divides by sqrt(v) + eps)")
        require(self.weight_decay >= 0, f"train.weight_decay={self.weight_decay} must be >= 0")
        require(self.output_dir.strip() != "", "train.output_dir must not be empty: checkpoints and logs go there")
        one_of("train.precision", self.precision, ("auto", "bf16", "fp32"))
        one_of("train.teacher_precision", self.teacher_precision, ("reference", "autocast", "fp32"))
        one_of("train.grad_reduce", self.grad_reduce, ("fp32", "compute"))
        one_of("train.decay_exempt", self.decay_exempt, ("reference", "beit", "none", "1d", "bias"))
        one_of("train.resume_damaged", self.resume_damaged, ("error", "previous"))
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                f"train.betas={self.betas} must be two numbers in [0, 1)")
        require(self.grad_clip >= 0, "train.grad_clip must be >= 0")
        require(self.log_every >= 1, "train.log_every must be >= 1")
        require(self.save_every >= 0, "train.save_every must be >= 0")
        require(self.keep_checkpoints >= 0, "train.keep_checkpoints must be >= 0")
        require(0 <= self.stop_after, "train.stop_after must be >= 0")
        one_of("train.nonfinite", self.nonfinite, ("skip", "stop"))
        require(self.nonfinite_limit >= 1, "train.nonfinite_limit must be >= 1")
        require(self.check_consistency_every >= 0, "train.check_consistency_every must be >= 0 (0: off)")


# ---------------------------------------------------------------------------------------------
# Generic dict -> dataclass with clear errors
# ---------------------------------------------------------------------------------------------

def build_dataclass(cls: type, raw: Any, where: str) -> Any:
    """Build ``cls`` from a dict, recursing into nested dataclasses; reject unknown keys."""
    if dataclasses.is_dataclass(raw):
        return raw
    if raw is None:
        raw = {}
    require(isinstance(raw, dict), f"'{where}' must be a mapping, got {type(raw).__name__}")
    fields = {config_key(f): f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" Did you mean '{_join(where, close[0])}'?" if close else ""
            raise ConfigError(f"unknown config key '{_join(where, key)}'.{hint} "
                              f"Valid keys here: {', '.join(sorted(fields))}")
        name = fields[key].name
        kwargs[name] = _coerce(hints[name], value, _join(where, key))
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad config section '{where}': {exc}") from None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"'{where}' must be {hint.__name__}, got {value!r}")
    if hint is list and not isinstance(value, list):
        raise ConfigError(f"'{where}' must be a list, got {value!r}")
    if hint is float and not math.isfinite(value):
        raise ConfigError(f"'{where}' must be a finite number, got {value!r}")
    if hint is int and abs(value) > MAX_INT:
        raise ConfigError(f"'{where}'={value} is out of range (at most {MAX_INT:.0e} in size)")
    return value


MAX_INT = 10 ** 12  # no count in a config is larger; a bigger one is a typo (and overflows schedules)


def field_help(cls: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every field of a dataclass tree, for --help."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = _join(prefix, config_key(f))
        if dataclasses.is_dataclass(hints[f.name]):
            rows += field_help(hints[f.name], key)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((key, default, f.metadata.get("help", "")))
    return rows


# ---------------------------------------------------------------------------------------------
# YAML presets and overrides
# ---------------------------------------------------------------------------------------------

def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; presets live in configs/ (e.g. configs/vision_tiny.yaml)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a UTF-8 text file: --config takes a YAML preset such as "
                          f"configs/vision_tiny.yaml") from None
    try:
        reject_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), path)
        raw = yaml.safe_load(text) or {}
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: an anchor refers to itself (a recursive alias)") from None
    except yaml.YAMLError as exc:  # syntax errors, and tags such as !!python/object, which safe_load refuses
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    require(isinstance(raw, dict), f"{path} must hold a YAML mapping at the top level")
    return raw


def reject_duplicate_keys(node, path: Path) -> None:
    """YAML keeps the last of two equal keys silently (a second ``train:`` would drop the first): refuse."""
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise ConfigError(f"{path}, line {key.start_mark.line + 1}: key '{key.value}' appears twice in "
                                      f"the same section; keep one")
                seen.add(key.value)
            reject_duplicate_keys(value, path)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            reject_duplicate_keys(item, path)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings; values are parsed as YAML scalars/lists (safe_load)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value (e.g. train.lr=3e-4)")
        key, text = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        require(bool(parts), f"override '{item}' has an empty key")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            require(isinstance(node, dict), f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = override_value(item, text)
    return raw


def override_value(item: str, text: str):
    """An override's value as a YAML scalar or list. Text with surrogate escapes (a non-ASCII path under
    a C/POSIX locale, where Python decodes arguments that way) is kept as the string it is: YAML cannot
    hold it, and the surrogates give the exact bytes back when the path is opened."""
    if not text.strip():
        return ""
    if any("\udc80" <= ch <= "\udcff" for ch in text):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{item}': the value is not valid YAML ({str(exc).splitlines()[0]}); "
                          f"quote it, e.g. key='value'") from None
