"""Fidelity to the released recipes, checked against implementations that are not ours.

- Masking: the statistics of our masks against the reference algorithms, re-written here from their
  descriptions on numpy's generator (BEiT's ``MaskingGenerator``, fairseq's ``compute_mask_indices`` and
  ``MaskTokensDataset``), on the same number of draws.
- Augmentation: torchvision's ColorJitter / RandomResizedCrop functions on the same drawn parameters.
- Weight-decay groups: BEiT's ``optim_factory.get_parameter_groups`` rule, and fairseq v1's single group.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from pipeline.distributed import model_parallel_config
from pipeline.experiment import load_experiment
from pipeline.model.data2vec import Student
from pipeline.modalities import vision
from pipeline.modalities.speech import span_mask
from pipeline.modalities.text import TextConfig, corrupt
from pipeline.trainer import decay_rule, param_groups

DRAWS = 1500


# ---------------------------------------------------------------------------------------------
# Reference algorithms, from their descriptions
# ---------------------------------------------------------------------------------------------

def beit_mask(gen: np.random.Generator, height=14, width=14, num_masking=120, min_patches=16, max_patches=196,
              min_aspect=0.3) -> np.ndarray:
    """BEiT MaskingGenerator: grow rectangles (area U(min, remaining), log-uniform aspect, 10 tries each)
    until the budget is met or no rectangle adds patches. No top-up: it may end short."""
    mask = np.zeros((height, width), dtype=bool)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 0
    while count < num_masking:
        budget = min(num_masking - count, max_patches)
        delta = 0
        for _ in range(10):
            area = min_patches + (budget - min_patches) * gen.random()  # python's random.uniform, also for low > high
            aspect = math.exp(gen.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top, left = gen.integers(0, height - h + 1), gen.integers(0, width - w + 1)
                new = h * w - mask[top:top + h, left:left + w].sum()
                if 0 < new <= budget:
                    delta = new
                    mask[top:top + h, left:left + w] = True
                    break
        if delta == 0:
            break
        count += delta
    return mask.reshape(-1)


def fairseq_time_masks(gen: np.random.Generator, batch: int, frames: int, prob: float, length: int) -> np.ndarray:
    """fairseq compute_mask_indices (static lengths, min_masks=1, require_same_masks, no mask_dropout)."""
    rows = []
    for _ in range(batch):
        num = max(1, int(prob * frames / length + gen.random()))
        starts = gen.choice(frames - length, num, replace=False)
        idx = np.unique(np.concatenate([starts + k for k in range(length)]))
        rows.append(idx[idx < frames])
    keep = min(len(r) for r in rows)
    out = np.zeros((batch, frames), dtype=bool)
    for i, r in enumerate(rows):
        out[i, gen.choice(r, keep, replace=False) if len(r) > keep else r] = True
    return out


def fairseq_text_mask(gen: np.random.Generator, size: int, prob: float, length: int) -> np.ndarray:
    """fairseq MaskTokensDataset: int(prob * size / length + u) distinct starts over the whole item, each
    extended by length, indices past the end dropped."""
    num = int(prob * size / float(length) + gen.random())
    starts = gen.choice(size, num, replace=False)
    idx = np.concatenate([starts + k for k in range(length)])
    mask = np.zeros(size, dtype=bool)
    mask[idx[idx < size]] = True
    return mask


def run_lengths(mask: np.ndarray) -> list[int]:
    """Lengths of the runs of True along the last axis."""
    out = []
    for row in np.atleast_2d(mask):
        padded = np.concatenate([[0], row.astype(np.int8), [0]])
        edges = np.flatnonzero(np.diff(padded))
        out += list(edges[1::2] - edges[::2])
    return out


def components(mask: np.ndarray, side: int) -> list[int]:
    """Sizes of the 4-connected components of a square mask."""
    grid = mask.reshape(side, side).copy()
    sizes = []
    for i in range(side):
        for j in range(side):
            if grid[i, j]:
                stack, size = [(i, j)], 0
                grid[i, j] = False
                while stack:
                    a, b = stack.pop()
                    size += 1
                    for x, y in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                        if 0 <= x < side and 0 <= y < side and grid[x, y]:
                            grid[x, y] = False
                            stack.append((x, y))
                sizes.append(size)
    return sizes


def histogram(values: list[int], bins: list[int]) -> np.ndarray:
    counts = np.histogram(values, bins=bins)[0].astype(float)
    return counts / counts.sum()


# ---------------------------------------------------------------------------------------------
# Masking statistics
# ---------------------------------------------------------------------------------------------

def test_vision_block_mask_matches_beit_statistics():
    """ViT-B/16 at 224: 120 of 196 patches in blocks of >= 16. BEiT can end short; we top up with single
    patches so every image masks exactly 120: the top-up must be rare and the block structure the same."""
    cfg = load_experiment(ROOT / "configs/vision_base.yaml").model
    gen, rng = np.random.default_rng(0), random.Random(0)
    ref = [beit_mask(gen) for _ in range(DRAWS)]
    ours = [vision.block_mask(cfg.grid, cfg.num_masked, cfg.min_block_patches, cfg.min_aspect, rng).numpy()
            for _ in range(DRAWS)]
    ref_counts = np.array([m.sum() for m in ref])
    assert all(m.sum() == 120 for m in ours)
    assert ref_counts.mean() > 118.5, ref_counts.mean()  # BEiT's shortfall (what the top-up adds) is small
    # where the masks fall: per-patch masking frequency (BEiT favours the centre) agrees patch by patch
    ref_map, our_map = np.mean(ref, 0), np.mean(ours, 0)
    assert np.abs(ref_map - our_map).max() < 0.07, np.abs(ref_map - our_map).max()
    assert np.corrcoef(ref_map, our_map)[0, 1] > 0.9
    # block structure: the number of separate masked regions and their sizes
    ref_parts = [components(m, 14) for m in ref]
    our_parts = [components(m, 14) for m in ours]
    assert abs(np.mean([len(p) for p in ref_parts]) - np.mean([len(p) for p in our_parts])) < 0.25
    bins = [1, 2, 8, 16, 32, 64, 100, 197]
    diff = np.abs(histogram(sum(ref_parts, []), bins) - histogram(sum(our_parts, []), bins)).max()
    assert diff < 0.04, (histogram(sum(ref_parts, []), bins), histogram(sum(our_parts, []), bins))


def test_speech_span_mask_matches_fairseq_statistics():
    """data2vec audio base: mask_prob 0.65, spans of 10, on 20 s clips (999 frames) batched by 8."""
    frames, batch = 999, 8
    gen, rng = np.random.default_rng(0), random.Random(0)
    ref = np.concatenate([fairseq_time_masks(gen, batch, frames, 0.65, 10) for _ in range(DRAWS // batch)])
    ours = torch.cat([span_mask(batch, frames, 0.65, 10, rng) for _ in range(DRAWS // batch)]).numpy()
    assert abs(ref.mean() - ours.mean()) < 0.005, (ref.mean(), ours.mean())  # ~0.49
    bins = [1, 10, 11, 20, 30, 50, 100, 1000]
    ref_h, our_h = histogram(run_lengths(ref), bins), histogram(run_lengths(ours), bins)
    assert np.abs(ref_h - our_h).max() < 0.02, (ref_h, our_h)


def test_text_span_mask_matches_fairseq_statistics():
    """The released text recipe: spans of 4 at mask_prob 0.35 on 512-token blocks: ~30.7% masked."""
    cfg = TextConfig(vocab_size=1000, masking="span", mask_prob=0.35, span_length=4, random_token_prob=0.0,
                     leave_unmasked_prob=0.0)
    gen, rng = np.random.default_rng(0), random.Random(0)
    ref = np.stack([fairseq_text_mask(gen, 512, 0.35, 4) for _ in range(DRAWS)])
    ours = np.stack([corrupt(torch.randint(5, 1000, (512,)), cfg, rng)[1].numpy() for _ in range(DRAWS)])
    assert abs(ref.mean() - 0.307) < 0.005 and abs(ours.mean() - ref.mean()) < 0.003, (ref.mean(), ours.mean())
    bins = [1, 2, 4, 5, 8, 9, 13, 20, 513]
    ref_h, our_h = histogram(run_lengths(ref), bins), histogram(run_lengths(ours), bins)
    assert np.abs(ref_h - our_h).max() < 0.02, (ref_h, our_h)


# ---------------------------------------------------------------------------------------------
# Augmentation against torchvision
# ---------------------------------------------------------------------------------------------

def photo(seed: int, size=(97, 61)) -> Image.Image:
    data = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(data, "RGB")


def test_color_jitter_equals_torchvision():
    """Our ColorJitter on drawn factors and order == torchvision's adjust_* functions applied in that order."""
    tf = pytest.importorskip("torchvision.transforms.functional")
    for seed in range(6):
        img, rng = photo(seed), random.Random(seed)
        ours = vision.color_jitter(img, 0.4, rng)
        replay = random.Random(seed)
        factors = [replay.uniform(0.6, 1.4) for _ in range(3)]
        order = [0, 1, 2]
        replay.shuffle(order)
        want = img
        for k in order:
            want = (tf.adjust_brightness, tf.adjust_contrast, tf.adjust_saturation)[k](want, factors[k])
        assert np.array_equal(np.asarray(ours), np.asarray(want)), seed


