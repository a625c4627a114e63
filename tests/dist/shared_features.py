"""Run under torchrun (1 rank): speech steps with the teacher sharing the student's conv features (as the presets
configure it) against the same steps with the teacher running its own copy (once with that copy spoiled); writes
each run's per-step losses, target stds and gradient norms, and whether sharing was on, to OUT (JSON)."""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(cfg, rt, batch, share: bool, spoil: bool = False) -> dict:
    """3 steps; ``spoil``: the teacher's own copy of the conv encoder is overwritten with noise first (the EMA
    copies the student's back after the first step), so a teacher that used it would give other targets."""
    import torch
    from pipeline.distributed import load_ds_config
    from pipeline.metrics import summary_values
    from pipeline.trainer import Trainer
    trainer = Trainer(cfg, rt, load_ds_config(cfg.train.ds_config), ["unused"])
    shared = trainer.share_features
    trainer.share_features = share
    trainer.batches = itertools.repeat(batch)
    if spoil:
        gen = torch.Generator().manual_seed(1)  # not the global RNG, which dropout draws from
        with torch.no_grad():
            for name, p in trainer.teacher.module.named_parameters():
                if name.startswith("embed.feature_extractor."):
                    p.ds_tensor.add_(torch.randn(p.ds_tensor.shape, generator=gen))
    steps = []
    for _ in range(3):
        values = summary_values(trainer.optimizer_step()["summary"])
        steps.append([values["loss"], values["target_std"], float(trainer.engine.get_global_grad_norm())])
    return {"steps": steps, "shared_by_default": shared, "flops": trainer.flops_per_sample()}


def main() -> None:
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    from bench.bench_train import synthetic_batch
    from pipeline.distributed import choose_device, init_runtime, shutdown
    from pipeline.experiment import load_experiment
    rt = init_runtime(1, choose_device("fp32"))
    cfg = load_experiment("configs/speech_tiny.yaml", [f"train.output_dir={sys.argv[1]}.run", "train.micro_batch_size=3",
                                                       "encoder.dropout=0.1"])
    batch = synthetic_batch(cfg, "speech")
    report = {"shared": run(cfg, rt, batch, True, spoil=True), "own": run(cfg, rt, batch, False),
              "own_spoiled": run(cfg, rt, batch, False, spoil=True)}
    Path(sys.argv[1]).write_text(json.dumps(report))
    shutdown()


if __name__ == "__main__":
    main()
