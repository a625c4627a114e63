"""Frozen features of a trained backbone: load it from any export, read labelled inputs, pool per example.

Sources: a checkpoint directory (any TP x DP layout, consolidated in memory), a ``--format pt`` export, or
a ``--format hf`` directory (it carries our experiment config as data2vec_pipeline.json).

Inputs, each decoded by the modality's evaluation transform (``Modality.eval_inputs``: no augmentation, no
crop, no mask):
- a data_prep shard directory (its manifest.json): every sample, labelled by the class data_prep recorded
  in its json "label": the class folder of images, of audio prepared with --layout classes (each piece of a
  split recording too), the --label-field of text (each complete_doc block of a long document too);
  samples without one (flat layouts, text without --label-field) are unlabelled examples;
- a folder of raw files: images (.jpg .jpeg .png .webp) or audio (.flac .wav .ogg, any rate: made 16 kHz
  mono as data_prep.audio does), labelled by the name of the first folder below the given root (CLASS/file);
- text: .txt (one example per line, unlabelled) or .jsonl (``text`` field, label from ``--label-field``),
  tokenised with the run's sentencepiece model as ``<s>`` + ids (up to max_positions - 2) + ``</s>``.

Pooling (the feature of one example): the mean over positions of a layer's output, the final layer by
default (vision: the 196 patch tokens after the final LayerNorm, CLS excluded; speech: the frames; text:
the non-pad tokens). ``layers=True`` also gives every block's output pooled the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

IMAGE_FILES = (".jpg", ".jpeg", ".png", ".webp")
AUDIO_FILES = (".flac", ".wav", ".ogg")
OUR_CONFIG = "data2vec_pipeline.json"  # our experiment config, written next to an HF export


@dataclass
class Example:
    key: str
    source: dict | Callable[[], dict]  # bytes per key, as in a shard, or how to read them (raw files: on demand)
    label: str | None

    @property
    def sample(self) -> dict:
        return self.source() if callable(self.source) else self.source


# ---------------------------------------------------------------------------------------------
# Backbones
# ---------------------------------------------------------------------------------------------

def load_backbone(source: str | Path, weights: str = "student", random_init: bool = False, seed: int = 0):
    """-> (experiment config, TP=1 Backbone in eval mode). ``random_init``: the same architecture untrained."""
    from pipeline import hf
    from pipeline.distributed import model_parallel_config, single_process_parallel_state
    from pipeline.experiment import build_experiment
    from pipeline.export import backbone_state, consolidated
    from pipeline.model.data2vec import Backbone
    source = Path(source)
    if source.is_dir() and (source / OUR_CONFIG).is_file():
        from pipeline.warm_start import read_hf_weights
        cfg = build_experiment(json.loads((source / OUR_CONFIG).read_text("utf-8")))
        state = None if random_init else hf.from_hf(cfg, read_hf_weights(source))
    else:
        exported = consolidated(source) if source.is_dir() else torch.load(source, map_location="cpu",
                                                                            weights_only=True)
        if exported.get("config") is None:
            raise ValueError(f"{source} carries no experiment config: cannot tell the architecture")
        cfg = build_experiment(exported["config"])
        state = None if random_init else backbone_state(exported, weights)
    cfg.parallel.tp = 1
    single_process_parallel_state()
    torch.manual_seed(seed)
    model = Backbone(cfg.make_modality(), cfg.encoder, model_parallel_config(1))
    if state is not None:
        if "embed.tokens.weight" in state:  # exports keep their run's TP padding rows; HF has none
            rows = model.embed.tokens.weight.shape[0]
            state["embed.tokens.weight"] = hf.fit_vocab(state["embed.tokens.weight"], cfg.model.vocab_size, rows)
        model.load_state_dict(state, strict=True)
    return cfg, model.eval()


@torch.no_grad()
def pooled(model, cfg, inputs: dict[str, torch.Tensor], layers: bool = False) -> torch.Tensor:
    """(1, D) mean-pooled final output, or (1, L + 1, D) with every block's pooled output first."""
    final, taps = model.encode(inputs, None) if layers else (model.encode(inputs, None, keep=0)[0], [])
    keep = final.new_ones(final.shape[:2], dtype=torch.float32)  # on the features' device (a GPU's in training)
    if cfg.modality == "text":
        keep = inputs["tokens"].ne(cfg.model.pad_id).float()
    weights = (keep / keep.sum(1, keepdim=True)).unsqueeze(-1)
    pool = lambda x: (x.float() * weights).sum(1)  # noqa: E731
    if not layers:
        return pool(final)
    if cfg.encoder.tap != "block":  # the taps are FFN branches: take the block outputs instead
        taps = block_outputs(model, inputs)
    return torch.stack([pool(t) for t in taps] + [pool(final)], dim=1)