@pytest.mark.parametrize("size,scale", [((97, 61), (0.08, 1.0)), ((300, 20), (0.9, 1.0)), ((20, 300), (0.9, 1.0)),
                                        ((50, 50), (0.08, 1.0))])
def test_random_resized_crop_equals_torchvision(monkeypatch, size, scale):
    """The crop box follows torchvision's RandomResizedCrop.get_params (including its clamped centre-crop
    fallback after 10 misses), and the crop + bicubic resize equals torchvision's resized_crop."""
    transforms = pytest.importorskip("torchvision.transforms")
    tf = pytest.importorskip("torchvision.transforms.functional")
    img = photo(1, size)
    for seed in range(20):
        rng = random.Random(seed)
        box = vision.crop_box(img.width, img.height, list(scale), rng)
        # torchvision draws from torch's RNG: feed it the same numbers ours drew, in the same order
        replay = random.Random(seed)
        monkeypatch.setattr(torch, "empty", lambda *a, **k: _Uniform(replay))
        monkeypatch.setattr(torch, "exp", lambda t: t.exp())
        monkeypatch.setattr(torch, "randint", lambda low, high, size=None, **k: _Int(replay, low, high))
        want = transforms.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])
        monkeypatch.undo()
        assert tuple(box) == tuple(want), (seed, box, want)
        top, left, h, w = box
        ours = vision.random_resized_crop(img, 24, list(scale), random.Random(seed))
        theirs = tf.resized_crop(img, top, left, h, w, [24, 24], tf.InterpolationMode.BICUBIC)
        assert np.array_equal(np.asarray(ours), np.asarray(theirs)), seed


