"""Does pretraining learn? kNN and linear probes of pretrained against random-init features, on real
labelled data, per modality.

    python bench/bench_probe.py --modality vision|speech|text|all [--steps N] [--quick] [--workdir DIR]
                                [--override KEY=VALUE ...]

For each modality: make a labelled data set from material real people or real tools made and that is
available offline (cached under --workdir), split it into a train part and a held-out eval part, shard the
train part with data_prep, pretrain the modality's tiny preset on it with the real entry point
(``torchrun --nproc_per_node 2 -m pipeline.train --config configs/<modality>_tiny.yaml ...``, the overrides
printed), then score the final checkpoint with ``python -m pipeline.evaluate CKPT --train ... --eval ...
--json`` for ``--weights student``, ``--weights teacher`` and ``--random-init``: kNN top-1 and linear-probe
top-1 on the held-out part. Prints a table per modality with the majority-class rate, then one JSON line.

- vision: the handwritten digits scikit-learn ships (``sklearn.datasets.load_digits``: 1,797 8x8 images,
  the test set of UCI's optdigits, written by 13 people), upscaled (bicubic) to the preset's 32x32 and
  written as PNG class folders; a seeded stratified third is held out. Needs
  ``pip install -e '.[bench]'`` (scikit-learn).
- speech: the ten digit words spoken by Debian's espeak-ng, every voice variant it ships (``!v``) in 8
  English accents, at a random speed (130-190 words/min) and pitch (25-75); 16 kHz WAV class folders,
  each word placed at a random offset in at least 1 s. Every fifth voice variant is held out: eval
  clips come from voices pretraining and the probes never heard. Needs
  ``apt-get install -y espeak-ng``.
- text: the docstrings of the standard-library packages bench/probe_text.py labels (classes with at
  least 20 docstrings), labelled by package, split in halves per class, written as jsonl
  (``text``, ``label``). Pretraining reads bench/bench_text_learning.py's corpus (the docstrings of the
  rest of the standard library) plus the train half, unlabelled.

--quick makes small data sets and runs few steps: a smoke test of the whole path, not a measurement.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import random
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO_ROOT, fmt, run_logged, start_report, table  # noqa: E402

MODALITIES = ("vision", "speech", "text")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029",
           "en-us-nyc")
SAMPLE_RATE = 16000

# Per modality: default optimizer steps (sized so pretraining takes at most about 10 minutes on 2 CPU
# cores: see BENCHMARKS.md section 11) and the trainer overrides beyond data, output and steps.
STEPS = {"vision": 2000, "speech": 1500, "text": 2500}
OVERRIDES = {
    "vision": ["data.shuffle_buffer=512"],
    "speech": ["data.shuffle_buffer=512", "data.bucket_window=64"],
    "text": ["model.vocab_size=2000", "data.shuffle_buffer=512"],
}


@dataclass
class Labelled:
    """A modality's labelled data: what pipeline.evaluate reads, and what pretraining reads."""
    train: list[str]  # --train inputs of pipeline.evaluate
    eval: list[str]  # --eval inputs
    shards: str  # data_prep output the pretraining reads
    n_train: int
    n_eval: int
    classes: int
    majority: float  # the share of the eval part's most common class
    source: str


def stratified(labels: list, eval_share: float, seed: int) -> list[bool]:
    """Whether each example is held out: a seeded ``eval_share`` of every class."""
    held = [False] * len(labels)
    by_class = collections.defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    for label in sorted(by_class):
        idx = by_class[label]
        random.Random(f"{seed}/{label}").shuffle(idx)
        for i in idx[:round(len(idx) * eval_share)]:
            held[i] = True
    return held


def majority(labels: list) -> float:
    return max(collections.Counter(labels).values()) / len(labels)


def cached(out: Path, make) -> Labelled:
    """``make()`` once: its result is kept in out/data.json, next to the files it wrote."""
    record = out / "data.json"
    if record.is_file():
        return Labelled(**json.loads(record.read_text()))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = make()
    record.write_text(json.dumps(asdict(data), indent=1))
    return data


def prep(module: str, raw: Path, shards: Path, *options: str) -> None:
    run_logged([sys.executable, "-m", module, "--input", str(raw), "--output", str(shards), "--workers", "2",
                "--quiet", *options])


# ---------------------------------------------------------------------------------------------
# Vision: scikit-learn's handwritten digits
# ---------------------------------------------------------------------------------------------

