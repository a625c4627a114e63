"""Run under torchrun with 2 CPU ranks: tensor parallelism (TP=2) against TP=1, for every modality.

Writes a JSON report (rank 0) to argv[1]. For each modality (the tiny preset, dropout and drop-path 0):

1. TP=1: megatron-core parallel state with tensor_model_parallel_size=1 (megatron layers take their
   group from the parallel state, not from the config). The Student and the teacher Backbone get one
   full random state dict (the same numbers on every rank), run forward on fixed inputs and backward of
   a fixed random projection of their outputs (student predictions; teacher per-block taps).
2. The parallel state is rebuilt with TP=2; the same models are built again and each rank loads its
   slice of the same state dict: every parameter megatron marks ``tensor_model_parallel`` is cut along
   its ``partition_dim`` (padded vocabulary rows are filled with extra random rows no token uses).
   Same inputs, same loss, forward + backward.
3. Reported: outputs vs TP=1; gathered TP-split gradients (all_gather over the TP group, concatenated on
   partition_dim) vs TP=1; replicated parameters' gradients on TP rank 0 vs rank 1 (must be identical:
   DeepSpeed reduces gradients over data-parallel ranks only); and, on rank 0, the TP=1 outputs vs the
   dense float64 oracle in tests/reference.py on the same weights.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (reference.py)

import reference as ref  # noqa: E402
from pipeline.distributed import model_parallel_config  # noqa: E402
from pipeline.experiment import load_experiment  # noqa: E402
from pipeline.modalities.speech import frames_for, span_mask  # noqa: E402
from pipeline.modalities.text import corrupt  # noqa: E402
from pipeline.modalities.vision import block_mask  # noqa: E402
from pipeline.model.data2vec import Backbone, Student  # noqa: E402

TP = 2
BATCH = 2
NO_DROPOUT = ["encoder.dropout=0.0", "encoder.attn_dropout=0.0", "encoder.drop_path=0.0"]


def make_inputs(name: str, cfg, gen: torch.Generator) -> tuple[dict, torch.Tensor]:
    m, rng = cfg.model, random.Random(1)
    if name == "vision":
        images = torch.randn(BATCH, m.in_chans, m.image_size, m.image_size, generator=gen)
        mask = torch.stack([block_mask(m.grid, m.num_masked, m.min_block_patches, m.min_aspect, rng)
                            for _ in range(BATCH)])
        return {"image": images}, mask
    if name == "speech":
        audio = torch.randn(BATCH, m.min_samples, generator=gen)
        mask = span_mask(BATCH, frames_for(m.conv_layers, m.min_samples), m.mask_prob, m.mask_length, rng)
        return {"audio": audio}, mask
    tokens = torch.randint(5, m.vocab_size, (BATCH, m.max_positions), generator=gen)
    tokens[1, -9:] = m.pad_id  # one padded row exercises the key-padding attention bias
    pairs = [corrupt(row, m, rng) for row in tokens]
    student = torch.stack([s for s, _ in pairs])
    mask = torch.stack([k for _, k in pairs])
    return {"tokens": tokens, "student_tokens": student}, mask


def random_state(module: torch.nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A full (TP=1) state dict of random values for every parameter (std 0.2, norm scales around 1)."""
    out = {}
    for name, p in module.named_parameters():
        value = torch.randn(p.shape, generator=gen) * 0.2
        if name.endswith("norm.weight") or ".layer_norm.weight" in name:
            value = value + 1.0
        out[name] = value
    return out


def split_info(p: torch.nn.Parameter) -> int | None:
    """partition_dim of a tensor-parallel parameter, None for a replicated one."""
    return int(p.partition_dim) if getattr(p, "tensor_model_parallel", False) else None


