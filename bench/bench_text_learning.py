"""Does text pretraining learn? Pretrain text_tiny on a larger real-text corpus, then probe its features.

    python bench/bench_text_learning.py [--steps 600] [--workdir runs/bench_text_learning]

Corpus: the docstrings of every standard-library module except the 8 packages bench/probe_text.py
labels (about 4,000 documents, 1 MB), one document per line -> ``data_prep.text`` (2,000-piece
sentencepiece, 64-token blocks) -> ``pipeline.train`` with configs/text_tiny.yaml on 2 CPU ranks ->
``bench/probe_text.py`` on the final checkpoint (kNN and linear probes against random init, on held-out
text the run never saw). Ends with one JSON line: the loss curve and the probe figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO_ROOT  # noqa: E402
from bench.probe_text import PACKAGES, package_docs  # noqa: E402
from pipeline.distributed import local_launch_command  # noqa: E402

SKIP = {"idlelib", "tkinter", "turtledemo", "turtle", "this", "antigravity", "test", "lib2to3", "ensurepip", "venv",
        "pydoc_data", *PACKAGES}


def write_corpus(path: Path) -> int:
    docs = []
    for name in sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP):
        try:  # some modules print or fail on import (platform-specific): keep what imports quietly
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                docs += package_docs(name)
        except BaseException:  # noqa: BLE001 (an import may even call sys.exit)
            continue
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(sorted(set(docs))) + "\n", encoding="utf-8")
    return len(set(docs))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps (16 blocks of 64 tokens each)")
    parser.add_argument("--workdir", default="runs/bench_text_learning")
    args = parser.parse_args(argv)
    work = (REPO_ROOT / args.workdir).resolve()
    run = work / f"text_tiny_{args.steps}"
    docs = write_corpus(work / "raw" / "stdlib_docs.txt")
    subprocess.run([sys.executable, "-m", "data_prep.text", "--input", str(work / "raw"), "--output",
                    str(work / "shards"), "--vocab-size", "2000", "--block-size", "64", "--shard-size", "200",
                    "--workers", "2", "--quiet"], cwd=REPO_ROOT, check=True)
    start = time.perf_counter()
    subprocess.run(local_launch_command(2, [
        "-m", "pipeline.train", "--config", "configs/text_tiny.yaml", f"data.manifest={work / 'shards'}",
        "model.vocab_size=2000", f"train.output_dir={run}", f"train.steps={args.steps}",
        f"ema.anneal_steps={args.steps}", f"train.save_every={args.steps}"]), cwd=REPO_ROOT, check=True)
    train_s = time.perf_counter() - start
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    from bench import probe_text
    probes = probe_text.main([str(run / "checkpoints" / f"step_{args.steps:08d}")])
    result = {"documents": docs, "steps": args.steps, "train_seconds": round(train_s, 1),
              "loss": {r["step"]: round(r["loss"], 4) for r in records}, "probes": probes["probes"]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
