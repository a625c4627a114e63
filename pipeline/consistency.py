"""What must be equal across ranks, compared while the run trains (``train.check_consistency_every``; Megatron-LM's
--check-weight-hash-across-dp-replicas-interval).

Two kinds of ranks hold copies that nothing re-synchronises once they differ:
- hybrid sharding's replicas (``parallel.shard`` < the data-parallel size): the ranks at the same place of each shard
  group hold the same ZeRO-3 partitions (student fp32 master, the working copy the forward gathers, the teacher's EMA
  state) and only average their gradients;
- tensor-parallel peers: a parameter megatron does not split (LayerNorms, row-parallel biases, position tables) is
  duplicated on each, and its partition at the same data-parallel place is the same.

Each rank fingerprints its partitions (two integer checksums of their bits: any changed bit changes them), gathers its
replica and tensor-parallel groups' fingerprints and compares. Every rank then learns the first difference found
anywhere (one small all-gather), so all stop together, with one line that names the parameter and the ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

KINDS = ("student master", "student working", "teacher")
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class ConsistencyError(RuntimeError):
    """Copies that must be equal differ: the run stops, saving nothing over the last good checkpoint."""


def fingerprint(part: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(2,) int64: the sum of the tensor's elements read as integers, and their sum weighted by position (so that
    moved values count too). Exact: equal bits give equal fingerprints on every rank and device."""
    bits = part.detach().reshape(-1).view(BITS[part.element_size()]).to(torch.int64)
    return torch.stack([bits.sum(), (bits * weights[:bits.numel()]).sum()])


def position_weights(size: int, device) -> torch.Tensor:
    return torch.arange(size, dtype=torch.int64, device=device) % 65521 + 1


def partitions(trainer) -> list[tuple[str, list[torch.Tensor], bool]]:
    """(parameter name, its local partitions in KINDS order, whether tensor-parallel peers hold it whole)."""
    from pipeline.ema import zero3_master_partition
    from pipeline.model.data2vec import teacher_parameter_name
    teacher = dict(zip(trainer.ema.names, trainer.ema.teacher_parts))
    out = []
    for name, p in trainer.engine.module.named_parameters():
        split = getattr(p, "tensor_model_parallel", False) and getattr(p, "partition_dim", -1) >= 0
        parts = [zero3_master_partition(p), p.ds_tensor.data]
        taught = teacher.get(teacher_parameter_name(name))
        out.append((name, parts + ([taught] if taught is not None else []), not split))
    return out


def fingerprints(held: list[tuple[str, list[torch.Tensor], bool]], device) -> torch.Tensor:
    """(parameters, len(KINDS), 2) int64 on ``device``; a kind a parameter lacks (no teacher copy) reads 0."""
    size = max(part.numel() for _, parts, _ in held for part in parts)
    weights = position_weights(size, device)
    out = torch.zeros(len(held), len(KINDS), 2, dtype=torch.int64, device=device)
    for i, (_, parts, _) in enumerate(held):
        for k, part in enumerate(parts):
            out[i, k] = fingerprint(part.to(device), weights)
    return out


def first_difference(mine: torch.Tensor, group, columns: torch.Tensor) -> tuple[int, int, int, int] | None:
    """Gather ``mine`` over ``group``; the first (parameter, kind) among ``columns`` (a bool per parameter) where a
    member differs from the group's first member -> (parameter, kind, first member's rank, other's rank)."""
    members = dist.get_process_group_ranks(group)
    table = [torch.empty_like(mine) for _ in members]
    dist.all_gather(table, mine, group=group)
    for rank, theirs in zip(members[1:], table[1:]):
        differs = (theirs != table[0]).any(-1) & columns[:, None]  # (parameters, kinds)
        if differs.any():
            param, kind = (int(i) for i in differs.nonzero()[0])
            return param, kind, members[0], rank
    return None


def check(trainer) -> bool:
    """Compare what replicas and tensor-parallel peers must hold alike; raise ConsistencyError on every rank when
    any differs. False (and nothing done) where the layout has no such copies."""
    rt = trainer.rt
    groups = [(g, what) for g, what in ((rt.replica_group, "replica"), (rt.tp_group if rt.tp > 1 else None, "tp"))
              if g is not None]
    if not groups:
        return False
    held = partitions(trainer)
    mine = fingerprints(held, rt.device)
    report = torch.zeros(5, dtype=torch.int64, device=rt.device)  # [group code, parameter, kind, rank a, rank b]
    for code, (group, what) in enumerate(groups):  # every group's collective on every rank, found or not
        columns = torch.tensor([what == "replica" or whole for _, _, whole in held], device=rt.device)
        found = first_difference(mine, group, columns)
        if found is not None and not report[0]:
            report = torch.tensor([1 + code, *found], dtype=torch.int64, device=rt.device)
    everyone = [torch.empty_like(report) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, report)
    found = [r.tolist() for r in everyone if r[0] > 0]
    if found:
        code, param, kind, a, b = min(found, key=lambda r: (r[1], r[2], r[0]))
        raise ConsistencyError(describe(held[param][0], KINDS[kind], groups[code - 1][1], a, b, trainer.step))
    return True


def describe(name: str, kind: str, what: str, a: int, b: int, step: int) -> str:
    copies = ("hybrid-sharding replicas (the same ZeRO-3 partition)" if what == "replica"
              else "tensor-parallel peers (a parameter megatron does not split)")
    return (f"ranks {a} and {b}, {copies}, hold different {kind} values of {name} at step {step}: the copies "
            f"diverged (a start or resume that wrote one copy only, a lost update, or a hardware fault). Stopped "
            f"without saving; resume from the last checkpoint, and report it if it happens again")
