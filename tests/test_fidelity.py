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
    decayed, exempt = (set(map(id, g["params"])) for g in param_groups(student, 0.05, decay_rule(cfg)))
    names = dict(student.named_parameters())
    if modality == "vision":  # BEiT: mask_token and the relative position table decay, cls_token does not
        for name, p in names.items():
            assert (id(p) in decayed) == beit_decays(name, p.shape), name
        assert id(names["backbone.embed.mask_token"]) in decayed
        assert id(names["backbone.embed.rel_pos_bias.table"]) in decayed
        assert id(names["backbone.embed.cls_token"]) in exempt
    else:  # fairseq v1 audio and text: one Adam group, every parameter decays
        assert not exempt and len(decayed) == len(names)