def block_outputs(model, inputs) -> list[torch.Tensor]:
    """Each block's output (prefix tokens removed), read with forward hooks."""
    seen = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: seen.append(out[0])) for b in model.encoder.blocks]
    try:
        model.encode(inputs, None)
    finally:
        for h in hooks:
            h.remove()
    return [x[:, model.prefix:] for x in seen]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def examples(paths: list[str], cfg, spm_model: str | None = None, label_field: str = "label") -> Iterator[Example]:
    for path in map(Path, paths):
        if path.is_dir() and (path / "manifest.json").is_file():
            yield from shard_examples(path)
        elif path.is_dir():
            yield from file_examples(path, cfg)
        elif path.suffix in (".txt", ".jsonl"):
            yield from text_examples(path, cfg, spm_model, label_field)
        elif path.is_file():
            yield Example(path.name, raw_sample(path, cfg), None)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")


def shard_examples(directory: Path) -> Iterator[Example]:
    from pipeline.data import raw_samples, resolve_shards
    for sample in raw_samples(resolve_shards(str(directory))):
        meta = json.loads(sample["json"]) if "json" in sample else {}
        label = meta.get("label")
        yield Example(sample["__key__"], sample, None if label is None else str(label))


def file_examples(root: Path, cfg) -> Iterator[Example]:
    suffixes = IMAGE_FILES if cfg.modality == "vision" else AUDIO_FILES
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes):
        rel = path.relative_to(root)
        yield Example(rel.as_posix(), partial(raw_sample, path, cfg), rel.parts[0] if len(rel.parts) > 1 else None)


def raw_sample(path: Path, cfg) -> dict:
    """A raw file as the shard sample the modality decodes (audio: converted to 16 kHz mono FLAC)."""
    data = path.read_bytes()
    if cfg.modality == "vision":
        return {path.suffix.lower().lstrip("."): data}
    if cfg.modality == "speech":
        from data_prep.audio import audio_samples
        return {"flac": audio_samples(data, path.name)[0]["flac"]}
    raise ValueError(f"{path}: text inputs are .txt or .jsonl files")


def text_examples(path: Path, cfg, spm_model: str | None, label_field: str) -> Iterator[Example]:
    import sentencepiece
    if spm_model is None:
        raise ValueError("text inputs need the run's sentencepiece model: pass --spm-model (the spm.model "
                         "data_prep.text wrote next to the shards)")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    m = cfg.model
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line) if path.suffix == ".jsonl" else {"text": line.rstrip("\n")}
            ids = [m.bos_id] + sp.encode(record["text"])[:m.max_positions - 2] + [m.eos_id]
            label = record.get(label_field)
            yield Example(f"{path.name}:{number}", {"i32": np.asarray(ids, dtype="<i4").tobytes()},
                          None if label is None else str(label))


def read_features(model, cfg, items: Iterator[Example], layers: bool = False, progress: bool = True) -> dict:
    """-> {"keys", "labels" (None where unlabelled), "features" (N, D), "layers" (N, L + 1, D) if asked}."""
    from tqdm import tqdm
    modality = cfg.make_modality()
    keys, labels, feats = [], [], []
    for item in tqdm(items, desc="features", unit="example", disable=not progress):
        feats.append(pooled(model, cfg, modality.eval_inputs(item.sample), layers))
        keys.append(item.key)
        labels.append(item.label)
    if not feats:
        raise ValueError("no input examples found")
    stacked = torch.cat(feats)
    out = {"keys": keys, "labels": labels, "features": stacked[:, -1] if layers else stacked}
    if layers:
        out["layers"] = stacked
    return out
