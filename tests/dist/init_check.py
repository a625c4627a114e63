"""Run under torchrun: every shipped preset's student and teacher, built under zero.Init as the trainer
builds them, must start from the initialisation a plain build (no DeepSpeed) gives.

argv: REPORT_DIR TP [TP1_REFERENCE]. For each configs/*.yaml (tiny presets at their size; the others with
depth and width scaled down, their init rules unchanged), with the same seed:
- a plain build: Student then Backbone, megatron-core layers at this TP, no DeepSpeed;
- the trainer's build: ``build_sharded`` (deepspeed.zero.Init over the data-parallel group);
then every parameter's gathered (mean, std, min, max) and whether the values are identical.
Each rank writes ``REPORT_DIR/rankN.json``. With TP > 1 and a TP1_REFERENCE file (written by the TP 1
run: ``<REPORT_DIR>/tp1_vision.pt``), the plain build's TP slices are all-gathered and compared with the
TP 1 weights: megatron's CPU initialisation draws the full weight and slices it.
"""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.distributed import (build_sharded, choose_device, init_runtime, load_ds_config, model_parallel_config,
                                  shutdown, student_ds_config, teacher_ds_config)
from pipeline.experiment import load_experiment
from pipeline.model.data2vec import Backbone

SEED = 1234


def scaled_overrides(preset: str) -> list[str]:
    """Tiny presets as they are; larger ones at depth 3, width 64 (4 heads), their init rules unchanged."""
    cfg = load_experiment(preset, ["data.manifest=unused"])
    if "tiny" in Path(preset).stem:
        return []
    depth = 3
    return [f"encoder.depth={depth}", "encoder.dim=64", "encoder.heads=4", "encoder.ffn_dim=128",
            f"objective.top_k={min(cfg.objective.top_k, depth)}"]


def stats(t: torch.Tensor) -> list[float]:
    t = t.detach().double().flatten()
    return [t.mean().item(), t.std().item() if t.numel() > 1 else 0.0, t.min().item(), t.max().item()]


def plain_build(cfg, mp) -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(SEED)
    modality = cfg.make_modality()
    student = cfg.make_method(modality).build_student(mp)
    teacher = Backbone(modality, cfg.encoder, mp)
    return {"student": {n: p.detach().clone() for n, p in student.named_parameters()},
            "teacher": {n: p.detach().clone() for n, p in teacher.named_parameters()},
            "modules": (student, teacher)}


def sharded_build(cfg, mp, rt) -> dict[str, dict[str, torch.Tensor]]:
    import deepspeed
    ds_student = student_ds_config(load_ds_config(cfg.train.ds_config), 1, 1, rt.dp, torch.float32)
    torch.manual_seed(SEED)
    modality = cfg.make_modality()
    student = build_sharded(lambda: cfg.make_method(modality).build_student(mp), ds_student, rt)
    teacher = build_sharded(lambda: Backbone(modality, cfg.encoder, mp), teacher_ds_config(ds_student), rt)
    out = {}
    for role, module in (("student", student), ("teacher", teacher)):
        out[role] = {}
        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                out[role][name] = p.detach().clone()
    return out


def compare(plain: dict, sharded: dict) -> dict:
    rows = {}
    for role in ("student", "teacher"):
        for name, ref in plain[role].items():
            got = sharded[role][name]
            rows[f"{role}.{name}"] = {"plain": stats(ref), "zero": stats(got), "shape": list(got.shape),
                                      "identical": bool(ref.shape == got.shape and torch.equal(ref, got))}
    return rows


def tp_gathered(module: torch.nn.Module, group) -> dict[str, torch.Tensor]:
    """Full weights from this TP rank's slices (megatron marks split parameters with partition_dim)."""
    out = {}
    world = dist.get_world_size(group)
    for name, p in module.named_parameters():
        if getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(p) for _ in range(world)]
            dist.all_gather(parts, p.detach().contiguous(), group=group)
            out[name] = torch.cat(parts, dim=p.partition_dim)
        else:
            out[name] = p.detach().clone()
    return out


def main() -> None:
    from megatron.core import parallel_state as ps
    report_dir, tp = Path(sys.argv[1]), int(sys.argv[2])
    reference = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    rt = init_runtime(tp, choose_device("fp32"))
    mp = model_parallel_config(tp)
    report = {"tp": tp, "dp": rt.dp, "presets": {}}
    for preset in sorted(glob.glob("configs/*.yaml")):
        cfg = load_experiment(preset, ["data.manifest=unused", f"parallel.tp={tp}", *scaled_overrides(preset)])
        plain = plain_build(cfg, mp)
        report["presets"][preset] = compare(plain, sharded_build(cfg, mp, rt))
        if Path(preset).stem == "vision_tiny":
            student = plain["modules"][0]
            if tp == 1 and rt.rank == 0:
                torch.save({n: p.detach().clone() for n, p in student.named_parameters()}, report_dir / "tp1_vision.pt")
            if tp > 1 and reference is not None:
                full = tp_gathered(student, ps.get_tensor_model_parallel_group())
                ref = torch.load(reference, weights_only=True)
                report["tp_vs_tp1"] = {n: bool(torch.equal(full[n], ref[n])) for n in ref}
    (report_dir / f"rank{rt.rank}.json").write_text(json.dumps(report), encoding="utf-8")
    dist.barrier()
    shutdown()


if __name__ == "__main__":
    main()
