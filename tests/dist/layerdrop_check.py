"""Run under torchrun (2 CPU ranks): layerdrop under ZeRO-3 gives the gradient of plain PyTorch.

vision_tiny with encoder.layerdrop=0.5 and 2 micro-batches per step. At every step boundary the
gathered ZeRO-3 gradient of each student parameter is compared with a dense single-process model
holding the same (gathered) student and teacher weights, run on the whole global batch with the same
skipped blocks: (1/accum) * sum over micro-batches of d(loss_sum / global masked count). Blocks skipped
in both micro-batches must get exactly zero (ZeRO-3 would otherwise reuse the previous step's
gradient). Also counts, from the third step on, how often ZeRO-3 drops its prefetch trace and how many elements
the student gathers again in its backward: with layerdrop changing the blocks every micro-step, both must stay 0
(parameters are released after the forward unless the trace is complete: persistence threshold 0 here).
argv[2:]: more config overrides (e.g. train.activation_checkpointing=true). Writes a JSON report (rank 0) to argv[1].
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from dp_equivalence import GLOBAL_BATCH, global_batches
from ema_check import gathered
from pipeline.distributed import choose_device, init_runtime, load_ds_config, model_parallel_config, shutdown
from pipeline.experiment import load_experiment
from pipeline.model.data2vec import Backbone, Student
from pipeline.objective import regression_loss, teacher_targets
from pipeline.trainer import Trainer

STEPS, ACCUM = 4, 2
COUNTS = {"invalidations": 0, "backward_gathered": 0}


def count_prefetch_losses() -> None:
    """Count DeepSpeed's trace invalidations and the elements its coordinator all-gathers in a backward."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coordinator
    invalidate, gather = Coordinator._invalidate_trace, Coordinator._PartitionedParameterCoordinator__all_gather_params

    def counted_invalidate(self):
        COUNTS["invalidations"] += 1
        return invalidate(self)

    def counted_gather(self, params, forward):
        if not forward:
            COUNTS["backward_gathered"] += sum(p.ds_numel for p in params)
        return gather(self, params, forward)
    Coordinator._invalidate_trace = counted_invalidate
    Coordinator._PartitionedParameterCoordinator__all_gather_params = counted_gather


def dense_copy(cls, modality, cfg, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    module = cls(modality, cfg.encoder, model_parallel_config(1))
    module.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    return module


def dense_gradient(cfg, trainer, micro_batches, skips) -> dict[str, torch.Tensor]:
    """The reference: plain PyTorch, whole global batch, no sharding."""
    student = dense_copy(Student, trainer.modality, cfg, gathered(trainer.engine.module))
    teacher = dense_copy(Backbone, trainer.modality, cfg, gathered(trainer.teacher.module)).eval()
    student.train()
    for (images, masks), skip in zip(micro_batches, skips):
        with torch.no_grad():
            targets = teacher_targets(teacher({"image": images}, keep=cfg.objective.top_k), cfg.objective)[masks]
        prediction = student({"image": images}, masks, skip)
        loss = regression_loss(prediction, targets, cfg.objective) / masks.sum() / len(micro_batches)
        loss.backward()
    return {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in student.named_parameters()}


def main() -> None:
    cfg = load_experiment("configs/vision_tiny.yaml", [
        "train.warmup_steps=0", "train.lr=0.005", "train.schedule=constant", "train.output_dir=/unused",
        f"train.grad_accum={ACCUM}", "encoder.layerdrop=0.5", "encoder.dropout=0", "encoder.drop_path=0",
        *sys.argv[2:]])
    rt = init_runtime(1, choose_device("fp32"))
    micro = GLOBAL_BATCH // rt.dp
    cfg.train.micro_batch_size = micro
    ds = load_ds_config(cfg.train.ds_config)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    count_prefetch_losses()
    trainer = Trainer(cfg, rt, ds, [])
    lo = rt.dp_rank * micro
    batches = global_batches(cfg, STEPS * ACCUM)
    report = {"steps": []}
    for step in range(STEPS):
        if step == 2:  # the trace is recorded in the first two forward + backward passes
            COUNTS.update(invalidations=0, backward_gathered=0)
        micro_batches, skips = [next(batches) for _ in range(ACCUM)], []
        reference = None
        for trainer.micro, (images, masks) in enumerate(micro_batches):
            skips.append(trainer.layers_to_drop())
            if trainer.micro == ACCUM - 1:  # weights before this step's update
                reference = dense_gradient(cfg, trainer, micro_batches, skips)
            trainer.micro_step({"image": images[lo:lo + micro], "mask": masks[lo:lo + micro]})
            if trainer.micro < ACCUM - 1:
                trainer.engine.step()  # not a boundary: DeepSpeed only counts the micro-step
        errors, zero_blocks = {}, set()
        for name, p in trainer.engine.module.named_parameters():
            got = safe_get_full_grad(p).double()
            want = reference[name].double()
            errors[name] = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
            block = name.split(".")[3] if name.startswith("backbone.encoder.blocks.") else None
            if block is not None and all(int(block) in s for s in skips):
                zero_blocks.add(int(block))
                errors[name] = max(errors[name], got.abs().max().item())  # must be exactly zero
        trainer.engine.step()
        trainer.ema.update(0.9)
        trainer.step += 1
        report["steps"].append({"skips": [list(s) for s in skips], "max_rel_err": max(errors.values()),
                                "worst": max(errors, key=errors.get), "skipped_all_step": sorted(zero_blocks)})
    report.update(COUNTS)
    if rt.rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(report, f)
    dist.barrier()
    shutdown()


if __name__ == "__main__":
    main()
