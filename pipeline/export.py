"""Export a TP x ZeRO-3 checkpoint: to a transformers directory, or to one consolidated fp32 state dict.

    python -m pipeline.export runs/vit_l/checkpoints/step_00100000 --format hf --output vit_l_hf
    python -m pipeline.export runs/vit_l/checkpoints/step_00100000 --output vit_l_step100k.pt

--format hf writes a directory that transformers loads: AutoModel gives Data2VecVisionModel,
Data2VecAudioModel or Data2VecTextModel with our weights (computing what our backbone computes, tested
layer by layer), and AutoImageProcessor / AutoFeatureExtractor / AutoTokenizer give our evaluation
transform (images: resized to the model's size, bicubic, normalised; audio: 16 kHz, normalised per clip;
text: the shards' sentencepiece ids). --weights picks the student (default: what the data2vec releases
fine-tune from, fairseq and BEiT alike) or the EMA teacher. An option HF cannot express is refused, naming
it. --format pt (the default) writes ``student``, ``teacher``, ``config`` and ``step`` with torch.save
(loads with ``weights_only=True``); the text vocabulary keeps its TP padding rows there.

Needs only the checkpoint directory, not the original world size or DeepSpeed: every rank's
``d2v_rankNNNNN.pt`` holds its fp32 partitions of the student (master weights) and the teacher, the
full shape of each parameter on its tensor-parallel rank and the dim it is split on. Partitions are
concatenated over data-parallel ranks (ZeRO-3 splits the flattened tensor in rank order and pads the
end), then over tensor-parallel ranks on the split dim; replicated parameters are taken from TP rank 0
and checked to agree across TP ranks.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

from pipeline.checkpoint import (COMPLETE, CheckpointError, atomic_torch_save, is_complete, read_complete,
                                 read_rank_file, repartition, saved_partitions, verify_rank_file)


class ExportError(RuntimeError):
    pass


def load_rank_files(ckpt: Path) -> dict[tuple[int, int], dict]:
    """{(tp_rank, dp_rank): rank state} for every rank file, checked to form a full TP x DP grid."""
    states = {}
    marker = read_complete(ckpt)
    for path in sorted(ckpt.glob("d2v_rank*.pt")):
        verify_rank_file(ckpt, marker, int(path.stem.removeprefix("d2v_rank")))
        state = read_rank_file(path)
        grid = state["grid"]
        states[(grid["tp_rank"], grid["dp_rank"])] = state
    if not states:
        raise ExportError(f"{ckpt} has no d2v_rank*.pt files: not a checkpoint of this pipeline")
    grid = next(iter(states.values()))["grid"]
    want = {(t, d) for t in range(grid["tp"]) for d in range(grid["dp"])}
    if set(states) != want:
        raise ExportError(f"{ckpt}: rank files for (tp_rank, dp_rank) {sorted(want - set(states))} are missing")
    return states


def unshard(parts: list[torch.Tensor], shape: list[int]) -> torch.Tensor:
    """ZeRO-3 partitions of one parameter (in data-parallel rank order) -> the tensor of ``shape``."""
    numel = math.prod(shape)
    held = sum(p.numel() for p in parts)
    if held < numel:
        raise ExportError(f"partitions hold {held} elements, the parameter needs {numel}")
    return repartition(parts, 0, numel, 0).reshape(shape)


def consolidate(states: dict[tuple[int, int], dict], kind: str) -> dict[str, torch.Tensor]:
    """One fp32 state dict of ``kind`` ('student', 'teacher' or a student optimizer moment such as
    'exp_avg') from every rank's partitions."""
    grid = next(iter(states.values()))["grid"]
    tp, parts = grid["tp"], saved_partitions(grid)
    of = "teacher" if kind == "teacher" else "student"
    layout = states[(0, 0)]["layout"][of]
    out = {}
    for name, info in layout.items():
        per_tp = [unshard([states[(t, d)]["partitions"][kind][name] for d in range(parts)],
                          states[(t, 0)]["layout"][of][name]["shape"]) for t in range(tp)]
        if info["partition_dim"] is None:
            for t in range(1, tp):
                if not torch.equal(per_tp[t], per_tp[0]):
                    raise ExportError(f"replicated parameter {name} differs between tensor-parallel ranks 0 and {t}")
            out[name] = per_tp[0]
        else:
            out[name] = torch.cat(per_tp, dim=info["partition_dim"])
    return out


def export(ckpt: Path, output: Path) -> dict:
    result = consolidated(ckpt)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(result, output)
    return result


