"""Run under torchrun: train on a fixed global batch split across data-parallel ranks and write the
per-step losses and gradient norms (rank 0) to argv[1]; argv[2] is the tensor-parallel size (default 1).
The same global batch must give the same losses whatever the layout (the loss is normalised by the
global masked count, the gradient of the global loss is what the optimizer sees, and tensor
parallelism only changes the summation order)."""

from __future__ import annotations

import json
import random
import sys

import torch

from pipeline.distributed import choose_device, init_runtime, load_ds_config, shutdown
from pipeline.experiment import load_experiment
from pipeline.modalities.vision import block_mask
from pipeline.trainer import Trainer

GLOBAL_BATCH, STEPS = 8, 4


def global_batches(cfg):
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    m = cfg.model
    for _ in range(STEPS):
        images = torch.randn(GLOBAL_BATCH, 3, m.image_size, m.image_size, generator=gen)
        # unequal masked counts per sample across the global batch exercise the global normaliser
        masks = torch.stack([block_mask(m.grid, m.num_masked - 6 * (i % 3), 2, m.min_aspect, rng)
                             for i in range(GLOBAL_BATCH)])
        yield images, masks


def main() -> None:
    out = sys.argv[1]
    tp = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    cfg = load_experiment("configs/vision_tiny.yaml", [
        "train.warmup_steps=0", "train.lr=0.005", "train.schedule=constant", "train.output_dir=/unused",
        f"parallel.tp={tp}"])
    rt = init_runtime(tp, choose_device("fp32"))
    micro = GLOBAL_BATCH // rt.dp
    cfg.train.micro_batch_size = micro
    trainer = Trainer(cfg, rt, load_ds_config(cfg.train.ds_config), [])
    lo = rt.dp_rank * micro
    trainer.batches = ({"image": images[lo:lo + micro], "mask": masks[lo:lo + micro]}
                       for images, masks in global_batches(cfg))
    losses = []
    for _ in range(STEPS):
        losses.append(trainer.optimizer_step()["loss"])
        losses.append(float(trainer.engine.get_global_grad_norm()))  # sensitive to the gradient scale
    if rt.rank == 0:
        with open(out, "w") as f:
            json.dump(losses, f)
    shutdown()


if __name__ == "__main__":
    main()
