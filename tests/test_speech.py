"""Speech modality: frame counts, span masks, targets and loss against the dense reference, batching."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import soundfile
import torch

import reference as ref
from conftest import ROOT, randomise
from pipeline.config import EncoderConfig
from pipeline.distributed import model_parallel_config
from pipeline.experiment import load_experiment
from pipeline.model.data2vec import Backbone, Student
from pipeline.modalities.speech import WAV2VEC_CONV, FeatureEncoder, Speech, SpeechConfig, frames_for, span_mask
from pipeline.objective import regression_loss, teacher_targets


def test_frame_count_formula_matches_the_conv_stack():
    convs = FeatureEncoder(WAV2VEC_CONV)
    assert frames_for(WAV2VEC_CONV, 16000) == 49  # 16 kHz -> ~50 Hz
    with torch.no_grad():
        for length in [400, 401, 719, 720, 1000, 3199, 3200, 16000, 16001, 16319, 16320, 23456, 48000]:
            out = convs(torch.zeros(1, length)).shape[-1]
            assert frames_for(WAV2VEC_CONV, length) == out, length
    assert frames_for(WAV2VEC_CONV, 399) == 0 and SpeechConfig().receptive_field == 400


def test_conv_feature_encoder_starts_as_wav2vec2s():
    """wav2vec 2.0's ConvFeatureExtractionModel (both data2vec releases) draws each conv with kaiming_normal_:
    std sqrt(2 / fan_in), fan_in = in_channels x kernel; PyTorch's default is about 2.4x smaller."""
    torch.manual_seed(0)
    convs = FeatureEncoder(WAV2VEC_CONV).conv_layers
    for layer, (_, kernel, _) in zip(convs, WAV2VEC_CONV):
        w = layer["conv"].weight
        want = math.sqrt(2.0 / (w.shape[1] * kernel))
        assert abs(w.std().item() / want - 1) < 0.05 and abs(w.mean().item()) < 0.1 * want, (w.shape, want)
    torch_default = FeatureEncoder(WAV2VEC_CONV, init="torch").conv_layers[1]["conv"].weight
    assert 2.2 < math.sqrt(2.0 / (512 * 3)) / torch_default.std().item() < 2.6
    assert SpeechConfig().conv_init == "kaiming"


def test_span_masks_same_count_per_row_about_half_masked():
    rng = random.Random(0)
    fractions = []
    for frames in (49, 100, 250, 500):
        for _ in range(20):
            mask = span_mask(8, frames, 0.65, 10, rng)
            counts = mask.sum(1)
            assert (counts == counts[0]).all()
            fractions.append(counts[0].item() / frames)
    mean = sum(fractions) / len(fractions)
    assert 0.40 < mean < 0.55  # the reference's ~49% after overlaps (minus same-count thinning)
    # masked frames come in runs (spans of 10, thinned only slightly to equalise rows)
    mask = span_mask(1, 500, 0.65, 10, random.Random(1))[0]
    runs = (mask[1:] != mask[:-1]).sum().item()
    assert runs < mask.sum().item() / 4


def speech_setup(enc_kw=None):
    cfg = SpeechConfig(conv_layers=[[8, 10, 5], [8, 3, 2], [8, 3, 2], [8, 2, 2]], pos_conv_layers=2,
                       pos_conv_kernel=4, pos_conv_groups=2, max_samples=4000, min_samples=800, mask_length=3)
    enc = EncoderConfig(dim=16, depth=3, heads=2, ffn_dim=32, norm_first=False, key_bias=True, tap="ffn",
                        layer_norm_eps=1e-5, **(enc_kw or {}))
    return Speech(cfg), cfg, enc


