"""Consolidate a TP x ZeRO-3 checkpoint into one fp32 state dict (student and teacher), on one machine.

    python -m pipeline.export runs/vit_l/checkpoints/step_00100000 --output vit_l_step100k.pt

Needs only the checkpoint directory, not the original world size or DeepSpeed: every rank's
``d2v_rankNNNNN.pt`` holds its fp32 partitions of the student (master weights) and the teacher, the
full shape of each parameter on its tensor-parallel rank and the dim it is split on. Partitions are
concatenated over data-parallel ranks (ZeRO-3 splits the flattened tensor in rank order and pads the
end), then over tensor-parallel ranks on the split dim; replicated parameters are taken from TP rank 0
and checked to agree across TP ranks. The output (``torch.save``; loads with ``weights_only=True``)
holds ``student``, ``teacher``, ``config`` and ``step``; the text vocabulary keeps its TP padding rows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from pipeline.checkpoint import (COMPLETE, CheckpointError, atomic_torch_save, is_complete, read_complete,
                                 read_rank_file, repartition, verify_rank_file)


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
    tp, dp = grid["tp"], grid["dp"]
    of = "teacher" if kind == "teacher" else "student"
    layout = states[(0, 0)]["layout"][of]
    out = {}
    for name, info in layout.items():
        per_tp = [unshard([states[(t, d)]["partitions"][kind][name] for d in range(dp)],
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
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/x/checkpoints/step_00001000")
    parser.add_argument("--output", "-o", required=True, help="where to write the consolidated .pt file")
    args = parser.parse_args(argv)
    try:
        result = export(Path(args.checkpoint), Path(args.output))
    except (ExportError, CheckpointError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = sum(t.numel() for t in result["student"].values())
    print(f"wrote {args.output}: student {len(result['student'])} tensors ({n / 1e6:.2f}M parameters), "
          f"teacher {len(result['teacher'])} tensors, step {result['step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
