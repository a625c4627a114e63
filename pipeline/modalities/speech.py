"""Speech: data2vec v1 audio (wav2vec 2.0-style backbone).

Waveform (16 kHz, normalised per utterance) -> 7-layer conv feature encoder (LayerNorm + GELU after
each conv, 16000 samples -> 49 frames) -> LayerNorm + Linear(C, D) -> learned mask embedding at masked
frames -> convolutional positional encoding (added) -> LayerNorm -> dropout -> post-LN blocks. The shapes and
order follow transformers' ``Data2VecAudioModel``.

Batches are cropped to the shortest clip in the batch (as the reference does): there is no padding,
so neither the convolutions nor the instance-normalised targets ever see padded frames. With
``data.max_tokens`` the data stream groups clips of similar length (``token_batches``), so the crop
discards little.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import soundfile
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import EncoderConfig, doc, one_of, require
from pipeline.modalities.base import Modality, visible_rows
from pipeline.model.transformer import InitConv1d

AUDIO_KEYS = ("flac", "wav")
SAMPLE_RATE = 16000
WAV2VEC_CONV = [[512, 10, 5], [512, 3, 2], [512, 3, 2], [512, 3, 2], [512, 3, 2], [512, 2, 2], [512, 2, 2]]


@dataclass
class SpeechConfig:
    conv_layers: list = doc("feature encoder convs as [channels, kernel, stride] (wav2vec 2.0: 7 layers, 512 ch, "
                            "kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2)", WAV2VEC_CONV)
    pos_conv_layers: int = doc("positional convolution layers", 5)
    pos_conv_kernel: int = doc("positional convolution kernel size", 19)
    pos_conv_groups: int = doc("positional convolution groups", 16)
    max_samples: int = doc("utterances longer than this are randomly cropped to it (samples at 16 kHz)", 320000)
    min_samples: int = doc("utterances shorter than this are skipped", 32000)
    masking: str = doc("'spans' (data2vec v1, fairseq compute_mask_indices: span starts, overlaps merged, rows thinned "
                       "to one count) or 'blocks' (data2vec 2.0, fairseq compute_block_mask_1d: span centres drawn at "
                       "mask_prob + mask_prob_adjust, then exactly int(frames x mask_prob) masked frames per row)",
                       "spans")
    mask_prob: float = doc("spans: span-start probability x span length (fraction of frames before overlaps); "
                           "blocks: the exact fraction of frames masked in every row", 0.65)
    mask_prob_adjust: float = doc("blocks: added to mask_prob when drawing span centres, to make up for overlaps "
                                  "(data2vec 2.0: 0.05 Base, 0.1 Large)", 0.0)
    mask_length: int = doc("span length in frames (data2vec 2.0: 5)", 10)
    clone_batch: int = doc("masked clones of each clip sharing one teacher pass (data2vec 2.0: 8)", 1)
    normalize: bool = doc("normalise each waveform to zero mean and unit variance", True)
    conv_init: str = doc("the conv feature encoder's weights: 'kaiming' (kaiming_normal_, fan in, as wav2vec 2.0's "
                         "ConvFeatureExtractionModel in both data2vec releases) or 'torch' (PyTorch's Conv1d default, "
                         "about 2.4x smaller)", "kaiming")

    def __post_init__(self):
        require(len(self.conv_layers) > 0 and all(len(c) == 3 and min(c) > 0 for c in self.conv_layers),
                "model.conv_layers must be a list of [channels, kernel, stride] with positive values")
        require(self.pos_conv_layers >= 1 and self.pos_conv_kernel >= 1, "model.pos_conv_* must be >= 1")
        require(self.min_samples >= self.receptive_field,
                f"model.min_samples={self.min_samples} is shorter than one frame ({self.receptive_field} samples)")
        require(self.max_samples >= self.min_samples, "model.max_samples must be >= model.min_samples")
        require(0 < self.mask_prob < 1 and self.mask_length >= 1, "model.mask_prob in (0, 1), model.mask_length >= 1")
        one_of("model.masking", self.masking, ("spans", "blocks"))
        one_of("model.conv_init", self.conv_init, ("kaiming", "torch"))
        require(0 <= self.mask_prob_adjust < 1 and (self.masking == "blocks" or not self.mask_prob_adjust),
                "model.mask_prob_adjust must be in [0, 1) and applies to model.masking=blocks only")
        require(1 <= self.clone_batch <= 256, f"model.clone_batch={self.clone_batch} must be in [1, 256]")
        require(frames_for(self.conv_layers, self.min_samples) > self.mask_length,
                f"model.min_samples={self.min_samples} gives too few frames for model.mask_length={self.mask_length}")

    @property
    def receptive_field(self) -> int:
        field = 1
        for _, kernel, stride in reversed(self.conv_layers):
            field = (field - 1) * stride + kernel
        return field


def normalize_wave(wav: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per clip: (x - mean) / sqrt(var + 1e-7), as HF's Wav2Vec2FeatureExtractor
    (fairseq's F.layer_norm uses eps 1e-5: the same for any clip of variance >> 1e-5)."""
    centred = wav - wav.mean()
    return centred / torch.sqrt(centred.pow(2).mean() + 1e-7)


