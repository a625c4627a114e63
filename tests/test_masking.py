"""Block-wise (BEiT) masking: exact count, ratio, rectangular blocks, determinism."""

from __future__ import annotations

import random

import torch

from conftest import ROOT
from pipeline.experiment import load_experiment
from pipeline.modalities.vision import add_block, block_mask


def neighbours_masked(mask: torch.Tensor, grid: int) -> float:
    """Fraction of masked patches with at least two masked 4-neighbours (high for blocks, low for noise)."""
    m = mask.view(grid, grid)
    padded = torch.nn.functional.pad(m.float(), (1, 1, 1, 1))
    count = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    return ((count >= 2) & m).sum().item() / m.sum().item()


def test_base_preset_masks_120_of_196_in_blocks():
    cfg = load_experiment(ROOT / "configs/vision_base.yaml").model  # 224 / 16 -> 14 x 14
    assert (cfg.grid, cfg.num_masked, cfg.min_block_patches) == (14, 120, 16)
    rng = random.Random(0)
    masks = [block_mask(14, cfg.num_masked, 16, 0.3, rng) for _ in range(200)]
    assert all(m.sum().item() == cfg.num_masked for m in masks)  # same count in every row
    blockiness = sum(neighbours_masked(m, 14) for m in masks) / len(masks)
    noise = [torch.zeros(196, dtype=torch.bool) for _ in range(200)]
    for m in noise:
        m[torch.randperm(196)[:cfg.num_masked]] = True
    noise_blockiness = sum(neighbours_masked(m, 14) for m in noise) / len(noise)
    assert blockiness > 0.9 and blockiness > noise_blockiness + 0.05
    # masks differ from image to image and cover every position over many draws
    assert len({tuple(m.tolist()) for m in masks}) == len(masks)
    assert torch.stack(masks).any(0).all()


def test_each_block_is_a_filled_rectangle_of_about_min_size():
    rng = random.Random(1)
    for _ in range(100):
        mask = [[False] * 14 for _ in range(14)]
        added = add_block(mask, 120, 16, 0.3, rng)
        cells = [(i, j) for i in range(14) for j in range(14) if mask[i][j]]
        assert added == len(cells) > 0
        rows, cols = {i for i, _ in cells}, {j for _, j in cells}
        assert len(cells) == len(rows) * len(cols)  # a full rectangle
        assert len(cells) >= 12  # >= 16 up to rounding of sqrt(area * aspect)
        assert max(len(rows), len(cols)) / min(len(rows), len(cols)) <= 1 / 0.3 + 1


def test_masks_are_deterministic_per_seed_and_exact_for_small_grids():
    a = block_mask(8, 38, 4, 0.3, random.Random("x"))
    b = block_mask(8, 38, 4, 0.3, random.Random("x"))
    assert torch.equal(a, b)
    for seed in range(50):
        assert block_mask(4, 13, 4, 0.3, random.Random(seed)).sum().item() == 13
