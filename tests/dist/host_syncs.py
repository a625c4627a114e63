"""Run under torchrun (1 rank): count the operations that make the host wait for the device in training steps.

Usage: host_syncs.py OUT.json. For vision, speech and text (blocks with padding) tiny presets at grad_accum 2,
after two warm-up steps, the loop's step between log steps (``Trainer.train_step``) runs under a TorchDispatchMode
that records every operation that reads a device value on the host or has an output shape that depends on device
data (``.item()``, ``nonzero``, boolean indexing, ...). On CPU these cost nothing; on a GPU each is a host sync.
Each is attributed to the innermost frame of our code (pipeline/), DeepSpeed or torch.optim; work on the CPU batch
before it is moved (the ``on_host`` methods) is counted apart.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import sys
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[2]
READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
         "aten.is_nonzero.default", "aten.unique.default", "aten._unique2.default", "aten.masked_scatter.default",
         "aten.repeat_interleave.Tensor", "aten.nonzero_static.default"}
OWNERS = (("pipeline", str(ROOT / "pipeline")), ("deepspeed", "/deepspeed/"), ("torch.optim", "/torch/optim/"))


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name == "aten.index.Tensor" and any(t is not None and t.dtype == torch.bool for t in args[1])
        if name in READS or bool_index:
            self.seen[owner(traceback.extract_stack()) + " " + name] += 1
        return func(*args, **(kwargs or {}))


def owner(stack) -> str:
    """Whose code asked: the innermost frame of ours, DeepSpeed's or torch.optim's. Work inside an ``on_host``
    method reads the loader's CPU batch before it goes to the device (by design: no device there to wait for)."""
    if any(frame.name == "on_host" for frame in stack):
        return "cpu-batch"
    for frame in reversed(stack):
        for label, marker in OWNERS:
            if marker in frame.filename:
                where = f"{os.path.basename(frame.filename)}:{frame.lineno}"
                return f"{label} {where}"
    return "other"


@contextlib.contextmanager
def accessor_calls(zero3):
    """Counts calls of ZeRO-3's per-parameter partition accessors, each of which waits for DeepSpeed's reduce
    stream on a GPU (a wait the CPU accelerator skips, so the dispatch mode cannot see it)."""
    names = ("_get_fp32_opt_state_partition", "_get_fp32_grad_state_partition")
    calls = collections.Counter()
    originals = {name: getattr(zero3, name) for name in names}

    def counted(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return call
    for name in names:
        setattr(zero3, name, counted(name))
    try:
        yield calls
    finally:
        for name in names:
            delattr(zero3, name)


def batch_for(cfg):
    sys.path.insert(0, str(ROOT))
    from bench.bench_train import synthetic_batch as sequences
    from bench.bench_train_vision import synthetic_batch as images
    if cfg.modality == "vision":
        return images(cfg)
    batch = sequences(cfg, cfg.modality)
    if cfg.modality == "text":  # complete_doc blocks: a padded tail that the model must keep out of attention
        batch["tokens"][:, -5:] = cfg.model.pad_id
        batch["student_tokens"][:, -5:] = cfg.model.pad_id
        batch["mask"][:, -5:] = False
    return batch


def main() -> None:
    from pipeline.distributed import LaggedRead, choose_device, init_runtime, load_ds_config, shutdown
    from pipeline.experiment import load_experiment
    from pipeline.metrics import MetricsLogger
    from pipeline.trainer import Trainer
    out = sys.argv[1]
    os.chdir(ROOT)
    rt = init_runtime(1, choose_device("auto"))
    report = {}
    for modality in ("vision", "speech", "text", "vision_v2"):
        preset = f"configs/{modality.replace('_v2', '')}_tiny{'_v2' if modality.endswith('_v2') else ''}.yaml"
        cfg = load_experiment(preset, [f"train.output_dir={out}.run", "train.grad_accum=2",
                                                                "train.micro_batch_size=2", "collapse.after_steps=0"])
        trainer = Trainer(cfg, rt, load_ds_config(cfg.train.ds_config), ["unused"])
        trainer.batches = itertools.repeat(batch_for(cfg))
        logger, lagged = MetricsLogger(Path(out + ".run"), enabled=False), LaggedRead(rt.device)
        for _ in range(2):
            trainer.train_step(logger, lagged)
        with HostReads() as reads, accessor_calls(trainer.engine.optimizer) as waits:
            for _ in range(2):
                trainer.train_step(logger, lagged)
        report[modality] = {"micro_steps": 4, "reads": dict(reads.seen), "reduce_stream_waits": waits,
                            "lr_rates_and_groups": [len(trainer.scheduler.base_lrs),
                                                    len(trainer.scheduler.optimizer.param_groups)]}
    with open(out, "w") as f:
        json.dump(report, f, indent=1, default=dict)
    shutdown()


if __name__ == "__main__":
    main()