class _Uniform:
    """Stands in for ``torch.empty(1).uniform_(a, b)`` (and ``torch.exp`` of it) with a draw from our generator."""

    def __init__(self, rng):
        self.rng = rng

    def uniform_(self, a, b):
        self.value = self.rng.uniform(float(a), float(b))
        return self

    def exp(self):
        self.value = math.exp(self.value)
        return self

    def item(self):
        return self.value


class _Int:
    """Stands in for ``torch.randint(0, n + 1, size=(1,))`` with ``random.randint(0, n)``."""

    def __init__(self, rng, low, high):
        self.value = rng.randint(low, high - 1)

    def item(self):
        return self.value


def test_vision_augmentation_order_is_beits():
    """ColorJitter, then flip, then the crop: the crop of a flipped image is the flipped crop of the mirror box."""
    cfg = load_experiment(ROOT / "configs/vision_tiny.yaml", ["model.color_jitter=0.0"]).model
    img = photo(3)
    for seed in range(30):
        flips = random.Random(seed).random() < 0.5
        out = vision.augment(img, cfg, random.Random(seed))
        replay = random.Random(seed)
        replay.random()  # the flip draw comes before the crop's
        base = img.transpose(Image.FLIP_LEFT_RIGHT) if flips else img
        assert np.array_equal(np.asarray(out), np.asarray(vision.random_resized_crop(base, cfg.image_size,
                                                                                     cfg.crop_scale, replay)))


