"""How good are a checkpoint's features? Linear-probe and kNN top-1 on labelled data, against random init.

    python -m pipeline.evaluate CKPT --train PATH [PATH ...] --eval PATH [PATH ...] [--probe linear|knn|both]
                                [--random-init] [--weights student|teacher] [--json]

Features: pipeline.embed's (pooled final layer, evaluation transform; see pipeline/features.py for inputs
and labels: class folders CLASS/file, the class data_prep recorded in shards, or --label-field of jsonl).
- linear: logistic regression on standardised frozen features; its L2 penalty is chosen by 5-fold
  cross-validation on the train split only, then fitted on the whole train split.
- knn: k=20 nearest training features by cosine similarity, votes weighted exp(sim / 0.07) (DINO).
--random-init evaluates the same architecture untrained: the baseline pretraining must beat. --json prints
one object: {"linear_top1", "knn_top1", "n_train", "n_eval", "classes", ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pipeline.embed import common_arguments


def labelled(found: dict, classes: dict[str, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Features and integer labels of the labelled examples; ``classes`` maps names to ids (made from these)."""
    rows = [i for i, label in enumerate(found["labels"]) if label is not None]
    names = [found["labels"][i] for i in rows]
    if classes is None:
        classes = {name: i for i, name in enumerate(sorted(set(names)))}
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ValueError(f"the eval split has classes the train split lacks: {unknown[:5]}")
    return found["features"][rows], torch.tensor([classes[n] for n in names], dtype=torch.long), classes


def evaluate(args) -> dict:
    from pipeline.features import examples, load_backbone, read_features
    from pipeline.probes import knn_top1, linear_top1
    cfg, model = load_backbone(args.checkpoint, args.weights, args.random_init)
    from pipeline.vocab import model_for
    spm = model_for(cfg, Path(args.checkpoint), args.spm_model, [*args.train, *args.eval])  # text: its own tokenizer
    read = lambda paths: read_features(model, cfg, examples(paths, cfg, spm, args.label_field),  # noqa: E731
                                       progress=not args.quiet)
    train_x, train_y, classes = labelled(read(args.train))
    eval_x, eval_y, _ = labelled(read(args.eval), classes)
    if len(classes) < 2 or not len(eval_y):
        raise ValueError(f"need labelled examples of at least 2 classes in --train and some in --eval (found "
                         f"{len(classes)} class(es), {len(eval_y)} eval example(s)): see --help for where labels "
                         f"come from")
    result = {"n_train": len(train_y), "n_eval": len(eval_y), "classes": len(classes), "modality": cfg.modality,
              "weights": "random_init" if args.random_init else args.weights}
    if args.probe in ("linear", "both"):
        linear = linear_top1(train_x, train_y, eval_x, eval_y)
        result.update(linear_top1=linear["top1"], linear_l2=linear["l2"])
    if args.probe in ("knn", "both"):
        result["knn_top1"] = knn_top1(train_x, train_y, eval_x, eval_y)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser)
    parser.add_argument("--train", nargs="+", required=True, help="labelled inputs the probes are fitted on")
    parser.add_argument("--eval", nargs="+", required=True, help="labelled inputs the probes are scored on")
    parser.add_argument("--probe", choices=("linear", "knn", "both"), default="both")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    try:
        result = evaluate(args)
    except (ValueError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        scores = "  ".join(f"{k.replace('_top1', '')} top-1 {result[k]:.4f}" for k in ("linear_top1", "knn_top1")
                           if k in result)
        print(f"{result['modality']} {result['weights']}: {scores}  ({result['n_train']} train, {result['n_eval']} "
              f"eval, {result['classes']} classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
