"""data2vec 2.0 (method: data2vec2) against an independent dense reference (tests/reference.py), fairseq's masking
algorithm, MAE's sin-cos positions (transformers' ViTMAE) and the multi-clone gradient identity."""

from __future__ import annotations

import random

import pytest
import torch

import reference as ref
from conftest import ROOT
from pipeline.config import ConfigError
from pipeline.distributed import model_parallel_config
from pipeline.experiment import load_experiment
from pipeline.model.data2vec import Backbone
from pipeline.model.decoder import ConvDecoder, DecoderConfig, fill_masked
from pipeline.modalities.text import removed_positions
from pipeline.modalities.vision import inverse_block_mask, sincos_positions
from pipeline.objective import class_targets, regression_loss, teacher_targets


def tiny(modality: str, *overrides: str):
    return load_experiment(ROOT / f"configs/{modality}_tiny_v2.yaml", ["decoder.mask_noise_std=0", *overrides])


def perturbed_state(module: torch.nn.Module, seed: int = 0) -> dict:
    """Give every parameter (LayerNorm weights and biases included) random values, so that no term hides."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return {k: v.detach().clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}


def host_batch(cfg, examples):
    mod = cfg.make_modality()
    method = cfg.make_method(mod)
    return mod, method, method.on_host(mod.on_host(mod.collate(examples)))


def vision_examples(cfg, n=2, seed=0):
    mod, rng = cfg.make_modality(), random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(3, cfg.model.image_size, cfg.model.image_size, generator=gen),
             "mask": torch.stack([mod.mask(rng) for _ in range(cfg.model.clone_batch)])} for _ in range(n)]


# -- masks -------------------------------------------------------------------------------------

def kept_neighbours(masks: torch.Tensor, grid: int) -> float:
    """Mean number of kept 4-neighbours of a kept patch: ~0.4 for scattered patches, ~2.7 for 3 x 3 blocks."""
    kept = (~masks.bool()).float().view(-1, 1, grid, grid)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    around = torch.nn.functional.conv2d(kept, kernel, padding=1)
    return float((around * kept).sum() / kept.sum())


@pytest.mark.parametrize("ratio, adjust, masked", [(0.8, 0.07, 157), (0.75, 0.1, 147)], ids=["base", "large"])
def test_inverse_block_masks_match_fairseq(ratio, adjust, masked):
    """Exact counts per image (fairseq keeps int(196 x (1 - ratio)) patches), and the same block structure as
    fairseq's compute_block_mask_2d: kept patches come in 3 x 3 squares, not scattered."""
    rng = random.Random(0)
    ours = torch.stack([inverse_block_mask(14, ratio, 3, adjust, rng) for _ in range(400)])
    theirs = ref.fairseq_inverse_block_mask(400, 196, ratio, 3, adjust, torch.Generator().manual_seed(0)).bool()
    assert (ours.sum(1) == masked).all() and (theirs.sum(1) == masked).all()
    a, b = kept_neighbours(ours, 14), kept_neighbours(theirs, 14)
    assert abs(a - b) < 0.05 * b, (a, b)
    assert a > 2 * kept_neighbours(torch.rand(400, 196).argsort(1) >= 196 - masked, 14)  # far from uniform
    per_patch = (ours.float().mean(0) - theirs.float().mean(0)).abs()
    assert per_patch.mean() < 0.03  # the same spatial distribution (borders are kept less: clamped blocks)