def frames_for(conv_layers: list, samples: int) -> int:
    """Frames the feature encoder gives for a clip: L <- floor((L - kernel) / stride) + 1 per conv."""
    length = samples
    for _, kernel, stride in conv_layers:
        length = (length - kernel) // stride + 1
    return max(length, 0)


# ---------------------------------------------------------------------------------------------
# Span masking (fairseq compute_mask_indices, static lengths, require_same_masks)
# ---------------------------------------------------------------------------------------------

def span_mask(batch: int, frames: int, mask_prob: float, span: int, rng: random.Random) -> torch.Tensor:
    """(batch, frames) bool: each row masks spans of ``span`` frames starting at
    int(mask_prob * frames / span + u) random positions (u ~ U[0,1), probabilistic rounding); spans may
    overlap. Rows are then thinned to the smallest row's count so every row masks the same number."""
    rows = []
    for _ in range(batch):
        # fairseq draws distinct starts from [0, frames - span): the last possible start is never drawn
        starts = rng.sample(range(frames - span), min(max(1, int(mask_prob * frames / span + rng.random())),
                                                      frames - span))
        rows.append(sorted({s + k for s in starts for k in range(span)}))
    count = min(len(r) for r in rows)
    mask = torch.zeros(batch, frames, dtype=torch.bool)
    for i, row in enumerate(rows):
        mask[i, rng.sample(row, count) if len(row) > count else row] = True
    return mask


