"""Audio prep: LibriSpeech or a folder of audio files -> 16 kHz mono FLAC WebDataset shards.

    python -m data_prep.audio --input DIR --output OUT [--min-seconds 1] [--max-seconds 30 --split-long]
                              [--layout classes]

Inputs: .flac .wav .ogg files (any case; WAV of any PCM width or float, OGG/Vorbis), searched
recursively. LibriSpeech's SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTT.flac names give speaker, chapter and
utterance ids, and SPEAKER-CHAPTER.trans.txt ("UTTID TEXT" lines) the transcripts. With --layout classes
(or auto, as for images), DIR/<class>/... is a class-folder tree: every sample of a file, each piece of a
split one too, carries the file's class.

Each good file (with --split-long, each piece of a long one) becomes one sample:
  __key__  "%09d" index of the file in the sorted list of candidate files; pieces add "_p00000", ...
  flac     16 kHz mono FLAC (PCM_16): channels averaged, resampled with torchaudio; the input bytes
           unchanged when the file already is a 16 kHz mono 16-bit FLAC and is not split
  json     {"path", "duration" (s), "samples" (at 16 kHz), "orig_sample_rate", "orig_channels",
           "speaker", "chapter", "utterance", "transcript", "piece", "clipped"} (null where unknown),
           and "label" (the class folder name) in the class layout only
  cls      label index as ASCII text, in the manifest's sorted "classes" (class layout only)
Bad files are listed in OUT/manifest.json "skipped" with a reason. Shard records and totals in the
manifest carry "seconds" and "hours" of audio.
"""
from __future__ import annotations

import argparse
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import soundfile

from data_prep import core
from data_prep.core import ClassLabel

SAMPLE_RATE = 16000
EXTENSIONS = (".flac", ".wav", ".ogg")
TRANSCRIPT_SUFFIX = ".trans.txt"
# Container formats as libsndfile names them; WAVEX is WAVE_FORMAT_EXTENSIBLE (e.g. 24-bit, multichannel).
FORMATS = ("FLAC", "WAV", "WAVEX", "RF64", "OGG")
_LIBRI_ID = re.compile(r"(\d+)-(\d+)-(\d+)")


MAX_FILE_SECONDS = 4 * 3600.0  # what a file's header may declare before it is decoded (whole, in memory)


class Utterance(NamedTuple):
    """What the layout says about a file; None where it says nothing."""

    speaker: str | None = None
    chapter: str | None = None
    utterance: str | None = None
    transcript: str | None = None


class Options(NamedTuple):
    """Length limits in seconds (``max_seconds`` None = no limit); pieces instead of skipping."""

    min_seconds: float = 0.0
    max_seconds: float | None = None
    split_long: bool = False
    max_file_seconds: float = MAX_FILE_SECONDS


class Decoded(NamedTuple):
    samples: np.ndarray  # (frames, channels) float32, full scale = 1.0
    rate: int
    format: str  # libsndfile container name, e.g. "FLAC"
    subtype: str  # e.g. "PCM_16", "FLOAT", "VORBIS"


@dataclass
class Discovery:
    files: list[tuple[Path, str, Utterance]]  # (path, relative posix path, ids), sorted by rel
    skipped: list[dict]  # {"path", "reason"} found while listing
    transcripts: int  # transcript lines read
    labels: list[ClassLabel] | None = None  # one per file in the class layout; None unlabelled
    classes: list[str] | None = None  # the sorted class names in the class layout


# ----------------------------------------------------------------------------- item processor


def process_audio(path: str, rel: str, utt: Utterance, opts: Options, label: ClassLabel | None = None) -> list[dict]:
    """Worker entry point: read ``path`` and build its samples (see ``audio_samples``)."""
    return audio_samples(core.read_input(path), rel, utt, opts, label)


def audio_samples(data: bytes, rel: str, utt: Utterance = Utterance(), opts: Options = Options(),
                  label: ClassLabel | None = None) -> list[dict]:
    """Pure: encoded bytes in, one sample per piece out, each with the file's ``label`` (if any); raises
    ``core.SkipItem`` for bad input."""
    decoded = decode_audio(data, opts.max_file_seconds)
    if _is_target_flac(decoded) and _pieces(len(decoded.samples), opts) == [(0, len(decoded.samples), None)]:
        samples = [_sample(data, False, len(decoded.samples), None, decoded, rel, utt)]  # already right: copy
    else:
        samples = _encoded_pieces(to_mono_16k(decoded.samples, decoded.rate), opts, decoded, rel, utt)
    return [core.labelled_sample(sample, label) for sample in samples]


