"""Targets and loss equal an independent dense computation (tests/reference.py) on the same weights."""

from __future__ import annotations

import pytest
import torch

import reference as ref
from conftest import randomise
from pipeline.config import EncoderConfig
from pipeline.distributed import model_parallel_config
from pipeline.model.data2vec import Backbone, Student
from pipeline.modalities.vision import Vision, VisionConfig
from pipeline.objective import ObjectiveConfig, regression_loss, teacher_targets

OBJECTIVES = [
    ObjectiveConfig(top_k=3, layer_norm="layer", final_norm="layer", loss="smooth_l1", beta=2.0, reduce_dim="mean"),
    ObjectiveConfig(top_k=2, layer_norm="instance", final_norm="none", loss="l2", reduce_dim="sum", scale="inv_sqrt_dim"),
    ObjectiveConfig(top_k=4, layer_norm="none", final_norm="instance", loss="smooth_l1", beta=0.25, reduce_dim="sum"),
]
ENCODERS = [
    EncoderConfig(dim=32, depth=4, heads=4, ffn_dim=64, norm_first=True, layer_scale_init=0.1, key_bias=False, tap="block"),
    EncoderConfig(dim=32, depth=4, heads=2, ffn_dim=48, norm_first=False, layer_scale_init=0.0, key_bias=True, tap="ffn"),
]


@pytest.mark.parametrize("obj", OBJECTIVES, ids=["v1-vision", "l2-instance", "smoothl1-sum"])
@pytest.mark.parametrize("enc", ENCODERS, ids=["pre-ln-block", "post-ln-ffn"])
def test_targets_and_loss_match_dense_reference(single_process_group, enc, obj):
    vcfg = VisionConfig(image_size=16, patch_size=4, mask_ratio=0.5, min_block_patches=2)
    modality = Vision(vcfg)
    mp = model_parallel_config(1)
    student, teacher = Student(modality, enc, mp).eval(), Backbone(modality, enc, mp).eval()
    s_sd, t_sd = randomise(student, 1), randomise(teacher, 2)
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(3, 3, 16, 16, generator=gen)
    mask = torch.zeros(3, vcfg.grid ** 2, dtype=torch.bool)
    for row in mask:
        row[torch.randperm(row.numel(), generator=gen)[:vcfg.num_masked]] = True

    with torch.no_grad():
        targets = teacher_targets(teacher({"image": images}), obj)
        pred = student({"image": images}, mask)
        loss = regression_loss(pred, targets[mask], obj) / mask.sum()

    kw = dict(grid=vcfg.grid, patch=4, heads=enc.heads, depth=enc.depth, eps=enc.layer_norm_eps,
              norm_first=enc.norm_first, tap=enc.tap)
    _, taps = ref.vit_forward(t_sd, "", images.double(), None, **kw)
    want_targets = ref.targets(taps, obj.top_k, obj.layer_norm, obj.final_norm)
    final, _ = ref.vit_forward(s_sd, "backbone.", images.double(), mask, **kw)
    want_pred = final[mask] @ s_sd["head.weight"].T + s_sd["head.bias"]
    want_loss = ref.loss(want_pred, want_targets[mask], obj.loss, obj.beta, obj.reduce_dim, obj.scale)

    torch.testing.assert_close(targets.double(), want_targets, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pred.double(), want_pred, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-4, atol=1e-6)
    assert targets.dtype == torch.float32


def test_targets_exclude_cls_and_use_top_layers(single_process_group):
    """Changing a lower layer's tap must not change targets built from the top K only."""
    taps = [torch.randn(2, 5, 8) for _ in range(6)]
    obj = ObjectiveConfig(top_k=2, layer_norm="layer", final_norm="none")
    before = teacher_targets(taps, obj)
    taps[0] = taps[0] * 100
    torch.testing.assert_close(teacher_targets(taps, obj), before)
    taps[-1] = taps[-1] + 1.0 + torch.randn(2, 5, 8)
    assert not torch.allclose(teacher_targets(taps, obj), before)
