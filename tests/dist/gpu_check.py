"""Run under torchrun on GPU ranks: a few bf16 steps; reports dtypes, device and losses (rank 0)."""

from __future__ import annotations

import json
import sys

from pipeline.data import make_loader, resolve_shards
from pipeline.distributed import choose_device, init_runtime, load_ds_config, shutdown
from pipeline.experiment import load_experiment
from pipeline.metrics import summary_values
from pipeline.trainer import Trainer


def main() -> None:
    report, manifest = sys.argv[1], sys.argv[2]
    cfg = load_experiment("configs/vision_tiny.yaml", [f"data.manifest={manifest}", "train.output_dir=/tmp/unused",
                                                       "train.micro_batch_size=8", "data.workers=1"])
    choice = choose_device("auto")
    rt = init_runtime(1, choice)
    trainer = Trainer(cfg, rt, load_ds_config(cfg.train.ds_config), resolve_shards(manifest))
    trainer.batches = iter(make_loader(trainer.shards, trainer.modality, cfg.data, 8, 0, rt.dp_rank, rt.dp))
    start = {n: p.ds_tensor.detach().clone() for n, p in trainer.teacher.module.named_parameters()}
    losses = [summary_values(trainer.optimizer_step()["summary"])["loss"] for _ in range(30)]
    moved = max((p.ds_tensor - start[n]).abs().max().item() for n, p in trainer.teacher.module.named_parameters())
    if rt.rank == 0:
        student_dtype = str(next(trainer.engine.module.parameters()).dtype)
        teacher_dtypes = sorted({str(p.ds_tensor.dtype) for p in trainer.teacher.module.parameters()})
        with open(report, "w") as f:
            json.dump({"device": str(rt.device), "backend": rt.choice.backend, "student_dtype": student_dtype,
                       "teacher_dtypes": teacher_dtypes, "losses": losses[:3] + losses[-3:],
                       "teacher_moved": moved}, f)
    shutdown()


if __name__ == "__main__":
    main()