def make_vision(out: Path, quick: bool, size: int = 32) -> Labelled:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("vision needs scikit-learn's digits: pip install -e '.[bench]' (or pip install scikit-learn)")
    from PIL import Image

    def make() -> Labelled:
        digits = load_digits()
        images, labels = digits.images, [str(int(t)) for t in digits.target]
        if quick:
            images, labels = images[:300], labels[:300]
        held = stratified(labels, 1 / 3, seed=0)
        for i, (pixels, label) in enumerate(zip(images, labels)):
            img = Image.fromarray((pixels * (255 / 16)).round().astype("uint8"), "L")
            path = out / ("eval" if held[i] else "train") / label / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.resize((size, size), Image.BICUBIC).save(path)
        prep("data_prep.images", out / "train", out / "shards", "--shard-size", "50")
        evals = [lab for lab, h in zip(labels, held) if h]
        return Labelled([str(out / "train")], [str(out / "eval")], str(out / "shards"), len(labels) - len(evals),
                        len(evals), len(set(labels)), majority(evals),
                        f"sklearn load_digits: {len(labels)} handwritten 8x8 digits (UCI optdigits test set, 13 "
                        f"writers), bicubic to {size}x{size} PNG; a stratified third held out")
    return cached(out, make)


# ---------------------------------------------------------------------------------------------
# Speech: digit words spoken by espeak-ng's voices
# ---------------------------------------------------------------------------------------------

ESPEAK_INSTALL = "apt-get update && apt-get install -y espeak-ng"


def espeak_variants() -> list[str]:
    """The voice variants (``!v/NAME``) espeak-ng ships, by file name (names with spaces left out)."""
    listing = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True, check=True).stdout
    files = (m.group(1) for m in re.finditer(r"!v/(\S+(?: \S+)*)", listing))  # the File column: ends at 2 spaces
    return sorted({f for f in files if " " not in f}, key=str.lower)