def block_mask_1d(rows: int, frames: int, mask_prob: float, span: int, adjust: float,
                  gen: torch.Generator) -> torch.Tensor:
    """(rows, frames) bool: data2vec 2.0's audio mask (fairseq compute_block_mask_1d, require_same_masks, as its
    audio dataset computes it). int(frames x (mask_prob + adjust) / span) span centres per row, drawn uniformly
    with replacement; each masks ``span`` frames from span // 2 before it (clipped at the ends). Then every row is
    brought to exactly int(frames x mask_prob) masked frames: a uniform random subset of its masked frames is kept,
    or uniform random unmasked frames are added."""
    centres = torch.randint(0, frames, (rows, int(frames * (mask_prob + adjust) / span)), generator=gen)
    covered = (centres.unsqueeze(-1) + torch.arange(span) - span // 2).clamp_(0, frames - 1).flatten(1)
    spans = torch.zeros(rows, frames, dtype=torch.bool).scatter_(1, covered, True)
    # rank each row's frames: its masked frames in random order, then its unmasked ones in random order
    ranked = (torch.rand(rows, frames, generator=gen) + (~spans).float()).argsort(dim=1)
    return torch.zeros_like(spans).scatter_(1, ranked[:, :int(frames * mask_prob)], True)


# ---------------------------------------------------------------------------------------------
# Length-bucketed batches (data.max_tokens)
# ---------------------------------------------------------------------------------------------

def length_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` sorted longest first (ties: by index) and cut greedily into batches whose
    size x longest length stays within ``max_tokens`` (fairseq batch_by_size on descending sizes). A
    length over the budget on its own still forms a batch of one."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


# ---------------------------------------------------------------------------------------------
# Model parts
# ---------------------------------------------------------------------------------------------

class ChannelNorm(nn.LayerNorm):
    """LayerNorm over channels of a (B, C, T) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class FeatureEncoder(nn.Module):
    """Conv1d (no bias) -> LayerNorm over channels -> GELU, per layer: (B, L) -> (B, C, T)."""

    def __init__(self, conv_layers: list, init: str = "kaiming"):
        super().__init__()
        layers, in_ch = [], 1
        for ch, kernel, stride in conv_layers:
            conv = (InitConv1d(in_ch, ch, kernel, stride, bias=False, init=nn.init.kaiming_normal_)
                    if init == "kaiming" else nn.Conv1d(in_ch, ch, kernel, stride, bias=False))
            layers.append(nn.ModuleDict({"conv": conv, "layer_norm": ChannelNorm(ch)}))
            in_ch = ch
        self.conv_layers = nn.ModuleList(layers)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = wav.unsqueeze(1)
        for layer in self.conv_layers:
            x = F.gelu(layer["layer_norm"](layer["conv"](x)))
        return x


class PositionalConv(nn.Module):
    """Stack of grouped Conv1d -> (drop last frame for even kernels) -> LayerNorm (no affine) -> GELU."""

    def __init__(self, dim: int, layers: int, kernel: int, groups: int):
        super().__init__()
        require(dim % groups == 0, f"encoder.dim={dim} must be divisible by model.pos_conv_groups={groups}")
        self.convs = nn.ModuleList(nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
                                   for _ in range(layers))
        self.trim = 1 if kernel % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        y = x.transpose(1, 2)
        for conv in self.convs:
            y = conv(y)
            if self.trim:
                y = y[..., :-self.trim]
            y = F.gelu(F.layer_norm(y.transpose(1, 2), y.shape[1:2]).transpose(1, 2))
        return y.transpose(1, 2)


class SpeechEmbedder(nn.Module):
    def __init__(self, cfg: SpeechConfig, enc: EncoderConfig):
        super().__init__()
        channels = cfg.conv_layers[-1][0]
        self.feature_extractor = FeatureEncoder(cfg.conv_layers, cfg.conv_init)
        self.feature_norm = nn.LayerNorm(channels, eps=enc.layer_norm_eps)
        self.projection = nn.Linear(channels, enc.dim)
        self.mask_emb = nn.Parameter(torch.empty(enc.dim).uniform_())
        self.pos_conv = PositionalConv(enc.dim, cfg.pos_conv_layers, cfg.pos_conv_kernel, cfg.pos_conv_groups)
        self.encoder_norm = nn.LayerNorm(enc.dim, eps=enc.layer_norm_eps)
        self.dropout = nn.Dropout(enc.dropout)  # fairseq TransformerEncoder.extract_features, HF Data2VecAudioEncoder

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The local encoder: conv feature encoder, LayerNorm, projection -> (B, T, D)."""
        return self.projection(self.feature_norm(self.feature_extractor(batch["audio"]).transpose(1, 2)))

    def forward(self, batch: dict[str, torch.Tensor], mask: torch.Tensor | None = None,
                visible: torch.Tensor | None = None):
        # ``features`` given: the student's local encoder output, which the teacher shares (Trainer.shared_inputs)
        x = batch["features"] if "features" in batch else self.features(batch)  # (B, T, D)
        if visible is not None:
            # data2vec 2.0: each clone's positional convolution sees its masked frames as zeros; only the visible
            # frames go on (fairseq: x_unmasked + gather of the positions computed on the zeroed sequence)
            x = x.repeat_interleave(mask.shape[0] // x.shape[0], 0)  # (B x M, T, D)
            x = visible_rows(x + self.pos_conv(x.masked_fill(mask.unsqueeze(-1), 0.0)), visible)
        else:
            if mask is not None:
                x = torch.where(mask.unsqueeze(-1), self.mask_emb.to(x.dtype), x)
            x = x + self.pos_conv(x)
        return self.dropout(self.encoder_norm(x)), None


class Speech(Modality):
    name = "speech"
    data_kind = "audio"
    Config = SpeechConfig
    # the local encoder SpeechEmbedder.features runs: when the teacher's copy of it is copied from the student
    # (ema.copy, as the presets and fairseq's ema_transformer_only), the teacher takes the student's output
    shared_prefixes = ("embed.feature_extractor.", "embed.feature_norm.", "embed.projection.")

    def example(self, sample, rng):
        wav = self.decode(sample)
        if wav.numel() < self.cfg.min_samples:
            return None
        if self.cfg.normalize:
            wav = normalize_wave(wav)
        if wav.numel() > self.cfg.max_samples:
            start = rng.randrange(wav.numel() - self.cfg.max_samples + 1)
            wav = wav[start:start + self.cfg.max_samples]
        return {"audio": wav, "seed": rng.getrandbits(62)}

    def eval_inputs(self, sample):
        """The whole clip, mono, normalised per clip as in training: HF's Wav2Vec2FeatureExtractor computes the same."""
        wav = self.decode(sample)
        if wav.numel() < self.cfg.receptive_field:
            raise ValueError(f"sample {sample.get('__key__')} has {wav.numel()} samples, fewer than one frame "
                             f"({self.cfg.receptive_field})")
        return {"audio": (normalize_wave(wav) if self.cfg.normalize else wav).unsqueeze(0)}

    def decode(self, sample) -> torch.Tensor:
        """The sample's audio as a (L,) float32 mono waveform at 16 kHz."""
        key = next((k for k in AUDIO_KEYS if k in sample), None)
        if key is None:
            raise ValueError(f"sample {sample.get('__key__')} has no audio (expected one of {AUDIO_KEYS})")
        wav, rate = soundfile.read(io.BytesIO(sample[key]), dtype="float32", always_2d=True)
        if rate != SAMPLE_RATE:
            raise ValueError(f"sample {sample.get('__key__')} is {rate} Hz; shards must hold 16 kHz audio "
                             f"(make them with python -m data_prep.audio)")
        return torch.from_numpy(wav).mean(1)

    def collate(self, examples):
        """Crop every clip (at a random offset) to the shortest in the batch, then span-mask the frames."""
        length = min(ex["audio"].numel() for ex in examples)
        crops = []
        for ex in examples:
            start = random.Random(ex["seed"]).randrange(ex["audio"].numel() - length + 1)
            crops.append(ex["audio"][start:start + length])
        frames = frames_for(self.cfg.conv_layers, length)
        return {"audio": torch.stack(crops), "mask": self.frame_mask(len(examples), frames, examples[0]["seed"])}

    def frame_mask(self, clips: int, frames: int, seed: int) -> torch.Tensor:
        """(clips x M, frames) bool: clone c of clip b is row b x M + c; every row masks the same count."""
        m = self.cfg
        rows = clips * m.clone_batch
        if m.masking == "blocks":
            gen = torch.Generator().manual_seed(seed ^ 0x5EED)
            return block_mask_1d(rows, frames, m.mask_prob, m.mask_length, m.mask_prob_adjust, gen)
        return span_mask(rows, frames, m.mask_prob, m.mask_length, random.Random(seed ^ 0x5EED))

    def token_batches(self, examples: list[dict], max_tokens: int) -> list[list[dict]]:
        """Examples grouped by length into batches of at most ``max_tokens`` audio samples (``length_batches``)."""
        return [[examples[i] for i in batch] for batch in length_batches([ex["audio"].numel() for ex in examples],
                                                                         max_tokens)]

    def build_embedder(self, enc, mp):
        return SpeechEmbedder(self.cfg, enc)

    def tokens_per_sample(self):
        return frames_for(self.cfg.conv_layers, self.cfg.max_samples)

    def masked_share(self):
        if self.cfg.masking == "blocks":
            return self.cfg.mask_prob  # exact per row
        return 1.0 - math.exp(-self.cfg.mask_prob)  # overlapping spans: ~48% of frames at 0.65

    def sample_bytes(self):
        return 4 * self.cfg.max_samples + self.tokens_per_sample() * self.cfg.clone_batch  # fp32 waveform + masks

    def embed_flops_per_sample(self, enc, tokens=None):
        """Conv feature encoder + projection + positional convs for a clip giving ``tokens`` frames."""
        return self.shared_flops_per_sample(enc, tokens) + self.clone_flops_per_sample(enc, tokens)

    def clone_flops_per_sample(self, enc, tokens=None):
        """The positional convolutions (a data2vec 2.0 student runs them on every clone's masked sequence)."""
        tokens = tokens or self.tokens_per_sample()
        m = self.cfg
        return m.pos_conv_layers * 2.0 * tokens * m.pos_conv_kernel * enc.dim ** 2 / m.pos_conv_groups

    def shared_flops_per_sample(self, enc, tokens=None):
        """The conv feature encoder and projection (``SpeechEmbedder.features``), run once for student and teacher."""
        tokens = tokens or self.tokens_per_sample()
        flops, length, in_ch = 0.0, self.samples_for_frames(tokens), 1
        for ch, kernel, stride in self.cfg.conv_layers:
            length = (length - kernel) // stride + 1
            flops += 2.0 * length * kernel * in_ch * ch
            in_ch = ch
        return flops + 2.0 * tokens * in_ch * enc.dim

    def samples_for_frames(self, frames: int) -> int:
        stride = 1
        for _, _, s in self.cfg.conv_layers:
            stride *= s
        return self.cfg.receptive_field + (frames - 1) * stride