def consolidated(ckpt: Path) -> dict:
    """``student`` and ``teacher`` fp32 state dicts of TP=1 models, ``config`` and ``step``, in memory."""
    ckpt = Path(ckpt)
    if not is_complete(ckpt):
        raise ExportError(f"{ckpt} is not a complete checkpoint (no {COMPLETE} marker)")
    states = load_rank_files(ckpt)
    config_path = ckpt / "config.json"
    result = {"student": consolidate(states, "student"), "teacher": consolidate(states, "teacher"),
              "config": json.loads(config_path.read_text("utf-8")) if config_path.is_file() else None,
              "step": next(iter(states.values()))["step"]}
    from pipeline.vocab import IDENTITY_FILE, read_identity_file
    if (ckpt / IDENTITY_FILE).is_file():  # a text run's tokenizer: init.from / embed of the .pt compare it
        result["tokenizer"] = read_identity_file(ckpt / IDENTITY_FILE).to_dict()
    return result


def backbone_state(result: dict, weights: str) -> dict[str, torch.Tensor]:
    """The consolidated student's backbone (head dropped) or the teacher, under backbone parameter names."""
    if weights == "teacher":
        return dict(result["teacher"])
    prefix = "backbone."
    return {k[len(prefix):]: v for k, v in result["student"].items() if k.startswith(prefix)}


def export_hf(ckpt: Path, output: Path, weights: str = "student", spm_model: Path | None = None) -> dict:
    """Write ``output`` as a transformers directory (model, config, preprocessor / tokenizer)."""
    from pipeline import hf
    from pipeline.experiment import build_experiment
    if importlib.util.find_spec("transformers") is None:
        raise ExportError("--format hf needs transformers: pip install -e '.[hf]'")
    result = consolidated(ckpt)
    if result["config"] is None:
        raise ExportError(f"{ckpt} has no config.json: cannot tell the model's architecture")
    cfg = build_experiment(result["config"])
    if cfg.modality == "text":  # the checkpoint's own copy of its tokenizer, or one that matches its record
        from pipeline.vocab import model_for
        spm_model = model_for(cfg, ckpt, spm_model and str(spm_model))
        if spm_model is None:
            raise ExportError(f"{ckpt} carries no sentencepiece model and none is next to data.manifest="
                              f"{cfg.data.manifest}: pass --spm-model PATH (the spm.model data_prep.text wrote with "
                              f"the shards)")
    output.mkdir(parents=True, exist_ok=True)
    hf.save_hf(cfg, backbone_state(result, weights), output, spm_model)
    from pipeline.features import OUR_CONFIG  # our config too: pipeline.embed / evaluate read the directory
    (output / OUR_CONFIG).write_text(json.dumps(result["config"], indent=1), encoding="utf-8")
    return {**result, "cfg": cfg}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/x/checkpoints/step_00001000")
    parser.add_argument("--output", "-o", required=True,
                        help="--format pt: the .pt file to write; --format hf: the directory to write")
    parser.add_argument("--format", choices=("pt", "hf"), default="pt",
                        help="'hf': a transformers directory (AutoModel + preprocessor); 'pt': one consolidated "
                             "state dict of student and teacher (default: %(default)s)")
    parser.add_argument("--weights", choices=("student", "teacher"), default="student",
                        help="--format hf: export the student (default; what the data2vec releases fine-tune "
                             "from) or the EMA teacher")
    parser.add_argument("--spm-model", type=Path, default=None,
                        help="--format hf, text: the sentencepiece model to ship (default: the checkpoint's own "
                             "copy, else spm.model next to the run's data.manifest); refused unless it is the "
                             "tokenizer the checkpoint records")
    args = parser.parse_args(argv)
    try:
        if args.format == "hf":
            result = export_hf(Path(args.checkpoint), Path(args.output), args.weights, args.spm_model)
            from pipeline.hf import HF_MODEL_CLASS
            print(f"wrote {args.output}: transformers {HF_MODEL_CLASS[result['cfg'].modality]} ({args.weights} "
                  f"weights, step {result['step']}) with its preprocessor; load it with "
                  f"transformers.AutoModel.from_pretrained({str(args.output)!r})")
            return 0
        result = export(Path(args.checkpoint), Path(args.output))
    except (ExportError, CheckpointError, OSError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = sum(t.numel() for t in result["student"].values())
    print(f"wrote {args.output}: student {len(result['student'])} tensors ({n / 1e6:.2f}M parameters), "
          f"teacher {len(result['teacher'])} tensors, step {result['step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
