"""Run under torchrun: start a run from init.from (at this TP), take no step, and (rank 0) write a fixed
batch with the teacher's targets and the student's predictions on it, so a test can compare them with
the source model's. Several sources are started one after the other by the same processes, each written to
output_dir/<source's name>/start.pt.

argv: output_dir preset manifest tp source [source ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from export_check import outputs_on  # tests/dist, this script's directory
from pipeline.data import make_loader, resolve_shards
from pipeline.distributed import choose_device, init_runtime, load_ds_config, shutdown
from pipeline.experiment import load_experiment
from pipeline.trainer import Trainer


def main() -> None:
    out, preset, manifest, tp, sources = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
    rt = init_runtime(tp, choose_device("fp32"))
    for source in sources:
        start(rt, Path(out) / Path(source).name, preset, manifest, tp, source)
    shutdown()


def start(rt, out: Path, preset: str, manifest: str, tp: int, source: str) -> None:
    cfg = load_experiment(preset, [f"data.manifest={manifest}", f"train.output_dir={out}", f"parallel.tp={tp}",
                                   "train.micro_batch_size=4", "data.workers=1", f"init.from={source}",
                                   "train.seed=123"])  # another seed: nothing by chance
    trainer = Trainer(cfg, rt, load_ds_config(cfg.train.ds_config), resolve_shards(manifest))
    trainer.warm_start()
    loader = make_loader(trainer.shards, trainer.modality, cfg.data, 4, 0, rt.dp_rank, rt.dp)
    outputs = outputs_on(trainer, next(iter(loader)))
    if rt.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(outputs, out / "start.pt")


if __name__ == "__main__":
    main()
