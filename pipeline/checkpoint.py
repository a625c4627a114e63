"""Checkpoints in one format of our own: per rank, fp32 partitions named by parameter.

A checkpoint directory ``<output>/checkpoints/step_XXXXXXXX`` holds one ``d2v_rankNNNNN.pt`` per rank
with that rank's ZeRO-3 partitions of the student's fp32 master weights, of every Adam moment and of
the EMA teacher, plus the parameter layout, the trainer's position (step, data position, LR
schedule) and the RNG state; rank 0 adds ``config.json`` (and for text the tokenizer: ``d2v_tokenizer.json``, its
identity, and ``spm.model``, see pipeline/vocab.py). Nothing in it needs unpickling: every file
loads with ``torch.load(weights_only=True)``.

It is reported as saved only after every rank has written and fsync'ed its file and rank 0 has
written the ``COMPLETE`` marker (which records the TP x DP grid); the ``latest`` pointer is updated
after that (for people: resuming never reads it). Resuming picks the newest complete checkpoint, so a job killed
mid-save resumes from the previous one; a resume from an older one sets the newer ones aside.

Because partitions are stored per parameter, a checkpoint can be resumed on a different
data-parallel size with the same tensor-parallel size: ZeRO-3 splits each flattened parameter into
equal contiguous slices in data-parallel rank order, so each new rank copies the overlap of its new
slice with the saved slices (memory-mapped: only those bytes are read).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
LATEST = "latest"


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path: Path, write) -> None:
    """Write to a temporary file, fsync it, rename it into place and fsync the directory, so that after
    a crash or power loss the file is either whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or an I/O error leaves nothing half-written behind
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def rank_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"d2v_rank{rank:05d}.pt"


class DamagedCheckpoint(CheckpointError):
    pass


