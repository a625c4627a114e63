"""Text modality: BERT masking statistics, targets and loss against the dense reference, token decoding."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import reference as ref
from conftest import ROOT, randomise
from pipeline.config import EncoderConfig
from pipeline.distributed import model_parallel_config
from pipeline.experiment import load_experiment
from pipeline.model.data2vec import Backbone, Student
from pipeline.modalities.text import Text, TextConfig, corrupt
from pipeline.objective import position_share, position_stats, projection, regression_loss, teacher_targets


@pytest.mark.parametrize("mask_specials", [False, True])
def test_bert_masking_statistics(mask_specials):
    cfg = TextConfig(vocab_size=1000, mask_specials=mask_specials)
    rng = random.Random(0)
    specials_changed = 0
    replaced = randomised = total = 0
    for _ in range(400):
        tokens = torch.randint(5, 1000, (128,))
        tokens[0], tokens[-1] = cfg.bos_id, cfg.eos_id
        student, loss = corrupt(tokens, cfg, rng)
        changed = student != tokens
        specials_changed += int(changed[0]) + int(changed[-1])
        replaced += int((student == cfg.mask_id).sum())
        randomised += int((changed & (student != cfg.mask_id)).sum())
        assert torch.equal(loss, student == cfg.mask_id)  # loss_on=mask_token: only <mask> positions
        assert not any(t in (0, 1, 2, 3) for t in student[changed & (student != cfg.mask_id)].tolist())
        total += 128 if mask_specials else 126
    sel = replaced / 0.8
    assert abs(sel / total - 0.15) < 0.01
    if mask_specials:  # fairseq MaskTokensDataset masks <s> and </s> like any token (90% of 15% change)
        assert abs(specials_changed / 800 - 0.15 * 0.9) < 0.04
    else:
        assert specials_changed == 0
    assert abs(randomised / sel - 0.1) < 0.02  # (a random token may equal the original: slightly < 10%)


def test_selected_loss_and_span_masking():
    tokens = torch.randint(5, 1000, (400,))
    cfg = TextConfig(vocab_size=1000, loss_on="selected", masking="span", mask_prob=0.35, span_length=4)
    student, loss = corrupt(tokens, cfg, random.Random(1))
    assert abs(loss.float().mean().item() - 0.307) < 0.03  # 35 starts of 4, overlaps merged: ~1 - (1 - 35/400)^4
    runs = (loss[1:] != loss[:-1]).sum().item()
    assert runs < loss.sum().item() / 2  # spans, not isolated tokens
    assert (student[~loss] == tokens[~loss]).all()


def test_targets_and_loss_match_dense_reference(single_process_group):
    cfg = load_experiment(ROOT / "configs/text_tiny.yaml", ["model.vocab_size=200", "model.max_positions=16"])
    enc = EncoderConfig(dim=16, depth=3, heads=2, ffn_dim=32, norm_first=False, key_bias=True, tap="ffn",
                        layer_norm_eps=1e-5)
    obj = cfg.objective
    obj.top_k = 2
    modality = Text(cfg.model)
    mp = model_parallel_config(1)
    student, teacher = Student(modality, enc, mp).eval(), Backbone(modality, enc, mp).eval()


    s_sd, t_sd = randomise(student, 1, 0.3), randomise(teacher, 2, 0.3)
    rng = random.Random(0)
    tokens = torch.randint(5, 200, (3, 16), generator=torch.Generator().manual_seed(4))
    tokens[2, 12:] = cfg.model.pad_id  # one padded row: padding must not leak into the other positions
    pairs = [corrupt(t, TextConfig(vocab_size=200, mask_prob=0.4), rng) for t in tokens]
    student_tokens = torch.stack([p[0] for p in pairs])
    mask = torch.stack([p[1] for p in pairs])
    batch = {"tokens": tokens, "student_tokens": student_tokens}
    with torch.no_grad():
        targets = teacher_targets(teacher(batch), obj)
        pred = student(batch, mask)
        loss = regression_loss(pred, targets[mask], obj) / mask.sum()
    kw = dict(pad_id=0, heads=2, depth=3, eps=1e-5)
    _, taps = ref.text_forward(t_sd, "", tokens, **kw)
    want_targets = ref.targets(taps, 2, "layer", "none")
    final, _ = ref.text_forward(s_sd, "backbone.", student_tokens, **kw)
    h = ref.gelu(final[mask] @ s_sd["head.fc1.weight"].T + s_sd["head.fc1.bias"])
    want_pred = h @ s_sd["head.fc2.weight"].T + s_sd["head.fc2.bias"]
    want_loss = ref.loss(want_pred, want_targets[mask], "smooth_l1", 4.0, "sum", "none")
    keep = tokens != 0
    torch.testing.assert_close(targets.double()[keep], want_targets[keep], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pred.double(), want_pred, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-4, atol=1e-6)


def test_example_decodes_uint16_blocks_and_rejects_foreign_vocab():
    modality = Text(TextConfig(vocab_size=1000, max_positions=8))
    block = np.array([1, 50, 60, 70, 2, 80, 90, 2], dtype="<u2")
    ex = modality.example({"__key__": "0", "u16": block.tobytes()}, random.Random(0))
    assert ex["tokens"].tolist() == block.tolist() and ex["tokens"].dtype == torch.long
    with pytest.raises(ValueError, match="different sentencepiece model"):
        modality.example({"u16": np.array([1, 5000], dtype="<u2").tobytes()}, random.Random(0))
    with pytest.raises(ValueError, match="max_positions"):
        modality.example({"i32": np.arange(20, dtype="<i4").tobytes()}, random.Random(0))


def test_content_collapse_monitor_sees_the_lost_position_init(single_process_group, tiny_text_shards):
    """The collapse a text run once suffered (zero.Init left PyTorch's N(0, 1) position embedding, ~57x the
    token signal): the teacher's targets become a function of position, and the monitor's statistic says so
    from the first step, on real text; with the presets' initialisation it stays far from the alarm."""
    from pipeline.data import raw_samples, resolve_shards
    cfg = load_experiment(str(ROOT / "configs/text_tiny.yaml"), [f"data.manifest={tiny_text_shards}"])
    modality = cfg.make_modality()
    blocks = [modality.decode(s) for _, s in zip(range(32), raw_samples(resolve_shards(str(tiny_text_shards),
                                                                                      modality)))]
    batch = {"tokens": torch.stack(blocks)}
    shares = {}
    for lost in (False, True):
        torch.manual_seed(0)
        teacher = Backbone(modality, cfg.encoder, model_parallel_config(1)).eval()
        if lost:
            torch.nn.init.normal_(teacher.embed.positions.weight)
        with torch.no_grad():
            targets = teacher_targets(teacher(batch, keep=cfg.objective.top_k), cfg.objective)
        stats = position_stats(targets, projection(targets.shape[-1], "cpu"), modality.valid_positions(batch))
        shares[lost] = position_share(stats)
    assert shares[True] > cfg.collapse.max_position_share > 0.9 > 0.7 > shares[False], shares
