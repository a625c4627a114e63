"""The step's host overhead, the proxy of issue #28: our Trainer against a plain-PyTorch transformers peer, where the
math costs about nothing and the step is pure framework.

    python bench/bench_host_overhead.py [--modalities vision speech text] [--depths 6 12 24] [--rounds 12]

For each modality's Base preset (vision_base, speech_base, text_base: their module structure, objective and
optimizer) at each depth, at tiny width (dim 32, 2 heads, FFN 64; speech's convs 32 channels) and batch 2 (vision
64-px images of 16-px patches; speech 1 s clips; text 32-token blocks):

- ours: ``pipeline.trainer.Trainer`` on one rank (a DeepSpeed ZeRO-3 engine for the student, the ZeRO-3 teacher
  gathered by pipeline.gather, megatron-core linears), ``optimizer_step()`` on one synthetic batch over and over:
  teacher forward, student forward and backward, AdamW with the preset's clipping, EMA;
- peer: the same step in plain PyTorch on transformers' Data2VecVisionModel / Data2VecAudioModel /
  Data2VecTextModel of the same shape (mask token, Linear head, deep-copied teacher with the preset's top-K
  target normalisation and loss, AdamW, clipping, EMA with ``torch._foreach_*``).

After warm-up they run in alternating rounds (A B, B A, ...), one thread, and the median step times are compared.
Then one more step of each is counted: Python calls (cProfile's total) and aten ops (a TorchDispatchMode: every op
that reaches the dispatcher from Python, DeepSpeed's and autograd's included). Each (modality, depth) runs in a
process of its own. The last line is one JSON object: per modality and depth, the time ratio, the Python calls per
block per step (the slope between the shallowest and deepest depth) and the aten ops per step, ours and the peer's.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import itertools
import json
import os
import pstats
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import REPO_ROOT, command_line, machine_info, now, summarize, table  # noqa: E402

PRESETS = {"vision": "configs/vision_base.yaml", "speech": "configs/speech_base.yaml", "text": "configs/text_base.yaml"}
TINY = ["encoder.dim=32", "encoder.heads=2", "encoder.ffn_dim=64", "encoder.drop_path=0", "encoder.dropout=0",
        "encoder.attn_dropout=0", "encoder.layerdrop=0", "train.micro_batch_size=2", "train.grad_accum=1",
        "data.workers=0"]
SHAPE = {
    "vision": ["model.image_size=64", "model.patch_size=16", "model.mask_ratio=0.4", "model.min_block_patches=2"],
    "speech": ["model.conv_layers=[[32,10,5],[32,3,2],[32,3,2],[32,3,2],[32,3,2],[32,2,2],[32,2,2]]",
               "model.max_samples=16000", "model.min_samples=8000", "model.pos_conv_groups=2",
               "model.pos_conv_layers=5", "model.pos_conv_kernel=19"],
    "text": ["model.vocab_size=512", "model.max_positions=32"],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/bench_host_overhead.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modalities", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--depths", nargs="+", type=int, default=[6, 12, 24])
    p.add_argument("--rounds", type=int, default=12, help="alternating timed rounds (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each first (default: %(default)s)")
    p.add_argument("--one", nargs=2, metavar=("MODALITY", "DEPTH"), help=argparse.SUPPRESS)  # a child's run
    p.add_argument("overrides", nargs="*", help="config overrides for ours, e.g. train.nvtx=true (a lever to measure)")
    return p.parse_args(argv)


def experiment(modality: str, depth: int, output_dir: str, overrides=()):
    from pipeline.experiment import load_experiment
    return load_experiment(PRESETS[modality], [*TINY, *SHAPE[modality], f"encoder.depth={depth}",
                                               "objective.top_k=" + str(min(depth, 8)), f"train.output_dir={output_dir}",
                                               *overrides])


def synthetic_batch(cfg) -> dict:
    """One collated batch of the modality (its own collate and masking), from seeded synthetic inputs."""
    import random

    import numpy as np
    mod, b = cfg.make_modality(), cfg.train.micro_batch_size
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    if cfg.modality == "vision":
        from bench.bench_train_vision import synthetic_batch as vision_batch
        return vision_batch(cfg)
    if cfg.modality == "speech":
        return mod.collate([{"audio": torch.randn(cfg.model.max_samples, generator=gen), "seed": i} for i in range(b)])
    ids = torch.randint(5, cfg.model.vocab_size, (b, cfg.model.max_positions), generator=gen).numpy().astype("<i4")
    return mod.collate([mod.example({"i32": np.ascontiguousarray(row).tobytes()}, rng) for row in ids])


# ---------------------------------------------------------------------------------------------
# Ours
# ---------------------------------------------------------------------------------------------

def build_ours(cfg, batch: dict):
    from bench.bench_train_vision import set_single_rank_env
    from pipeline import distributed
    from pipeline.trainer import Trainer
    set_single_rank_env()
    choice = distributed.choose_device(cfg.train.precision)
    rt = distributed.init_runtime(tp=1, choice=choice)
    trainer = Trainer(cfg, rt, distributed.load_ds_config(cfg.train.ds_config), ["unused"])
    trainer.batches = itertools.repeat(batch)
    return trainer


# ---------------------------------------------------------------------------------------------
# Peer: transformers' models in plain PyTorch
# ---------------------------------------------------------------------------------------------

def peer_model(cfg):
    import transformers
    enc, m = cfg.encoder, cfg.model
    common = dict(hidden_size=enc.dim, num_hidden_layers=enc.depth, num_attention_heads=enc.heads,
                  intermediate_size=enc.ffn_dim, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  layer_norm_eps=enc.layer_norm_eps, hidden_act="gelu")
    if cfg.modality == "vision":
        from bench.bench_train_vision import build_peer
        return build_peer(cfg)
    if cfg.modality == "speech":
        conv = m.conv_layers
        hf = transformers.Data2VecAudioConfig(
            **common, conv_dim=[c[0] for c in conv], conv_kernel=[c[1] for c in conv], conv_stride=[c[2] for c in conv],
            num_conv_pos_embeddings=m.pos_conv_kernel, num_conv_pos_embedding_layers=m.pos_conv_layers,
            num_conv_pos_embedding_groups=m.pos_conv_groups, mask_time_prob=0.05, layerdrop=0.0,
            feat_proj_dropout=0.0, activation_dropout=0.0)
        return transformers.Data2VecAudioModel(hf)
    hf = transformers.Data2VecTextConfig(**common, vocab_size=m.vocab_size, pad_token_id=m.pad_id,
                                         max_position_embeddings=m.max_positions + m.pad_id + 1, type_vocab_size=1)
    return transformers.Data2VecTextModel(hf, add_pooling_layer=False)


class PeerStudent(torch.nn.Module):
    """transformers' encoder on the student's input + the preset's head on the masked positions."""

    def __init__(self, cfg, encoder):
        super().__init__()
        self.modality, self.encoder = cfg.modality, encoder
        d = cfg.encoder.dim
        self.head = (torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.GELU(), torch.nn.Linear(2 * d, d))
                     if cfg.modality == "text" else torch.nn.Linear(d, d))

    def forward(self, inputs: dict, mask: torch.Tensor) -> torch.Tensor:
        if self.modality == "vision":
            x = self.encoder(inputs["image"], bool_masked_pos=mask).last_hidden_state[:, 1:]
        elif self.modality == "speech":
            x = self.encoder(inputs["audio"], mask_time_indices=mask).last_hidden_state
        else:
            x = self.encoder(input_ids=inputs["student_tokens"]).last_hidden_state
        return self.head(x[mask])


