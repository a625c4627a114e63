"""The EMA teacher, kept sharded: each rank updates only its own partition, in fp32, with no communication.

Under ZeRO-3 every teacher parameter ``t`` holds this rank's flat partition in ``t.ds_tensor`` and the
student's optimizer holds the matching fp32 master partition (``safe_get_local_fp32_param``). Both
were partitioned the same way (same shapes, same data-parallel group), so
``t_part = tau * t_part + (1 - tau) * s_part`` is local. The teacher's forward then gathers layer by
layer exactly like the student's. Where the teacher computes in bf16 (under the student's autocast: the release's
half-precision teacher for speech, text and data2vec 2.0), its ZeRO-3 partitions are bf16, so that its forward gathers
half the bytes, and the EMA keeps its own fp32 partitions, written into the bf16 ones after every change (``publish``).
Note the trap this avoids: editing parameters inside
``deepspeed.zero.GatheredParameters`` without ``modifier_rank`` silently discards the edits.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from pipeline.config import doc, require


@dataclass
class EMAConfig:
    tau0: float = doc("EMA decay at step 0", 0.999)
    tau_end: float = doc("EMA decay after anneal_steps", 0.9999)
    anneal_steps: int = doc("steps of the linear tau0 -> tau_end anneal (0: constant tau_end)", 30000)
    copy: list = doc("fnmatch patterns of teacher parameter names copied from the student each step "
                     "instead of averaged (e.g. 'embed.*' for shared embeddings)", [])

    def __post_init__(self):
        require(0.0 <= self.tau0 <= 1.0 and 0.0 <= self.tau_end <= 1.0, "ema.tau0 and ema.tau_end must be in [0, 1]")
        require(self.anneal_steps >= 0, "ema.anneal_steps must be >= 0")
        require(all(isinstance(p, str) for p in self.copy), "ema.copy must be a list of name patterns")


def tau_at(step: int, cfg: EMAConfig) -> float:
    """Linear anneal from tau0 to tau_end over anneal_steps updates, then constant. ``step`` counts updates
    from 1, as fairseq's num_updates: the EMA step after the first optimizer step uses tau_at(1)."""
    if cfg.anneal_steps == 0 or step >= cfg.anneal_steps:
        return cfg.tau_end
    return cfg.tau0 + (cfg.tau_end - cfg.tau0) * step / cfg.anneal_steps


def zero3_partition(param: nn.Parameter) -> torch.Tensor:
    """This rank's partition of a ZeRO-3 parameter (the teacher's EMA state)."""
    return param.ds_tensor.data


def owned_elements(part: torch.Tensor, param: nn.Parameter, rank: int) -> torch.Tensor:
    """The elements of a ZeRO-3 partition (rank ``rank`` of its shard group) that hold the parameter: ZeRO-3 pads the
    last partitions to equal sizes, with values it never initialises (they differ between replicas, and may be NaN)."""
    n = part.numel()
    return part.reshape(-1)[:max(0, min(n, param.ds_numel - rank * n))]


def zero3_master_partition(param: nn.Parameter) -> torch.Tensor:
    """This rank's fp32 master partition of a ZeRO-3 student parameter (no communication)."""
    from deepspeed.utils import safe_get_local_fp32_param
    return safe_get_local_fp32_param(param)


def copied_from_student(name: str, cfg: EMAConfig) -> bool:
    """Whether the teacher parameter ``name`` is copied from the student each step instead of averaged (ema.copy)."""
    return any(fnmatch.fnmatchcase(name, pat) for pat in cfg.copy)


def shared_encoder(names, prefixes: tuple[str, ...], cfg: EMAConfig) -> list[str]:
    """The teacher parameters (of ``names``) under ``prefixes``, a modality's local encoder that student and teacher
    can share (speech's conv features: computed once, the teacher takes the student's output), when every one of
    them is copied from the student each step, so both hold the same weights; else []."""
    shared = [n for n in names if prefixes and n.startswith(prefixes)]
    return shared if shared and all(copied_from_student(n, cfg) for n in shared) else []