def _encoded_pieces(wav: np.ndarray, opts: Options, decoded: Decoded, rel: str, utt: Utterance) -> list[dict]:
    samples = []
    for start, stop, piece in _pieces(len(wav), opts):
        flac, clipped = encode_flac(wav[start:stop])
        samples.append(_sample(flac, clipped, stop - start, piece, decoded, rel, utt))
    return samples


def _sample(flac: bytes, clipped: bool, n: int, piece: int | None, decoded: Decoded, rel: str,
            utt: Utterance) -> dict:
    seconds = n / SAMPLE_RATE
    meta = {"path": rel, "duration": seconds, "samples": n, "orig_sample_rate": decoded.rate,
            "orig_channels": decoded.samples.shape[1], **utt._asdict(), "piece": piece, "clipped": clipped}
    sample = {"flac": flac, "json": meta, "__stats__": {"seconds": seconds, "hours": seconds / 3600}}
    if piece is not None:
        sample["__suffix__"] = f"_p{piece:05d}"
    return sample


def decode_audio(data: bytes, max_file_seconds: float = MAX_FILE_SECONDS) -> Decoded:
    """Fully decode ``data``; SkipItem for empty, non-audio, unsupported or corrupt input, and for a header
    that declares more than ``max_file_seconds`` of audio (checked before decoding: a 21 KB FLAC can claim
    2^36 samples, and decoding it would exhaust memory)."""
    if not data:
        raise core.SkipItem("empty file")
    try:
        f = soundfile.SoundFile(io.BytesIO(data))
    except (soundfile.SoundFileError, ValueError) as exc:
        raise core.SkipItem(f"not audio: {_message(exc)}") from None
    with f:
        if f.format not in FORMATS:
            raise core.SkipItem(f"unsupported format: {f.format} {f.subtype}")
        declared = f.frames / max(f.samplerate, 1)
        if declared > max_file_seconds:
            raise core.SkipItem(f"declares {declared / 3600:.1f} h of audio in {len(data):,} bytes, over "
                                f"--max-file-seconds {max_file_seconds:g} (a corrupt header, or a recording to cut "
                                f"first)")
        try:
            samples = f.read(dtype="float32", always_2d=True)
        except (soundfile.SoundFileError, ValueError) as exc:
            raise core.SkipItem(f"corrupt or truncated: {_message(exc)}") from None
        except MemoryError:
            raise core.SkipItem(f"too large to decode in memory ({declared:.0f} s declared)") from None
        if len(samples) < f.frames:
            raise core.SkipItem(f"corrupt or truncated: {len(samples)} of {f.frames} frames decoded")
        decoded = Decoded(samples, f.samplerate, f.format, f.subtype)
    if not len(samples):
        raise core.SkipItem("empty audio: 0 frames")
    if not np.isfinite(samples).all():
        raise core.SkipItem("corrupt: NaN or infinite samples")
    return decoded


def _message(exc: Exception) -> str:
    """libsndfile's own words, without the object address soundfile adds (reasons stay deterministic)."""
    text = getattr(exc, "error_string", None) or str(exc)
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text).strip()


def _is_target_flac(decoded: Decoded) -> bool:
    return (decoded.format, decoded.subtype, decoded.rate, decoded.samples.shape[1]) == (
        "FLAC", "PCM_16", SAMPLE_RATE, 1)


def to_mono_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """(frames, channels) -> (n,) float32 at 16 kHz: mean of the channels, then band-limited resampling."""
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if rate == SAMPLE_RATE:
        return mono
    import torch  # imported here: workers that only copy 16 kHz FLAC never pay for torch
    from torchaudio.functional import resample

    return resample(torch.from_numpy(np.ascontiguousarray(mono)), rate, SAMPLE_RATE).numpy()