def run_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Histogram of the lengths of the runs of masked frames (index: length; longer than 40 counted at 40)."""
    edges = torch.diff(torch.nn.functional.pad(mask.int(), (1, 1)), dim=1)  # +1 where a run starts, -1 after it
    lengths = edges.eq(-1).nonzero()[:, 1] - edges.eq(1).nonzero()[:, 1]  # row-major order pairs them up
    hist = torch.bincount(lengths.clamp(max=40), minlength=41).float()
    return hist / hist.sum()


@pytest.mark.parametrize("frames, prob, adjust", [(499, 0.5, 0.05), (999, 0.55, 0.1), (74, 0.5, 0.05)],
                         ids=["base-10s", "large-20s", "tiny"])
def test_speech_block_masks_match_fairseq(frames, prob, adjust):
    """data2vec 2.0 audio masks (fairseq compute_block_mask_1d as its audio dataset calls it): exactly
    int(T x mask_prob) frames in every row, and the same run-length histogram and per-frame frequency (the ends
    are masked less: clipped spans) as a port of fairseq's own function over 2048 rows."""
    from pipeline.modalities.speech import block_mask_1d
    ours = block_mask_1d(2048, frames, prob, 5, adjust, torch.Generator().manual_seed(1))
    theirs = ref.fairseq_block_mask_1d((2048, frames), prob, 5, adjust, torch.Generator().manual_seed(2)).bool()
    assert (ours.sum(1) == int(frames * prob)).all() and (theirs.sum(1) == int(frames * prob)).all()
    ours_runs, their_runs = run_lengths(ours), run_lengths(theirs)
    assert (ours_runs - their_runs).abs().sum() / 2 < 0.03, (ours_runs[:12], their_runs[:12])  # total variation
    assert their_runs[5:].sum() > 0.3  # spans of 5 and longer: not scattered frames
    ours_freq, their_freq = ours.float().mean(0), theirs.float().mean(0)
    assert (ours_freq - their_freq).abs().mean() < 0.02  # sampling noise alone: about 0.0125
    ends = [0, 1, -2, -1]
    assert (ours_freq[ends].mean() - their_freq[ends].mean()).abs() < 0.03
    assert their_freq[ends].mean() < prob - 0.05  # the ends' deficit is real, and ours has it too


def test_the_text_decoder_projection_starts_as_fairseqs():
    """fairseq applies init_bert_params (normal(0.02), bias 0) to the whole model; the image and audio encoders then
    reset their decoder's Linear layers to PyTorch's default, the text encoder does not."""
    torch.manual_seed(0)
    text = ConvDecoder(DecoderConfig(dim=256, projection_layers=2, init="bert"), 256)
    for layer in (m for m in text.proj if isinstance(m, torch.nn.Linear)):
        assert abs(layer.weight.std().item() - 0.02) < 0.001 and not layer.bias.any()
    audio = ConvDecoder(DecoderConfig(dim=256), 256)
    assert abs(audio.proj[0].weight.std().item() - 1 / (3 * 256) ** 0.5) < 0.001  # kaiming_uniform(a=sqrt(5))
    for preset, want in [("text_base_v2", "bert"), ("text_large_v2", "bert"), ("speech_base_v2", "torch"),
                         ("vision_base_v2", "torch")]:
        assert load_experiment(ROOT / f"configs/{preset}.yaml").decoder.init == want, preset


@pytest.mark.parametrize("preset", ["speech_tiny_v2", "speech_base_v2", "speech_large_v2"])
def test_speech_v2_presets_mask_the_released_share_whatever_the_batch(preset):
    """Half the frames (0.55 for Large) of every clone row, for one clip or many: where span thinning to the
    batch's smallest row masked 34-39%, falling as the batch grew."""
    cfg = load_experiment(ROOT / f"configs/{preset}.yaml")
    mod = cfg.make_modality()
    for clips in (1, 8):
        mask = mod.frame_mask(clips, 499, seed=clips)
        assert mask.shape == (clips * cfg.model.clone_batch, 499)
        assert (mask.sum(1) == int(499 * cfg.model.mask_prob)).all()
    assert mod.masked_share() == cfg.model.mask_prob


def test_every_clone_row_masks_the_same_count():
    """Vision (inverse blocks), speech (exact block masks), text (exact removal): the
    student's (B x M, K) visible index needs one count per row."""
    vision = tiny("vision")
    _, _, batch = host_batch(vision, vision_examples(vision, 3))
    assert batch["mask"].shape == (12, 64) and (batch["mask"].sum(1) == vision.model.num_masked).all()
    assert batch["visible"].shape == (12, 64 - vision.model.num_masked)
    speech = tiny("speech")
    clips = [{"audio": torch.randn(16000 + 900 * i), "seed": i} for i in range(3)]
    _, _, batch = host_batch(speech, clips)
    counts = batch["mask"].sum(1)
    assert batch["mask"].shape[0] == 12 and (counts == counts[0]).all() and 0 < counts[0] < batch["mask"].shape[1]
    tokens = torch.randint(5, 1000, (64,))
    tokens[40:] = 0  # a padded block
    content = tokens.ne(0)
    for seed in range(50):
        removed = removed_positions(content, 0.48, random.Random(seed))
        assert removed.sum() == 64 - int(64 * 0.52) and (content & ~removed).any()
    tiny_block = removed_positions(torch.ones(3, dtype=torch.bool), 0.9, random.Random(0))
    assert tiny_block.sum() == 2  # int(3 x 0.1) = 0 would keep nothing: one position always stays visible
    short = torch.zeros(64, dtype=torch.long)
    short[:2] = torch.tensor([7, 8])  # two tokens: one always stays visible, the count does not change
    for seed in range(50):
        removed = removed_positions(short.ne(0), 0.9, random.Random(seed))
        assert removed.sum() == 64 - int(64 * 0.1) and (short.ne(0) & ~removed).any()


