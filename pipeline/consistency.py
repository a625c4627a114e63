"""What must be equal across ranks, compared while the run trains (``train.check_consistency_every``; Megatron-LM's
--check-weight-hash-across-dp-replicas-interval).

Two kinds of ranks hold copies that nothing re-synchronises once they differ:
- hybrid sharding's replicas (``parallel.shard`` < the data-parallel size): the ranks at the same place of each shard
  group hold the same ZeRO-3 partitions (student fp32 master, the working copy the forward gathers, the teacher's EMA
  state) and only average their gradients;
- tensor-parallel peers: a parameter megatron does not split (LayerNorms, row-parallel biases, position tables) is
  duplicated on each, and its partition at the same data-parallel place is the same.

Each rank fingerprints its partitions' own elements (two integer checksums of their bits: any changed bit changes
them; and two float sums), gathers its replica and tensor-parallel groups' fingerprints and compares: replicas bit for
bit, tensor-parallel peers to a relative 1e-4 (``TP_RTOL``: they reduce over different communicators). Every rank
then learns the first difference found anywhere (one small all-gather), so all stop together, with one line that
names the parameter and the ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

KINDS = ("student master", "student working", "teacher")
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class ConsistencyError(RuntimeError):
    """Copies that must be equal differ: the run stops, saving nothing over the last good checkpoint."""


def fingerprint(part: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """((2,) int64, (2,) float64): the sum of the elements read as integers and their sum weighted by position (exact:
    equal bits give equal fingerprints on every rank and device, and any changed bit changes them), and the sums of
    the values' magnitudes and squares (for a comparison with a tolerance)."""
    flat = part.detach().reshape(-1)
    bits = flat.view(BITS[part.element_size()]).to(torch.int64)
    values = flat.double()
    return (torch.stack([bits.sum(), (bits * weights[:bits.numel()]).sum()]),
            torch.stack([values.abs().sum(), values.square().sum()]))


def position_weights(size: int, device) -> torch.Tensor:
    return torch.arange(size, dtype=torch.int64, device=device) % 65521 + 1


def partitions(trainer) -> list[tuple[str, torch.nn.Parameter, list, bool]]:
    """(parameter name, the parameter, a reader per kind of KINDS of its own elements in this rank's partition,
    whether tensor-parallel peers hold it whole). Readers, not tensors: with an offloaded optimizer the master is a
    device copy, made one parameter at a time."""
    from pipeline.ema import owned_elements, zero3_master_partition
    from pipeline.model.data2vec import teacher_parameter_name
    teacher = dict(zip(trainer.ema.names, trainer.ema.teacher_parts))
    rank = trainer.rt.shard_rank
    out = []
    for name, p in trainer.engine.module.named_parameters():
        split = getattr(p, "tensor_model_parallel", False) and getattr(p, "partition_dim", -1) >= 0
        taught = teacher.get(teacher_parameter_name(name))
        readers = [lambda p=p: zero3_master_partition(p), lambda p=p: p.ds_tensor.data]
        readers += [lambda p=p, t=taught: t] if taught is not None else []
        out.append((name, p, [lambda read=read, p=p: owned_elements(read(), p, rank) for read in readers], not split))
    return out