# ---------------------------------------------------------------------------------------------
# Weight-decay groups
# ---------------------------------------------------------------------------------------------

def beit_decays(name: str, shape: torch.Size) -> bool:
    """data2vec_vision beit/optim_factory.py get_parameter_groups, with no_weight_decay() = {pos_embed, cls_token}
    of the pretraining model (names there are the model's own: ours end the same way)."""
    return not (len(shape) == 1 or name.endswith(".bias") or name.split(".")[-1] in {"pos_embed", "cls_token"})


@pytest.mark.parametrize("modality", ["vision", "speech", "text"])
def test_weight_decay_groups_follow_the_release(single_process_group, modality):
    cfg = load_experiment(ROOT / f"configs/{modality}_tiny.yaml")
    student = Student(cfg.make_modality(), cfg.encoder, model_parallel_config(1))
    groups = param_groups(student, 0.05, decay_rule(cfg))
    decayed, exempt = ({id(p) for g in groups if (g["weight_decay"] > 0) == wd for p in g["params"]}
                       for wd in (True, False))
    names = dict(student.named_parameters())
    if modality == "vision":  # BEiT: mask_token and the relative position table decay, cls_token does not
        for name, p in names.items():
            assert (id(p) in decayed) == beit_decays(name, p.shape), name
        assert id(names["backbone.embed.mask_token"]) in decayed
        assert id(names["backbone.embed.rel_pos_bias.table"]) in decayed
        assert id(names["backbone.embed.cls_token"]) in exempt
    else:  # fairseq v1 audio and text: one Adam group, every parameter decays
        assert not exempt and len(decayed) == len(names) and len(groups) == 1


# ---------------------------------------------------------------------------------------------
# Presets against the released recipes
# ---------------------------------------------------------------------------------------------

FS = "facebookresearch/fairseq@3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99"
AUDIO = f"{FS}:examples/data2vec/config/audio/pretraining/base_librispeech.yaml"
TEXT = f"{FS}:examples/data2vec/config/text/pretraining/base.yaml"
W2V = f"{FS}:fairseq/models/wav2vec/wav2vec2.py"
AB2 = f"{FS}:examples/data2vec/config/v2/base_audio_only_task.yaml"
AL2 = f"{FS}:examples/data2vec/config/v2/large_audio_only_task.yaml"
DV = "facebookresearch/data2vec_vision@af9a36349aaed59ae66e69b5dabeef2d62fdc5da"
RD = f"{DV}:beit/README.md"
RC = f"{DV}:beit/run_cyclical.py"
EPOCH_B, EPOCH_L = 1281167 // 2048, 1281167 // 4096  # BEiT: num_training_steps_per_epoch = len(dataset) // batch

