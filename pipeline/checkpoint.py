"""Checkpoints: the DeepSpeed engine's state plus, per rank, the teacher partition and RNG state.

A checkpoint directory ``<output>/checkpoints/step_XXXXXXXX`` is reported as saved only after every
rank has written and fsync'ed its files and rank 0 has written the ``COMPLETE`` marker; the
``latest`` pointer is updated after that. Resuming picks the newest complete checkpoint, so a job
killed mid-save resumes from the previous one.
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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rank_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"d2v_rank{rank:05d}.pt"


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
    """The newest complete checkpoint under ``root`` (the ``latest`` pointer if it is valid)."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        ckpt = root / pointer.read_text().strip()
        if ckpt.parent == root and is_complete(ckpt):
            return ckpt
    candidates = sorted((p for p in root.glob("step_*") if p.is_dir() and is_complete(p)), reverse=True)
    return candidates[0] if candidates else None


def param_layout(module: torch.nn.Module) -> dict:
    """Per parameter: its shape on this tensor-parallel rank and the dim it is split on (None: replicated)."""
    layout = {}
    for name, p in module.named_parameters():
        split = getattr(p, "tensor_model_parallel", False) and getattr(p, "partition_dim", -1) >= 0
        layout[name] = {"shape": list(getattr(p, "ds_shape", p.shape)), "partition_dim": p.partition_dim if split else None}
    return layout


def rank_state(engine, ema, step: int, rt) -> dict:
    """What one rank adds to a checkpoint: its teacher partition (the EMA state), its fp32 master
    partition of the student (so python -m pipeline.export can consolidate without DeepSpeed's internal
    optimizer format), the parameter layout, its position in the TP x DP grid and its RNG state."""
    from pipeline.ema import zero3_master_partition
    student = engine.module
    return {"teacher": ema.state_dict(),
            "student": {n: zero3_master_partition(p).detach().cpu().clone() for n, p in student.named_parameters()},
            "layout": {"student": param_layout(student), "teacher": param_layout(ema.module)},
            "grid": {"tp": rt.tp, "tp_rank": rt.tp_rank, "dp": rt.dp, "dp_rank": rt.dp_rank},
            "rng": rng_state(rt.choice.device_type), "step": step, "world_size": rt.world_size}


def save(engine, ema, root: Path, step: int, client_state: dict, rt, keep: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory once it is complete."""
    root = Path(root)
    tag = tag_for(step)
    ckpt = root / tag
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    ok = 1.0
    try:
        atomic_torch_save(rank_state(engine, ema, step, rt), rank_file(ckpt, rt.rank))
    except OSError as exc:
        print(f"[rank {rt.rank}] could not write {rank_file(ckpt, rt.rank)}: {exc}", flush=True)
        ok = 0.0
    flag = torch.tensor([ok], device=engine.device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if flag.item() < 1:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: a rank failed to write its files")
    if rt.rank == 0:
        missing = [r for r in range(rt.world_size) if not rank_file(ckpt, r).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {ckpt} lacks the files of ranks {missing}")
        if "config" in client_state:  # readable without DeepSpeed (python -m pipeline.export)
            atomic_write_bytes(ckpt / "config.json", json.dumps(client_state["config"], indent=1).encode())
        marker = {"step": step, "world_size": rt.world_size, "tp": rt.tp, "dp": rt.dp}
        atomic_write_bytes(ckpt / COMPLETE, json.dumps(marker).encode())
        atomic_write_bytes(root / LATEST, tag.encode())
        prune(root, keep)
    if dist.is_initialized():
        dist.barrier()
    return ckpt


def prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and is_complete(p))
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load(engine, ema, ckpt: Path, rt) -> dict:
    """Restore engine, teacher partition and RNG; returns the client state (step, data position)."""
    ckpt = Path(ckpt)
    if not is_complete(ckpt):
        raise CheckpointError(f"{ckpt} is not a complete checkpoint (no {COMPLETE} marker)")
    marker = json.loads((ckpt / COMPLETE).read_text())
    if marker["world_size"] != rt.world_size or marker.get("tp", 1) != rt.tp:
        raise CheckpointError(f"{ckpt} was written by {marker['world_size']} ranks (tp={marker.get('tp', 1)}); this job "
                              f"has {rt.world_size} (tp={rt.tp}). Resume with the same layout, or consolidate it "
                              f"with python -m pipeline.export and start from the consolidated weights")
    path, client_state = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt}")
    own = torch.load(rank_file(ckpt, rt.rank), map_location="cpu", weights_only=True)
    ema.load_state_dict(own["teacher"])
    set_rng_state(own["rng"], rt.choice.device_type)
    return client_state