def fingerprints(held: list, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(parameters, len(KINDS), 2) int64 and float64 on ``device``; a kind a parameter lacks (no teacher) reads 0."""
    weights = position_weights(max(p.ds_tensor.numel() for _, p, _, _ in held), device)
    bits = torch.zeros(len(held), len(KINDS), 2, dtype=torch.int64, device=device)
    values = torch.zeros(len(held), len(KINDS), 2, dtype=torch.float64, device=device)
    for i, (_, _, readers, _) in enumerate(held):
        for k, read in enumerate(readers):
            bits[i, k], values[i, k] = fingerprint(read().to(device), weights)
    return bits, values


def first_difference(mine: tuple[torch.Tensor, torch.Tensor], group, columns: torch.Tensor,
                     rtol: float) -> tuple[int, int, int, int] | None:
    """Gather ``mine`` over ``group``; the first (parameter, kind) among ``columns`` (a bool per parameter) where a
    member differs from the group's first member: in any bit, or with ``rtol`` > 0 by more than that relative
    tolerance of the magnitudes -> (parameter, kind, first member's rank, other's rank)."""
    members = dist.get_process_group_ranks(group)
    tables = []
    for part in mine:
        table = [torch.empty_like(part) for _ in members]
        dist.all_gather(table, part, group=group)
        tables.append(table)
    bits, values = tables
    for i, rank in enumerate(members[1:], start=1):
        if rtol:
            differs = ((values[i] - values[0]).abs() > rtol * values[0].abs().clamp_min(1e-30)).any(-1)
        else:
            differs = (bits[i] != bits[0]).any(-1)
        differs &= columns[:, None]  # (parameters, kinds)
        if differs.any():
            param, kind = (int(x) for x in differs.nonzero()[0])
            return param, kind, members[0], rank
    return None


TP_RTOL = 1e-4  # tensor-parallel peers reduce the gradients of the parameters they both hold over different
# data-parallel communicators, whose reduction order NCCL does not promise alike: last-bit drift is tolerated there


def check(trainer, tp_rtol: float = TP_RTOL) -> bool:
    """Compare what replicas (bit for bit) and tensor-parallel peers (to ``tp_rtol``; 0: bit for bit) must hold alike;
    raise ConsistencyError on every rank when any differs. False (and nothing done) where the layout has no copies."""
    rt = trainer.rt
    groups = [(g, what) for g, what in ((rt.replica_group, "replica"), (rt.tp_group if rt.tp > 1 else None, "tp"))
              if g is not None]
    if not groups:
        return False
    held = partitions(trainer)
    mine = fingerprints(held, rt.device)
    report = torch.zeros(5, dtype=torch.int64, device=rt.device)  # [group code, parameter, kind, rank a, rank b]
    for code, (group, what) in enumerate(groups):  # every group's collective on every rank, found or not
        columns = torch.tensor([what == "replica" or whole for _, _, _, whole in held], device=rt.device)
        found = first_difference(mine, group, columns, 0.0 if what == "replica" else tp_rtol)
        if found is not None and not report[0]:
            report = torch.tensor([1 + code, *found], dtype=torch.int64, device=rt.device)
    everyone = [torch.empty_like(report) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, report)
    found = [r.tolist() for r in everyone if r[0] > 0]
    if found:
        code, param, kind, a, b = min(found, key=lambda r: (r[1], r[2], r[0]))
        raise ConsistencyError(describe(held[param][0], KINDS[kind], groups[code - 1][1], a, b, trainer.step))
    return True


def check_due(trainer, start: bool = False) -> None:
    """train.check_consistency_every: at the start (after a resume or init.from) and every that many steps."""
    import logging
    import time
    every = trainer.cfg.train.check_consistency_every
    if not every or not (start or trainer.step % every == 0):
        return
    began = time.perf_counter()
    if check(trainer) and start and trainer.rt.is_main:
        logging.getLogger("pipeline").info(
            "consistency: replicas and tensor-parallel peers hold equal copies (%.0f ms a check; every %d steps: "
            "train.check_consistency_every)", 1000 * (time.perf_counter() - began), every)


def describe(name: str, kind: str, what: str, a: int, b: int, step: int) -> str:
    copies = ("hybrid-sharding replicas (the same ZeRO-3 partition)" if what == "replica"
              else "tensor-parallel peers (a parameter megatron does not split)")
    return (f"ranks {a} and {b}, {copies}, hold different {kind} values of {name} at step {step}: the copies "
            f"diverged (a start or resume that wrote one copy only, a lost update, or a hardware fault). Stopped "
            f"without saving; resume from the last checkpoint, and report it if it happens again")
