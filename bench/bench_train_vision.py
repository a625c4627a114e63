"""Training throughput of the full data2vec vision step, against the machine's matmul peak and a
plain-PyTorch peer built on transformers' ``Data2VecVisionModel``.

    python bench/bench_train_vision.py [--image-size 64 --patch-size 8 --dim 256 --depth 6 --heads 8
                                        --ffn-dim 1024 --batch 16 --steps 12 --warmup 3] [key.sub=value ...]

Three measurements, all in this one process:

1. matmul peak: best rate of ``torch.matmul`` on two n x n matrices (fp32 on the CPU, bf16 on a GPU).
2. ours: ``pipeline.trainer.Trainer`` (a DeepSpeed ZeRO-3 engine for the student, a ZeRO-3 teacher gathered by
   pipeline.gather, megatron-core linears, world size 1) fed one synthetic batch over and over; each
   ``optimizer_step()`` is the whole data2vec step: teacher forward on the clean image, student forward on the masked
   image and backward, AdamW step (with the DeepSpeed config's gradient clipping) and the EMA update.
3. peer: the same work in plain PyTorch on ``transformers.Data2VecVisionModel`` of the same shape
   (mask token, shared relative position bias, layer scale 0.1, no mean pooling): student forward
   with ``bool_masked_pos`` + Linear(D, D) head + Smooth L1 on masked positions, backward, gradient
   clipping, AdamW; teacher (deepcopy, eval, no_grad) forward with ``output_hidden_states=True`` and
   layer-normed top-K average targets; EMA with ``torch._foreach_*``.

After a few warmup steps each, ours and the peer are timed in alternating rounds (A B, B A, ...) so
background load on a shared machine hits both alike; the median step time is reported. The matmul
peak is taken before and after, and the better of the two is used as "peak".

With ``--ranks N`` the script relaunches itself under torchrun: ours is the Trainer at data-parallel size N (ZeRO-3
over N ranks), the peer the same student under ``DistributedDataParallel`` (gloo on the CPU), each rank with the
same batch; rates count the samples of all ranks, and the peak is N x one rank's (all ranks measuring at once).

Both rates use the trainer's own FLOP count (``Trainer.flops_per_sample``: 3x forward for the
student, 1x for the teacher; matmuls and attention only), so the ratio is a pure time ratio.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import (REPO_ROOT, Stopwatch, fmt, machine_info, matmul_peak, now, summarize,  # noqa: E402
                          table, command_line)

SHAPE_OPTIONS = (  # (flag, config key, default)
    ("image_size", "model.image_size", 64),
    ("patch_size", "model.patch_size", 8),
    ("dim", "encoder.dim", 256),
    ("depth", "encoder.depth", 6),
    ("heads", "encoder.heads", 8),
    ("ffn_dim", "encoder.ffn_dim", 1024),
    ("batch", "train.micro_batch_size", 16),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/bench_train_vision.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="configs/vision_tiny.yaml",
                   help="experiment YAML the shape options override (default: %(default)s)")
    for flag, key, default in SHAPE_OPTIONS:
        p.add_argument(f"--{flag.replace('_', '-')}", type=int, default=default,
                       help=f"sets {key} (default: %(default)s)")
    p.add_argument("--steps", type=int, default=12, help="timed optimizer steps per model (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    p.add_argument("--matmul-n", type=int, default=2048, help="matrix size for the peak (default: %(default)s)")
    p.add_argument("--matmul-repeats", type=int, default=10, help="timed matmuls (default: %(default)s)")
    p.add_argument("--skip-peer", action="store_true", help="do not run the transformers peer")
    p.add_argument("--ranks", type=int, default=1,
                   help="data-parallel ranks (default 1): > 1 relaunches this script under torchrun; ours is the "
                        "Trainer at DP N, the peer the same model under DistributedDataParallel; figures are for all "
                        "ranks together, the matmul peak is N x one rank's measured while all run theirs")
    p.add_argument("overrides", nargs="*", help="more config overrides, e.g. objective.top_k=4 encoder.drop_path=0.1")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.ranks < 1:
        p.error("--steps and --ranks must be >= 1 and --warmup >= 0")
    return args


def config_overrides(args: argparse.Namespace, output_dir: str) -> list[str]:
    shape = [f"{key}={getattr(args, flag)}" for flag, key, _ in SHAPE_OPTIONS]
    # grad_accum=1: one micro-batch per timed step, like the peer; output_dir: nothing is saved here
    return [*shape, "train.grad_accum=1", f"train.output_dir={output_dir}", *args.overrides]


def synthetic_batch(cfg, seed: int = 0) -> dict:
    """Normalised-looking images and a random mask with exactly model.num_masked True per row (data2vec 2.0: one
    row per clone, model.clone_batch per image)."""
    import torch
    model, batch = cfg.model, cfg.train.micro_batch_size
    g = torch.Generator().manual_seed(seed)
    n, rows = model.grid ** 2, batch * model.clone_batch
    image = torch.randn(batch, model.in_chans, model.image_size, model.image_size, generator=g)
    order = torch.rand(rows, n, generator=g).argsort(dim=1)
    mask = torch.zeros(rows, n, dtype=torch.bool)
    mask.scatter_(1, order[:, :model.num_masked], True)
    return {"image": image, "mask": mask}


# ---------------------------------------------------------------------------------------------
# Ours: pipeline.trainer.Trainer
# ---------------------------------------------------------------------------------------------

def set_single_rank_env() -> None:
    from pipeline.distributed import free_port
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())})


def build_ours(cfg, batch: dict):
    """The Trainer on one rank, fed ``batch`` forever. Call ``pipeline.distributed.shutdown()`` after."""
    from pipeline import distributed
    from pipeline.trainer import Trainer

    if "WORLD_SIZE" not in os.environ:  # under torchrun (--ranks > 1) the launcher set it
        set_single_rank_env()
    choice = distributed.choose_device(cfg.train.precision)
    ds_base = distributed.load_ds_config(cfg.train.ds_config)
    rt = distributed.init_runtime(tp=1, choice=choice)
    trainer = Trainer(cfg, rt, ds_base, ["unused"])  # shards are never read: batches are fed here
    trainer.batches = itertools.repeat(batch)
    return trainer


# ---------------------------------------------------------------------------------------------
# Peer: transformers Data2VecVisionModel in plain PyTorch
# ---------------------------------------------------------------------------------------------

def build_peer(cfg):
    from transformers import Data2VecVisionConfig, Data2VecVisionModel
    enc, model = cfg.encoder, cfg.model
    hf = Data2VecVisionConfig(
        hidden_size=enc.dim, num_hidden_layers=enc.depth, num_attention_heads=enc.heads,
        intermediate_size=enc.ffn_dim, image_size=model.image_size, patch_size=model.patch_size,
        num_channels=model.in_chans, use_mask_token=True, use_absolute_position_embeddings=False,
        use_relative_position_bias=False, use_shared_relative_position_bias=True, use_mean_pooling=False,
        layer_scale_init_value=0.1, drop_path_rate=enc.drop_path, hidden_dropout_prob=enc.dropout,
        attention_probs_dropout_prob=enc.attn_dropout, layer_norm_eps=enc.layer_norm_eps,
        hidden_act="gelu")
    return Data2VecVisionModel(hf, add_pooling_layer=False)


class PeerStudent(torch.nn.Module):
    """The peer's student: transformers' encoder + a Linear(D, D) head on the masked positions (one module, so that
    DistributedDataParallel can wrap both)."""

    def __init__(self, encoder, head):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, image, mask):
        final = self.encoder(image, bool_masked_pos=mask).last_hidden_state[:, 1:]
        return self.head(final[mask])


def build_peer_step(cfg, batch: dict, device: str, dtype, clip: float | None, ddp: bool = False,
                    teacher_autocast: bool = True):
    """One plain-PyTorch data2vec step on transformers' model (``ddp``: under DistributedDataParallel, gradients
    averaged over the ranks as our loss is; ``teacher_autocast``: the teacher computes under the student's
    autocast, else in fp32, as ours does: ``Trainer.teacher_autocast``); returns ``step() -> loss``."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(cfg.train.seed)
    obj, t = cfg.objective, cfg.train
    student = build_peer(cfg).to(device).train()
    head = torch.nn.Linear(cfg.encoder.dim, cfg.encoder.dim).to(device)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    params = list(student.parameters()) + list(head.parameters())
    model = PeerStudent(student, head)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model)
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=t.lr, betas=tuple(t.betas), eps=t.eps)
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    image, mask = batch["image"].to(device), batch["mask"].to(device)
    k, tau = obj.top_k, cfg.ema.tau0

    def ln(x):
        return F.layer_norm(x.float(), x.shape[-1:])

    def autocast(enabled: bool = True):  # like the trainer: bf16 autocast on a GPU, plain fp32 on the CPU
        return torch.autocast(torch.device(device).type, dtype=dtype, enabled=enabled and dtype != torch.float32)

    def step() -> float:
        with torch.no_grad(), autocast(teacher_autocast):
            hidden = teacher(image, output_hidden_states=True).hidden_states[-k:]  # block outputs incl. CLS
        targets = ln(sum(ln(h[:, 1:]) for h in hidden) / k)[mask]  # (M, D) fp32
        with autocast():
            prediction = model(image, mask)
        loss = F.smooth_l1_loss(prediction, targets, reduction="none", beta=obj.beta).mean(-1).sum() / mask.sum()
        peer_update(loss, optimizer, params, clip, t_params, s_params, tau)
        return loss.item()

    return step


