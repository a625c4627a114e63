"""Real image files for the data-prep tests, generated with Pillow (small and deterministic)."""
from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

try:  # tests/ is a plain directory (rootdir on sys.path) or a package
    from file_fixtures import FileTree
except ImportError:
    from tests.file_fixtures import FileTree


@dataclass(frozen=True)
class Good:
    ext: str  # the sample key the real format maps to
    mode: str  # PIL mode of the stored image
    size: tuple[int, int]


@dataclass
class ImageTree(FileTree):
    good: dict[str, Good] = field(default_factory=dict)  # rel path -> expectation
    classes: list[str] | None = None


def noise(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    """Random pixels (incompressible, so half a JPEG is really half the scan)."""
    rng = random.Random(seed)
    rgb = Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3)))
    if mode == "P":
        return rgb.quantize(colors=16)
    return rgb.convert(mode)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _good_files() -> dict[str, tuple[bytes, Good]]:
    rgba = noise("RGBA", (40, 40), 3)
    rgba.putalpha(Image.linear_gradient("L").resize((40, 40)))
    files = {
        "cat/rgb.jpg": (encode(noise("RGB", (64, 48), 1), "JPEG", quality=95), Good("jpg", "RGB", (64, 48))),
        "cat/gray.png": (encode(noise("L", (48, 64), 2), "PNG"), Good("png", "L", (48, 64))),
        "cat/rgba.png": (encode(rgba, "PNG"), Good("png", "RGBA", (40, 40))),
        "cat/progressive.jpeg": (encode(noise("RGB", (56, 40), 4), "JPEG", progressive=True),
                                 Good("jpg", "RGB", (56, 40))),
        "dog/palette.png": (encode(noise("P", (50, 30), 5), "PNG"), Good("png", "P", (50, 30))),
        "dog/cmyk.jpg": (encode(noise("CMYK", (32, 48), 6), "JPEG"), Good("jpg", "CMYK", (32, 48))),
        "dog/photo.webp": (encode(noise("RGB", (48, 36), 7), "WEBP", quality=80), Good("webp", "RGB", (48, 36))),
        "dog/nested/upper.JPG": (encode(noise("RGB", (36, 36), 8), "JPEG"), Good("jpg", "RGB", (36, 36))),
        # the format comes from the bytes, not from the file name
        "dog/misnamed.jpg": (encode(noise("RGB", (30, 40), 9), "PNG"), Good("png", "RGB", (30, 40))),
    }
    return files


def _bad_files() -> dict[str, tuple[bytes, str]]:
    whole = encode(noise("RGB", (64, 64), 10), "JPEG", quality=95)
    return {
        "cat/truncated.jpg": (whole[: len(whole) // 2], "corrupt or truncated"),
        "cat/empty.jpg": (b"", "empty file"),
        "dog/text.jpg": (b"this is not an image\n" * 4, "not an image"),
        "cat/notes.txt": (b"some notes\n", "unsupported extension"),
        "dog/anim.png": (encode(noise("P", (16, 16), 11), "GIF"), "unsupported format"),
    }


def make_tree(root: Path, outside: Path, flat: bool = False) -> ImageTree:
    """Write the good and bad files under ``root`` (2 classes, or flat), plus symlinks
    into ``outside`` (a directory that is not under ``root``) that must be refused."""
    tree = ImageTree(root, classes=None if flat else ["cat", "dog"])

    def place(rel: str) -> str:
        return rel.split("/", 1)[1] if flat else rel

    tree.add(_good_files(), _bad_files(), place)
    tree.write()
    _add_outside_links(tree, outside, place)
    return tree


def _add_outside_links(tree: ImageTree, outside: Path, place) -> None:
    (outside / "secret").mkdir(parents=True, exist_ok=True)
    secret = encode(noise("RGB", (20, 20), 12), "JPEG")
    (outside / "secret.jpg").write_bytes(secret)
    (outside / "secret" / "inner.jpg").write_bytes(secret)
    link_file, link_dir = place("dog/link.jpg"), place("cat/linkdir")
    os.symlink(outside / "secret.jpg", tree.root / link_file)
    os.symlink(outside / "secret", tree.root / link_dir)
    tree.bad[link_file] = "outside input directory"
    tree.bad[link_dir] = "outside input directory"
