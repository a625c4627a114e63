"""Run under torchrun on GPU ranks: a few bf16 steps of vision_tiny (config overrides after the two paths);
reports dtypes, device and losses (rank 0)."""

from __future__ import annotations

import json
import sys

from pipeline.data import make_loader, resolve_shards
from pipeline.distributed import choose_device, init_runtime, load_ds_config, shutdown
from pipeline.experiment import load_experiment
from pipeline.metrics import summary_values
from pipeline.trainer import Trainer


def main() -> None:
    report, manifest, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    cfg = load_experiment("configs/vision_tiny.yaml", [f"data.manifest={manifest}", "train.output_dir=/tmp/unused",
                                                       "train.micro_batch_size=8", "data.workers=1", *overrides])
    choice = choose_device("auto")
    rt = init_runtime(1, choice)
    trainer = Trainer(cfg, rt, load_ds_config(cfg.train.ds_config), resolve_shards(manifest))
    trainer.batches = iter(make_loader(trainer.shards, trainer.modality, cfg.data, 8, 0, rt.dp_rank, rt.dp))
    start = [part.clone() for part in trainer.ema.teacher_parts]  # the EMA state (fp32, whatever the teacher runs in)
    losses = [summary_values(trainer.optimizer_step()["summary"])["loss"] for _ in range(30)]
    moved = max((part - s).abs().max().item() for part, s in zip(trainer.ema.teacher_parts, start))
    if rt.rank == 0:
        student_dtype = str(next(trainer.engine.module.parameters()).dtype)
        with open(report, "w") as f:
            json.dump({"device": str(rt.device), "backend": rt.choice.backend, "student_dtype": student_dtype,
                       "teacher_dtypes": sorted({str(p.dtype) for p in trainer.ema.teacher_parts}),
                       "teacher_autocast": trainer.teacher_autocast(),
                       "teacher_gathered_dtypes": sorted({str(p.ds_tensor.dtype)
                                                          for p in trainer.teacher.module.parameters()}),
                       "losses": losses[:3] + losses[-3:], "teacher_moved": moved}, f)
    shutdown()


if __name__ == "__main__":
    main()