def peer_update(loss, optimizer, params: list, clip: float | None, t_params: list, s_params: list, tau: float) -> None:
    """A plain-PyTorch peer's update after its loss: backward, gradient clipping, AdamW step, EMA of the teacher."""
    import torch
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    with torch.no_grad():
        torch._foreach_mul_(t_params, tau)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - tau)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def timed_rounds(steps: dict, rounds: int, warmup: int, device: str) -> dict:
    """Warm every step function up, then time them in alternating rounds (A B, B A, ...) so that
    background load on a shared machine hits all of them alike. -> {name: (seconds, last result)}."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in steps}
    last = {}
    names = list(steps)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            with Stopwatch(device) as sw:
                last[name] = steps[name]()
            times[name].append(sw.seconds)
    return {name: (times[name], last[name]) for name in steps}


def rates(times: list[float], batch: int, flops_per_sample: float, peak: float) -> dict:
    s = summarize(times)
    samples_per_s = batch / s["median"]
    tflops = samples_per_s * flops_per_sample / 1e12
    return {"step_s": s["median"], "samples_per_s": samples_per_s, "tflops": tflops, "pct_peak": 100 * tflops / peak}


def relaunch_under_torchrun(ranks: int, argv, script: str = __file__) -> int:
    """Run ``script`` (default: this one) again under torchrun on ``ranks`` ranks with the same arguments."""
    import subprocess
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           str(Path(script).resolve()), *(sys.argv[1:] if argv is None else argv)]
    return subprocess.run(cmd, cwd=REPO_ROOT).returncode


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.ranks > 1 and "LOCAL_RANK" not in os.environ:
        return relaunch_under_torchrun(args.ranks, argv)
    world, main_rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)) == 0
    say = print if main_rank else (lambda *a, **k: None)
    os.chdir(REPO_ROOT)  # presets and ds_configs/ are relative to the repository root

    from pipeline import distributed
    from pipeline.config import ConfigError
    from pipeline.experiment import load_experiment

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        try:
            cfg = load_experiment(args.preset, config_overrides(args, tmp))
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        batch = synthetic_batch(cfg, cfg.train.seed)
        say(f"machine: {machine_info()}\ndate: {now()}\ncommand: {command_line()}", flush=True)
        enc, model = cfg.encoder, cfg.model
        say(f"shape: image {model.image_size}, patch {model.patch_size} ({model.grid ** 2} patches + CLS, "
              f"{model.num_masked} masked), dim {enc.dim}, depth {enc.depth}, heads {enc.heads}, "
              f"ffn {enc.ffn_dim}, batch {cfg.train.micro_batch_size}, top_k {cfg.objective.top_k}; "
              f"{args.warmup} warmup + {args.steps} timed steps; {world} data-parallel rank(s)", flush=True)

        peak_before = matmul_peak(args.matmul_n, args.matmul_repeats)
        with Stopwatch() as build:
            trainer = build_ours(cfg, batch)
        try:
            rt = trainer.rt
            device = str(rt.device)
            steps = {"ours": trainer.optimizer_step}
            if not args.skip_peer:
                clip = trainer.ds_student.get("gradient_clipping")
                steps["peer"] = build_peer_step(cfg, batch, device, rt.choice.dtype, clip, ddp=world > 1,
                                                teacher_autocast=trainer.teacher_autocast())
            results = timed_rounds(steps, args.steps, args.warmup, device)
            flops = trainer.flops_per_sample()
        finally:
            distributed.shutdown()
        peak_after = matmul_peak(args.matmul_n, args.matmul_repeats)

    if not main_rank:
        return 0
    peak = world * max(peak_before["best_tflops"], peak_after["best_tflops"])
    print(f"matmul peak ({args.matmul_n}x{args.matmul_n} {peak_before['dtype']} on {peak_before['device']}, "
          f"best of {args.matmul_repeats}{', per rank, all ranks at once' if world > 1 else ''}): "
          f"{peak_before['best_tflops']:.4f} TFLOP/s before, "
          f"{peak_after['best_tflops']:.4f} after (medians {peak_before['median_tflops']:.4f}, "
          f"{peak_after['median_tflops']:.4f})")
    print(f"ours: Trainer built in {build.seconds:.1f}s (process group, megatron state, ZeRO-3 student and teacher)")
    from pipeline.metrics import summary_values
    for name, (times, last) in results.items():
        loss = summary_values(last["summary"])["loss"] if isinstance(last, dict) else last
        print(f"{name}: step seconds {[round(x, 3) for x in times]}, last loss {loss:.4f}")
    b = cfg.train.micro_batch_size * world  # samples per step, all ranks
    ours_r = rates(results["ours"][0], b, flops, peak)
    peer_r = rates(results["peer"][0], b, flops, peak) if "peer" in results else None
    print(f"\nFLOPs per sample (Trainer.flops_per_sample): {flops / 1e9:.3f} GFLOP; "
          f"compute dtype {str(rt.choice.dtype).replace('torch.', '')} on {device}; "
          f"torch threads {torch.get_num_threads()}; load avg now {os.getloadavg()[0]:.2f}")
    rows = [["matmul peak", "-", "-", fmt(peak, 3), "100"]]
    rows.append(["ours (Trainer, ZeRO-3)", fmt(ours_r["step_s"]), fmt(ours_r["samples_per_s"]),
                 fmt(ours_r["tflops"], 3), fmt(ours_r["pct_peak"])])
    if peer_r:
        rows.append(["peer (transformers)", fmt(peer_r["step_s"]), fmt(peer_r["samples_per_s"]),
                     fmt(peer_r["tflops"], 3), fmt(peer_r["pct_peak"])])
        rows.append(["ratio ours / peer", "-",
                     fmt(ours_r["samples_per_s"] / peer_r["samples_per_s"]),
                     fmt(ours_r["tflops"] / peer_r["tflops"]), "-"])
    print(table(["", "s/step (median)", "samples/s", "TFLOP/s", "% of peak"], rows))
    print(json.dumps({"ratio_vs_peer": ours_r["samples_per_s"] / peer_r["samples_per_s"] if peer_r else None,
                      "ranks": world, "ours": ours_r, "peer": peer_r, "peak_tflops": peak}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
