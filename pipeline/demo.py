"""The built-in CPU default: make real image files, shard them, pretrain a tiny ViT on 2 CPU ranks.

``python -m pipeline.demo`` needs no GPU, no SLURM and no download. It writes ~250 small JPEG/PNG
files (synthetic scenes of shapes and gradients) under runs/demo/raw, shards them with
``python -m data_prep.images``, then runs ``torchrun --nproc_per_node 2 -m pipeline.train`` with
configs/vision_tiny.yaml (ZeRO-3 over 2 gloo ranks). Extra arguments are passed to the trainer as
config overrides, e.g. ``python -m pipeline.demo train.steps=50``.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/demo", help="where raw images, shards and the run go")
    parser.add_argument("--nproc", type=int, default=2, help="CPU ranks (ZeRO-3 data parallel)")
    parser.add_argument("--config", default="configs/vision_tiny.yaml", help="preset to train")
    parser.add_argument("overrides", nargs="*", help="trainer config overrides, e.g. train.steps=50")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    raw = make_images(work / "raw")
    shards = work / "shards"
    subprocess.run([sys.executable, "-m", "data_prep.images", "--input", str(raw), "--output", str(shards),
                    "--shard-size", "32", "--workers", "2"], check=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "pipeline.train", "--config", args.config, f"data.manifest={shards}",
           f"train.output_dir={work / Path(args.config).stem}", *args.overrides]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
