"""Image prep: an ImageNet-style tree or a flat folder of images -> WebDataset shards.

    python -m data_prep.images --input DIR --output OUT [--resize 256] [--workers 8]

Each good image becomes one sample:
  __key__  "%09d" index of the file in the sorted list of candidate files
  jpg|png|webp  the original bytes, keyed by the format Pillow detects (not the file name);
           with --resize an RGB JPEG re-encode under "jpg"
  cls      label index as ASCII text (class layout only)
  json     {"path", "label", "width", "height", "mode"} of the stored image
Bad files are listed in OUT/manifest.json "skipped" with a reason.
"""
from __future__ import annotations

import argparse
import io
import struct
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from data_prep import core
from data_prep.core import ClassLabel

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# MPO is the multi-picture JPEG some cameras write: plain JPEG bytes for every decoder.
FORMAT_KEYS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


# ----------------------------------------------------------------------------- item processor


MAX_PIXELS = 50_000_000  # about 7000 x 7000; training decodes every sample each epoch, at ~4.8 bytes per pixel


def process_image(path: str, rel: str, label: ClassLabel | None, resize: int | None, quality: int,
                  max_pixels: int = MAX_PIXELS) -> dict:
    """Worker entry point: read ``path`` and build its sample (see ``image_sample``)."""
    return image_sample(core.read_input(path), rel, label, resize, quality, max_pixels)


def image_sample(data: bytes, rel: str, label: ClassLabel | None,
                 resize: int | None = None, quality: int = 95, max_pixels: int = MAX_PIXELS) -> dict:
    """Pure: encoded bytes in, sample dict out; raises ``core.SkipItem`` for bad input. An image of more
    than ``max_pixels`` is skipped, unless ``resize`` shrinks it (it is then stored small)."""
    img = decode_image(data, max_pixels if resize is None else None)
    if resize is None:
        ext, payload = FORMAT_KEYS[img.format], data
    else:
        img = _reencode_input(img, resize)
        ext, payload = "jpg", encode_jpeg(img, quality)
    meta = {"path": rel, "label": None, "width": img.width, "height": img.height, "mode": img.mode}
    return core.labelled_sample({ext: payload, "json": meta}, label)


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode ``data``; SkipItem for empty, non-image, unsupported or corrupt input, and
    (checked on the header, before decoding) for more than ``max_pixels`` pixels."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone flipped Pillow's global switch: truncated files would decode "fine" (grey fill).
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; refusing to validate images")
    if not data:
        raise core.SkipItem("empty file")
    try:
        img = Image.open(io.BytesIO(data))
        if img.format not in FORMAT_KEYS:
            raise core.SkipItem(f"unsupported format: {img.format}")
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise core.SkipItem(f"too many pixels: {img.width}x{img.height} > --max-pixels {max_pixels:,} "
                                f"(--resize stores such images shrunk instead)")
        img.load()  # open() only reads the header; load() decodes every pixel
    except UnidentifiedImageError:
        raise core.SkipItem("not an image: Pillow cannot identify the data") from None
    except Image.DecompressionBombError as exc:
        raise core.SkipItem(f"too large: {exc}") from None
    except _DECODE_ERRORS as exc:
        raise core.SkipItem(f"corrupt or truncated: {exc}") from None
    return img


def _reencode_input(img: Image.Image, short_side: int) -> Image.Image:
    try:
        return to_rgb_short_side(img, short_side)
    except _DECODE_ERRORS as exc:
        raise core.SkipItem(f"cannot convert to RGB: {exc}") from None


def to_rgb_short_side(img: Image.Image, short_side: int) -> Image.Image:
    """Upright (EXIF) RGB image whose shorter side is at most ``short_side``, aspect kept."""
    img = _flatten_to_rgb(ImageOps.exif_transpose(img))
    w, h = img.size
    if min(w, h) <= short_side:
        return img
    scale = short_side / min(w, h)
    size = (short_side, max(1, round(h * scale))) if w <= h else (max(1, round(w * scale)), short_side)
    return img.resize(size, Image.Resampling.BICUBIC)