# (preset, key, released value, where the release sets it). Values in epochs are converted to steps here.
RELEASED = [
    ("vision_base", "model.num_masked", 120, f"{RD}:24 --num_mask_patches 120"),
    ("vision_base", "model.min_block_patches", 16, f"{RD}:33 --min_mask_patches_per_block 16"),
    ("vision_base", "model.crop_scale", [0.08, 1.0], f"{DV}:beit/transforms.py:83 scale=(0.08, 1.0)"),
    ("vision_base", "model.color_jitter", 0.4, f"{DV}:beit/datasets.py:67 ColorJitter(0.4, 0.4, 0.4)"),
    ("vision_base", "encoder.layer_scale_init", 1e-4, f"{RD}:30 --layer_scale_init_value 1e-4"),
    ("vision_base", "encoder.drop_path", 0.25, f"{RD}:30 --drop_path 0.25"),
    ("vision_base", "encoder.attn_dropout", 0.05, f"{RD}:37 --attn_drop_rate 0.05"),
    ("vision_base", "objective.top_k", 6, f"{RD}:27 --target_layers [6,7,8,9,10,11]"),
    ("vision_base", "objective.beta", 2.0, f"{RD}:34 --l1_beta 2.0"),
    ("vision_base", "ema.tau_end", 0.9998, f"{RD}:28 --ema_decay 0.9998"),
    ("vision_base", "ema.anneal_steps", 0, f"{RD}:28 --ema_start_at 0 (constant decay)"),
    ("vision_base", "train.lr", 2e-3, f"{RD}:29 --lr 2e-3"),
    ("vision_base", "train.steps", 800 * EPOCH_B, f"{RD}:29 --epochs 800"),
    ("vision_base", "train.warmup_steps", 10 * EPOCH_B, f"{RD}:29 --warmup_epochs 10"),
    ("vision_base", "train.min_lr", 1e-5, f"{RC}:148-150 --min_lr default 1e-5"),
    ("vision_base", "train.grad_clip", 3.0, f"{RD}:30 --clip_grad 3.0"),
    ("vision_base", "train.weight_decay", 0.05, f"{RD}:35 --weight_decay 0.05"),
    ("vision_base", "train.betas", [0.9, 0.999], f"{DV}:beit/optim_factory.py:120-121 (torch AdamW default)"),
    ("vision_large", "model.num_masked", 120, f"{RD}:61 --num_mask_patches 120"),
    ("vision_large", "encoder.layer_scale_init", 1e-5, f"{RD}:67 --layer_scale_init_value 1e-5"),
    ("vision_large", "encoder.drop_path", 0.2, f"{RD}:67 --drop_path 0.2"),
    ("vision_large", "encoder.attn_dropout", 0.15, f"{RD}:73 --attn_drop_rate 0.15"),
    ("vision_large", "objective.top_k", 6, f"{RD}:64 --target_layers [18,...,23]"),
    ("vision_large", "ema.tau_end", 0.9998, f"{RD}:65 --ema_decay 0.9998 (stage 1)"),
    ("vision_large", "train.lr", 1e-3, f"{RD}:66 --lr 1e-3"),
    ("vision_large", "train.steps", 800 * EPOCH_L, f"{RD}:66 --epochs 800 (stage 1)"),
    ("vision_large", "train.warmup_steps", 80 * EPOCH_L, f"{RD}:66 --warmup_epochs 80"),
    ("vision_large", "train.micro_batch_size", 64, f"{RD}:66 --batch_size 64 (per GPU, 64 GPUs: RD:60)"),
    ("vision_large", "train.grad_clip", 3.0, f"{RD}:67 --clip_grad 3.0"),
    ("vision_large_stage2", "ema.tau_end", 0.9999, f"{RD}:86 --ema_decay 0.9999 (stage 2)"),
    ("vision_large_stage2", "ema.anneal_steps", 0, f"{RD}:86 --ema_start_at 0"),
    ("vision_large_stage2", "train.warmup_steps", 40 * EPOCH_L, f"{RD}:87 --warmup_epochs 40"),
    ("vision_large_stage2", "train.steps", 800 * EPOCH_L, f"{RD}:87 --epochs 800"),
    ("vision_large_stage2", "train.lr", 1e-3, f"{RD}:87 --lr 1e-3"),
    ("vision_large_stage2", "encoder.drop_path", 0.2, f"{RD}:88 --drop_path 0.2"),
    ("vision_large_stage2", "encoder.attn_dropout", 0.15, f"{RD}:94 --attn_drop_rate 0.15"),
    ("vision_large_stage2", "init.from_", "runs/vision_large/stage1.pt", f"{RD}:95 --seed_model (stage 1's export)"),
    ("speech_base", "model.max_samples", 320000, f"{AUDIO}:18 max_sample_size"),
    ("speech_base", "model.min_samples", 32000, f"{AUDIO}:19 min_sample_size"),
    ("speech_base", "model.normalize", True, f"{AUDIO}:20 normalize"),
    ("speech_base", "model.mask_prob", 0.65, f"{AUDIO}:64 mask_prob"),
    ("speech_base", "model.mask_length", 10, f"{AUDIO}:65 mask_length"),
    ("speech_base", "model.pos_conv_layers", 5, f"{AUDIO}:73 pos_conv_depth"),
    ("speech_base", "model.pos_conv_kernel", 19, f"{AUDIO}:74 conv_pos 95 / 5 layers ({W2V}:1019-1022)"),
    ("speech_base", "encoder.layerdrop", 0.05, f"{AUDIO}:58 encoder_layerdrop"),
    ("speech_base", "encoder.dropout", 0.1, f"{W2V}:73-75 dropout default"),
    ("speech_base", "encoder.attn_dropout", 0.1, f"{W2V}:76-78 attention_dropout default"),
    ("speech_base", "objective.top_k", 8, f"{AUDIO}:71 average_top_k_layers"),
    ("speech_base", "objective.layer_norm", "instance", f"{AUDIO}:70 instance_norm_target_layer"),
    ("speech_base", "objective.loss", "l2", f"{AUDIO}:67 loss_beta 0 (MSE)"),
    ("speech_base", "objective.scale", "inv_sqrt_dim", f"{AUDIO}:68 loss_scale null (1/sqrt(D))"),
    ("speech_base", "ema.tau0", 0.999, f"{AUDIO}:76 ema_decay"),
    ("speech_base", "ema.tau_end", 0.9999, f"{AUDIO}:77 ema_end_decay"),
    ("speech_base", "ema.anneal_steps", 30000, f"{AUDIO}:78 ema_anneal_end_step"),
    ("speech_base", "train.steps", 400000, f"{AUDIO}:42 max_update"),
    ("speech_base", "train.lr", 5e-4, f"{AUDIO}:43 lr"),
    ("speech_base", "train.betas", [0.9, 0.98], f"{AUDIO}:47 adam_betas"),
    ("speech_base", "train.eps", 1e-6, f"{AUDIO}:48 adam_eps"),
    ("speech_base", "train.weight_decay", 0.01, f"{AUDIO}:49 weight_decay"),
    ("speech_base", "train.schedule", "tri_stage", f"{AUDIO}:52 lr_scheduler tri_stage"),
    ("speech_base", "train.warmup_steps", 12000, f"{AUDIO}:53 phase_ratio 0.03 x 400000"),
    ("speech_base", "train.hold_steps", 360000, f"{AUDIO}:53 phase_ratio 0.9 x 400000"),
    ("speech_base", "train.grad_clip", 0.0, f"{FS}:fairseq/dataclass/configs.py:601-602 clip_norm default 0"),
    ("text_base", "model.masking", "span", f"{TEXT}:26 mask_multiple_length 4"),
    ("text_base", "model.mask_prob", 0.35, f"{TEXT}:25 mask_prob"),
    ("text_base", "model.span_length", 4, f"{TEXT}:26 mask_multiple_length"),
    ("text_base", "model.random_token_prob", 0.0, f"{TEXT}:23 random_token_prob"),
    ("text_base", "model.leave_unmasked_prob", 0.0, f"{TEXT}:24 leave_unmasked_prob"),
    ("text_base", "model.mask_specials", True, f"{FS}:fairseq/data/mask_tokens_dataset.py:148 (every position)"),
    ("text_base", "encoder.dropout", 0.1, f"{TEXT}:64 dropout"),
    ("text_base", "encoder.attn_dropout", 0.1, f"{TEXT}:65 attention_dropout"),
    ("text_base", "encoder.init", "bert", f"{FS}:examples/data2vec/models/data2vec_text.py:90 init_bert_params"),
    ("text_base", "objective.top_k", 10, f"{TEXT}:54 average_top_k_layers"),
    ("text_base", "objective.beta", 4.0, f"{TEXT}:60 loss_beta"),
    ("text_base", "ema.tau0", 0.999, f"{TEXT}:57 ema_decay"),
    ("text_base", "ema.tau_end", 0.9999, f"{TEXT}:58 ema_end_decay"),
    ("text_base", "ema.anneal_steps", 300000, f"{TEXT}:59 ema_anneal_end_step"),
    ("text_base", "train.steps", 1000000, f"{TEXT}:48 max_update"),
    ("text_base", "train.lr", 2e-4, f"{TEXT}:47 lr"),
    ("text_base", "train.schedule", "cosine", f"{TEXT}:42 lr_scheduler cosine"),
    ("text_base", "train.warmup_steps", 10000, f"{TEXT}:43 warmup_updates"),
    ("text_base", "train.min_lr", 0.0, f"{FS}:fairseq/optim/lr_scheduler/cosine_lr_scheduler.py:23-28 min_lr default"),
    ("text_base", "train.grad_clip", 5.0, f"{TEXT}:46 clip_norm"),
    ("text_base", "train.weight_decay", 0.01, f"{TEXT}:37 weight_decay"),
    ("text_base", "train.betas", [0.9, 0.98], f"{TEXT}:38 adam_betas"),
    ("text_base", "train.eps", 1e-6, f"{TEXT}:39 adam_eps"),
    # data2vec 2.0 audio: the dataset precomputes the masks (compute_block_mask_1d)
    ("speech_base_v2", "model.masking", "blocks", f"{AB2}:24 precompute_mask_config {{}}"),
    ("speech_base_v2", "model.mask_prob", 0.5, f"{AB2}:95 mask_prob"),
    ("speech_base_v2", "model.mask_prob_adjust", 0.05, f"{AB2}:96 mask_prob_adjust"),
    ("speech_base_v2", "model.mask_length", 5, f"{AB2}:98 mask_length"),
    ("speech_base_v2", "model.clone_batch", 8, f"{AB2}:71 clone_batch"),
    ("speech_large_v2", "model.masking", "blocks", f"{AL2}:24 precompute_mask_config {{}}"),
    ("speech_large_v2", "model.mask_prob", 0.55, f"{AL2}:104 mask_prob"),
    ("speech_large_v2", "model.mask_prob_adjust", 0.1, f"{AL2}:105 mask_prob_adjust"),
    ("speech_large_v2", "model.mask_length", 5, f"{AL2}:107 mask_length"),
    ("speech_large_v2", "model.clone_batch", 12, f"{AL2}:80 clone_batch"),
    # initialisation the code does, not the YAML: the conv feature encoder (both releases build wav2vec 2.0's) and the
    # text decoder's projection (init_bert_params, which only the text encoder does not reset)
    ("speech_base", "model.conv_init", "kaiming", f"{W2V}:867 nn.init.kaiming_normal_(conv.weight)"),
    ("speech_base_v2", "model.conv_init", "kaiming", f"{W2V}:867 nn.init.kaiming_normal_(conv.weight)"),
    ("speech_base_v2", "decoder.init", "torch", f"{FS}:examples/data2vec/models/modalities/audio.py:191-192"),
    ("text_base_v2", "decoder.init", "bert", f"{FS}:examples/data2vec/models/data2vec2.py:245, modalities/text.py:95"),
    ("text_large_v2", "decoder.init", "bert", f"{FS}:examples/data2vec/models/data2vec2.py:245, modalities/text.py:95"),
    # collapse: the audio and 2.0 models raise past 5000 updates below min_target_var 0.1 / min_pred_var 0.01 (a mean
    # per-dimension std, fairseq's compute_var); the 2.0 image recipe sets both to 0; v1 text and vision never check
    ("speech_base", "collapse.action", "stop", f"{FS}:examples/data2vec/models/data2vec_audio.py:482-492"),
    ("speech_base", "collapse.min_target_std", 0.1, f"{FS}:examples/data2vec/models/data2vec_audio.py:78-79"),
    ("speech_base", "collapse.min_prediction_std", 0.01, f"{FS}:examples/data2vec/models/data2vec_audio.py:81-83"),
    ("speech_base", "collapse.after_steps", 5000, f"{FS}:examples/data2vec/models/data2vec_audio.py:482"),
    ("speech_base_v2", "collapse.action", "stop", f"{FS}:examples/data2vec/models/data2vec2.py:669-684"),
    ("text_base_v2", "collapse.action", "stop", f"{FS}:examples/data2vec/models/data2vec2.py:669-684"),
    ("text_base_v2", "collapse.min_target_std", 0.1, f"{FS}:examples/data2vec/models/data2vec2.py:128-129"),
    ("text_base_v2", "collapse.min_prediction_std", 0.01, f"{FS}:examples/data2vec/models/data2vec2.py:131-133"),
    ("vision_base_v2", "collapse.min_target_std", 0.0, f"{FS}:examples/data2vec/config/v2/base_images_only_task.yaml:86"),
    ("vision_base_v2", "collapse.min_prediction_std", 0.0,
     f"{FS}:examples/data2vec/config/v2/base_images_only_task.yaml:87"),
]