def peer_targets(cfg, teacher, inputs: dict) -> torch.Tensor:
    """The preset's targets from the teacher's block outputs: top-K, each normalised, averaged, final norm."""
    import torch.nn.functional as F
    obj = cfg.objective
    if cfg.modality == "vision":
        hidden = teacher(inputs["image"], output_hidden_states=True).hidden_states[-obj.top_k:]
        hidden = [h[:, 1:] for h in hidden]
    elif cfg.modality == "speech":
        hidden = teacher(inputs["audio"], output_hidden_states=True).hidden_states[-obj.top_k:]
    else:
        hidden = teacher(input_ids=inputs["tokens"], output_hidden_states=True).hidden_states[-obj.top_k:]

    def norm(x, kind):
        if kind == "instance":
            return F.instance_norm(x.float().transpose(1, 2)).transpose(1, 2)
        return F.layer_norm(x.float(), x.shape[-1:]) if kind == "layer" else x.float()
    y = sum(norm(h, obj.layer_norm) for h in hidden) / len(hidden)
    return norm(y, obj.final_norm)


def build_peer_step(cfg, batch: dict, clip: float | None):
    import torch.nn.functional as F

    from bench.bench_train_vision import peer_update
    torch.manual_seed(cfg.train.seed)
    obj, t = cfg.objective, cfg.train
    student = PeerStudent(cfg, peer_model(cfg)).train()
    teacher = copy.deepcopy(student.encoder).eval().requires_grad_(False)
    params = list(student.parameters())
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1], "weight_decay": t.weight_decay},
                                   {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
                                  lr=t.lr, betas=tuple(t.betas), eps=t.eps)
    t_params, s_params = list(teacher.parameters()), list(student.encoder.parameters())
    mask, tau = batch["mask"], cfg.ema.tau0

    def step() -> float:
        with torch.no_grad():
            targets = peer_targets(cfg, teacher, batch)[mask]
        prediction = student(batch, mask)
        if obj.loss == "l2":
            loss = F.mse_loss(prediction.float(), targets, reduction="none").sum(-1)
        else:
            loss = F.smooth_l1_loss(prediction.float(), targets, reduction="none", beta=obj.beta).sum(-1)
        loss = loss.sum() / mask.sum() / (targets.shape[-1] ** 0.5 if obj.scale == "inv_sqrt_dim" else 1.0)
        peer_update(loss, optimizer, params, clip, t_params, s_params, tau)
        return float(loss.detach())

    return step


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------

