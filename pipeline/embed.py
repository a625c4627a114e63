"""Feature extraction: one pooled feature vector per input, from a trained (or untrained) backbone.

    python -m pipeline.embed CKPT --input PATH [PATH ...] --output OUT.npz [--layers] [--weights teacher]

CKPT: a checkpoint directory, a --format pt export or a --format hf directory (python -m pipeline.export).
Inputs, decoding and pooling: see pipeline/features.py (shard directories, CLASS/file folders of images or
audio, .txt / .jsonl text; the evaluation transform; mean over positions of the final layer). OUT.npz holds
``keys`` (one per example), ``features`` (N, D) float32, ``labels`` (the class folder or label field; ""
where none) and with --layers ``layers`` (N, L + 1, D): every block's output, then the final output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def common_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments pipeline.embed and pipeline.evaluate share: the model and how text is read."""
    parser.add_argument("checkpoint", help="checkpoint directory, .pt export or HF export directory")
    parser.add_argument("--weights", choices=("student", "teacher"), default="student",
                        help="the student (default) or the EMA teacher (checkpoints and .pt exports hold both)")
    parser.add_argument("--random-init", action="store_true",
                        help="the same architecture untrained (the checkpoint's config, seeded init): the baseline")
    parser.add_argument("--spm-model", default=None,
                        help="text: the sentencepiece model (default: the one the checkpoint or HF directory "
                             "carries, else spm.model next to the run's data.manifest); checked against the "
                             "tokenizer the model records")
    parser.add_argument("--label-field", default="label", help="jsonl inputs: the field holding the label")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.embed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser)
    parser.add_argument("--input", nargs="+", required=True, help="shard directories, folders or text files")
    parser.add_argument("--output", "-o", required=True, help="the .npz file to write")
    parser.add_argument("--layers", action="store_true", help="also every block's pooled output")
    args = parser.parse_args(argv)
    import numpy as np

    from pipeline.features import examples, load_backbone, read_features
    from pipeline.vocab import model_for
    try:
        cfg, model = load_backbone(args.checkpoint, args.weights, args.random_init)
        spm = model_for(cfg, Path(args.checkpoint), args.spm_model, args.input)  # text: the model's own tokenizer
        found = read_features(model, cfg, examples(args.input, cfg, spm, args.label_field), args.layers,
                              progress=not args.quiet)
    except (ValueError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    arrays = {"keys": np.array(found["keys"]), "features": found["features"].numpy().astype(np.float32),
              "labels": np.array([label or "" for label in found["labels"]])}
    if args.layers:
        arrays["layers"] = found["layers"].numpy().astype(np.float32)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.output, **arrays)
    print(f"wrote {args.output}: {len(found['keys'])} examples x {arrays['features'].shape[1]} features "
          f"({cfg.modality}, {'random init' if args.random_init else args.weights})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