def read_rank_file(path: Path) -> dict:
    """A rank's state, memory-mapped: tensors are read from disk only where they are used."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch.load's errors never name the file
        raise DamagedCheckpoint(f"{path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}): "
                                f"it is damaged or not a checkpoint file. Resume from an earlier checkpoint "
                                f"(--resume DIR, or train.resume_damaged=previous)") from None


def file_crc32(path: Path, chunk: int = 1 << 24) -> int:
    """CRC-32 of a file's bytes (zlib's: about 1 GB/s, see bench/bench_checkpoint.py)."""
    import zlib
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def verify_rank_file(ckpt: Path, marker: dict, rank: int) -> None:
    """The rank file's bytes against the CRC-32 its ``COMPLETE`` marker records; a marker written before checksums
    existed carries none: the file must then exist and open as a checkpoint (its index read, no tensor)."""
    path = rank_file(ckpt, rank)
    if not path.is_file():
        raise DamagedCheckpoint(f"{path} is missing from a complete checkpoint")
    crcs = marker.get("crc32")
    if crcs is None:
        read_rank_file(path)
        return
    got = file_crc32(path)
    if got != crcs[rank]:
        raise DamagedCheckpoint(f"{path} is damaged: its CRC-32 is {got:08x}, {COMPLETE} recorded {crcs[rank]:08x}. "
                                f"Resume from an earlier checkpoint (--resume DIR, or train.resume_damaged=previous)")


def rng_state(device_type: str) -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_version": 3}
    if device_type != "cpu":
        from deepspeed.accelerator import get_accelerator
        state["device"] = get_accelerator().get_rng_state()
    return state


def set_rng_state(state: dict, device_type: str) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), None))
    if device_type != "cpu" and "device" in state:
        from deepspeed.accelerator import get_accelerator
        get_accelerator().set_rng_state(state["device"])


def is_complete(ckpt: Path) -> bool:
    return (ckpt / COMPLETE).is_file()


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``. The ``latest`` pointer is written for people and tools, never
    read: a job killed between a ``COMPLETE`` and the pointer's update leaves it one behind, and a rollback sets the
    newer checkpoints aside (``supersede_newer``), so the newest complete one is always this trajectory's."""
    candidates = complete_checkpoints(root)
    return candidates[0] if candidates else None


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, newest first."""
    return sorted((p for p in Path(root).glob("step_*") if p.is_dir() and is_complete(p)), reverse=True)


def set_aside(ckpt: Path, reason: str = "damaged") -> Path:
    """Rename a checkpoint to ``<reason>_step_N`` (``-2``, ``-3``, ... when that name is taken), so that nothing
    resumes from it, prunes it or takes it for this run's save of that step. Kept, not deleted: damaged, its other
    files may still be of use; superseded (another trajectory's), it is someone's weights."""
    aside = ckpt.with_name(f"{reason}_{ckpt.name}")  # no longer a step_* directory
    count = 1
    while aside.exists():
        count += 1
        aside = ckpt.with_name(f"{reason}_{ckpt.name}-{count}")
    os.replace(ckpt, aside)
    return aside


def supersede_newer(root: Path, step: int) -> list[Path]:
    """Set aside, as ``superseded_step_N``, the complete checkpoints under ``root`` past ``step``: after a rollback (a
    resume from an older checkpoint) they belong to the trajectory left behind. Incomplete ones past it (a save that
    crashed) are removed, as ``prune`` removes older ones. Rank 0 only; returns the new names."""
    newer = sorted(p for p in Path(root).glob("step_*") if p.is_dir() and p.name > tag_for(step))
    for crashed in (p for p in newer if not is_complete(p)):
        shutil.rmtree(crashed, ignore_errors=True)
    return [set_aside(p, "superseded") for p in newer if p.exists()]


def param_layout(module: torch.nn.Module) -> dict:
    """Per parameter: its shape on this tensor-parallel rank and the dim it is split on (None: replicated)."""
    layout = {}
    for name, p in module.named_parameters():
        split = getattr(p, "tensor_model_parallel", False) and getattr(p, "partition_dim", -1) >= 0
        layout[name] = {"shape": list(getattr(p, "ds_shape", p.shape)), "partition_dim": p.partition_dim if split else None}
    return layout


# -- the student's ZeRO-3 optimizer state, per parameter ------------------------------------------
# DeepSpeed keeps one flat fp32 tensor per parameter sub-group and the client optimizer's state
# (Adam: step, exp_avg, exp_avg_sq) is keyed by those flat tensors; it is created lazily at the
# first step. safe_get/set_local_* read and write one parameter's slice of them.

def optimizer_state(engine, optimizer: torch.optim.Optimizer, copy: bool = True) -> tuple[dict, dict]:
    """(partitions, scalars): per state key the fp32 partition of every parameter (``copy`` False: the keys only,
    each with an empty dict), and the per-group scalars (Adam's ``step``) that are equal across parameters. Empty
    before the first step."""
    from deepspeed.utils import safe_get_local_optimizer_state
    flats = engine.optimizer.fp32_partitioned_groups_flat
    if not flats or flats[0] not in optimizer.state:
        return {}, {}
    first = optimizer.state[flats[0]]
    keys = [k for k, v in first.items() if torch.is_tensor(v) and v.shape == flats[0].shape]
    scalars = {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in first.items() if k not in keys}
    parts = {k: {name: safe_get_local_optimizer_state(p, k).detach().cpu().clone()
                 for name, p in engine.module.named_parameters()} if copy else {} for k in keys}
    return parts, scalars


def ensure_optimizer_state(engine, optimizer: torch.optim.Optimizer, keys: list[str], scalars: dict) -> None:
    """Create the state the optimizer would create lazily, so saved moments have somewhere to go."""
    for flat in engine.optimizer.fp32_partitioned_groups_flat:
        state = optimizer.state[flat]
        for key in keys:
            if key not in state:
                state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        for key, value in scalars.items():
            state[key] = value.clone() if torch.is_tensor(value) else value


def set_student_state(engine, optimizer: torch.optim.Optimizer, master: dict, moments: dict, scalars: dict) -> None:
    """Write this rank's partitions of the fp32 master weights and optimizer moments, then the working
    (bf16 on GPU) partitions the forward gathers, and re-gather the parameters ZeRO keeps resident."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state
    if moments:
        ensure_optimizer_state(engine, optimizer, list(moments), scalars)
    with torch.no_grad():
        for name, p in engine.module.named_parameters():
            safe_set_local_fp32_param(p, master[name])
            for key, parts in moments.items():
                safe_set_local_optimizer_state(p, parts[name], key)
            p.ds_tensor.data.copy_(master[name].reshape(p.ds_tensor.shape))
    persistent = engine.optimizer.persistent_parameters
    if persistent:  # small parameters stay gathered between steps: release and gather them afresh
        persistent[0].partition(persistent)
    engine.optimizer.checkpoint_event_epilogue()


def partition_sizes(module: torch.nn.Module) -> dict[str, int]:
    return {name: p.ds_tensor.numel() for name, p in module.named_parameters()}


# -- save ---------------------------------------------------------------------------------------
def rank_state(trainer) -> dict:
    """What one rank writes: its fp32 partitions of the student, of each optimizer moment and of the
    teacher (with hybrid sharding, replica 0 only), the layout and its place in the TP x DP grid, the trainer's
    position and its RNG state."""
    from pipeline.ema import zero3_master_partition
    engine, rt = trainer.engine, trainer.rt
    student = engine.module
    writes = rt.replica_rank == 0  # hybrid sharding: the other replicas hold the same partitions
    moments, scalars = optimizer_state(engine, trainer.scheduler.optimizer, copy=writes)
    partitions = {}
    if writes:
        partitions = {"student": {n: zero3_master_partition(p).detach().cpu().clone()
                                  for n, p in student.named_parameters()},
                      "teacher": trainer.ema.state_dict(), **moments}
    return {"partitions": partitions,
            "moments": list(moments), "optimizer_scalars": scalars,
            "layout": {"student": param_layout(student), "teacher": param_layout(trainer.ema.module)},
            "grid": {"tp": rt.tp, "tp_rank": rt.tp_rank, "dp": rt.dp, "dp_rank": rt.dp_rank, "shard": rt.shard},
            "trainer": trainer.position(), "scheduler": trainer.scheduler.state_dict(),
            "rng": rng_state(rt.choice.device_type), "step": trainer.step, "world_size": rt.world_size}


def gather_rows(rt, row: list[int]) -> list[list[int]]:
    """Every global rank's ``row`` of integers, in rank order."""
    mine = torch.tensor(row, dtype=torch.int64, device=rt.device)  # NCCL: on the GPU
    if not dist.is_initialized():
        return [mine.tolist()]
    everyone = [torch.zeros_like(mine) for _ in range(rt.world_size)]
    dist.all_gather(everyone, mine)
    return [t.tolist() for t in everyone]


def all_ok(ok: bool, device) -> bool:
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.item() > 0


def save(trainer, root: Path, keep: int, files: dict[str, bytes] | None = None,
         own: set[str] = frozenset()) -> tuple[Path, bool]:
    """Collective: every rank calls it. Returns (the checkpoint directory once it is complete, whether this call
    wrote it). A complete checkpoint of this step that this run wrote or resumed from (``own``: names) is kept: it
    holds this state (a stop right after a periodic save or a resume), and rewriting it in place would leave no
    complete checkpoint if the job died during the rewrite. Any other directory of this step (another trajectory's
    complete checkpoint, a crashed save's files) is set aside or removed first, never reported as saved."""
    rt = trainer.rt
    root = Path(root)
    tag = tag_for(trainer.step)
    ckpt = root / tag
    if all_ok(tag in own and is_complete(ckpt), rt.device):  # every rank takes the same branch
        return ckpt, False
    if rt.rank == 0 and ckpt.exists():
        if is_complete(ckpt):
            print(f"[rank 0] {ckpt} holds another trajectory's checkpoint of this step: set aside as "
                  f"{set_aside(ckpt, 'superseded').name}", flush=True)
        else:
            shutil.rmtree(ckpt)  # a crashed save's files (perhaps of another world size)
    if dist.is_initialized():
        dist.barrier()
    ok, crc = True, -1
    try:
        ckpt.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(rank_state(trainer), rank_file(ckpt, rt.rank))
        crc = file_crc32(rank_file(ckpt, rt.rank))  # what reached the disk (read back from the page cache)
    except OSError as exc:
        print(f"[rank {rt.rank}] could not write {rank_file(ckpt, rt.rank)}: {exc}", flush=True)
        ok = False
    if not all_ok(ok, rt.device):
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: a rank failed to write its file")
    table = gather_rows(rt, [rt.tp_rank, rt.dp_rank, crc])
    grid, crcs = [row[:2] for row in table], [row[2] for row in table]
    if rt.rank == 0:
        missing = [r for r in range(rt.world_size) if not rank_file(ckpt, r).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {ckpt} lacks the files of ranks {missing}")
        for name, data in (files or {}).items():  # config.json, a text run's tokenizer: readable without torch
            atomic_write_bytes(ckpt / name, data)
        marker = {"step": trainer.step, "world_size": rt.world_size, "tp": rt.tp, "dp": rt.dp, "shard": rt.shard,
                  "grid": grid, "crc32": crcs}
        atomic_write_bytes(ckpt / COMPLETE, json.dumps(marker).encode())
        atomic_write_bytes(root / LATEST, tag.encode())
        prune(root, keep, ckpt)
    if dist.is_initialized():
        dist.barrier()
    return ckpt, True


def prune(root: Path, keep: int, newest: Path) -> None:
    """Keep ``newest`` and the keep - 1 complete checkpoints before it; delete older complete ones and
    every incomplete (crashed) save older than ``newest``. Checkpoints after ``newest`` are not touched."""
    older = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name < newest.name)
    complete = [p for p in older if is_complete(p)]
    doomed = [p for p in older if not is_complete(p)]
    if keep > 0:
        doomed += complete[:max(0, len(complete) - (keep - 1))]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)


# -- load ---------------------------------------------------------------------------------------
def read_complete(ckpt: Path) -> dict:
    """The parsed ``COMPLETE`` marker; DamagedCheckpoint, naming it, when it is not one."""
    try:
        marker = json.loads((ckpt / COMPLETE).read_text("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise DamagedCheckpoint(f"{ckpt / COMPLETE} is damaged ({type(exc).__name__}: {str(exc)[:100]}); resume "
                                f"from an earlier checkpoint (--resume DIR, or train.resume_damaged=previous)") from None
    if not isinstance(marker, dict) or not {"tp", "dp", "world_size"} <= set(marker):
        raise DamagedCheckpoint(f"{ckpt / COMPLETE} does not hold a checkpoint marker ({str(marker)[:60]!r}); resume "
                                f"from an earlier checkpoint (--resume DIR, or train.resume_damaged=previous)")
    crcs = marker.get("crc32")
    if crcs is not None and not (isinstance(crcs, list) and len(crcs) == marker["world_size"]
                                 and all(isinstance(c, int) for c in crcs)):
        raise DamagedCheckpoint(f"{ckpt / COMPLETE} is damaged: its crc32 list should hold {marker['world_size']} "
                                f"integers, one per rank file ({str(crcs)[:60]}); resume from an earlier checkpoint "
                                f"(--resume DIR, or train.resume_damaged=previous)")
    return marker


def read_marker(ckpt: Path, tp: int) -> dict:
    """The ``COMPLETE`` marker of a checkpoint a job with tensor-parallel size ``tp`` can resume from.
    Cheap (no tensors are read), so ``pipeline.train`` calls it before any process group starts."""
    ckpt = Path(ckpt)
    if not is_complete(ckpt):
        raise CheckpointError(f"{ckpt} is not a complete checkpoint (no {COMPLETE} marker); pick another with "
                              f"--resume, or start over in a new train.output_dir")
    marker = read_complete(ckpt)
    if "grid" not in marker:
        raise CheckpointError(f"{ckpt} was written by an older version of the pipeline (no grid in {COMPLETE}); "
                              f"it cannot be resumed by this one: start over in a new train.output_dir")
    if marker["tp"] != tp:
        raise CheckpointError(f"{ckpt} was written with tensor parallel size {marker['tp']}; this job has "
                              f"parallel.tp={tp}. Resume with parallel.tp={marker['tp']} (any number of "
                              f"data-parallel ranks), or start a new run at parallel.tp={tp} from its weights: "
                              f"python -m pipeline.export {ckpt} --output W.pt, then train with init.from=W.pt in a "
                              f"new train.output_dir (optimizer, schedule and data start fresh)")
    return marker


def repartition(saved: list[torch.Tensor], start: int, size: int, rank: int) -> torch.Tensor:
    """This rank's slice (``size`` elements, zero-padded past the end) of a flat parameter saved as
    contiguous slices ``saved``, the first of which begins at element ``start``."""
    out = torch.zeros(size, dtype=saved[0].dtype if saved else torch.float32)  # all padding: nothing saved
    lo = rank * size
    for part in saved:
        a, b = max(lo, start), min(lo + size, start + part.numel())
        if a < b:
            out[a - lo:b - lo] = part.reshape(-1)[a - start:b - start]
        start += part.numel()
    return out


def saved_partitions(grid: dict) -> int:
    """Into how many ZeRO-3 partitions a checkpoint (its marker, or a rank file's grid) split each parameter: its
    parallel.shard, else (plain ZeRO-3, and checkpoints from before hybrid sharding) its data-parallel size. The
    partitions are in the files of data-parallel ranks 0 .. that - 1 (replica 0)."""
    return grid.get("shard") or grid["dp"]


class SavedGrid:
    """The rank files of one tensor-parallel rank of a checkpoint, opened lazily and memory-mapped."""

    def __init__(self, ckpt: Path, marker: dict, tp_rank: int):
        self.ckpt, self.parts = ckpt, saved_partitions(marker)
        self.rank_of = {dp_rank: rank for rank, (t, dp_rank) in enumerate(marker["grid"]) if t == tp_rank}
        self.cache: dict[int, dict] = {}

    def state(self, dp_rank: int) -> dict:
        if dp_rank not in self.cache:
            self.cache[dp_rank] = read_rank_file(rank_file(self.ckpt, self.rank_of[dp_rank]))
        return self.cache[dp_rank]

    def partitions(self, kind: str, name: str, size: int, dp_rank: int) -> torch.Tensor:
        """The slice of ``kind``/``name`` that data-parallel rank ``dp_rank`` of ``size``-element
        partitions holds, read from the saved slices that overlap it."""
        saved_size = self.state(0)["partitions"][kind][name].numel()
        lo, hi = dp_rank * size, (dp_rank + 1) * size
        first, last = lo // saved_size, min(self.parts - 1, (hi - 1) // saved_size)
        parts = [self.state(r)["partitions"][kind][name] for r in range(first, last + 1)]
        return repartition(parts, first * saved_size, size, dp_rank)


def verify_before_loading(ckpt: Path, marker: dict, ranks: list[int], rt) -> None:
    """Collective: each rank checks the rank files it will read; if any rank finds damage, every rank
    raises DamagedCheckpoint naming the first damaged file (nothing has been loaded yet)."""
    bad = len(marker["grid"])
    for rank in ranks:
        try:
            verify_rank_file(ckpt, marker, rank)
        except DamagedCheckpoint as exc:
            print(f"[rank {rt.rank}] {exc}", flush=True)
            bad = min(bad, rank)
    first = torch.tensor([bad], dtype=torch.int64, device=rt.device)
    if dist.is_initialized():
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
    if first.item() < len(marker["grid"]):
        check = f"does not match the CRC-32 in {ckpt / COMPLETE}" if "crc32" in marker else "cannot be read"
        raise DamagedCheckpoint(f"{rank_file(ckpt, int(first.item()))} {check} (damaged or missing). Resume from an "
                                f"earlier checkpoint (--resume DIR, or train.resume_damaged=previous)")


def restore_schedule(scheduler, saved: dict) -> None:
    """The LR schedule's position from the checkpoint; its shape and peak from this run's config (a
    changed train.lr or schedule applies from the resumed step on)."""
    scheduler.load_state_dict({**saved, "base_lrs": scheduler.base_lrs})
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports (torch keeps it in this attribute)


def check_layout(saved: dict, live: dict, kind: str, ckpt: Path) -> None:
    if saved != live:
        diff = sorted(set(saved) ^ set(live)) or [n for n in live if saved[n] != live[n]]
        raise CheckpointError(f"{ckpt}: the {kind} in the checkpoint does not match this model "
                              f"(first differences: {diff[:3]}). Resume with the configuration it was saved with "
                              f"(its config.json)")


def load(trainer, ckpt: Path) -> dict:
    """Restore the student (weights and optimizer), the teacher, the LR schedule and, on the same
    layout, the RNG. Returns the saved trainer position with the saved data-parallel size (``saved_dp``)."""
    rt = trainer.rt
    ckpt = Path(ckpt)
    marker = read_marker(ckpt, rt.tp)
    grid = SavedGrid(ckpt, marker, rt.tp_rank)
    same_parts = saved_partitions(marker) == rt.shard  # this rank's partitions are saved as they are
    same = same_parts and marker["dp"] == rt.dp  # and so is the rest of its state (RNG)
    holders = [rt.shard_rank] if same_parts else range(grid.parts)  # the files its partitions come from
    read = {grid.rank_of[d] for d in holders} | ({rt.rank} if same else set())
    verify_before_loading(ckpt, marker, sorted(read), rt)
    own = grid.state(rt.dp_rank) if same else grid.state(0)
    student, teacher = trainer.engine.module, trainer.ema.module
    check_layout(own["layout"]["student"], param_layout(student), "student", ckpt)
    check_layout(own["layout"]["teacher"], param_layout(teacher), "teacher", ckpt)

    def mine(kind: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        sizes = partition_sizes(module)
        if same_parts:
            return {n: grid.state(rt.shard_rank)["partitions"][kind][n] for n in sizes}
        return {n: grid.partitions(kind, n, size, rt.shard_rank) for n, size in sizes.items()}

    moments = {k: mine(k, student) for k in own["moments"]}
    set_student_state(trainer.engine, trainer.scheduler.optimizer, mine("student", student), moments,
                      own["optimizer_scalars"])
    trainer.ema.load_state_dict(mine("teacher", teacher))
    restore_schedule(trainer.scheduler, own["scheduler"])
    if same:
        set_rng_state(own["rng"], rt.choice.device_type)
    return {**own["trainer"], "saved_dp": marker["dp"]}
