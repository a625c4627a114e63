"""Real audio files for the data-prep tests, generated with numpy + soundfile (small and deterministic).

Every good file holds a known signal (``Good.tones``: a sum of sines, or a chirp), so tests can check
the prepared audio against the analytic signal at 16 kHz rather than against the code under test.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile

try:  # tests/ is a plain directory (rootdir on sys.path) or a package
    from file_fixtures import FileTree
except ImportError:
    from tests.file_fixtures import FileTree


@dataclass(frozen=True)
class Good:
    rate: int  # sample rate of the file
    channels: int
    frames: int  # frames in the file
    tones: tuple = ()  # per channel: (amplitude, frequency Hz) of a sine; () for a chirp
    speaker: str | None = None
    chapter: str | None = None
    utterance: str | None = None
    transcript: str | None = None
    clipped: bool = False

    @property
    def seconds(self) -> float:
        return self.frames / self.rate


@dataclass
class AudioTree(FileTree):
    good: dict[str, Good] = field(default_factory=dict)  # rel path -> expectation


def sine(amplitude: float, freq: float, rate: int, frames: int) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(frames) / rate)


def chirp(rate: int, frames: int, f0: float = 200.0, f1: float = 3000.0, amplitude: float = 0.5) -> np.ndarray:
    """Linear sweep from f0 to f1 Hz over the clip."""
    t = np.arange(frames) / rate
    duration = frames / rate
    return amplitude * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * duration)))


def encode(wav: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, wav, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def tone_file(tones: tuple, rate: int, seconds: float, fmt: str, subtype: str, **meta) -> tuple[bytes, Good]:
    """One channel per ``(amplitude, freq)`` in ``tones``."""
    frames = round(rate * seconds)
    wav = np.stack([sine(a, f, rate, frames) for a, f in tones], axis=1)
    return encode(wav, rate, fmt, subtype), Good(rate, len(tones), frames, tones, **meta)


def chirp_file(rate: int, seconds: float, channels: int, fmt: str, subtype: str, **meta) -> tuple[bytes, Good]:
    frames = round(rate * seconds)
    wav = np.stack([chirp(rate, frames)] * channels, axis=1)
    return encode(wav, rate, fmt, subtype), Good(rate, channels, frames, (), **meta)


LIBRI = "LibriSpeech/train-clean-100"
TRANSCRIPTS = {  # utterance id -> text; 19-198-0001 deliberately has no line
    "103-1240-0000": "CHAPTER ONE MISSUS RACHEL LYNDE IS SURPRISED",
    "103-1240-0001": "THAT HAD ITS SOURCE AWAY BACK IN THE WOODS",
    "19-198-0000": "NORTHANGER ABBEY",
}


def _good_files() -> dict[str, tuple[bytes, Good]]:
    return {
        # 1 kHz left, 3 kHz right: the downmix must hold both at half amplitude
        "misc/tone_44k1_stereo_16bit.wav": tone_file(((0.6, 1000), (0.4, 3000)), 44100, 1.0, "WAV", "PCM_16"),
        "misc/chirp_48k_mono_24bit.wav": chirp_file(48000, 0.9, 1, "WAV", "PCM_24"),
        "misc/tone_22k05_mono_float.wav": tone_file(((0.5, 1000),), 22050, 1.1, "WAV", "FLOAT"),
        "misc/tone_48k_stereo_32bit.wav": tone_file(((0.5, 1000), (0.5, 1000)), 48000, 0.7, "WAV", "PCM_32"),
        "misc/tone_16k_mono_u8.wav": tone_file(((0.5, 1000),), 16000, 0.6, "WAV", "PCM_U8"),
        "misc/tone_8k_mono.flac": tone_file(((0.5, 1000),), 8000, 1.3, "FLAC", "PCM_16"),
        "misc/chirp_44k1_stereo.ogg": chirp_file(44100, 1.0, 2, "OGG", "VORBIS"),
        "misc/loud_16k_float.wav": tone_file(((1.5, 1000),), 16000, 0.5, "WAV", "FLOAT", clipped=True),
        "misc/nested/UPPER_16k_stereo.WAV": tone_file(((0.3, 1000), (0.3, 1000)), 16000, 0.8, "WAV", "PCM_16"),
        # already 16 kHz mono 16-bit FLAC: stored byte for byte
        f"{LIBRI}/103/1240/103-1240-0000.flac": _libri("103-1240-0000", 1.2),
        f"{LIBRI}/103/1240/103-1240-0001.flac": _libri("103-1240-0001", 2.5),
        f"{LIBRI}/19/198/19-198-0000.flac": _libri("19-198-0000", 0.75),
        f"{LIBRI}/19/198/19-198-0001.flac": _libri("19-198-0001", 1.0),
    }


def _libri(utt: str, seconds: float) -> tuple[bytes, Good]:
    speaker, chapter, utterance = utt.split("-")
    return tone_file(((0.5, 1000),), 16000, seconds, "FLAC", "PCM_16", speaker=speaker, chapter=chapter,
                     utterance=utterance, transcript=TRANSCRIPTS.get(utt))


def _bad_files() -> dict[str, tuple[bytes, str]]:
    whole = encode(chirp(16000, 16000), 16000, "FLAC", "PCM_16")
    aiff = encode(chirp(16000, 1600), 16000, "AIFF", "PCM_16")
    return {
        "bad/truncated.flac": (whole[: len(whole) // 2], "corrupt or truncated"),
        "bad/zero_frames.wav": (encode(np.zeros((0, 1)), 16000, "WAV", "PCM_16"), "empty audio"),
        "bad/empty.flac": (b"", "empty file"),
        "bad/text.wav": (b"this is not audio\n" * 8, "not audio"),
        "bad/aiff_named.wav": (aiff, "unsupported format"),
        "bad/notes.txt": (b"some notes\n", "unsupported extension"),
        "LibriSpeech/README.TXT": (b"LibriSpeech ASR corpus\n", "unsupported extension"),
    }


def _transcript_files() -> dict[str, bytes]:
    by_file: dict[str, list[str]] = {}
    for utt, text in TRANSCRIPTS.items():
        speaker, chapter, _ = utt.split("-")
        by_file.setdefault(f"{LIBRI}/{speaker}/{chapter}/{speaker}-{chapter}.trans.txt", []).append(f"{utt} {text}")
    return {rel: ("\n".join(lines) + "\n").encode() for rel, lines in by_file.items()}


def make_tree(root: Path) -> AudioTree:
    """Write the good files, the bad files and the LibriSpeech transcripts under ``root``."""
    tree = AudioTree(root)
    tree.add(_good_files(), _bad_files())
    tree.data.update(_transcript_files())
    tree.write()
    return tree
