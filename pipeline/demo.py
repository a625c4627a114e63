"""The built-in CPU default: make real-format files, shard them, pretrain a tiny model on 2 CPU ranks.

``python -m pipeline.demo`` needs no GPU, no SLURM and no download. For vision (the default) it writes
256 small JPEG/PNG files (synthetic scenes of shapes and gradients) under runs/demo/raw, shards them
with ``python -m data_prep.images`` and runs ``torchrun --nproc_per_node 2 -m pipeline.train`` with
configs/vision_tiny.yaml (ZeRO-3 over 2 gloo ranks). ``--modality speech`` writes 64 synthetic spoken
clips (vowel-like formant sequences) as WAV/FLAC at 16, 22.05 and 44.1 kHz, shards them with
``python -m data_prep.audio`` and trains configs/speech_tiny.yaml. ``--modality text`` writes the
docstrings of ~30 standard-library modules as .txt, .jsonl and .txt.gz, trains a 1000-piece
sentencepiece model, packs 64-token blocks with ``python -m data_prep.text`` and trains
configs/text_tiny.yaml. ``--method data2vec2`` trains the modality's data2vec 2.0 preset
(configs/<modality>_tiny_v2.yaml) instead; ``--config`` any preset (its modality picks the demo data). Extra
arguments are passed to the trainer as config overrides, e.g. ``python -m pipeline.demo train.steps=50``.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from pipeline.config import load_yaml
from pipeline.distributed import local_launch_command

SHAPES = ("ellipse", "rectangle", "triangle", "stripes")


def scene(kind: str, size: int, rng: random.Random) -> Image.Image:
    """A gradient background with a few shapes of one kind (the class)."""
    c0, c1 = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(2)]
    img = Image.new("RGB", (size, size))
    px = img.load()
    for y in range(size):
        t = y / (size - 1)
        row = tuple(int(a + (b - a) * t) for a, b in zip(c0, c1))
        for x in range(size):
            px[x, y] = row
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 3)):
        x0, y0 = rng.randrange(size // 2), rng.randrange(size // 2)
        x1, y1 = x0 + rng.randint(size // 5, size // 2), y0 + rng.randint(size // 5, size // 2)
        color = tuple(rng.randrange(256) for _ in range(3))
        if kind == "ellipse":
            draw.ellipse((x0, y0, x1, y1), fill=color)
        elif kind == "rectangle":
            draw.rectangle((x0, y0, x1, y1), fill=color)
        elif kind == "triangle":
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=color)
        else:
            for k in range(x0, x1, 4):
                draw.line((k, y0, k, y1), fill=color, width=2)
    return img


def make_images(root: Path, count: int = 256, size: int = 48, seed: int = 0) -> Path:
    """Write ``count`` images into class folders (JPEG and PNG alternating); idempotent."""
    rng = random.Random(seed)
    for i in range(count):
        kind = SHAPES[i % len(SHAPES)]
        path = root / kind / f"{i:05d}.{'jpg' if i % 2 else 'png'}"
        img = scene(kind, size, rng)
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90) if path.suffix == ".jpg" else img.save(path)
    return root


VOWELS = {"a": (730, 1090, 2440), "i": (270, 2290, 3010), "u": (300, 870, 2240), "e": (530, 1840, 2480),
          "o": (570, 840, 2410)}


def formant_clip(rng: random.Random, rate: int, seconds: float):
    """A 'spoken' clip: a glottal pulse train with a wandering pitch through vowel formant resonators,
    vowels separated by short noise bursts (consonant-like). Returns float32 samples in [-1, 1]."""
    import numpy as np
    out = []
    while sum(len(x) for x in out) < seconds * rate:
        f1, f2, f3 = VOWELS[rng.choice(sorted(VOWELS))]
        n = int(rate * rng.uniform(0.12, 0.3))
        f0 = rng.uniform(90, 220) * (1 + 0.1 * np.sin(np.linspace(0, rng.uniform(1, 4), n)))
        phase = np.cumsum(f0 / rate)
        source = (np.diff(np.floor(phase), prepend=0.0) > 0).astype(np.float64)  # one pulse per period
        voice = sum(resonate(source, f, 80 + f / 20, rate) for f in (f1, f2, f3))
        burst = np.random.default_rng(rng.randrange(1 << 30)).standard_normal(int(rate * 0.04)) * 0.05
        out += [voice * np.hanning(n), burst]
    wav = np.concatenate(out)[:int(seconds * rate)]
    return (0.5 * wav / (np.abs(wav).max() + 1e-9)).astype("float32")


def resonate(x, freq: float, bandwidth: float, rate: int):
    """Two-pole resonator (a formant)."""
    import numpy as np
    r = np.exp(-np.pi * bandwidth / rate)
    a1, a2 = 2 * r * np.cos(2 * np.pi * freq / rate), -r * r
    y = np.zeros_like(x)
    for t in range(len(x)):
        y[t] = x[t] + a1 * (y[t - 1] if t else 0.0) + a2 * (y[t - 2] if t > 1 else 0.0)
    return y


def make_clips(root: Path, count: int = 64, seed: int = 0) -> Path:
    """Write ``count`` clips of 1-3 s into speaker folders, as 16 kHz FLAC, 22.05 kHz WAV and 44.1 kHz
    stereo WAV in turn; idempotent."""
    import numpy as np
    import soundfile
    rng = random.Random(seed)
    for i in range(count):
        rate, ext, channels = [(16000, "flac", 1), (22050, "wav", 1), (44100, "wav", 2)][i % 3]
        path = root / f"speaker{i % 4}" / f"{i:05d}.{ext}"
        wav = formant_clip(rng, rate, rng.uniform(1.0, 3.0))
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, np.stack([wav] * channels, 1) if channels > 1 else wav, rate)
    return root


CORPUS_MODULES = ("argparse", "collections", "csv", "datetime", "decimal", "email.message", "fractions", "functools",
                  "http.client", "inspect", "itertools", "json", "logging", "os", "pathlib", "random", "re",
                  "shutil", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "unittest",
                  "urllib.parse", "zipfile")


def make_corpus(root: Path, seed: int = 0) -> Path:
    """A small real-text corpus: the docstrings of Python standard-library modules, one document per
    line, split over a .txt, a .jsonl and a .txt.gz file (the three input formats); idempotent."""
    import gzip
    import importlib
    import inspect
    import json
    docs = []
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        for obj in [module, *(v for k, v in sorted(vars(module).items()) if not k.startswith("_"))]:
            text = inspect.getdoc(obj) if inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj) else None
            if text and len(text) > 40 and getattr(obj, "__module__", name) in (name, None):
                docs.append(" ".join(text.split()))
    docs = sorted(set(docs))
    random.Random(seed).shuffle(docs)
    root.mkdir(parents=True, exist_ok=True)
    third = len(docs) // 3
    if not (root / "docs.txt").exists():
        (root / "docs.txt").write_text("\n".join(docs[:third]) + "\n", encoding="utf-8")
        (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[third:2 * third]),
                                         encoding="utf-8")
        with gzip.open(root / "docs.txt.gz", "wt", encoding="utf-8") as f:
            f.write("\n".join(docs[2 * third:]) + "\n")
    return root


DEMOS = {  # modality: (make raw files, data prep module, default preset, data prep options)
    "vision": (make_images, "data_prep.images", "configs/vision_tiny.yaml", ["--shard-size", "32"]),
    "speech": (make_clips, "data_prep.audio", "configs/speech_tiny.yaml", ["--shard-size", "8"]),
    "text": (make_corpus, "data_prep.text", "configs/text_tiny.yaml",
             ["--shard-size", "100", "--vocab-size", "1000", "--block-size", "64"]),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/demo", help="where raw images, shards and the run go")
    parser.add_argument("--nproc", type=int, default=2, help="CPU ranks (ZeRO-3 data parallel)")
    parser.add_argument("--modality", choices=sorted(DEMOS), default=None,
                        help="which demo to run (default: the --config preset's modality, else vision)")
    parser.add_argument("--method", choices=("data2vec", "data2vec2"), default="data2vec",
                        help="data2vec (v1) or data2vec2 (data2vec 2.0: the modality's tiny _v2 preset)")
    parser.add_argument("--config", default=None, help="preset to train (default: the modality's tiny preset)")
    parser.add_argument("overrides", nargs="*", help="trainer config overrides, e.g. train.steps=50")
    args = parser.parse_args(argv)
    if args.modality is None:
        args.modality = load_yaml(args.config).get("modality", "vision") if args.config else "vision"
    if args.modality not in DEMOS:
        parser.error(f"{args.config} trains modality {args.modality!r}; the demo has {', '.join(sorted(DEMOS))}")
    make_raw, prep, preset, prep_options = DEMOS[args.modality]
    config = args.config or (preset.replace(".yaml", "_v2.yaml") if args.method == "data2vec2" else preset)
    work = Path(args.workdir)
    raw = make_raw(work / f"raw_{args.modality}")
    shards = work / f"shards_{args.modality}"
    subprocess.run([sys.executable, "-m", prep, "--input", str(raw), "--output", str(shards), *prep_options,
                    "--workers", "2"], check=True)
    cmd = local_launch_command(args.nproc, ["-m", "pipeline.train", "--config", config, f"data.manifest={shards}",
                                            f"train.output_dir={work / Path(config).stem}", *args.overrides])
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