def speak(text: str, voice: str, speed: int, pitch: int, seconds: float, rng: random.Random):
    """espeak-ng's rendering of ``text`` at 16 kHz, its leading and trailing silence trimmed, placed at a random
    offset in ``seconds`` of silence (longer if the word needs it)."""
    import io

    import numpy as np
    import soundfile
    import torch
    import torchaudio
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                         capture_output=True, check=True).stdout
    data, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    data = torchaudio.functional.resample(torch.from_numpy(data), rate, SAMPLE_RATE).numpy()
    loud = np.flatnonzero(np.abs(data) > 1e-3)
    if not len(loud):
        return None
    data = data[loud[0]:loud[-1] + 1]
    total = max(int(seconds * SAMPLE_RATE), len(data) + SAMPLE_RATE // 10)
    start = rng.randrange(total - len(data) + 1)
    out = np.zeros(total, dtype="float32")
    out[start:start + len(data)] = data
    return out


def make_speech(out: Path, quick: bool) -> Labelled:
    if shutil.which("espeak-ng") is None:
        sys.exit(f"speech needs Debian's espeak-ng (the spoken words are made with it): {ESPEAK_INSTALL}")
    import soundfile

    def make() -> Labelled:
        variants = espeak_variants()
        accents = ACCENTS[:2] if quick else ACCENTS
        if quick:
            variants = variants[:20]
        held_voices = set(variants[4::5])  # every fifth variant: voices the model and probes never hear
        labels, held, silent = [], [], 0
        rng = random.Random(0)
        for variant in variants:
            for accent in accents:
                for word in DIGIT_WORDS:
                    speed, pitch = rng.randint(130, 190), rng.randint(25, 75)
                    wav = speak(word, f"{accent}+{variant}", speed, pitch, 1.0, rng)
                    if wav is None:
                        silent += 1
                        continue
                    split = "eval" if variant in held_voices else "train"
                    path = out / split / word / f"{variant}_{accent}_s{speed}_p{pitch}.wav"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    soundfile.write(path, wav, SAMPLE_RATE, subtype="PCM_16")
                    labels.append(word)
                    held.append(variant in held_voices)
        prep("data_prep.audio", out / "train", out / "shards", "--shard-size", "100")
        evals = [lab for lab, h in zip(labels, held) if h]
        return Labelled([str(out / "train")], [str(out / "eval")], str(out / "shards"), len(labels) - len(evals),
                        len(evals), len(DIGIT_WORDS), majority(evals),
                        f"espeak-ng: the 10 digit words x {len(variants)} voice variants x {len(accents)} English "
                        f"accents, speed 130-190, pitch 25-75, 16 kHz WAV ({silent} silent renderings dropped); "
                        f"{len(held_voices)} variants held out: {', '.join(sorted(held_voices))}")
    return cached(out, make)


# ---------------------------------------------------------------------------------------------
# Text: standard-library docstrings labelled by package
# ---------------------------------------------------------------------------------------------

def make_text(out: Path, quick: bool, min_docs: int = 20) -> Labelled:
    from bench.bench_text_learning import write_corpus
    from bench.probe_text import PACKAGES, labelled_docs

    def make() -> Labelled:
        texts, labels = labelled_docs(40 if quick else 150, seed=0)
        names = [PACKAGES[i] for i in labels]
        kept = {p for p, n in collections.Counter(names).items() if n >= min_docs}
        rows = [(t, n) for t, n in zip(texts, names) if n in kept]
        held = stratified([n for _, n in rows], 1 / 2, seed=0)
        for split, keep in (("train", False), ("eval", True)):
            with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for (text, name), h in zip(rows, held):
                    if h == keep:
                        f.write(json.dumps({"text": text, "label": name}) + "\n")
        raw = out / "raw"
        docs = write_corpus(raw / "stdlib_docs.txt")
        if quick:  # a small corpus: the first 500 documents
            lines = (raw / "stdlib_docs.txt").read_text(encoding="utf-8").splitlines()[:500]
            (raw / "stdlib_docs.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
            docs = len(lines)
        train_docs = [t for (t, _), h in zip(rows, held) if not h]
        (raw / "probe_train.txt").write_text("\n".join(train_docs) + "\n", encoding="utf-8")
        prep("data_prep.text", raw, out / "shards", "--vocab-size", "2000", "--block-size", "64",
             "--shard-size", "200")
        evals = [n for (_, n), h in zip(rows, held) if h]
        dropped = sorted(set(names) - kept)
        return Labelled([str(out / "train.jsonl")], [str(out / "eval.jsonl")], str(out / "shards"),
                        len(rows) - len(evals), len(evals), len(kept), majority(evals),
                        f"docstrings of {len(kept)} standard-library packages ({', '.join(sorted(kept))}; "
                        f"left out, under {min_docs} docstrings: {', '.join(dropped) or 'none'}), at most "
                        f"{40 if quick else 150} per package, halves per class; pretraining corpus: {docs} "
                        f"docstrings of the rest of the standard library + the {len(train_docs)} train docstrings")
    return cached(out, make)


MAKE = {"vision": make_vision, "speech": make_speech, "text": make_text}


# ---------------------------------------------------------------------------------------------
# Pretraining and evaluation through the public entry points
# ---------------------------------------------------------------------------------------------

def pretrain(modality: str, data: Labelled, steps: int, run: Path, nproc: int, extra: list[str],
             config: str | None = None) -> dict:
    """Train ``config`` (default ``configs/<modality>_tiny.yaml``) on the train part's shards (``extra``: more
    trainer overrides, last, so they win); reuses a finished run."""
    config = config or f"configs/{modality}_tiny.yaml"
    ckpt = run / "checkpoints" / f"step_{steps:08d}"
    record = run / "bench_probe.json"
    overrides = [f"data.manifest={data.shards}", f"train.output_dir={run}", f"train.steps={steps}",
                 f"ema.anneal_steps={steps}", f"train.save_every={steps}", f"train.log_every={max(steps // 20, 1)}",
                 *OVERRIDES[modality], *extra]
    if (ckpt / "COMPLETE").is_file() and record.is_file():
        print(f"reusing the finished run {run}", flush=True)
        return json.loads(record.read_text())
    shutil.rmtree(run, ignore_errors=True)
    seconds, _ = run_logged(["-m", "pipeline.train", "--config", config, *overrides], torchrun=nproc)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    result = {"checkpoint": str(ckpt), "steps": steps, "train_seconds": round(seconds, 1), "overrides": overrides,
              "config": config, "samples_per_s": {r["step"]: r["samples_per_s"] for r in metrics},
              "loss": {r["step"]: round(r["loss"], 4) for r in metrics},
              "target_std": {r["step"]: round(r["target_std"], 4) for r in metrics}}
    record.write_text(json.dumps(result))
    return result


def evaluate(ckpt: str, data: Labelled, which: str) -> dict:
    """``python -m pipeline.evaluate`` with ``--weights student|teacher`` or ``--random-init``."""
    choice = ["--random-init"] if which == "random_init" else ["--weights", which]
    seconds, out = run_logged([sys.executable, "-m", "pipeline.evaluate", ckpt, "--train", *data.train, "--eval",
                               *data.eval, *choice, "--json", "--quiet"], capture=True)
    return json.loads(out.strip().splitlines()[-1]) | {"seconds": round(seconds, 1)}


def random_init_baseline(ckpt: str, data: Labelled) -> dict:
    """``evaluate(..., "random_init")``, kept next to the data: it depends only on the architecture (the
    checkpoint's modality, model and encoder config; the init is seeded) and the data, not on trained weights."""
    config = json.loads((Path(ckpt) / "config.json").read_text())
    key = {k: config[k] for k in ("modality", "model", "encoder")} | {"train": data.train, "eval": data.eval}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    cache = Path(data.shards).parent / f"random_init_{digest}.json"
    if cache.is_file() and json.loads(cache.read_text())["key"] == key:
        print(f"random init: reusing {cache} (same architecture and data)", flush=True)
        return json.loads(cache.read_text())["result"]
    result = evaluate(ckpt, data, "random_init")
    cache.write_text(json.dumps({"key": key, "result": result}))
    return result


def bench(modality: str, args) -> dict:
    work = (REPO_ROOT / args.workdir / modality).resolve()
    data = MAKE[modality](work / ("data_quick" if args.quick else "data"), args.quick)
    print(f"\n== {modality}: {data.source}\n   {data.n_train} train / {data.n_eval} eval examples, {data.classes} "
          f"classes, majority class {data.majority:.3f}", flush=True)
    steps = args.steps or (20 if args.quick else STEPS[modality])
    tag = "_" + hashlib.sha1(" ".join(args.override).encode()).hexdigest()[:8] if args.override else ""
    run = work / f"run_{steps}{'_quick' if args.quick else ''}{tag}"
    trained = pretrain(modality, data, steps, run, args.nproc, args.override)
    loss = trained["loss"]
    print(f"pretraining: {steps} steps in {trained['train_seconds']} s; loss "
          + ", ".join(f"{v:.3g}@{k}" for k, v in list(loss.items())[::max(len(loss) // 6, 1)]), flush=True)
    rows = {which: evaluate(trained["checkpoint"], data, which) for which in ("student", "teacher")}
    rows["random_init"] = random_init_baseline(trained["checkpoint"], data)
    print(table(["weights", "kNN top-1", "linear top-1", "n_train", "n_eval", "classes", "evaluate s"],
                [[w, fmt(r["knn_top1"]), fmt(r["linear_top1"]), r["n_train"], r["n_eval"], r["classes"],
                  r.get("seconds", "-")] for w, r in rows.items()]))
    print(f"majority class: {data.majority:.3f}", flush=True)
    return {"modality": modality, "data": asdict(data), "steps": steps, "train_seconds": trained["train_seconds"],
            "overrides": trained["overrides"], "loss": loss, "probes": rows}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python bench/bench_probe.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modality", choices=(*MODALITIES, "all"), default="all")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"pretraining steps (default: {', '.join(f'{m} {s}' for m, s in STEPS.items())}; "
                             f"20 with --quick)")
    parser.add_argument("--quick", action="store_true", help="small data sets and 20 steps: a smoke test")
    parser.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE",
                        help="more trainer overrides for the pretraining, after the bench's own (e.g. train.lr=3e-4); "
                             "the run directory gets a tag of them")
    parser.add_argument("--nproc", type=int, default=2, help="CPU ranks of the pretraining (default: %(default)s)")
    parser.add_argument("--workdir", default="runs/bench_probe",
                        help="data and runs, relative to the repository root; data and finished runs are reused "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    start_report()
    results = [bench(m, args) for m in (MODALITIES if args.modality == "all" else (args.modality,))]
    print("\n" + table(["modality", "weights", "kNN top-1", "linear top-1", "n_train", "n_eval", "classes",
                        "majority"],
                       [[r["modality"], w, fmt(p["knn_top1"]), fmt(p["linear_top1"]), p["n_train"], p["n_eval"],
                         p["classes"], fmt(r["data"]["majority"])] for r in results for w, p in r["probes"].items()]))
    summary = {"results": [{k: r[k] for k in ("modality", "steps", "train_seconds", "overrides", "probes")}
                           | {"majority": r["data"]["majority"], "loss": r["loss"]} for r in results]}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
