"""data2vec v1 against data2vec 2.0 on this pipeline: cost per step, and probe accuracy at equal wall-clock.

    python bench/bench_v2.py [--modality vision|speech|text|all] [--seconds 420] [--cost-steps 60]
                             [--nproc 2] [--workdir runs/bench_v2]

Per modality, the tiny presets of the two methods (``configs/<modality>_tiny.yaml`` and ``..._tiny_v2.yaml``: the
same 4 x 64 encoder, the same data) train through the real entry point on ``--nproc`` CPU ranks, on the labelled
data of bench/bench_probe.py (sklearn's handwritten digits, espeak-ng's spoken digits with held-out voices,
standard-library docstrings by package).

1. Cost: ``--cost-steps`` steps of each; from the step lines (after the first, which holds start-up): seconds per
   step, unique samples per second, masked predictions per second (samples x clones x masked positions per
   clone), and the model FLOPs per sample split into teacher, student encoder and decoder (``Method.
   flops_per_sample``: forward + backward for the student and the decoder, forward for the teacher).
2. Quality at equal time: each method gets ``--seconds`` of training, as the number of steps its measured
   seconds per step allows (its schedule, warmup and EMA anneal sized to that), then ``python -m
   pipeline.evaluate`` scores the final student and teacher with the kNN and linear probes on the held-out part.

Prints the tables and one JSON line. Data and finished runs are reused (delete --workdir to start over).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_probe import MAKE, OVERRIDES, evaluate, pretrain, random_init_baseline  # noqa: E402
from bench.common import REPO_ROOT, fmt, start_report, table  # noqa: E402

MODALITIES = ("vision", "speech", "text")
METHODS = {"data2vec": "", "data2vec2": "_v2"}  # method -> preset suffix


def preset(modality: str, method: str) -> str:
    return f"configs/{modality}_tiny{METHODS[method]}.yaml"


def flop_split(config: str, nproc: int) -> dict:
    """FLOPs per sample by part at the preset's nominal length, and the global batch and clone geometry."""
    from pipeline.experiment import load_experiment
    cfg = load_experiment(REPO_ROOT / config)
    mod = cfg.make_modality()
    method = cfg.make_method(mod)
    tokens = mod.tokens_per_sample()
    rows, length = method.student_shape(tokens)
    return {"flops": method.flops_per_sample(tokens, share_features=False), "clones": rows,
            "student_positions": length, "tokens": tokens,
            "masked_per_clone": round(mod.masked_share() * tokens), "global_batch": cfg.train.micro_batch_size * nproc}


def seconds_per_step(run: dict, global_batch: int) -> tuple[float, float]:
    """(seconds per step, unique samples per second): medians over the step lines after the first."""
    rates = [v for k, v in sorted(run["samples_per_s"].items(), key=lambda kv: int(kv[0]))][1:] or \
        list(run["samples_per_s"].values())
    rate = statistics.median(rates)
    return global_batch / rate, rate


def bench(modality: str, args) -> dict:
    work = (REPO_ROOT / args.workdir / modality).resolve()
    data = MAKE[modality](work / "data", False)
    print(f"\n== {modality}: {data.source}\n   {data.n_train} train / {data.n_eval} eval examples, {data.classes} "
          f"classes, majority class {data.majority:.3f}", flush=True)
    cost, quality = {}, {}
    for method in METHODS:
        config = preset(modality, method)
        geometry = flop_split(config, args.nproc)
        log_every = [f"train.log_every={max(args.cost_steps // 6, 1)}", "train.warmup_steps=10"]
        run = pretrain(modality, data, args.cost_steps, work / f"cost_{method}_{args.cost_steps}", args.nproc,
                       log_every, config)
        step_s, rate = seconds_per_step(run, geometry["global_batch"])
        cost[method] = {**geometry, "seconds_per_step": step_s, "samples_per_s": rate,
                        "masked_per_s": rate * geometry["clones"] * geometry["masked_per_clone"]}
    print(table(["method", "s/step", "samples/s", "masked predictions/s", "clones", "student positions",
                 "GFLOP/sample teacher", "student", "decoder"],
                [[m, fmt(c["seconds_per_step"]), fmt(c["samples_per_s"]), fmt(c["masked_per_s"]), c["clones"],
                  f"{c['student_positions']} of {c['tokens']}", fmt(c["flops"]["teacher"] / 1e9),
                  fmt(c["flops"]["student"] / 1e9), fmt(c["flops"]["decoder"] / 1e9)] for m, c in cost.items()]))
    for method in METHODS:
        steps = max(10, int(args.seconds / cost[method]["seconds_per_step"]))
        extra = [f"train.warmup_steps={max(steps // 20, 1)}", *OVERRIDES[modality]]
        trained = pretrain(modality, data, steps, work / f"equal_{method}_{args.seconds}s_{steps}", args.nproc, extra,
                           preset(modality, method))
        rows = {which: evaluate(trained["checkpoint"], data, which) for which in ("student", "teacher")}
        rows["random_init"] = random_init_baseline(trained["checkpoint"], data)  # the method's architecture
        quality[method] = {"steps": steps, "train_seconds": trained["train_seconds"], "probes": rows,
                           "loss": trained["loss"]}
    print(table(["method", "steps", "train s", "student kNN", "student linear", "teacher kNN", "teacher linear",
                 "random-init kNN", "random-init linear"],
                [[m, q["steps"], q["train_seconds"], *(fmt(q["probes"][w][k]) for w in ("student", "teacher",
                                                                                       "random_init")
                                                       for k in ("knn_top1", "linear_top1"))]
                 for m, q in quality.items()]))
    print(f"majority class: {data.majority:.3f}", flush=True)
    return {"modality": modality, "cost": cost, "quality": quality, "majority": data.majority,
            "seconds": args.seconds}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python bench/bench_v2.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modality", choices=(*MODALITIES, "all"), default="vision")
    parser.add_argument("--seconds", type=int, default=420, help="training wall-clock per method (default: %(default)s)")
    parser.add_argument("--cost-steps", type=int, default=60, help="steps of the cost runs (default: %(default)s)")
    parser.add_argument("--nproc", type=int, default=2, help="CPU ranks (default: %(default)s)")
    parser.add_argument("--workdir", default="runs/bench_v2", help="data and runs (default: %(default)s)")
    args = parser.parse_args(argv)
    start_report()
    results = [bench(m, args) for m in (MODALITIES if args.modality == "all" else (args.modality,))]
    print(json.dumps({"results": results}, default=str))
    return {"results": results}


if __name__ == "__main__":
    main()