def _flatten_to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparent pixels become white rather than whatever colour they hid."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ----------------------------------------------------------------------------- discovery


def discover(input_dir: Path, layout: str = "auto") -> core.Labelled:
    """List candidate files under ``input_dir`` (sorted by relative path) with labels, and what was skipped."""
    root = core.input_root(input_dir)
    files, skipped = _walk(root)
    found = core.label_by_folder(root, files, layout)
    if not found.files:
        raise core.PrepError(f"no supported image files ({' '.join(EXTENSIONS)}) found under {root}")
    return core.Labelled(found.files, found.classes, skipped + found.skipped, found.layout)


def _walk(root: Path) -> tuple[list[tuple[Path, str]], list[dict]]:
    """Recursive listing (see ``core.walk_files``): supported files sorted by relative path, and skipped."""
    files, skipped = [], []
    for path, rel in core.walk_files(root, skipped):
        reason = _file_problem(path)
        if reason:
            skipped.append({"path": rel, "reason": reason})
        else:
            files.append((path, rel))
    files.sort(key=lambda f: f[1])
    return files, skipped


def _file_problem(path: Path) -> str | None:
    if path.suffix.lower() not in EXTENSIONS:
        return "unsupported extension"
    if not path.is_file():
        return "not a regular file"
    return None


def make_items(found: core.Labelled, resize: int | None, quality: int,
               max_pixels: int = MAX_PIXELS) -> list[core.WorkItem]:
    """One WorkItem per candidate file; the key is its index in the sorted list."""
    return core.file_items(found.files, resize, quality, max_pixels)


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep.images", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    core.add_io_args(p, "images", "DIR/<class>/<file> tree (label = index in the sorted class folder names) or a "
                                  "flat folder; searched recursively for .jpg .jpeg .png .webp (any case)")
    core.add_shard_args(p, "input files per shard; bad files only make a shard smaller (default: %(default)s)")
    p.add_argument("--resize", type=core.int_arg(1), metavar="SHORT_SIDE",
                   help="re-encode as RGB JPEG, shrinking the shorter side to SHORT_SIDE if larger "
                        "(default: keep the original bytes)")
    p.add_argument("--quality", type=core.int_arg(1, 100), default=95,
                   help="JPEG quality (1-100) used with --resize (default: %(default)s)")
    p.add_argument("--max-pixels", type=core.int_arg(1), default=MAX_PIXELS, metavar="N",
                   help="skip images of more than N pixels (read from the header, before decoding), or with "
                        "--resize store them shrunk; training refuses the same (model.max_pixels) "
                        "(default: %(default)s)")
    core.add_layout_arg(p)
    core.add_task_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> core.PrepReport:
    """Discover, check, and hand the items to the shared shard writer."""
    core.check_task_args(args)
    found = discover(args.input, args.layout)
    out = core.check_output_outside(args.output, args.input)
    return core.write_task_shards(
        args, make_items(found, args.resize, args.quality, args.max_pixels), process_image, out, modality="image",
        params=_params(args, found), extra={"classes": found.classes}, pre_skipped=found.skipped,
    )


def _params(args: argparse.Namespace, found: core.Labelled) -> dict:
    return {"input": str(args.input.resolve()), "layout": found.layout, "shard_size": args.shard_size,
            "resize": args.resize, "quality": args.quality, "max_pixels": args.max_pixels,
            "key_format": core.KEY_FORMAT}


def main(argv: Sequence[str] | None = None) -> core.PrepReport:
    report = core.cli_run(build_parser(), run, argv)
    print(report.summary())
    return report


if __name__ == "__main__":
    # Import ourselves by module name so worker processes pickle
    # data_prep.images.process_image rather than __main__.process_image.
    from data_prep.images import main as _main

    _main()
