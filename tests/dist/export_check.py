"""Run under torchrun: train a few steps with the given TP size, save a checkpoint, and (rank 0) write a
fixed batch with the live TP x ZeRO-3 teacher's targets and the student's predictions on it, so a test
can check that consolidated weights loaded into a TP=1 model give the same outputs.

argv: output_dir preset manifest tp
"""

from __future__ import annotations

import sys

import torch

from pipeline.data import STREAM_KEY, make_loader, resolve_shards, to_device
from pipeline.distributed import choose_device, init_runtime, load_ds_config, shutdown
from pipeline.experiment import load_experiment
from pipeline.objective import teacher_targets
from pipeline.trainer import Trainer


def main() -> None:
    out, preset, manifest, tp = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    cfg = load_experiment(preset, [f"data.manifest={manifest}", f"train.output_dir={out}", f"parallel.tp={tp}",
                                   "train.micro_batch_size=4", "data.workers=1", "train.warmup_steps=0"])
    rt = init_runtime(tp, choose_device("fp32"))
    trainer = Trainer(cfg, rt, load_ds_config(cfg.train.ds_config), resolve_shards(manifest))
    trainer.batches = iter(make_loader(trainer.shards, trainer.modality, cfg.data, 4, 0, rt.dp_rank, rt.dp))
    for _ in range(3):
        trainer.optimizer_step()
    ckpt = trainer.save()
    outputs = outputs_on(trainer, next(trainer.batches))
    if rt.rank == 0:
        torch.save({**outputs, "ckpt": str(ckpt)}, f"{out}/outputs.pt")
    shutdown()


def outputs_on(trainer, raw_batch: dict) -> dict:
    """The live TP x ZeRO-3 teacher's targets and student's predictions on one batch (eval mode)."""
    rt = trainer.rt
    batch = to_device(raw_batch, rt.device, rt.choice.dtype)
    mask = batch.pop("mask")
    batch.pop(STREAM_KEY)
    trainer.engine.eval()
    with torch.no_grad():
        targets = teacher_targets(trainer.teacher(batch), trainer.cfg.objective)
        predictions = trainer.engine(batch, mask)
    return {"batch": batch, "mask": mask, "targets": targets, "predictions": predictions}


if __name__ == "__main__":
    main()
