"""Run under torchrun (2+ CPU ranks): train a few steps and check the sharded EMA teacher.

Writes a JSON report (rank 0) to the path given as argv[1]; argv[2] the preset, argv[3] the manifest, argv[4]
(optional) "bf16": the student computes in bf16 on the CPU as on a GPU. Checked: every teacher partition has
ceil(N / DP) elements (+ padding); the EMA state equals a dense EMA of the student's fp32 weights computed step by
step here (fp32: the teacher's partitions themselves, gathered; bf16: the EMA's own fp32 partitions, while the
teacher's bf16 partitions must hold exactly their rounding); and the well-known broken recipe (editing inside
GatheredParameters without modifier_rank) would have been caught.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import torch
import torch.distributed as dist

from pipeline.data import make_loader, resolve_shards
from pipeline.distributed import choose_device, init_runtime, load_ds_config, shutdown
from pipeline.experiment import load_experiment
from pipeline.trainer import Trainer


def gathered(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    import deepspeed
    out = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.detach().clone().double()
    return out


def masters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The student's fp32 master weights, whole."""
    from deepspeed.utils import safe_get_full_fp32_param
    return {name: safe_get_full_fp32_param(p).double() for name, p in module.named_parameters()}


def ema_state(ema, dp_group) -> dict[str, torch.Tensor]:
    """The EMA's fp32 partitions, all-gathered over the data-parallel ranks into whole tensors."""
    out = {}
    for name, part, t in zip(ema.names, ema.teacher_parts, ema.module.parameters()):
        parts = [torch.empty_like(part) for _ in range(dist.get_world_size(dp_group))]
        dist.all_gather(parts, part, group=dp_group)
        out[name] = torch.cat(parts)[:t.ds_numel].view(t.ds_shape).double()
    return out


def main() -> None:
    report_path, preset, manifest = sys.argv[1], sys.argv[2], sys.argv[3]
    bf16 = sys.argv[4:] == ["bf16"]
    steps, tau0, tau_end, anneal = 5, 0.5, 0.9, 3
    cfg = load_experiment(preset, [
        f"data.manifest={manifest}", "data.workers=1", "train.micro_batch_size=4", "train.lr=0.01",
        "train.warmup_steps=0", f"ema.tau0={tau0}", f"ema.tau_end={tau_end}", f"ema.anneal_steps={anneal}",
        "train.output_dir=/nonexistent-not-used"])
    choice = choose_device("fp32")
    rt = init_runtime(1, dataclasses.replace(choice, dtype=torch.bfloat16) if bf16 else choice)
    trainer = Trainer(cfg, rt, load_ds_config(cfg.train.ds_config), resolve_shards(manifest))
    trainer.batches = iter(make_loader(trainer.shards, trainer.modality, cfg.data, 4, 0, rt.dp_rank, rt.dp))

    teacher = trainer.teacher.module
    partitions = {}
    for name, p in teacher.named_parameters():
        partitions[name] = {"numel": p.ds_tensor.numel(), "full": p.ds_numel, "dtype": str(p.ds_tensor.dtype),
                            "ceil": math.ceil(p.ds_numel / rt.dp)}
    student = trainer.engine.module.backbone
    copied = [n for n, c in zip(trainer.ema.names, trainer.ema.copied) if c]
    weights = masters if bf16 else gathered
    state = (lambda: ema_state(trainer.ema, rt.dp_group)) if bf16 else (lambda: gathered(teacher))
    reference = weights(student)  # the teacher starts as a copy of the student
    start_teacher = state()
    init_err = max((start_teacher[k] - reference[k]).abs().max().item() for k in reference)
    for step in range(steps):
        trainer.optimizer_step()
        update = step + 1  # fairseq's num_updates: the EMA after the first update decays by tau(1)
        tau = tau0 + (tau_end - tau0) * update / anneal if update < anneal else tau_end
        current = weights(student)
        reference = {k: current[k] if k in copied else tau * reference[k] + (1 - tau) * current[k]
                     for k in reference}
    final_teacher = state()
    published_err = max((gathered(teacher)[k] - final_teacher[k].to(torch.bfloat16).double()).abs().max().item()
                        for k in reference) if bf16 else 0.0
    max_err = max((final_teacher[k] - reference[k]).abs().max().item() for k in reference)
    moved = max((final_teacher[k] - start_teacher[k]).abs().max().item() for k in reference)

    # The broken recipe: modify inside GatheredParameters without modifier_rank -> silently discarded.
    import deepspeed
    params, before_bad = list(teacher.parameters()), gathered(teacher)
    with deepspeed.zero.GatheredParameters(params):
        for p in params:
            p.data.mul_(0.0)
    after_bad = gathered(teacher)
    bad_recipe_changed = max((after_bad[k] - before_bad[k]).abs().max().item() for k in reference)
    if rt.rank == 0:
        with open(report_path, "w") as f:
            json.dump({"dp": rt.dp, "partitions": partitions, "max_err": max_err, "teacher_moved": moved,
                       "bad_recipe_changed": bad_recipe_changed, "init_err": init_err,
                       "published_err": published_err,
                       "copied": copied}, f)
    dist.barrier()
    shutdown()


if __name__ == "__main__":
    main()