def encode_flac(wav: np.ndarray) -> tuple[bytes, bool]:
    """16 kHz FLAC (PCM_16) bytes of float samples, and whether any had to be clipped to [-1, 1].

    The int16 conversion is done here, not by libsndfile, which wraps out-of-range floats around."""
    clipped = bool(np.abs(wav).max(initial=0.0) > 1.0)
    pcm = np.clip(np.round(wav.astype(np.float64) * 32768.0), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    soundfile.write(buf, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue(), clipped


def _pieces(n: int, opts: Options) -> list[tuple[int, int, int | None]]:
    """``(start, stop, piece)`` spans of an ``n``-sample recording at 16 kHz (piece None = whole)."""
    low = round(opts.min_seconds * SAMPLE_RATE)
    if n < low:
        raise core.SkipItem(f"too short: {n / SAMPLE_RATE:.3f} s < {opts.min_seconds:g} s")
    if opts.max_seconds is None or n <= round(opts.max_seconds * SAMPLE_RATE):
        return [(0, n, None)]
    if not opts.split_long:
        raise core.SkipItem(f"too long: {n / SAMPLE_RATE:.3f} s > {opts.max_seconds:g} s")
    step = round(opts.max_seconds * SAMPLE_RATE)
    spans = [(start, min(start + step, n), i) for i, start in enumerate(range(0, n, step))]
    return [s for s in spans if s[1] - s[0] >= low]  # only the last piece can be short


# ----------------------------------------------------------------------------- discovery


def discover(input_dir: Path, layout: str = "flat") -> Discovery:
    """List candidate files under ``input_dir`` (sorted) with their ids and transcripts, and with their
    classes in the class-folder ``layout`` (``core.label_by_folder``)."""
    root = core.input_root(input_dir)
    files, transcript_files, skipped = _walk(root)
    transcripts, bad_transcripts = _read_transcripts(transcript_files)
    found = core.label_by_folder(root, files, layout)
    if not found.files:
        raise core.PrepError(f"no supported audio files ({' '.join(EXTENSIONS)}) found under {root}")
    with_ids = [(path, rel, _utterance(rel, transcripts)) for path, rel, _ in found.files]
    labels = None if found.classes is None else [label for _, _, label in found.files]
    return Discovery(with_ids, skipped + bad_transcripts + found.skipped, len(transcripts), labels, found.classes)


def _walk(root: Path) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]], list[dict]]:
    """Recursive listing (see ``core.walk_files``): (audio files, transcript files, skipped)."""
    files, transcripts, skipped = [], [], []
    for path, rel in core.walk_files(root, skipped):
        reason = _file_problem(path)
        if reason is None:
            files.append((path, rel))
        elif reason == "transcript":
            transcripts.append((path, rel))
        else:
            skipped.append({"path": rel, "reason": reason})
    return sorted(files, key=lambda f: f[1]), sorted(transcripts, key=lambda f: f[1]), skipped


def _file_problem(path: Path) -> str | None:
    """None for a candidate audio file, "transcript" for a trans.txt, else the skip reason."""
    if not path.is_file():
        return "not a regular file"
    if path.name.lower().endswith(TRANSCRIPT_SUFFIX):
        return "transcript"
    if path.suffix.lower() not in EXTENSIONS:
        return "unsupported extension"
    return None