def load_full(module: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            assert p.shape == full[name].shape, (name, p.shape, full[name].shape)
            p.copy_(full[name])


def load_slices(module: torch.nn.Module, full: dict[str, torch.Tensor], gen: torch.Generator) -> dict:
    """Load this TP rank's slice of each parameter; returns {name: partition_dim} of the split ones."""
    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    split = {}
    with torch.no_grad():
        for name, p in module.named_parameters():
            dim, value = split_info(p), full[name]
            if dim is None:
                assert p.shape == value.shape, (name, p.shape, value.shape)
                p.copy_(value)
                continue
            total = p.shape[dim] * size
            assert total >= value.shape[dim], (name, p.shape, value.shape)
            if total > value.shape[dim]:  # padded vocabulary: extra rows (never looked up)
                assert name.endswith("embed.tokens.weight"), (name, p.shape, value.shape)
                shape = list(value.shape)
                shape[dim] = total - value.shape[dim]
                value = torch.cat([value, torch.randn(shape, generator=gen) * 0.2], dim)
            p.copy_(value.chunk(size, dim)[(1 - rank) if name.endswith("table") else rank])
            split[name] = dim
    return split


def run(module: torch.nn.Module, student: bool, batch: dict, mask: torch.Tensor, proj) -> torch.Tensor:
    """Forward + backward of sum(output * fixed projection); returns the detached output."""
    module.zero_grad(set_to_none=True)
    if student:
        out = module(batch, mask)  # (M, D)
    else:
        out = torch.stack(module(batch))  # (depth, B, T, D)
    (out * proj(out.shape)).sum().backward()
    return out.detach()


def projector(seed: int):
    def proj(shape):
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return proj


def gather_tp(t: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    return parts


def rel_err(got: torch.Tensor, want: torch.Tensor) -> dict:
    got, want = got.double(), want.double()
    return {"max_abs": (got - want).abs().max().item(), "scale": want.abs().max().item(),
            "shape_ok": list(got.shape) == list(want.shape)}


def oracle(name: str, cfg, sd: dict, student: bool, batch: dict, mask: torch.Tensor) -> torch.Tensor:
    """Dense float64 output (student predictions or stacked teacher taps) from tests/reference.py."""
    enc, m = cfg.encoder, cfg.model
    sd = {k: v.double() for k, v in sd.items()}
    prefix = "backbone." if student else ""
    kw = dict(heads=enc.heads, depth=enc.depth, eps=enc.layer_norm_eps)
    if name == "vision":
        final, taps = ref.vit_forward(sd, prefix, batch["image"].double(), mask if student else None,
                                      grid=m.grid, patch=m.patch_size, norm_first=enc.norm_first, tap=enc.tap, **kw)
    elif name == "speech":
        final, taps = ref.speech_forward(sd, prefix, batch["audio"].double(), mask if student else None,
                                         m.conv_layers, m.pos_conv_layers, m.pos_conv_kernel, m.pos_conv_groups, **kw)
    else:
        tokens = batch["student_tokens"] if student else batch["tokens"]
        final, taps = ref.text_forward(sd, prefix, tokens, m.pad_id, **kw)
    if not student:
        return torch.stack(taps)
    x = final[mask]
    if name == "text":
        return ref.gelu(x @ sd["head.fc1.weight"].T + sd["head.fc1.bias"]) @ sd["head.fc2.weight"].T + sd["head.fc2.bias"]
    return x @ sd["head.weight"].T + sd["head.bias"]


def check_modality(name: str) -> dict:
    cfg = load_experiment(f"configs/{name}_tiny.yaml", NO_DROPOUT)
    modality = cfg.make_modality()
    batch, mask = make_inputs(name, cfg, torch.Generator().manual_seed(0))
    kinds = {"student": (Student, True, projector(11)), "teacher": (Backbone, False, projector(12))}

    # -- TP=1 reference on every rank ---------------------------------------------------------
    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    reference = {}
    for kind, (cls, is_student, proj) in kinds.items():
        model = cls(modality, cfg.encoder, model_parallel_config(1))
        model.train(is_student)
        full = random_state(model, torch.Generator().manual_seed(100 + is_student))
        load_full(model, full)
        out = run(model, is_student, batch, mask, proj)
        grads = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                 for n, p in model.named_parameters()}
        unused = sorted(n for n, p in model.named_parameters() if p.grad is None)  # e.g. the teacher's mask token
        reference[kind] = (full, out, grads, unused)
    ps.destroy_model_parallel()

    # -- TP=2 ----------------------------------------------------------------------------------
    ps.initialize_model_parallel(tensor_model_parallel_size=TP)
    assert ps.get_tensor_model_parallel_world_size() == TP
    report = {}
    for kind, (cls, is_student, proj) in kinds.items():
        full, want_out, want_grads, unused = reference[kind]
        model = cls(modality, cfg.encoder, model_parallel_config(TP))
        model.train(is_student)
        split = load_slices(model, full, torch.Generator().manual_seed(7))
        out = run(model, is_student, batch, mask, proj)
        outs = gather_tp(out)
        r = {"split": split, "output": rel_err(out, want_out),
             "output_same_on_tp_ranks": all(torch.equal(o, outs[0]) for o in outs),
             "no_grad_tp1": unused, "no_grad_tp2": sorted(n for n, p in model.named_parameters() if p.grad is None),
             "grads": {}, "replicated_grad_rank_diff": {}}
        for n, p in model.named_parameters():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            parts = gather_tp(grad)
            if n in split:
                dim = split[n]
                gathered = torch.cat(parts, dim).narrow(dim, 0, want_grads[n].shape[dim])
                r["grads"][n] = rel_err(gathered, want_grads[n])
            else:
                r["grads"][n] = rel_err(grad, want_grads[n])
                r["replicated_grad_rank_diff"][n] = max((q - parts[0]).abs().max().item() for q in parts)
        if dist.get_rank() == 0:
            r["tp1_vs_oracle"] = rel_err(want_out, oracle(name, cfg, full, is_student, batch, mask))
        report[kind] = r
    ps.destroy_model_parallel()
    return report


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    report = {"world_size": dist.get_world_size(), "tp": TP}
    for name in ("vision", "speech", "text"):
        report[name] = check_modality(name)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(report, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
