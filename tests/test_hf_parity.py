"""Our backbones equal transformers' Data2Vec models, layer by layer, on the same weights.

transformers' ``Data2VecVisionModel``, ``Data2VecAudioModel`` and ``Data2VecTextModel`` are the
independent implementations: our weights go in through ``pipeline.hf``'s name map (the one export and
import use), the HF config comes from ``pipeline.hf.hf_config``, and every hidden state (embedding
output, each block's output, the final output) must agree within 1e-5 in fp32, on masked input.
"""

from __future__ import annotations

import random

import pytest
import torch

from conftest import ROOT, randomise
from pipeline import hf
from pipeline.distributed import model_parallel_config
from pipeline.experiment import load_experiment
from pipeline.model.data2vec import Backbone
from pipeline.modalities.speech import frames_for, span_mask
from pipeline.modalities.text import corrupt
from pipeline.modalities.vision import block_mask

transformers = pytest.importorskip("transformers")
TOL = 1e-5


def build_pair(cfg, seed: int = 0):
    """(our backbone, the HF model loaded from it through the name map), both in eval mode."""
    ours = Backbone(cfg.make_modality(), cfg.encoder, model_parallel_config(1)).eval()
    randomise(ours, seed, scale=0.1)
    with torch.no_grad():  # LayerNorm gains near 1 and layer scale near its init keep 4+ blocks well scaled
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight") or ".layer_norm.weight" in name:
                p.add_(1.0)
    kwargs = {"add_pooling_layer": False} if cfg.modality == "text" else {}  # our backbone has no pooler
    hf_model = getattr(transformers, hf.HF_MODEL_CLASS[cfg.modality])(hf.hf_config(cfg), **kwargs).eval()
    state = {k: v for k, v in ours.state_dict().items() if k in hf.name_map(cfg)}
    result = hf_model.load_state_dict(hf.to_hf(cfg, state), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return ours, hf_model


def our_hidden_states(backbone, batch, mask):
    """[embedding output, block 1 output, ..., block L output] (full sequence) and the final output."""
    seen = []
    hooks = [backbone.embed.register_forward_hook(lambda _m, _i, out: seen.append(out[0]))]
    hooks += [b.register_forward_hook(lambda _m, _i, out: seen.append(out[0])) for b in backbone.encoder.blocks]
    try:
        with torch.no_grad():
            final, _ = backbone.encode(batch, mask)
    finally:
        for h in hooks:
            h.remove()
    return seen, final


def assert_layers_equal(ours, theirs, final, last_hidden, tol: float = TOL):
    assert len(ours) == len(theirs), f"{len(ours)} hidden states here, {len(theirs)} in transformers"
    for i, (a, b) in enumerate(zip(ours, theirs)):
        diff = (a - b).abs().max().item()
        assert diff <= tol, f"hidden state {i}: max abs diff {diff:.3g} > {tol}"
    diff = (final - last_hidden).abs().max().item()
    assert diff <= tol, f"last_hidden_state: max abs diff {diff:.3g} > {tol}"


@pytest.mark.parametrize("overrides", [[], ["encoder.layer_scale_init=0.0"]], ids=["layer-scale", "no-layer-scale"])
def test_vision_backbone_equals_transformers(single_process_group, overrides):
    cfg = load_experiment(ROOT / "configs/vision_tiny.yaml", overrides)
    ours, theirs = build_pair(cfg)
    m = cfg.model
    images = torch.randn(3, m.in_chans, m.image_size, m.image_size, generator=torch.Generator().manual_seed(1))
    rng = random.Random(2)
    mask = torch.stack([block_mask(m.grid, m.num_masked, m.min_block_patches, m.min_aspect, rng) for _ in range(3)])
    hidden, final = our_hidden_states(ours, {"image": images}, mask)
    with torch.no_grad():
        out = theirs(pixel_values=images, bool_masked_pos=mask, output_hidden_states=True)
    assert_layers_equal(hidden, out.hidden_states, final, out.last_hidden_state[:, 1:])  # HF keeps CLS first


def test_speech_backbone_equals_transformers(single_process_group):
    cfg = load_experiment(ROOT / "configs/speech_tiny.yaml")
    ours, theirs = build_pair(cfg)
    audio = torch.randn(2, 16000, generator=torch.Generator().manual_seed(1))
    frames = frames_for(cfg.model.conv_layers, audio.shape[1])
    mask = span_mask(2, frames, cfg.model.mask_prob, cfg.model.mask_length, random.Random(3))
    hidden, final = our_hidden_states(ours, {"audio": audio}, mask)
    with torch.no_grad():
        out = theirs(input_values=audio, mask_time_indices=mask, output_hidden_states=True)
    assert_layers_equal(hidden, out.hidden_states, final, out.last_hidden_state)


def test_text_backbone_equals_transformers(single_process_group):
    cfg = load_experiment(ROOT / "configs/text_tiny.yaml")
    ours, theirs = build_pair(cfg)
    m = cfg.model
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(5, m.vocab_size, (3, m.max_positions), generator=gen)
    tokens[:, 0] = m.bos_id
    tokens[2, 40:] = m.pad_id  # a padded row: HF gets the attention mask, ours masks pad keys itself
    rows = [corrupt(row, m, random.Random(4 + i)) for i, row in enumerate(tokens)]
    student = torch.stack([r[0] for r in rows])
    mask = torch.stack([r[1] for r in rows])
    hidden, final = our_hidden_states(ours, {"tokens": tokens, "student_tokens": student}, mask)
    with torch.no_grad():
        out = theirs(input_ids=student, attention_mask=student.ne(m.pad_id).long(), output_hidden_states=True)
    assert_layers_equal(hidden, out.hidden_states, final, out.last_hidden_state)


@pytest.mark.parametrize("modality", ["vision", "speech", "text"])
def test_hf_state_round_trips_exactly(single_process_group, modality):
    """to_hf then from_hf gives our state back (text: the padded vocabulary rows are zero on the way back)."""
    cfg = load_experiment(ROOT / f"configs/{modality}_tiny.yaml")
    ours, theirs = build_pair(cfg)
    state = {k: v for k, v in ours.state_dict().items() if k in hf.name_map(cfg)}
    back = hf.from_hf(cfg, theirs.state_dict(), padded_vocab=state.get("embed.tokens.weight", torch.empty(0)).shape[0])
    assert set(back) == set(state)
    for name, value in state.items():
        if name == "embed.tokens.weight":
            torch.testing.assert_close(back[name][:cfg.model.vocab_size], value[:cfg.model.vocab_size], rtol=0, atol=0)
            assert not back[name][cfg.model.vocab_size:].any()
        else:
            torch.testing.assert_close(back[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("modality,override,option", [
    ("vision", "encoder.key_bias=true", "encoder.key_bias"),
    ("vision", "encoder.norm_first=false", "encoder.norm_first"),
    ("speech", "encoder.norm_first=true", "encoder.norm_first"),
    ("text", "encoder.layer_scale_init=0.1", "encoder.layer_scale_init"),
])
def test_options_without_hf_form_are_named(modality, override, option):
    cfg = load_experiment(ROOT / f"configs/{modality}_tiny.yaml", [override])
    problems = hf.unsupported(cfg)
    assert len(problems) == 1 and problems[0].startswith(option), problems


@pytest.mark.parametrize("modality", ["vision", "speech", "text"])
def test_shipped_presets_have_an_hf_form(modality):
    """Every preset exports to transformers but the data2vec 2.0 ViTs (sin-cos positions, post-LN: no HF class),
    which are refused with the reason."""
    for path in sorted((ROOT / "configs").glob(f"{modality}_*.yaml")):
        cfg = load_experiment(path)
        problems = hf.unsupported(cfg)
        if modality == "vision" and cfg.method == "data2vec2":
            assert any(p.startswith("model.positions=sincos") for p in problems), path.name
        else:
            assert problems == [], path.name


TRICKY_TEXTS = [
    "Hello world", "", "  leading and trailing  ", "\ttabs\nand newlines\r\n",
    "Grüße aus Köln, ça va? Ελληνικά, русский, עברית, العربية, हिन्दी, 日本語, 한국어, 中文",
    "emoji 😀🚀👩🏽‍💻 flags 🇩🇪 and ☃ snowmen", "unseen characters: 龘 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0001F9EC",
    "a literal <mask> and <s> </s> <pad> <unk> in the text", "<mask><mask>", "NFKC: ﬁ ligature, ① ２ Ⅻ, ǅ",
    "zero\u200bwidth and \u00a0 no-break spaces", "x" * 300,
]


def test_exported_tokenizer_gives_our_sentencepiece_ids(tiny_text_shards, tmp_path):
    """AutoTokenizer of an exported directory == the shards' sentencepiece model, on any text: specials,
    byte fallback, many scripts, emoji, and a literal "<mask>" (which data_prep.text keeps as text)."""
    import sentencepiece
    cfg = load_experiment(ROOT / "configs/text_tiny.yaml")
    spm_model = tiny_text_shards / "spm.model"
    hf.hf_preprocessor(cfg, str(spm_model)).save_pretrained(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    for text in TRICKY_TEXTS:
        assert tokenizer(text)["input_ids"] == sp.encode(text), text
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id,
            tokenizer.mask_token_id] == [cfg.model.pad_id, cfg.model.bos_id, cfg.model.eos_id, cfg.model.unk_id,
                                         cfg.model.mask_id]
    assert any(sp.id_to_piece(i).startswith("<0x") for i in sp.encode("龘")), "byte fallback not exercised"


@pytest.mark.parametrize("modality,override,option", [
    ("vision", "encoder.key_bias=true", "encoder.key_bias"),
    ("speech", "encoder.layer_scale_init=0.1", "encoder.layer_scale_init"),
])
def test_export_refuses_what_transformers_cannot_compute(single_process_group, tmp_path, modality, override, option):
    cfg = load_experiment(ROOT / f"configs/{modality}_tiny.yaml", [override])
    ours = Backbone(cfg.make_modality(), cfg.encoder, model_parallel_config(1))
    with pytest.raises(ValueError, match=option):
        hf.save_hf(cfg, ours.state_dict(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_init_from_is_checked_before_any_process_group(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.warm_start import check_source
    text = load_experiment(ROOT / "configs/text_tiny.yaml")
    with pytest.raises(ConfigError, match="neither a transformers model directory nor a .pt export"):
        check_source(load_experiment(ROOT / "configs/text_tiny.yaml", [f"init.from={tmp_path / 'nope'}"]))
    hf.hf_config(text).save_pretrained(tmp_path / "text")
    with pytest.raises(ConfigError, match="has no model.safetensors"):
        check_source(load_experiment(ROOT / "configs/text_tiny.yaml", [f"init.from={tmp_path / 'text'}"]))
    (tmp_path / "text" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="its weights file cannot be read"):
        check_source(load_experiment(ROOT / "configs/text_tiny.yaml", [f"init.from={tmp_path / 'text'}"]))
    import transformers
    transformers.Data2VecTextModel(hf.hf_config(text)).save_pretrained(tmp_path / "text")
    check_source(load_experiment(ROOT / "configs/text_tiny.yaml", [f"init.from={tmp_path / 'text'}"]))
    with pytest.raises(ConfigError, match="holds a 'data2vec-text' model; modality=vision"):
        check_source(load_experiment(ROOT / "configs/vision_tiny.yaml", [f"init.from={tmp_path / 'text'}"]))
    with pytest.raises(ConfigError, match="hidden_size=64 there, 128 here"):
        check_source(load_experiment(ROOT / "configs/text_tiny.yaml",
                                     [f"init.from={tmp_path / 'text'}", "encoder.dim=128", "encoder.ffn_dim=256"]))
