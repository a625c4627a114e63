"""Every shipped preset and DeepSpeed JSON is loaded, validated and built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import ROOT
from pipeline.config import ConfigError
from pipeline.distributed import load_ds_config, model_parallel_config, student_ds_config, teacher_ds_config
from pipeline.experiment import config_help, load_experiment
from pipeline.model.data2vec import Backbone

PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))


def expected_vit_params(cfg) -> int:
    """Parameter count of the ViT backbone, from the architecture description: v1 BEiT-style (CLS and mask tokens,
    shared relative position table, final LayerNorm of the pre-LN stack), 2.0 (CLS, fixed sin-cos positions,
    LayerNorm after the embedding, post-LN blocks)."""
    d, f, h, L = cfg.encoder.dim, cfg.encoder.ffn_dim, cfg.encoder.heads, cfg.encoder.depth
    g, p, c = cfg.model.grid, cfg.model.patch_size, cfg.model.in_chans
    per_block = (4 * d * d + (3 + cfg.encoder.key_bias) * d  # q k v out (+ biases)
                 + 2 * d * f + f + d  # FFN
                 + 4 * d  # two LayerNorms
                 + (2 * d if cfg.encoder.layer_scale_init > 0 else 0))  # layer scale
    if cfg.model.positions == "sincos":
        return c * p * p * d + d + d + 2 * d + L * per_block
    embed = c * p * p * d + d + 2 * d + ((2 * g - 1) ** 2 + 3) * h
    return embed + L * per_block + 2 * d


def expected_speech_params(cfg) -> int:
    """data2vec audio backbone, from the architecture description."""
    d, f, L, m = cfg.encoder.dim, cfg.encoder.ffn_dim, cfg.encoder.depth, cfg.model
    convs, in_ch = 0, 1
    for ch, kernel, _ in m.conv_layers:
        convs += kernel * in_ch * ch + 2 * ch  # conv (no bias) + LayerNorm
        in_ch = ch
    embed = convs + 2 * in_ch + in_ch * d + d + d  # feature LayerNorm, projection, mask embedding
    embed += m.pos_conv_layers * (d * (d // m.pos_conv_groups) * m.pos_conv_kernel + d) + 2 * d
    per_block = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
    return embed + L * per_block


def expected_text_params(cfg) -> int:
    """RoBERTa-shaped data2vec text backbone, from the architecture description."""
    d, f, L, m = cfg.encoder.dim, cfg.encoder.ffn_dim, cfg.encoder.depth, cfg.model
    vocab = -(-m.vocab_size // (128 * cfg.parallel.tp)) * 128 * cfg.parallel.tp  # padded for TP
    embed = vocab * d + (m.max_positions + m.pad_id + 1) * d + 2 * d
    per_block = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
    return embed + L * per_block


def expected_student_extra(cfg) -> int:
    """What the student holds beyond the backbone: v1's regression head (text: Linear(D, 2D)-GELU-Linear(2D, D),
    else Linear(D, D)); data2vec 2.0's decoder (grouped convolutions with bias, then the projection)."""
    d = cfg.encoder.dim
    if cfg.method == "data2vec":
        return d * 2 * d + 2 * d + 2 * d * d + d if cfg.modality == "text" else d * d + d
    dec = cfg.decoder
    taps = dec.kernel ** (2 if cfg.modality == "vision" else 1)
    convs = sum((d if i == 0 else dec.dim) // dec.groups * dec.dim * taps + dec.dim for i in range(dec.layers))
    hidden = [dec.dim] + [int(dec.dim * dec.projection_ratio)] * (dec.projection_layers - 1) + [d]
    return convs + sum(a * b + b for a, b in zip(hidden, hidden[1:]))


EXPECTED = {"vision": expected_vit_params, "speech": expected_speech_params, "text": expected_text_params}
SIZES = {"vision_base": (85e6, 88e6), "vision_large": (300e6, 310e6),  # ViT-B/16, ViT-L/16 (+ head)
         "speech_base": (92e6, 96e6), "speech_large": (310e6, 320e6),  # data2vec audio Base ~94M, Large ~315M
         "text_base": (124e6, 128e6), "text_large": (352e6, 362e6),  # RoBERTa base/large, 50k vocab, + head
         # data2vec 2.0: the same encoders; the decoders add ViT-B 6 x 768 x 48 x 9 (~3.2M), ViT-L 3 x 1024 x 64
         # x 25 (~4.9M), audio 384- and 768-wide 1-D convs, text 5 x 768 x 768 x 9 (~26.6M) + a 2-layer projection
         "vision_base_v2": (88e6, 91e6), "vision_large_v2": (307e6, 310e6),
         "speech_base_v2": (93e6, 96e6), "speech_large_v2": (315e6, 325e6),
         "text_base_v2": (150e6, 158e6), "text_large_v2": (380e6, 395e6)}


def test_presets_exist():
    assert {p.stem for p in PRESETS} >= {"vision_tiny", "vision_base", "vision_large",
                                         "speech_tiny", "speech_base", "speech_large",
                                         "text_tiny", "text_base", "text_large"}
    assert DS_CONFIGS


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_builds(single_process_group, preset: Path):
    cfg = load_experiment(preset)
    modality = cfg.make_modality()
    mp = model_parallel_config(cfg.parallel.tp)
    with torch.device("meta"):  # full size, no memory
        student = cfg.make_method(modality).build_student(mp)
        teacher = Backbone(modality, cfg.encoder, mp)
    n = sum(p.numel() for p in student.parameters())
    backbone = sum(p.numel() for p in teacher.parameters())
    assert backbone == EXPECTED[cfg.modality](cfg)
    assert n == backbone + expected_student_extra(cfg)
    if preset.stem in SIZES:
        low, high = SIZES[preset.stem]
        assert low < n < high, n
    ds = load_ds_config(ROOT / cfg.train.ds_config)
    student_ds_config(ds, cfg.train.micro_batch_size, cfg.train.grad_accum, 2, torch.float32)


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.stem)
def test_ds_config_derivation(path: Path):
    base = load_ds_config(path)
    student = student_ds_config(base, micro=4, accum=2, dp=8, dtype=torch.bfloat16)
    assert student["train_batch_size"] == 64 and student["bf16"]["enabled"] is True
    assert student["zero_optimization"]["stage"] == 3
    teacher = teacher_ds_config(student)
    assert teacher["bf16"]["enabled"] is False  # the EMA teacher is fp32
    assert teacher["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert "gradient_clipping" not in teacher
    assert student["communication_data_type"] == "fp32"  # train.grad_reduce's default under bf16
    assert student_ds_config(base, 4, 2, 8, torch.bfloat16, grad_reduce="compute")["communication_data_type"] == "bf16"
    with pytest.raises(ConfigError, match="train.grad_reduce"):
        student_ds_config({**base, "communication_data_type": "bf16"}, 4, 2, 8, torch.bfloat16)
    assert "communication_data_type" not in teacher_ds_config(student)
    assert teacher_ds_config(student, half=True)["bf16"]["enabled"] is True  # computes under the student's autocast
    fp32_student = student_ds_config(base, micro=4, accum=2, dp=8, dtype=torch.float32)
    assert teacher_ds_config(fp32_student, half=True)["bf16"]["enabled"] is False
    # ZeRO++ hpZ keeps a secondary copy that only an optimizer step refreshes: the teacher (no optimizer) must not
    hpz_base = {**base, "zero_optimization": {**base["zero_optimization"], "zero_hpz_partition_size": 8}}
    hpz = student_ds_config(hpz_base, micro=4, accum=2, dp=8, dtype=torch.bfloat16)
    assert teacher_ds_config(hpz)["zero_optimization"]["zero_hpz_partition_size"] == 1
    with pytest.raises(ConfigError, match="must divide the data-parallel size 12"):
        student_ds_config(hpz_base, micro=4, accum=2, dp=12, dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="with parallel.shard: hybrid sharding already keeps every gather inside"):
        student_ds_config(hpz_base, micro=4, accum=2, dp=8, dtype=torch.bfloat16, replicas=4)


def test_help_lists_every_section():
    text = config_help()
    for key in ("model.patch_size", "encoder.dim", "objective.top_k", "ema.tau0", "collapse.action",
                "data.manifest", "train.lr", "parallel.tp"):
        assert key in text


def test_overrides_are_typed_and_checked():
    cfg = load_experiment(ROOT / "configs/vision_tiny.yaml", ["train.lr=3e-4", "encoder.depth=6", "ema.copy=[embed.*]"])
    assert cfg.train.lr == 3e-4 and cfg.encoder.depth == 6 and cfg.ema.copy == ["embed.*"]
    with pytest.raises(ConfigError, match="must be int"):
        load_experiment(ROOT / "configs/vision_tiny.yaml", ["encoder.depth=six"])
    with pytest.raises(ConfigError, match="Did you mean 'encoder.depth'"):
        load_experiment(ROOT / "configs/vision_tiny.yaml", ["encoder.dept=6"])