def test_text_scores_masked_tokens_not_padding():
    cfg = tiny("text")
    rng = random.Random(0)
    blocks = []
    for n in (64, 30):
        tokens = torch.randint(5, 1000, (64,))
        tokens[n:] = 0
        blocks.append({"tokens": tokens, "mask": torch.stack([removed_positions(tokens.ne(0), 0.48, rng)
                                                              for _ in range(4)])})
    _, _, batch = host_batch(cfg, blocks)
    flat = batch["masked_index"]
    rows, pos = flat // 64, flat % 64
    assert batch["mask"].flatten()[flat].all()  # scored positions are removed ones...
    assert (batch["tokens"][rows // 4, pos] != 0).all()  # ...that hold a token
    assert (batch["target_index"] == rows // 4 * 64 + pos).all()  # the teacher row of clone r is sample r // M
    assert int(batch["mask"][4:].flatten()[torch.arange(256) % 64 >= 30].sum()) > 0  # pads were removed, unscored


# -- model parts ---------------------------------------------------------------------------------

def test_sincos_positions_match_mae():
    """fairseq's (MAE's) layout: the first half of the channels encodes the column. transformers' ViTMAE helper
    puts the row first: the same values with the halves swapped."""
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding as hf
    for dim, grid in ((64, 8), (768, 14)):
        ours = sincos_positions(dim, grid)
        assert torch.allclose(ours, ref.mae_sincos_positions(dim, grid), atol=1e-6)
        theirs, half = hf(grid, grid, dim), dim // 2
        assert torch.allclose(ours, torch.cat([theirs[:, half:], theirs[:, :half]], 1), atol=1e-6)


@pytest.mark.parametrize("grid, kernel, layers, dim, width, proj", [(None, 7, 4, 384, 768, 1), (None, 8, 2, 64, 64, 2),
                                                                     (14, 3, 6, 768, 768, 1), (14, 5, 3, 1024, 1024, 1)])
def test_decoder_shapes(grid, kernel, layers, dim, width, proj):
    """1-D and 2-D, even kernels trimmed to the input length, first-layer residual only where widths agree."""
    cfg = DecoderConfig(dim=dim, layers=layers, kernel=kernel, groups=16, projection_layers=proj)
    decoder = ConvDecoder(cfg, width, grid)
    length = grid * grid if grid else 37
    out = decoder(torch.randn(3, length, width))
    assert out.shape == (3, length, width)
    assert [b.conv.in_channels for b in decoder.blocks] == [width] + [dim] * (layers - 1)
    assert len([m for m in decoder.proj if isinstance(m, torch.nn.Linear)]) == proj


def test_masked_slots_hold_noise_of_the_configured_std():
    visible = torch.randn(64, 10, 32)
    positions = torch.stack([torch.randperm(50)[:10].sort().values for _ in range(64)])
    full = fill_masked(visible, positions, 50, 0.01)
    for r in range(64):
        assert torch.equal(full[r, positions[r]], visible[r])
    slots = torch.ones(64, 50, dtype=torch.bool)
    slots[torch.arange(64)[:, None], positions] = False
    assert abs(float(full[slots].std()) - 0.01) < 0.001 and abs(float(full[slots].mean())) < 0.001


# -- the student, the targets and the loss against the dense reference ----------------------------

def test_vision_step_matches_dense_reference(single_process_group):
    cfg = tiny("vision")
    mod, method, batch = host_batch(cfg, vision_examples(cfg))
    torch.manual_seed(0)
    student = method.build_student(model_parallel_config(1)).eval()
    teacher = Backbone(mod, cfg.encoder, model_parallel_config(1)).eval()
    sd = perturbed_state(student)
    teacher.load_state_dict({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")})
    mask, index, target_index = batch.pop("mask"), batch.pop("masked_index"), batch.pop("target_index")
    e, m = cfg.encoder, cfg.model
    positions = ref.mae_sincos_positions(e.dim, m.grid)
    with torch.no_grad():
        ours = student(batch, mask, (), index)
        y = teacher_targets(teacher(batch, keep=cfg.objective.top_k), cfg.objective)
        _, t_taps = ref.vit2_forward(sd, "backbone.", batch["image"], None, positions, m.grid, m.patch_size, e.heads,
                                     e.depth, e.layer_norm_eps)
        final, _ = ref.vit2_forward(sd, "backbone.", batch["image"], batch["visible"], positions, m.grid,
                                    m.patch_size, e.heads, e.depth, e.layer_norm_eps)
    want_y = ref.targets(t_taps, cfg.objective.top_k, "instance", "layer")
    assert torch.allclose(y, want_y, atol=1e-4)
    full = ref.place_visible(final[:, 1:], batch["visible"], m.grid ** 2)
    decoded = ref.conv_decoder(sd, "", full, cfg.decoder.layers, cfg.decoder.groups, True, grid=m.grid)
    assert torch.allclose(ours.masked, decoded.flatten(0, 1)[index], atol=1e-4)
    assert torch.allclose(ours.cls, final[:, 0], atol=1e-4)
    # the loss: L2 summed over D / sqrt(D), mean over masked positions, + cls_loss x the per-row CLS loss mean
    clones = m.clone_batch
    rows = ref.keep_rows(want_y, torch.arange(64).expand(mask.shape[0], -1))  # (R, T, D): each clone's sample
    want_reg = ref.loss(decoded[mask], rows[mask], "l2", 0, "sum", "inv_sqrt_dim")
    want_cls = ref.loss(final[:, 0], want_y.mean(1).repeat_interleave(clones, 0), "l2", 0, "sum", "inv_sqrt_dim")
    targets = y.flatten(0, 1)[target_index]
    reg = regression_loss(ours.masked, targets, cfg.objective) / index.numel()
    cls = regression_loss(ours.cls, class_targets(y, clones), cfg.objective) / mask.shape[0]
    assert torch.allclose(reg, want_reg, rtol=1e-4) and torch.allclose(cls, want_cls, rtol=1e-4)


def test_speech_student_matches_dense_reference(single_process_group):
    """Per clone the positional convolutions see the masked frames as zeros; only visible frames are encoded."""
    cfg = tiny("speech", "decoder.input_dropout=0")
    clips = [{"audio": torch.randn(16000 + 900 * i), "seed": i} for i in range(2)]
    mod, method, batch = host_batch(cfg, clips)
    torch.manual_seed(0)
    student = method.build_student(model_parallel_config(1)).eval()
    sd = perturbed_state(student)
    mask, index = batch.pop("mask"), batch.pop("masked_index")
    m, e = cfg.model, cfg.encoder
    with torch.no_grad():
        ours = student(batch, mask, (), index)
        final, _ = ref.speech2_student(sd, "backbone.", batch["audio"], mask, batch["visible"], m.conv_layers,
                                       m.pos_conv_layers, m.pos_conv_kernel, m.pos_conv_groups, e.heads, e.depth,
                                       e.layer_norm_eps)
    full = ref.place_visible(final, batch["visible"], mask.shape[1])
    decoded = ref.conv_decoder(sd, "", full, cfg.decoder.layers, cfg.decoder.groups, True)
    assert ours.cls is None
    assert torch.allclose(ours.masked, decoded.flatten(0, 1)[index], atol=1e-4)


def test_text_student_matches_dense_reference(single_process_group):
    """Padded blocks: kept pads stay out of attention; the decoder has no residual and a two-layer projection."""
    cfg = tiny("text", "decoder.input_dropout=0")
    rng = random.Random(0)
    blocks = []
    for n in (64, 41):
        tokens = torch.randint(5, 1000, (64,))
        tokens[n:] = 0
        blocks.append({"tokens": tokens,
                       "mask": torch.stack([removed_positions(tokens.ne(0), 0.48, rng) for _ in range(4)])})
    mod, method, batch = host_batch(cfg, blocks)
    torch.manual_seed(0)
    student = method.build_student(model_parallel_config(1)).eval()
    sd = perturbed_state(student)
    mask, index = batch.pop("mask"), batch.pop("masked_index")
    e = cfg.encoder
    with torch.no_grad():
        ours = student(batch, mask, (), index)
        rows = ref.keep_rows(batch["tokens"], batch["visible"])  # each clone's kept tokens, (R, K)
        positions = ref.keep_rows(ref.text_positions(batch["tokens"], 0), batch["visible"])
        x = sd["backbone.embed.tokens.weight"][rows] + sd["backbone.embed.positions.weight"][positions]
        x = ref.layer_norm(x, sd["backbone.embed.norm.weight"], sd["backbone.embed.norm.bias"], e.layer_norm_eps)
        bias = torch.zeros(rows.shape).masked_fill(rows == 0, float("-inf"))[:, None, None, :]
        final, _ = ref.encoder_blocks(sd, "backbone.", x, e.heads, e.depth, e.layer_norm_eps, False, "ffn", bias)
    full = ref.place_visible(final, batch["visible"], 64)
    decoded = ref.conv_decoder(sd, "", full, cfg.decoder.layers, cfg.decoder.groups, False)
    assert torch.allclose(ours.masked, decoded.flatten(0, 1)[index], atol=1e-4)


def test_multi_clone_gradient_equals_the_sum_over_clones(single_process_group):
    """One step on M clones sharing the teacher's targets = the sum of M steps with one clone each."""
    cfg = tiny("vision")
    mod, method, batch = host_batch(cfg, vision_examples(cfg, n=3, seed=1))
    torch.manual_seed(0)
    student = method.build_student(model_parallel_config(1)).eval()
    teacher = Backbone(mod, cfg.encoder, model_parallel_config(1)).eval()
    perturbed_state(student)
    teacher.load_state_dict({k[len("backbone."):]: v for k, v in student.state_dict().items()
                             if k.startswith("backbone.")})
    with torch.no_grad():
        y = teacher_targets(teacher({"image": batch["image"]}, keep=cfg.objective.top_k), cfg.objective)
    clones = cfg.model.clone_batch

    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        """Summed regression + CLS loss of the clone rows ``rows`` (their batch built as the trainer's host step)."""
        sub = load_experiment(ROOT / "configs/vision_tiny_v2.yaml",
                              ["decoder.mask_noise_std=0", f"model.clone_batch={len(rows) // 3}"])
        sub_mod = sub.make_modality()
        b = sub.make_method(sub_mod).on_host({"image": batch["image"], "mask": batch["mask"][rows]})
        pred = student({"image": b["image"], "visible": b["visible"]}, b["mask"], (), b["masked_index"])
        m = len(rows) // 3
        reg = regression_loss(pred.masked, y.flatten(0, 1)[b["target_index"]], cfg.objective)
        return reg + regression_loss(pred.cls, class_targets(y, m), cfg.objective)

    student.zero_grad()
    loss_of(torch.arange(3 * clones)).backward()
    together = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    for c in range(clones):
        loss_of(torch.arange(3) * clones + c).backward()  # accumulates
    scale = max(float(g.abs().max()) for g in together.values())  # (the key bias's true gradient is 0: noise only)
    for name, p in student.named_parameters():
        assert torch.allclose(p.grad, together[name], rtol=1e-4, atol=1e-6 * scale), name
    assert any(g.abs().sum() > 0 for g in together.values())


# -- configuration ---------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, overrides, message", [
    ("vision_tiny", ["model.clone_batch=4"], "masked clones are data2vec 2.0's"),
    ("vision_tiny", ["objective.cls_loss=0.1"], "cls_loss is data2vec 2.0's"),
    ("vision_tiny_v2", ["model.positions=relative"], "needs model.positions=sincos"),
    ("vision_tiny_v2", ["model.masking=block"], "model.masking=inverse_block"),
    ("text_tiny_v2", ["model.masking=bert"], "set model.masking=random"),
    ("speech_tiny_v2", ["objective.cls_loss=0.5"], "needs a CLS token"),
    ("vision_tiny_v2", ["method=data2vec3"], "'method' must be one of"),
    ("vision_tiny_v2", ["decoder.groups=5"], "divisible by decoder.groups"),
])
def test_wrong_method_settings_are_rejected(preset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(ROOT / f"configs/{preset}.yaml", overrides)


def test_v2_weight_decay_spares_biases_and_1d_parameters(single_process_group):
    from pipeline.trainer import decay_rule, param_groups
    cfg = tiny("vision")
    assert decay_rule(cfg) == "bias"
    student = cfg.make_method().build_student(model_parallel_config(1))
    decayed, exempt = param_groups(student, 0.05, decay_rule(cfg))
    names = {id(p): n for n, p in student.named_parameters()}
    assert {names[id(p)] for p in decayed["params"]} >= {"backbone.embed.cls_token", "decoder.blocks.0.conv.weight"}
    assert all(names[id(p)].endswith(".bias") or p.dim() == 1 for p in exempt["params"])


# -- a real run: the entry point on 2 ranks, then the export of its encoder ---------------------------

@pytest.mark.distributed
def test_text_run_exports_its_encoder_to_transformers(single_process_group, tiny_text_shards, tmp_path):
    """pipeline.train with configs/text_tiny_v2.yaml on 2 ZeRO-3 ranks; pipeline.export writes the student's encoder
    (not the decoder) as a transformers Data2VecTextModel that computes what our backbone computes."""
    import subprocess
    import sys

    import transformers

    from conftest import torchrun
    out = tmp_path / "run"
    proc = torchrun(["-m", "pipeline.train", "--config", "configs/text_tiny_v2.yaml", f"data.manifest={tiny_text_shards}",
                     f"train.output_dir={out}", "train.steps=2", "train.micro_batch_size=4"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 2/2 | loss" in proc.stdout
    import json
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.3 < record["masked_fraction"] < 0.7, record  # 48% of each clone's positions, fewer of the padded
    ckpt, directory = out / "checkpoints/step_00000002", tmp_path / "hf"
    cli = subprocess.run([sys.executable, "-m", "pipeline.export", str(ckpt), "--format", "hf", "--output",
                          str(directory)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    model, info = transformers.AutoModel.from_pretrained(directory, output_loading_info=True)
    assert type(model).__name__ == "Data2VecTextModel"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    from pipeline.features import load_backbone
    _, ours = load_backbone(ckpt, "student")
    tokens = torch.randint(5, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours.encode({"tokens": tokens}, None)[0]
        got = model(input_ids=tokens).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("modality", ["vision", "text"])
def test_flop_split_matches_counted_flops(single_process_group, modality):
    """Method.flops_per_sample (what bench/bench_v2.py and the step lines report) against torch's FLOP counter on
    the dense teacher forward and the student + decoder forward (the split counts backward as 2x forward). The
    counter does not see the CPU attention kernel: the attention products (4 s^2 D per block) are left out."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = tiny(modality)
    if modality == "vision":
        examples = vision_examples(cfg, n=2)
    else:
        rng = random.Random(0)
        examples = [{"tokens": torch.randint(5, 1000, (64,)),
                     "mask": torch.stack([removed_positions(torch.ones(64, dtype=torch.bool), 0.48, rng)
                                          for _ in range(4)])} for _ in range(2)]
    mod, method, batch = host_batch(cfg, examples)
    student = method.build_student(model_parallel_config(1)).eval()
    teacher = Backbone(mod, cfg.encoder, model_parallel_config(1)).eval()
    mask, index = batch.pop("mask"), batch.pop("masked_index")
    split = method.flops_per_sample(mod.tokens_per_sample(), share_features=False)
    enc, tokens = cfg.encoder, mod.tokens_per_sample()
    rows, visible = method.student_shape(tokens)
    attention = lambda s: enc.depth * 4 * s * s * enc.dim  # noqa: E731
    with torch.no_grad(), FlopCounterMode(display=False) as counted:
        teacher(batch)
    assert counted.get_total_flops() / 2 == pytest.approx(split["teacher"] - attention(tokens + mod.prefix_tokens),
                                                          rel=0.01)
    with torch.no_grad(), FlopCounterMode(display=False) as counted:
        student(batch, mask, (), index)
    want = (split["student"] + split["decoder"]) / 3 - rows * attention(visible)
    assert counted.get_total_flops() / 2 == pytest.approx(want, rel=0.01)
