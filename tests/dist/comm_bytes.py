"""Run under torchrun (CPU gloo ranks): measure the bytes each rank sends per collective, for pipeline.plan.

usage: comm_bytes.py REPORT.json RUNS_JSON

RUNS_JSON: a list of layouts, measured one after the other by the same ranks (imports take most of the time),
each ``{"preset": YAML, "tp": N, "zero": {merged into the DeepSpeed JSON's zero_optimization}, "accum": N,
"precision": "fp32" | "bf16", "overrides": [config overrides]}``. Each builds the Trainer as
tests/dist/memory_check.py does (micro batch MICRO), feeds it one fixed synthetic batch and runs WARMUP + 1
optimizer steps, keeping the bytes of the last: the first step records DeepSpeed's module trace (no prefetch
yet), the second checks it across ranks (a few broadcasts, once). "bf16" computes the student in bf16 on the
CPU as on a GPU (the teacher in bf16 or fp32 by its precision rule, as there; ``choose_device`` refuses bf16 on a
CPU, where it is slow).

Every torch.distributed collective is wrapped, in ``torch.distributed`` and ``distributed_c10d`` both and before
DeepSpeed's ``TorchBackend`` and megatron-core look them up; one called from inside another counts once (the
outer one). What DeepSpeed 0.19.8 and megatron-core 0.16.1 call in a step (the report's ``calls``): ZeRO-3's
parameter gathers ``all_gather_into_tensor`` (one per fetch or prefetch bucket), its gradient reduction
``reduce_scatter_tensor`` (one per reduce bucket), ``all_reduce`` for megatron's row-parallel outputs,
column-parallel input gradients and vocab-parallel embedding, for our statistics (``Trainer.micro_step``,
``agree_over_tp``) and for DeepSpeed's gradient-norm scalars. Bytes one rank sends, ring algorithms over a group of
n ranks (the planner's convention): all-gather ``input x (n-1)``, reduce-scatter ``input x (n-1)/n``, all-reduce
``2 x size x (n-1)/n``, broadcast / reduce / all-to-all ``size x (n-1)/n``, send ``size``.

A call's category (the keys of ``pipeline.plan.Plan.comm``) comes from the phase of the step it is issued in
(the Trainer's ``teacher_targets`` and ``student_forward``, the engine's ``backward`` and ``step``, the EMA
update; the rest of ``optimizer_step`` is "micro-step"), its kind (gather / reduce-scatter / all-reduce) and its
group (data- or tensor-parallel); anything else is "other: ...". The calling frames of each category are
recorded as a cross-check (DeepSpeed's coordinator, megatron's mappings and layers, pipeline.distributed).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import inspect
import itertools
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

MICRO = 2
WARMUP = 2  # steps: the first records DeepSpeed's module trace, the second checks it across ranks
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GATHER, SCATTER, REDUCE, OTHER = "all-gather", "reduce-scatter", "all-reduce", "other"
# operation -> (its kind, the argument holding this rank's contribution, bytes sent per contributed byte on n ranks)
RING = {
    "all_gather_into_tensor": (GATHER, "input_tensor", lambda n: n - 1),
    "_all_gather_base": (GATHER, "input_tensor", lambda n: n - 1),
    "all_gather": (GATHER, "tensor", lambda n: n - 1),
    "all_gather_coalesced": (GATHER, "input_tensor_list", lambda n: n - 1),
    "reduce_scatter_tensor": (SCATTER, "input", lambda n: (n - 1) / n),
    "_reduce_scatter_base": (SCATTER, "input", lambda n: (n - 1) / n),
    "reduce_scatter": (SCATTER, "input_list", lambda n: (n - 1) / n),
    "all_reduce": (REDUCE, "tensor", lambda n: 2 * (n - 1) / n),
    "all_reduce_coalesced": (REDUCE, "tensors", lambda n: 2 * (n - 1) / n),
    "broadcast": (OTHER, "tensor", lambda n: (n - 1) / n),
    "reduce": (OTHER, "tensor", lambda n: (n - 1) / n),
    "all_to_all_single": (OTHER, "input", lambda n: (n - 1) / n),
    "all_to_all": (OTHER, "input_tensor_list", lambda n: (n - 1) / n),
    "gather": (OTHER, "tensor", lambda n: 1),
    "scatter": (OTHER, "scatter_list", lambda n: (n - 1) / n),
    "send": (OTHER, "tensor", lambda n: 1),
    "isend": (OTHER, "tensor", lambda n: 1),
    "barrier": (OTHER, None, lambda n: 0),
}
GRAD_NORM = "gradient norm all-reduce (DeepSpeed, unplanned)"
# (kind, group, phase) -> the planner's category (pipeline.plan.Plan.comm)
CATEGORIES = {
    (GATHER, "dp", "student forward"): "student all-gather, forward",
    (GATHER, "dp", "backward"): "student all-gather, backward",
    (SCATTER, "dp", "backward"): "gradient reduce-scatter",
    (SCATTER, "dp", "step"): "gradient reduce-scatter",
    (GATHER, "dp", "step"): "student all-gather of persistent parameters, after the step",
    (GATHER, "dp", "teacher forward"): "teacher all-gather",
    (REDUCE, "tp", "student forward"): "TP all-reduce, student forward",
    (REDUCE, "tp", "backward"): "TP all-reduce, student backward",
    (REDUCE, "tp", "teacher forward"): "TP all-reduce, teacher forward",
    (REDUCE, "dp", "micro-step"): "statistics all-reduce",
    (REDUCE, "tp", "micro-step"): "statistics all-reduce over TP",  # agree_over_tp: the same on TP peers
    (REDUCE, "dp", "step"): GRAD_NORM,
    (REDUCE, "tp", "step"): GRAD_NORM,
    # hybrid sharding (parallel.shard): ZeRO-3 over the shard group, the gradient partitions over the replicas
    (REDUCE, "shard", "step"): GRAD_NORM,
    (REDUCE, "replica", "replica reduce"): "gradient all-reduce over replicas",
}
CATEGORIES.update({(kind, "shard", phase): name for (kind, group, phase), name in list(CATEGORIES.items())
                   if group == "dp" and kind in (GATHER, SCATTER)})


def nbytes(value) -> int:
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return value.numel() * value.element_size() if torch.is_tensor(value) else 0


def caller() -> str:
    """The innermost frame outside torch, DeepSpeed's comm wrappers and this file: "path.py:function"."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if not any(skip in path for skip in ("/torch/", "/deepspeed/comm/", __file__)):
            return f"{path.split('site-packages/')[-1].split(ROOT)[-1].lstrip('/')}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