def test_targets_and_loss_match_dense_reference(single_process_group):
    modality, cfg, enc = speech_setup()
    obj = load_experiment(ROOT / "configs/speech_tiny.yaml").objective  # instance norm, L2, 1/sqrt(D)
    obj.top_k = 2
    mp = model_parallel_config(1)
    student, teacher = Student(modality, enc, mp).eval(), Backbone(modality, enc, mp).eval()
    s_sd, t_sd = randomise(student, 1, 0.3), randomise(teacher, 2, 0.3)
    wav = torch.randn(3, 1600, generator=torch.Generator().manual_seed(3))
    frames = frames_for(cfg.conv_layers, 1600)
    mask = span_mask(3, frames, 0.65, 3, random.Random(0))
    with torch.no_grad():
        targets = teacher_targets(teacher({"audio": wav}), obj)
        pred = student({"audio": wav}, mask)
        loss = regression_loss(pred, targets[mask], obj) / mask.sum()
    kw = dict(conv_layers=cfg.conv_layers, pos_layers=2, pos_kernel=4, pos_groups=2, heads=2, depth=3, eps=1e-5)
    _, taps = ref.speech_forward(t_sd, "", wav.double(), None, **kw)
    want_targets = ref.targets(taps, 2, "instance", "none")
    final, _ = ref.speech_forward(s_sd, "backbone.", wav.double(), mask, **kw)
    want_pred = final[mask] @ s_sd["head.weight"].T + s_sd["head.bias"]
    want_loss = ref.loss(want_pred, want_targets[mask], "l2", 1.0, "sum", "inv_sqrt_dim")
    torch.testing.assert_close(targets.double(), want_targets, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pred.double(), want_pred, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-4, atol=1e-6)


def flac_bytes(wav: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, wav, rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def test_examples_are_normalised_cropped_and_batches_cut_to_the_shortest(single_process_group):
    modality, cfg, enc = speech_setup()
    rng = np.random.default_rng(0)
    clips = [0.3 * rng.standard_normal(n) + 0.1 for n in (6000, 2500, 1700)]
    examples = [modality.example({"__key__": str(i), "flac": flac_bytes(c)}, random.Random(i))
                for i, c in enumerate(clips)]
    assert examples[0]["audio"].numel() == cfg.max_samples  # randomly cropped to max_samples
    for ex in examples[1:]:  # uncropped: zero mean, unit variance per utterance
        assert abs(ex["audio"].mean().item()) < 1e-4 and abs(ex["audio"].std(unbiased=False).item() - 1) < 1e-3
    assert modality.example({"flac": flac_bytes(clips[0][:500])}, random.Random(0)) is None  # < min_samples
    with pytest.raises(ValueError, match="16 kHz"):
        modality.example({"flac": flac_bytes(clips[1], 22050)}, random.Random(0))
    batch = modality.collate(examples)
    assert batch["audio"].shape == (3, 1700)  # cropped to the shortest: no padding anywhere
    assert batch["mask"].shape == (3, frames_for(cfg.conv_layers, 1700))
    # batching changes nothing: each clip's outputs equal those of the clip run alone
    mp = model_parallel_config(1)
    backbone = Backbone(modality, enc, mp).eval()
    with torch.no_grad():
        together = backbone({"audio": batch["audio"]})[-1]
        for i in range(3):
            alone = backbone({"audio": batch["audio"][i:i + 1]})[-1]
            torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_teacher_shares_the_students_conv_features(tmp_path):
    """The conv feature encoder, its LayerNorm and projection are copied to the teacher every step (ema.copy, as
    fairseq's ema_transformer_only): the teacher takes the student's output instead of computing it again, with
    the same losses, target stds and gradient norms, and one conv pass fewer in the FLOPs counted."""
    import json

    from conftest import torchrun
    out = tmp_path / "shared.json"
    proc = torchrun([str(ROOT / "tests/dist/shared_features.py"), str(out)], nproc=1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["shared"]["shared_by_default"]
    assert r["shared"]["steps"] == r["own"]["steps"]  # fp32: equal, though the shared run's teacher copy was spoiled
    assert r["own_spoiled"]["steps"][0] != r["own"]["steps"][0]  # which a teacher using its own copy does show
    assert r["shared"]["steps"][0][0] != r["shared"]["steps"][-1][0]
    assert r["shared"]["flops"] < r["own"]["flops"]
