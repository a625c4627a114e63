"""Run under torchrun (CPU gloo ranks): measure what ZeRO-3 really holds per rank, for pipeline.plan.

usage: memory_check.py REPORT.json PRESET TP [ZERO_OVERRIDES_JSON]

Builds ``pipeline.trainer.Trainer`` (student ZeRO-3 engine with the torch AdamW client optimizer, fp32 ZeRO-3 teacher
gathered by pipeline.gather, ShardedEMA) on synthetic batches (no shards), runs two optimizer steps (the first records
DeepSpeed's module trace, the second uses it) and writes, per rank, the element counts the planner predicts: student
``ds_tensor`` partitions, the optimizer's fp32 master partitions (``safe_get_local_fp32_param`` per parameter, and the
flat sub-groups), the Adam ``exp_avg`` / ``exp_avg_sq`` state, the gradient partition buffer, the teacher
``ds_tensor`` partitions, the persistent parameters, and the student parameters still gathered (available or in
flight) when the second forward ends.
ZERO_OVERRIDES_JSON (optional) is merged into the DeepSpeed JSON's ``zero_optimization`` section.
"""

from __future__ import annotations

import itertools
import json
import sys

import torch.distributed as dist

from bench.bench_train_vision import synthetic_batch

from pipeline.distributed import choose_device, init_runtime, load_ds_config, shutdown
from pipeline.experiment import load_experiment
from pipeline.trainer import Trainer

MICRO = 2


def main() -> None:
    report_path, preset, tp = sys.argv[1], sys.argv[2], int(sys.argv[3])
    zero_overrides = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    cfg = load_experiment(preset, [f"parallel.tp={tp}", f"train.micro_batch_size={MICRO}", "train.grad_accum=1",
                                   "train.warmup_steps=0", "train.output_dir=/nonexistent-not-used"])
    require_vision = cfg.modality == "vision"
    assert require_vision, "memory_check feeds synthetic vision batches"
    rt = init_runtime(tp, choose_device("fp32"))
    ds_base = load_ds_config(cfg.train.ds_config)
    ds_base.setdefault("zero_optimization", {}).update(zero_overrides)
    trainer = Trainer(cfg, rt, ds_base, ["unused"])  # shards are never read: batches are fed here
    trainer.batches = itertools.repeat(synthetic_batch(cfg))  # micro batch MICRO (set in the config)

    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.utils import safe_get_local_fp32_param

    student = trainer.engine.module
    kept = []

    def after_forward(_module, _inputs, _output):
        kept.append(sum(p.ds_numel for p in student.parameters() if p.ds_status != ZeroParamStatus.NOT_AVAILABLE))

    hook = student.register_forward_hook(after_forward)
    trainer.optimizer_step()
    trainer.optimizer_step()
    hook.remove()

    zero_opt = trainer.engine.optimizer  # DeepSpeedZeroOptimizer_Stage3
    adam = zero_opt.optimizer  # the torch AdamW client optimizer, on the flat fp32 partitions
    adam_state = sum(t.numel() for st in adam.state.values() for k, t in st.items()
                     if k in ("exp_avg", "exp_avg_sq"))
    teacher = trainer.teacher.module
    grads = zero_opt.grad_partitions_flat_buffer  # the ZeRO-3 gradient partitions, one flat buffer
    out = {
        "rank": rt.rank, "tp": rt.tp, "dp": rt.dp, "tp_rank": rt.tp_rank, "dp_rank": rt.dp_rank,
        "zero_overrides": zero_overrides,
        "student_tp_numel": sum(p.ds_numel for p in student.parameters()),
        "student_partition": sum(p.ds_tensor.numel() for p in student.parameters()),
        "student_partition_dtype": str(next(student.parameters()).ds_tensor.dtype),
        "fp32_master": sum(safe_get_local_fp32_param(p).numel() for p in student.parameters()),
        "fp32_flat_groups": sum(t.numel() for t in zero_opt.fp32_partitioned_groups_flat),
        "adam_state": adam_state,
        "grad_partition_buffer": grads.numel(),
        "teacher_tp_numel": sum(p.ds_numel for p in teacher.parameters()),
        "teacher_partition": sum(p.ds_tensor.numel() for p in teacher.parameters()),
        "teacher_partition_dtype": str(next(teacher.parameters()).ds_tensor.dtype),
        "ema_state_numel": trainer.ema.state_numel(),
        "persistent": sum(p.ds_numel for p in student.parameters() if p.ds_persist),
        "teacher_persistent": sum(p.ds_numel for p in teacher.parameters() if p.ds_persist),
        "kept_after_forward": kept,
        "bytes": {  # what these tensors occupy (CPU ranks compute in fp32)
            "student_params": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in student.parameters()),
            "gradients": grads.numel() * grads.element_size(),
            "optimizer": sum(t.numel() * t.element_size() for t in zero_opt.fp32_partitioned_groups_flat)
            + sum(t.numel() * t.element_size() for st in adam.state.values() for k, t in st.items()
                  if k in ("exp_avg", "exp_avg_sq")),
            "teacher": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in teacher.parameters()),
        },
        "params": len(list(student.parameters())), "teacher_params": len(list(teacher.parameters())),
    }
    gathered = [None] * rt.world_size
    dist.all_gather_object(gathered, out)
    if rt.rank == 0:
        with open(report_path, "w") as f:
            json.dump({"world_size": rt.world_size, "ranks": gathered}, f, indent=1)
    dist.barrier()
    shutdown()


if __name__ == "__main__":
    main()