class Recorder:
    """Bytes sent per category in the step kept (``recording``), with the operations and callers seen."""

    def __init__(self):
        self.phase, self.recording, self.depth = "setup", False, 0
        self.groups: dict[str, set] = {}  # "dp" / "tp" -> the global ranks of this rank's group
        self.reset()

    def reset(self) -> None:
        self.sent: dict[str, float] = {}  # category -> bytes sent in the step kept
        self.calls = collections.defaultdict(collections.Counter)  # category -> {operation: calls}
        self.callers = collections.defaultdict(set)  # category -> calling frames

    def install(self) -> None:
        for name in RING:
            original = getattr(c10d, name)
            wrapped = self.wrap(name, original)
            for module in (dist, c10d):
                if getattr(module, name, None) is original:
                    setattr(module, name, wrapped)

    def wrap(self, name: str, original):
        signature = inspect.signature(original)
        kind, argument, factor = RING[name]

        @functools.wraps(original)
        def collective(*args, **kwargs):
            if self.depth == 0 and self.recording:
                bound = signature.bind(*args, **kwargs).arguments
                group = bound.get("group")
                n = dist.get_world_size(group)
                sent = nbytes(bound.get(argument)) * factor(n) if n > 1 and argument else 0
                self.record(name, kind, self.group_name(group), sent)
            self.depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.depth -= 1
        return collective

    def group_name(self, group) -> str:
        ranks = set(dist.get_process_group_ranks(group or dist.group.WORLD))
        return next((name for name, members in self.groups.items() if members == ranks), f"{len(ranks)} ranks")

    def record(self, name: str, kind: str, group: str, sent: float) -> None:
        category = CATEGORIES.get((kind, group, self.phase), f"other: {name} over {group} in {self.phase}")
        self.sent[category] = self.sent.get(category, 0) + sent
        self.calls[category][name] += 1
        self.callers[category].add(caller())

    @contextlib.contextmanager
    def during(self, phase: str):
        outer, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = outer

    def in_phase(self, phase: str, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with self.during(phase):
                return fn(*args, **kwargs)
        return run


def synthetic_batch(cfg) -> dict:
    if cfg.modality == "vision":
        from bench.bench_train_vision import synthetic_batch as vision_batch
        return vision_batch(cfg)
    from bench.bench_train import synthetic_batch as other_batch
    return other_batch(cfg, cfg.modality)


def compute_on_cpu(precision: str):
    """The CPU device choice; "bf16" computes the student in bf16 as on a GPU (``choose_device`` refuses it on
    CPU, as it is slow there), so that the bytes of a bf16 run can be measured."""
    from pipeline.distributed import choose_device
    if precision == "bf16":
        return dataclasses.replace(choose_device("fp32"), dtype=torch.bfloat16)
    return choose_device(precision)


def measure(recorder: Recorder, run: dict) -> dict:
    """One layout: build the Trainer, run WARMUP + 1 optimizer steps, keep the bytes of the last."""
    from megatron.core import parallel_state as ps

    from pipeline.distributed import init_runtime, load_ds_config
    from pipeline.experiment import load_experiment
    from pipeline.trainer import Trainer

    tp, zero, accum = run["tp"], run.get("zero", {}), run.get("accum", 1)
    cfg = load_experiment(run["preset"], [f"parallel.tp={tp}", f"train.micro_batch_size={MICRO}",
                                          f"train.grad_accum={accum}", "train.warmup_steps=0",
                                          "train.output_dir=/nonexistent-not-used", *run.get("overrides", [])])
    if ps.model_parallel_is_initialized():  # the previous run's layout
        ps.destroy_model_parallel()
    rt = init_runtime(tp, compute_on_cpu(run.get("precision", "fp32")), shard=cfg.parallel.shard)
    recorder.groups = {"dp": set(dist.get_process_group_ranks(ps.get_data_parallel_group())),
                       "tp": set(dist.get_process_group_ranks(ps.get_tensor_model_parallel_group()))}
    if rt.replica_group is not None:
        recorder.groups["shard"] = set(dist.get_process_group_ranks(rt.shard_group))
        recorder.groups["replica"] = set(dist.get_process_group_ranks(rt.replica_group))
    ds_base = load_ds_config(cfg.train.ds_config)
    ds_base.setdefault("zero_optimization", {}).update(zero)
    trainer = Trainer(cfg, rt, ds_base, ["unused"])  # shards are never read: batches are fed here
    trainer.batches = itertools.repeat(synthetic_batch(cfg))
    trainer.teacher_targets = recorder.in_phase("teacher forward", trainer.teacher_targets)
    trainer.student_forward = recorder.in_phase("student forward", trainer.student_forward)
    # speech: the student's conv features run before its forward, once for student and teacher (shared_inputs)
    trainer.shared_inputs = recorder.in_phase("student forward", trainer.shared_inputs)
    trainer.engine.backward = recorder.in_phase("backward", trainer.engine.backward)
    trainer.engine.step = recorder.in_phase("step", trainer.engine.step)
    trainer.reduce_over_replicas = recorder.in_phase("replica reduce", trainer.reduce_over_replicas)
    trainer.ema.update = recorder.in_phase("EMA update", trainer.ema.update)
    recorder.reset()
    for step in range(WARMUP + 1):
        recorder.recording = step == WARMUP
        with recorder.during("micro-step"):
            trainer.optimizer_step()
    recorder.recording = False
    return {"rank": rt.rank, "tp": rt.tp, "dp": rt.dp, "tp_rank": rt.tp_rank, "dp_rank": rt.dp_rank,
            "sent": recorder.sent, "calls": {k: dict(v) for k, v in recorder.calls.items()},
            "callers": {k: sorted(v) for k, v in recorder.callers.items()}}


def main() -> None:
    report_path, runs = sys.argv[1], json.loads(sys.argv[2])
    recorder = Recorder()
    recorder.install()  # before DeepSpeed's TorchBackend and megatron-core look the collectives up
    from pipeline.distributed import shutdown
    results = []
    for run in runs:
        mine = measure(recorder, run)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        results.append({**run, "micro": MICRO, "ranks": gathered})
    if dist.get_rank() == 0:
        with open(report_path, "w") as f:
            json.dump({"world_size": dist.get_world_size(), "runs": results}, f, indent=1)
    dist.barrier()
    shutdown()


if __name__ == "__main__":
    main()
