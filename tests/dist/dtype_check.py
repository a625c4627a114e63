"""Run under torchrun (2 CPU ranks): which dtypes the sharded student and teacher get, on either kind of CPU.

For each forced answer of DeepSpeed's ``is_fp16_supported`` (True: oneDNN has fp16; None: it has not),
builds the vision_tiny student from an fp32 and from a bf16 DeepSpeed config (bf16 is what a GPU run
uses) and the teacher from its fp32 config, all through ``build_sharded`` as the trainer does, and
records every partition's dtype. Also records what ``zero.Init(dtype=torch.float32)``, the call the
trainer used to make, builds: the DeepSpeed behaviour the fix avoids. Writes a JSON report (rank 0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the forced-machine helpers

from machine import force_cpu_fp16  # noqa: E402
from pipeline.distributed import (build_sharded, choose_device, init_runtime, load_ds_config,  # noqa: E402
                                  model_parallel_config, shutdown, student_ds_config, teacher_ds_config)
from pipeline.experiment import load_experiment  # noqa: E402
from pipeline.model.data2vec import Backbone, Student  # noqa: E402


def dtypes(module: torch.nn.Module) -> list[str]:
    return sorted({str(p.ds_tensor.dtype) for p in module.parameters()})


def main() -> None:
    import deepspeed
    report_path = sys.argv[1]
    cfg = load_experiment("configs/vision_tiny.yaml", ["data.manifest=unused"])
    rt = init_runtime(1, choose_device("fp32"))
    modality, mp = cfg.make_modality(), model_parallel_config(1)
    base = load_ds_config(cfg.train.ds_config)
    report = {}
    for kind, supported in (("cpu-fp16", True), ("cpu-no-fp16", False)):
        force_cpu_fp16(supported)
        row = {}
        for compute in (torch.float32, torch.bfloat16):
            student_cfg = student_ds_config(base, 4, 1, rt.dp, compute)
            student = build_sharded(lambda: Student(modality, cfg.encoder, mp), student_cfg, rt)
            teacher = build_sharded(lambda: Backbone(modality, cfg.encoder, mp), teacher_ds_config(student_cfg), rt)
            half = build_sharded(lambda: Backbone(modality, cfg.encoder, mp), teacher_ds_config(student_cfg, True), rt)
            row[str(compute)] = {"student": dtypes(student), "teacher": dtypes(teacher),
                                 "autocast teacher": dtypes(half)}
        with deepspeed.zero.Init(config_dict_or_path=teacher_ds_config(student_ds_config(base, 4, 1, rt.dp, torch.float32)),
                                 data_parallel_group=rt.dp_group, dtype=torch.float32, mpu=rt.mpu):
            old_call = Backbone(modality, cfg.encoder, mp)
        row["old_call_dtype_float32"] = dtypes(old_call)
        report[kind] = row
    if rt.rank == 0:
        Path(report_path).write_text(json.dumps(report, indent=1), encoding="utf-8")
    dist.barrier()
    shutdown()


if __name__ == "__main__":
    main()
