"""How much a bf16 gradient reduction loses at large data-parallel sizes (why train.grad_reduce defaults to fp32).

    python bench/bench_grad_reduce.py [--ranks 8,64,512] [--preset configs/vision_tiny.yaml] [--micro 2]

Each "rank" contributes the real bf16 gradient of one micro-batch (a plain single-process student + teacher of the
preset, fresh random images and masks, the data2vec loss), as a bf16 student's backward leaves it. The data-parallel
mean over R ranks is then formed two ways:

* fp32 reduce (train.grad_reduce=fp32, DeepSpeed communication_data_type fp32): the bf16 gradients are cast to fp32
  and summed in fp32 (the reference here), then divided by R;
* bf16 ring reduce (train.grad_reduce=compute): a reduce-scatter ring passes each chunk through R - 1 hops; each hop
  adds one rank's gradient to the partial sum it received and sends the result in bf16 (NCCL adds in fp32 and rounds
  the partial sum to bf16 at every hop), so the sum is rounded R - 1 times.

Reported: the relative error ||bf16 - fp32|| / ||fp32|| of the mean gradient and the cosine between the two, next to
what one rounding of the fp32 mean to bf16 costs (DeepSpeed stores the reduced partition in the compute dtype
either way), at each R. Gradients are computed once for the largest R; smaller R use the first ones. The last line
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import REPO_ROOT, Stopwatch, command_line, fmt, machine_info, now, table  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/bench_grad_reduce.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="8,64,512", help="data-parallel sizes R to compare")
    p.add_argument("--preset", default="configs/vision_tiny.yaml")
    p.add_argument("--micro", type=int, default=2, help="images per rank")
    return p.parse_args(argv)


def rank_gradients(preset: str, count: int, micro: int) -> list[torch.Tensor]:
    """``count`` flat bf16 gradients, one per micro-batch, of the preset's student at its initialisation."""
    from pipeline.distributed import model_parallel_config, single_process_parallel_state
    from pipeline.experiment import load_experiment
    from pipeline.model.data2vec import Backbone, Student
    from pipeline.modalities.vision import block_mask
    from pipeline.objective import regression_loss, teacher_targets
    import random
    single_process_parallel_state()
    cfg = load_experiment(REPO_ROOT / preset)
    torch.manual_seed(0)
    modality, mp = cfg.make_modality(), model_parallel_config(1)
    student = Student(modality, cfg.encoder, mp).train()
    teacher = Backbone(modality, cfg.encoder, mp).eval()
    teacher.load_state_dict(student.backbone.state_dict(), strict=False)
    student.bfloat16()  # as DeepSpeed's bf16 engine holds it
    m, rng, gen = cfg.model, random.Random(0), torch.Generator().manual_seed(0)
    grads = []
    for _ in range(count):
        images = torch.randn(micro, 3, m.image_size, m.image_size, generator=gen)
        masks = torch.stack([block_mask(m.grid, m.num_masked, 2, m.min_aspect, rng) for _ in range(micro)])
        with torch.no_grad():
            targets = teacher_targets(teacher({"image": images}, keep=cfg.objective.top_k), cfg.objective)[masks]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            prediction = student({"image": images.bfloat16()}, masks)
        student.zero_grad()
        (regression_loss(prediction.float(), targets, cfg.objective) / masks.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]).bfloat16())
    return grads


def ring_bf16_mean(grads: list[torch.Tensor]) -> torch.Tensor:
    partial = grads[0].clone()
    for g in grads[1:]:
        partial = (partial.float() + g.float()).bfloat16()
    return partial.float() / len(grads)


def compare(grads: list[torch.Tensor]) -> dict:
    exact = torch.stack([g.float() for g in grads]).double().sum(0) / len(grads)
    ring = ring_bf16_mean(grads).double()
    once = exact.float().bfloat16().double()
    rel = lambda x: ((x - exact).norm() / exact.norm()).item()  # noqa: E731
    return {"ranks": len(grads), "bf16_ring_rel_err": rel(ring), "one_bf16_rounding_rel_err": rel(once),
            "bf16_ring_cosine": torch.nn.functional.cosine_similarity(ring, exact, dim=0).item()}


def main(argv=None) -> int:
    args = parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    print(f"machine: {machine_info()}\ndate: {now()}\ncommand: {command_line()}", flush=True)
    with Stopwatch() as sw:
        grads = rank_gradients(args.preset, max(ranks), args.micro)
    print(f"{len(grads)} gradients of {grads[0].numel():,} elements in {sw.seconds:.1f}s")
    results = [compare(grads[:r]) for r in ranks]
    print(table(["ranks R", "bf16 ring: rel. error of the mean", "one bf16 rounding: rel. error", "bf16 ring: cosine"],
                [[r["ranks"], fmt(r["bf16_ring_rel_err"], 4), fmt(r["one_bf16_rounding_rel_err"], 4),
                  fmt(r["bf16_ring_cosine"], 6)] for r in results]))
    print(json.dumps({"grad_reduce": results}))
    return 0


if __name__ == "__main__":
    import warnings
    warnings.filterwarnings("ignore")
    sys.exit(main())