class ShardedEMA:
    """EMA of the student into the teacher, one local partition per parameter.

    ``teacher_state`` / ``student_state`` map a parameter to the local tensor to read or write; the
    defaults are the ZeRO-3 partitions. Passing ``lambda p: p.data`` for both gives a dense EMA. A bf16 teacher
    partition gets an fp32 EMA state of its own (``teacher_parts``), rounded into it by ``publish``.
    """

    def __init__(self, teacher: nn.Module, student_params: dict[str, nn.Parameter], cfg: EMAConfig,
                 teacher_state: Callable = zero3_partition, student_state: Callable = zero3_master_partition):
        self.cfg = cfg
        self.module = teacher
        self.student_state = student_state
        self.names, self.teacher_parts, self.student_params, self.copied = [], [], [], []
        self.published: list[tuple[torch.Tensor, torch.Tensor]] = []  # (bf16 teacher partition, its fp32 state)
        self.student_parts: list[torch.Tensor] | None = None  # cached views, once taken (see update)
        for name, t in teacher.named_parameters():
            require(name in student_params, f"teacher parameter {name} has no student counterpart")
            part = teacher_state(t)
            require(part.dtype in (torch.float32, torch.bfloat16),
                    f"teacher partition {name} is {part.dtype}; the teacher must be fp32 or bf16")
            if part.dtype != torch.float32:
                state = torch.zeros_like(part, dtype=torch.float32)
                self.published.append((part, state))
                part = state
            self.names.append(name)
            self.teacher_parts.append(part)
            self.student_params.append(student_params[name])
            self.copied.append(copied_from_student(name, cfg))

    def state_numel(self) -> int:
        return sum(p.numel() for p in self.teacher_parts)

    def sources(self) -> list[torch.Tensor]:
        """The student partitions to read. ZeRO-3's fp32 masters are views into its flat partition buffers, updated
        in place by every step, resume and warm start: taken once, they are read again without asking DeepSpeed,
        whose accessor waits for its reduce stream (a host sync per parameter). A state that is a copy (an
        offloaded optimizer's master moved to the device) is taken anew each time."""
        if self.student_parts is not None:
            return self.student_parts
        parts = [self.student_state(s) for s in self.student_params]
        again = [self.student_state(s) for s in self.student_params[:1]]
        if not again or again[0].data_ptr() == parts[0].data_ptr():
            self.student_parts = parts
        return parts

    @torch.no_grad()
    def update(self, tau: float) -> None:
        """teacher <- tau * teacher + (1 - tau) * student for averaged params; copy for the others."""
        avg_t, avg_s = [], []
        for t, src, copied in zip(self.teacher_parts, self.sources(), self.copied):
            require(src.shape == t.shape, f"student/teacher partitions differ: {tuple(src.shape)} vs {tuple(t.shape)}")
            if copied:
                t.copy_(src)
            else:
                avg_t.append(t)
                avg_s.append(src.to(t.device, torch.float32))
        if avg_t:
            torch._foreach_mul_(avg_t, tau)
            torch._foreach_add_(avg_t, avg_s, alpha=1.0 - tau)
        self.publish()

    @torch.no_grad()
    def publish(self) -> None:
        """Round the fp32 EMA state into the bf16 partitions the teacher's forward gathers (nothing for an fp32
        teacher, whose partitions are the state)."""
        if self.published:
            torch._foreach_copy_([bf16 for bf16, _ in self.published], [fp32 for _, fp32 in self.published])

    @torch.no_grad()
    def copy_student(self) -> None:
        """Initialise the teacher as an exact copy of the student."""
        for t, s in zip(self.teacher_parts, self.student_params):
            t.copy_(self.student_state(s))
        self.publish()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: part.detach().cpu().clone() for name, part in zip(self.names, self.teacher_parts)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) - set(state)
        require(not missing, f"teacher checkpoint lacks {sorted(missing)[:5]}")
        for name, part in zip(self.names, self.teacher_parts):
            require(state[name].shape == part.shape,
                    f"teacher partition {name} has shape {tuple(state[name].shape)} in the checkpoint but "
                    f"{tuple(part.shape)} here")
            part.copy_(state[name])
        self.publish()