def _read_transcripts(files: list[tuple[Path, str]]) -> tuple[dict[tuple[str, str], str], list[dict]]:
    """``{(directory rel, utterance id): text}`` from "UTTID TEXT" lines; the first line for an id wins."""
    texts, skipped = {}, []
    for path, rel in files:
        try:
            lines = path.read_text("utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            skipped.append({"path": rel, "reason": f"unreadable transcript: {exc}"})
            continue
        folder = rel.rpartition("/")[0]
        for line in lines:
            utt_id, _, text = line.strip().partition(" ")
            if utt_id:
                texts.setdefault((folder, utt_id), text.strip())
    return texts, skipped


def _utterance(rel: str, transcripts: dict[tuple[str, str], str]) -> Utterance:
    """Ids from LibriSpeech's SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTT.ext layout; the transcript from the
    same folder's trans.txt (any layout)."""
    folder, _, name = rel.rpartition("/")
    stem = name.rsplit(".", 1)[0]
    transcript = transcripts.get((folder, stem))
    ids = _LIBRI_ID.fullmatch(stem)
    if ids is None or folder.split("/")[-2:] != [ids[1], ids[2]]:
        return Utterance(transcript=transcript)
    return Utterance(ids[1], ids[2], ids[3], transcript)


def make_items(found: Discovery, opts: Options) -> list[core.WorkItem]:
    """One WorkItem per candidate file; the key is its index in the sorted list."""
    return core.file_items(found.files, opts, labels=found.labels)


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep.audio", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    core.add_io_args(p, "audio", "LibriSpeech tree or any folder of audio; searched recursively for "
                                 ".flac .wav .ogg (any case) and *.trans.txt transcripts")
    core.add_shard_args(p, "input files per shard; bad files make a shard smaller, split ones larger "
                           "(default: %(default)s)")
    p.add_argument("--min-seconds", type=_seconds, default=0.0, metavar="S",
                   help="skip recordings shorter than S seconds, reason 'too short'; with --split-long "
                        "also drops a last piece shorter than S (default: %(default)s)")
    p.add_argument("--max-seconds", type=_seconds, default=None, metavar="S",
                   help="skip recordings longer than S seconds, reason 'too long', or split them with "
                        "--split-long (default: no limit)")
    p.add_argument("--split-long", action="store_true",
                   help="cut recordings longer than --max-seconds into consecutive pieces of that length, "
                        "each its own sample with key suffix _pNNNNN and json 'piece'")
    p.add_argument("--max-file-seconds", type=_seconds, default=MAX_FILE_SECONDS, metavar="S",
                   help="skip a file whose header declares more than S seconds, before decoding it (each file is "
                        "decoded whole in memory, about 0.23 GB per hour of mono audio) (default: %(default)s)")
    p.add_argument("--format", choices=("flac",), default="flac",
                   help="stored encoding: 16 kHz mono 16-bit FLAC under the 'flac' key (default: %(default)s)")
    core.add_layout_arg(p, default="flat", note="; audio defaults to flat, as LibriSpeech's top-level SPEAKER "
                                                "or subset folders would look like classes")
    core.add_task_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not (math.isfinite(seconds) and seconds >= 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {value!r}")
    return seconds


def options(args: argparse.Namespace) -> Options:
    """The processor's options, checked against each other."""
    if args.max_seconds is not None and args.max_seconds * SAMPLE_RATE < 1:
        raise core.PrepError("--max-seconds must be at least one sample (1/16000 s)")
    if args.max_seconds is not None and args.min_seconds > args.max_seconds:
        raise core.PrepError(f"--min-seconds {args.min_seconds:g} is above --max-seconds {args.max_seconds:g}")
    if args.split_long and args.max_seconds is None:
        raise core.PrepError("--split-long needs --max-seconds")
    return Options(args.min_seconds, args.max_seconds, args.split_long, args.max_file_seconds)


def run(args: argparse.Namespace) -> core.PrepReport:
    """Discover, check, and hand the items to the shared shard writer."""
    core.check_task_args(args)
    opts = options(args)
    found = discover(args.input, args.layout)
    out = core.check_output_outside(args.output, args.input)
    return core.write_task_shards(
        args, make_items(found, opts), process_audio, out, modality="audio", params=_params(args, found),
        extra=_extra(found), pre_skipped=found.skipped,
    )


def _params(args: argparse.Namespace, found: Discovery) -> dict:
    params = {"input": str(args.input.resolve()), "shard_size": args.shard_size, "format": args.format,
              "min_seconds": args.min_seconds, "max_seconds": args.max_seconds,
              "split_long": args.split_long, "max_file_seconds": args.max_file_seconds,
              "transcripts": found.transcripts, "key_format": core.KEY_FORMAT}
    return params if found.classes is None else {**params, "layout": "classes"}


def _extra(found: Discovery) -> dict:
    """The manifest's own fields; "classes" in the class layout only (an unlabelled manifest is as before)."""
    extra = {"sample_rate": SAMPLE_RATE}
    return extra if found.classes is None else {**extra, "classes": found.classes}


def main(argv: Sequence[str] | None = None) -> core.PrepReport:
    report = core.cli_run(build_parser(), run, argv)
    print(report.summary())
    print(f"  {report.manifest['totals'].get('hours', 0.0):.3f} hours of 16 kHz mono audio")
    return report


if __name__ == "__main__":
    # Import ourselves by module name so worker processes pickle
    # data_prep.audio.process_audio rather than __main__.process_audio.
    from data_prep.audio import main as _main

    _main()