def python_calls(fn) -> int:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    return pstats.Stats(prof).total_calls


def aten_ops(fn) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def measure_one(modality: str, depth: int, rounds: int, warmup: int, overrides=()) -> dict:
    """One (modality, depth) in this process: median step times, Python calls and aten ops of ours and the peer's."""
    from bench.bench_train_vision import timed_rounds
    from pipeline import distributed
    torch.set_num_threads(1)
    os.chdir(REPO_ROOT)
    with tempfile.TemporaryDirectory(prefix="bench_host_") as tmp:
        cfg = experiment(modality, depth, tmp, overrides)
        batch = synthetic_batch(cfg)
        trainer = build_ours(cfg, batch)
        try:
            steps = {"ours": trainer.optimizer_step,
                     "peer": build_peer_step(cfg, synthetic_batch(cfg), trainer.ds_student.get("gradient_clipping"))}
            results = timed_rounds(steps, rounds, warmup, "cpu")
            counts = {name: {"python_calls": python_calls(fn), "aten_ops": aten_ops(fn)} for name, fn in steps.items()}
        finally:
            distributed.shutdown()
    out = {"modality": modality, "depth": depth}
    for name, (times, _) in results.items():
        out[name] = {"ms_per_step": 1000 * summarize(times)["median"], **counts[name]}
    out["ratio"] = out["ours"]["ms_per_step"] / out["peer"]["ms_per_step"]
    return out


def run_child(modality: str, depth: int, args) -> dict:
    from pipeline.distributed import source_tree_env
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", modality, str(depth), "--rounds", str(args.rounds),
           "--warmup", str(args.warmup), *args.overrides]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=source_tree_env(REPO_ROOT, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"{modality} depth {depth} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def per_block(rows: list[dict], who: str, key: str) -> float:
    """The slope of ``key`` against depth between the shallowest and the deepest run: the cost of one block."""
    lo, hi = min(rows, key=lambda r: r["depth"]), max(rows, key=lambda r: r["depth"])
    return (hi[who][key] - lo[who][key]) / max(hi["depth"] - lo["depth"], 1)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), args.rounds, args.warmup, args.overrides)))
        return 0
    print(f"machine: {machine_info()}\ndate: {now()}\ncommand: {command_line()}", flush=True)
    rows, summary = [], {}
    for modality in args.modalities:
        runs = []
        for depth in args.depths:
            r = run_child(modality, depth, args)
            runs.append(r)
            rows.append([modality, depth, f"{r['ours']['ms_per_step']:.1f}", f"{r['peer']['ms_per_step']:.1f}",
                         f"{r['ratio']:.2f}", f"{r['ours']['python_calls'] / 1000:.1f}k / "
                         f"{r['peer']['python_calls'] / 1000:.1f}k", f"{r['ours']['aten_ops']:,} / "
                         f"{r['peer']['aten_ops']:,}"])
            print(table(["modality", "depth", "ours ms/step", "peer ms/step", "ratio", "Python calls ours / peer",
                         "aten ops ours / peer"], rows[-1:]), flush=True)
        summary[modality] = {
            "ratio": {r["depth"]: round(r["ratio"], 3) for r in runs},
            "ms_per_step": {r["depth"]: [round(r["ours"]["ms_per_step"], 1), round(r["peer"]["ms_per_step"], 1)]
                            for r in runs},
            "python_calls_per_block": [round(per_block(runs, w, "python_calls")) for w in ("ours", "peer")],
            "ms_per_block": [round(per_block(runs, w, "ms_per_step"), 2) for w in ("ours", "peer")],
            "aten_ops": {r["depth"]: [r["ours"]["aten_ops"], r["peer"]["aten_ops"]] for r in runs}}
    print()
    print(table(["modality", "depth", "ours ms/step", "peer ms/step", "ratio", "Python calls ours / peer",
                 "aten ops ours / peer"], rows))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
