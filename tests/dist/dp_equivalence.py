"""Run under torchrun: train on a fixed global batch split across data-parallel ranks and write the
per-step losses and gradient norms (rank 0) to OUT as JSON.

The same global batch must give the same losses whatever the layout (the loss is normalised by the
global masked count, the gradient of the global loss is what the optimizer sees, and tensor
parallelism only changes the summation order). With --ckpt DIR it also checks checkpoints across
layouts: --save-at K writes a checkpoint into DIR after step K and trains on; --resume resumes from
the latest checkpoint in DIR (any data-parallel size), writes it again at once under DIR/resaved (so
the test can compare the two bit for bit) and trains on from the saved step. --shard S: hybrid sharding
(parallel.shard); a variant with "plain": true runs plain ZeRO-3 over every data-parallel rank in the same launch.
An init.from override starts the run from those weights (Trainer.warm_start). Every run checks at the start and at each
train.check_consistency_every that replicas and tensor-parallel peers hold equal copies (pipeline.consistency).
--config picks the preset
(configs/vision_tiny_v2.yaml: data2vec 2.0, whose M clones per image mask with inverse blocks). --variants JSON
runs several configurations one after the other in the same processes (imports and process start are most of a
launch's time): a list of {"config": preset, "overrides": [...]} added to the command line's; OUT then holds one
list per variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path

import torch

from pipeline.consistency import check_due
from pipeline.distributed import MegatronMPU, choose_device, init_runtime, load_ds_config, shutdown
from pipeline.experiment import load_experiment
from pipeline.metrics import summary_values
from pipeline.modalities.vision import block_mask, inverse_block_mask
from pipeline.trainer import Trainer

GLOBAL_BATCH = 8


def global_batches(cfg, steps: int):
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    m = cfg.model
    for _ in range(steps):
        images = torch.randn(GLOBAL_BATCH, 3, m.image_size, m.image_size, generator=gen)
        if m.clone_batch > 1:  # data2vec 2.0: M inverse-block clones per image, rows b x M .. b x M + M - 1
            masks = torch.stack([inverse_block_mask(m.grid, m.mask_ratio, m.keep_block, m.keep_adjust, rng)
                                 for _ in range(GLOBAL_BATCH * m.clone_batch)])
        else:  # unequal masked counts per sample across the global batch exercise the global normaliser
            masks = torch.stack([block_mask(m.grid, m.num_masked - 6 * (i % 3), 2, m.min_aspect, rng)
                                 for i in range(GLOBAL_BATCH)])
        yield images, masks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("tp", type=int, nargs="?", default=1)
    parser.add_argument("--steps", type=int, default=4, help="train up to this step")
    parser.add_argument("--ckpt", help="checkpoint root")
    parser.add_argument("--save-at", type=int, default=0, help="save a checkpoint after this step")
    parser.add_argument("--resume", action="store_true", help="resume from the latest checkpoint in --ckpt")
    parser.add_argument("--config", default="configs/vision_tiny.yaml", help="a vision preset")
    parser.add_argument("--variants", help="JSON list of {config, overrides} run in turn (see the docstring)")
    parser.add_argument("--shard", type=int, default=0, help="parallel.shard (hybrid sharding)")
    parser.add_argument("overrides", nargs="*", default=[])
    args = parser.parse_intermixed_args()
    rt = init_runtime(args.tp, choose_device("fp32"), shard=args.shard)
    plain = dataclasses.replace(rt, shard=rt.dp, shard_rank=rt.dp_rank, shard_group=rt.dp_group, replica_group=None,
                                mpu=MegatronMPU())
    variants = json.loads(args.variants) if args.variants else [{}]
    results = [run(args, plain if v.get("plain") else rt, v.get("config", args.config),
                   [*args.overrides, *v.get("overrides", [])]) for v in variants]
    if rt.rank == 0:
        with open(args.out, "w") as f:
            json.dump(results if args.variants else results[0], f)
    shutdown()


def run(args, rt, config: str, overrides: list[str]) -> list[float]:
    """Train one configuration: (loss, gradient norm) per step."""
    cfg = load_experiment(config, [
        "train.warmup_steps=0", "train.lr=0.005", "train.schedule=constant", "train.output_dir=/unused",
        f"parallel.tp={args.tp}", f"train.steps={args.steps}", *overrides])
    micro = GLOBAL_BATCH // rt.dp
    cfg.train.micro_batch_size = micro
    trainer = Trainer(cfg, rt, load_ds_config(cfg.train.ds_config), [])
    if args.resume:
        trainer.ckpt_root = Path(args.ckpt)
        trainer.resume(None)
        trainer.ckpt_root = Path(args.ckpt) / "resaved"
        trainer.save()
    if cfg.init.from_:
        trainer.warm_start()
    check_due(trainer, start=True)  # train.check_consistency_every: replicas and TP peers hold equal copies
    lo = rt.dp_rank * micro
    batches = global_batches(cfg, args.steps)
    for _ in range(trainer.step):
        next(batches)
    m = cfg.model.clone_batch
    trainer.batches = ({"image": images[lo:lo + micro], "mask": masks[lo * m:(lo + micro) * m]}
                       for images, masks in batches)
    losses = []
    while trainer.step < args.steps:
        losses.append(summary_values(trainer.optimizer_step()["summary"])["loss"])
        losses.append(float(trainer.engine.get_global_grad_norm()))  # sensitive to the gradient scale
        check_due(trainer)
        if trainer.step == args.save_at:
            trainer.ckpt_root = Path(args.ckpt)
            trainer.save()
    return losses


if __name__ == "__main__":
    main()