def preset_value(cfg, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


@pytest.mark.parametrize("preset", sorted({row[0] for row in RELEASED}))
def test_presets_match_the_released_recipes(preset):
    cfg = load_experiment(ROOT / f"configs/{preset}.yaml")
    wrong = [f"{key}={preset_value(cfg, key)!r}, released {want!r} ({source})"
             for name, key, want, source in RELEASED if name == preset and preset_value(cfg, key) != pytest.approx(want)]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("preset", ["vision_base", "vision_large", "speech_base", "text_base", "vision_base_v2",
                                    "speech_base_v2", "text_large_v2"])
def test_reference_rules_resolve_per_modality(preset):
    """Weight decay as the release: BEiT's groups for vision, one group for fairseq audio and text (v1); data2vec
    2.0 spares biases and 1-D parameters in every modality."""
    cfg = load_experiment(ROOT / f"configs/{preset}.yaml")
    if cfg.method == "data2vec2":
        assert decay_rule(cfg) == "bias"
    else:
        assert decay_rule(cfg) == ("beit" if cfg.modality == "vision" else "none")


@pytest.mark.parametrize("preset,override,gpu_autocast", [
    ("vision_base", "reference", False),  # BEiT: the teacher runs outside autocast (engine_for_cyclical.py:66-67)
    ("speech_base", "reference", True),  # fairseq: the teacher is part of the fp16 model
    ("text_base", "reference", True),
    ("vision_base", "autocast", True),
    ("speech_base", "fp32", False),
    ("vision_base_v2", "reference", True),  # fairseq data2vec 2.0: the EMA model in the student's half precision
])
def test_teacher_precision_follows_the_release(preset, override, gpu_autocast):
    from types import SimpleNamespace
    from pipeline.trainer import Trainer
    cfg = load_experiment(ROOT / f"configs/{preset}.yaml", [f"train.teacher_precision={override}"])
    for student_autocast in (True, False):  # bf16 on GPU, fp32 on CPU (where nothing is autocast)
        fake = SimpleNamespace(cfg=cfg, modality=cfg.make_modality(), method=cfg.make_method(),
                               rt=SimpleNamespace(choice=SimpleNamespace(autocast=student_autocast)))
        assert Trainer.teacher_autocast(fake) == (gpu_autocast and student_autocast)


def test_fp32_teacher_computes_in_fp32_under_a_bf16_student(single_process_group):
    """With the student under bf16 autocast (forced here on CPU) and batches cast to bf16, an fp32 teacher
    upcasts the inputs and computes outside autocast: its targets equal a plain fp32 forward."""
    from types import SimpleNamespace
    from pipeline.model.data2vec import Backbone
    from pipeline.objective import teacher_targets
    from pipeline.trainer import Trainer
    cfg = load_experiment(ROOT / "configs/vision_tiny.yaml")
    teacher = Backbone(cfg.make_modality(), cfg.encoder, model_parallel_config(1)).eval()
    image = torch.randn(2, 3, cfg.model.image_size, cfg.model.image_size, generator=torch.Generator().manual_seed(0))
    bf16_batch = {"image": image.to(torch.bfloat16)}
    with torch.no_grad():
        want = teacher_targets(teacher({"image": bf16_batch["image"].float()}, keep=cfg.objective.top_k), cfg.objective)
    for precision, exact in (("fp32", True), ("autocast", False)):
        cfg.train.teacher_precision = precision
        fake = SimpleNamespace(cfg=cfg, modality=cfg.make_modality(), method=cfg.make_method(), teacher=teacher,
                               rt=SimpleNamespace(choice=SimpleNamespace(autocast=True, device_type="cpu",
                                                                         dtype=torch.bfloat16)))
        fake.teacher_autocast = lambda: Trainer.teacher_autocast(fake)
        got = Trainer.teacher_targets(fake, dict(bf16_batch))
        assert got.dtype == torch.float32
        assert torch.equal(got, want) == exact, precision
