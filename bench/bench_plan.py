"""The capacity planner (pipeline.plan) against measured ZeRO-3 state, and its tables for the big presets.

    python bench/bench_plan.py [--layouts 2x1,4x1,4x2] [--gpus 8,64,256,512] [--skip-measure]

(a) Measured vs planned, per rank, on CPU gloo ranks: tests/dist/memory_check.py under torchrun builds
    the real ``Trainer`` for configs/vision_tiny.yaml (micro 2, fp32 on CPU, ds_configs/zero3.json) at
    each WORLDxTP layout, runs two steps and reports the element counts and bytes of the student's
    ZeRO-3 parameter partitions, the gradient partition buffer, the optimizer (fp32 master flat groups +
    AdamW exp_avg / exp_avg_sq), the teacher's fp32 partitions and the student parameters still gathered
    after the forward; ``pipeline.plan.plan(..., dtype="fp32")`` predicts the same in this process.
(b) The planner's table (analytic) for the *_large presets at TP 1 and the *_1b presets at TP 2 (one
    TP group inside a node, halving the per-GPU activations of these 1B models) on 8 / 64 / 256 / 512
    GPUs of 80 GiB, 8 per node. The global batch is held at each modality's reference (vision 2048
    images, speech 256 crops, text 256 blocks): micro batch = min(preset, target / DP), grad_accum
    makes up the rest; where DP alone exceeds the target the global batch is DP x 1 (marked).
(c) Inter- and intra-node bytes per GPU per optimizer step for the *_large presets (data2vec v1 and 2.0, TP 1) at
    the same layouts, in three settings: "before" (the pipeline until 2026-11-28: the teacher gathers fp32 weights
    whatever it computes in, gradients reduce-scattered in bf16; at TP 1 this is train.teacher_precision=fp32
    train.grad_reduce=compute), "now" (defaults: a teacher under the student's autocast gathers bf16 weights,
    gradients reduce in fp32), "now, bf16 reduce" (train.grad_reduce=compute), and hybrid sharding over one node's
    8 ranks (parallel.shard=8: gathers inside a node, the gradient partitions all-reduced over the DP / 8 replicas
    across nodes) with fp32 and with bf16 (train.grad_reduce=compute) reduction. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO_ROOT, Stopwatch, command_line, fmt, machine_info, now, table, torchrun_json  # noqa: E402

TINY = "configs/vision_tiny.yaml"
TARGET_BATCH = {"vision": 2048, "speech": 256, "text": 256}
PRESETS = [("vision_large", 1), ("speech_large", 1), ("text_large", 1),
           ("vision_1b", 2), ("speech_1b", 2), ("text_1b", 2)]
GiB = 2 ** 30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/bench_plan.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="2x1,4x1,4x2", help="WORLDxTP layouts measured on CPU ranks")
    p.add_argument("--gpus", default="8,64,256,512", help="cluster sizes for the planner table")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0)
    p.add_argument("--skip-measure", action="store_true", help="only the planner table")
    return p.parse_args(argv)


def measure(world: int, tp: int, out: Path) -> dict:
    return torchrun_json([str(REPO_ROOT / "tests/dist/memory_check.py"), str(out), TINY, str(tp)], world, out, 600)


def measured_table(layouts: list[tuple[int, int]]) -> str:
    from pipeline.experiment import load_experiment
    from pipeline.plan import plan
    cfg = load_experiment(REPO_ROOT / TINY)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world, tp in layouts:
            with Stopwatch() as sw:
                report = measure(world, tp, Path(tmp) / f"{world}x{tp}.json")
            p = plan(cfg, world, tp, 2, 1, dtype="fp32")
            planned = {"student parameters": p.student_partition * 4, "gradients": p.student_partition * 4,
                       "optimizer (fp32 master + m + v)": p.student_partition * 12,
                       "teacher (fp32)": p.teacher_partition * 4}
            ranks = report["ranks"]
            for label, key in (("student parameters", "student_params"), ("gradients", "gradients"),
                               ("optimizer (fp32 master + m + v)", "optimizer"), ("teacher (fp32)", "teacher")):
                got = sorted({r["bytes"][key] for r in ranks})
                rows.append([f"{world}x{tp} (DP {world // tp})", label, fmt(planned[label] / 1024, 4),
                             "/".join(fmt(g / 1024, 4) for g in got), _ratio(got, planned[label])])
            kept = sorted({r["kept_after_forward"][-1] * 4 for r in ranks})
            rows.append([f"{world}x{tp} (DP {world // tp})", "gathered after the forward (fp32)",
                         fmt(p.kept_numel * 4 / 1024, 4), "/".join(fmt(k / 1024, 4) for k in kept),
                         _ratio(kept, p.kept_numel * 4)])
            print(f"  measured {world}x{tp} in {sw.seconds:.1f}s", flush=True)
    return table(["WORLDxTP", "per rank", "planned KiB", "measured KiB (all ranks)", "measured / planned"], rows)


def _ratio(got: list[int], planned: float) -> str:
    return "/".join(f"{g / planned:.4f}" for g in got)


def layout_for(cfg, gpus: int, tp: int) -> tuple[int, int, int, str]:
    dp = gpus // tp
    target = TARGET_BATCH[cfg.modality]
    if dp >= target:
        return 1, 1, dp, " (>target)" if dp > target else ""
    per_rank = target // dp
    micro = max(m for m in range(1, min(cfg.train.micro_batch_size, per_rank) + 1) if per_rank % m == 0)
    return micro, per_rank // micro, micro * (per_rank // micro) * dp, ""


def planner_table(gpus_list: list[int], memory_gb: float) -> str:
    from pipeline.experiment import load_experiment
    from pipeline.plan import plan
    rows = []
    for name, tp in PRESETS:
        cfg = load_experiment(REPO_ROOT / f"configs/{name}.yaml")
        for gpus in gpus_list:
            micro, accum, global_batch, mark = layout_for(cfg, gpus, tp)
            p = plan(cfg, gpus, tp, micro, accum, gpu_memory_gb=memory_gb, nodes=max(1, gpus // 8),
                     gpus_per_node=min(8, gpus), suggest=False)
            states = sum(v for k, v in p.memory.items() if not k.startswith(("CUDA", "ZeRO reduce")))
            student = p.phases["student forward/backward"]
            gathered, act = list(student.values())
            per_step = p.comm_per_step()
            tp_traffic = sum(v for k, v in per_step.items() if k.startswith("TP"))
            dp_traffic = sum(per_step.values()) - tp_traffic  # gathers, reduce-scatter, statistics
            nodes = p.comm_bytes_per_step()
            rows.append([name, gpus, f"{tp} x {p.dp}", f"{micro} x {accum} = {global_batch}{mark}",
                         f"{p.student_numel / 1e9:.2f}B", fmt(states / GiB), fmt(gathered / GiB), fmt(act / GiB),
                         p.peak_phase.split()[0], fmt(p.peak / GiB), "yes" if p.fits else "NO",
                         fmt(dp_traffic / GiB), fmt(tp_traffic / GiB), fmt(nodes["inter_node"] / GiB)])
    return table(["preset", "GPUs", "TP x DP", "micro x accum = global", "params", "states GiB",
                  "gathered GiB", "activations GiB", "peak phase", "peak GiB", f"fits {memory_gb:g}",
                  "DP traffic GiB/step", "TP traffic GiB/step", "inter-node GiB/step"], rows)


TRAFFIC_PRESETS = ["vision_large", "speech_large", "text_large", "vision_large_v2", "speech_large_v2",
                   "text_large_v2"]
TRAFFIC_SETTINGS = {"before": ["train.teacher_precision=fp32", "train.grad_reduce=compute"], "now": [],
                    "now, bf16 reduce": ["train.grad_reduce=compute"], "hybrid 8": ["parallel.shard=8"],
                    "hybrid 8, bf16 reduce": ["parallel.shard=8", "train.grad_reduce=compute"]}


def traffic_table(gpus_list: list[int]) -> tuple[str, dict]:
    from pipeline.experiment import load_experiment
    from pipeline.plan import plan
    rows, figures = [], {}
    for name in TRAFFIC_PRESETS:
        for gpus in gpus_list:
            row, nodes = [name, gpus], max(1, gpus // 8)
            for setting, overrides in TRAFFIC_SETTINGS.items():
                cfg = load_experiment(REPO_ROOT / f"configs/{name}.yaml", overrides)
                micro, accum, _, _ = layout_for(cfg, gpus, 1)
                p = plan(cfg, gpus, 1, micro, accum, nodes=nodes, gpus_per_node=min(8, gpus), suggest=False)
                split = p.comm_bytes_per_step()
                figures[f"{name}/{gpus}/{setting}"] = split
                row += [fmt(split["inter_node"] / GiB), fmt(split["intra_node"] / GiB)]
            before = figures[f"{name}/{gpus}/before"]["inter_node"]
            for setting in ("now", "hybrid 8, bf16 reduce"):
                row.append(fmt(figures[f"{name}/{gpus}/{setting}"]["inter_node"] / before) if before else "-")
            rows.append(row)
    headers = ["preset", "GPUs"] + [f"{s} {k}" for s in TRAFFIC_SETTINGS for k in ("inter", "intra")]
    return table(headers + ["inter now / before", "inter hybrid bf16 / before"], rows), figures


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"machine: {machine_info()}\ndate: {now()}\ncommand: {command_line()}", flush=True)
    if not args.skip_measure:
        layouts = [tuple(int(x) for x in item.split("x")) for item in args.layouts.split(",")]
        print("\n(a) per-rank model states and teacher, vision_tiny (fp32 on CPU ranks, micro 2), planned vs measured:")
        print(measured_table(layouts))
    gpus = [int(g) for g in args.gpus.split(",")]
    with Stopwatch() as sw:
        text = planner_table(gpus, args.gpu_memory_gb)
    print(f"\n(b) planner ({sw.seconds:.1f}s), bf16 compute, 8 GPUs per node, {args.gpu_memory_gb:g} GiB each, "
          f"math attention (no --fused-attention), --overhead-gb 2:")
    print(text)
    text, figures = traffic_table(gpus)
    print("\n(c) GiB per GPU per optimizer step, inter-node / intra-node (TP 1, 8 GPUs per node, bf16 compute):")
    print(text)
    print(json.dumps({"comm_bytes_per_step": figures}))
    return 0


if __name__ == "__main__":
    import warnings
    warnings.filterwarnings("ignore")
    sys.exit(main())
