"""The one bridge to transformers' Data2Vec models: config, parameter names and what has no HF form.

Our backbone (``pipeline.model.data2vec.Backbone``) and transformers' ``Data2VecVisionModel``,
``Data2VecAudioModel`` and ``Data2VecTextModel`` hold the same tensors under other names, 1:1. This
file owns that name map (both directions), the HF config that makes the HF model compute what ours
computes, and the list of our options that have no HF equivalent. Export (HF directory) and import
(``init.from``) use it, and the parity tests check it against transformers itself.

State dicts here are whole (tensor-parallel slices merged, see ``pipeline.export``) and hold backbone
parameters without the ``backbone.`` prefix; the text embedding has the real vocabulary's rows.
"""

from __future__ import annotations

from typing import Any

import torch

HF_MODEL_CLASS = {"vision": "Data2VecVisionModel", "speech": "Data2VecAudioModel", "text": "Data2VecTextModel"}
HF_MODEL_TYPE = {"vision": "data2vec-vision", "speech": "data2vec-audio", "text": "data2vec-text"}

# per block: our name -> HF name (block index substituted for {i})
VISION_BLOCK = {
    "gamma_1": "lambda_1", "gamma_2": "lambda_2",
    "attn_norm.weight": "layernorm_before.weight", "attn_norm.bias": "layernorm_before.bias",
    "attn.query.weight": "attention.attention.query.weight", "attn.query.bias": "attention.attention.query.bias",
    "attn.key.weight": "attention.attention.key.weight",
    "attn.value.weight": "attention.attention.value.weight", "attn.value.bias": "attention.attention.value.bias",
    "attn.out.weight": "attention.output.dense.weight", "attn.out.bias": "attention.output.dense.bias",
    "ffn_norm.weight": "layernorm_after.weight", "ffn_norm.bias": "layernorm_after.bias",
    "ffn.fc1.weight": "intermediate.dense.weight", "ffn.fc1.bias": "intermediate.dense.bias",
    "ffn.fc2.weight": "output.dense.weight", "ffn.fc2.bias": "output.dense.bias",
}
AUDIO_BLOCK = {
    "attn.query.weight": "attention.q_proj.weight", "attn.query.bias": "attention.q_proj.bias",
    "attn.key.weight": "attention.k_proj.weight", "attn.key.bias": "attention.k_proj.bias",
    "attn.value.weight": "attention.v_proj.weight", "attn.value.bias": "attention.v_proj.bias",
    "attn.out.weight": "attention.out_proj.weight", "attn.out.bias": "attention.out_proj.bias",
    "attn_norm.weight": "layer_norm.weight", "attn_norm.bias": "layer_norm.bias",
    "ffn.fc1.weight": "feed_forward.intermediate_dense.weight", "ffn.fc1.bias": "feed_forward.intermediate_dense.bias",
    "ffn.fc2.weight": "feed_forward.output_dense.weight", "ffn.fc2.bias": "feed_forward.output_dense.bias",
    "ffn_norm.weight": "final_layer_norm.weight", "ffn_norm.bias": "final_layer_norm.bias",
}
TEXT_BLOCK = {
    "attn.query.weight": "attention.self.query.weight", "attn.query.bias": "attention.self.query.bias",
    "attn.key.weight": "attention.self.key.weight", "attn.key.bias": "attention.self.key.bias",
    "attn.value.weight": "attention.self.value.weight", "attn.value.bias": "attention.self.value.bias",
    "attn.out.weight": "attention.output.dense.weight", "attn.out.bias": "attention.output.dense.bias",
    "attn_norm.weight": "attention.output.LayerNorm.weight", "attn_norm.bias": "attention.output.LayerNorm.bias",
    "ffn.fc1.weight": "intermediate.dense.weight", "ffn.fc1.bias": "intermediate.dense.bias",
    "ffn.fc2.weight": "output.dense.weight", "ffn.fc2.bias": "output.dense.bias",
    "ffn_norm.weight": "output.LayerNorm.weight", "ffn_norm.bias": "output.LayerNorm.bias",
}
TEXT_TOKEN_TYPES = "embeddings.token_type_embeddings.weight"  # HF only: one row of zeros (type_vocab_size=1)


def vision_names(cfg) -> dict[str, str]:
    names = {"embed.cls_token": "embeddings.cls_token", "embed.mask_token": "embeddings.mask_token",
             "embed.patch.weight": "embeddings.patch_embeddings.projection.weight",
             "embed.patch.bias": "embeddings.patch_embeddings.projection.bias",
             "embed.rel_pos_bias.table": "encoder.relative_position_bias.relative_position_bias_table",
             "encoder.final_norm.weight": "layernorm.weight", "encoder.final_norm.bias": "layernorm.bias"}
    return names | block_names(cfg.encoder.depth, "encoder.layer", VISION_BLOCK)


def speech_names(cfg) -> dict[str, str]:
    names = {"embed.mask_emb": "masked_spec_embed",
             "embed.feature_norm.weight": "feature_projection.layer_norm.weight",
             "embed.feature_norm.bias": "feature_projection.layer_norm.bias",
             "embed.projection.weight": "feature_projection.projection.weight",
             "embed.projection.bias": "feature_projection.projection.bias",
             "embed.encoder_norm.weight": "encoder.layer_norm.weight",
             "embed.encoder_norm.bias": "encoder.layer_norm.bias"}
    for i in range(len(cfg.model.conv_layers)):
        for part in ("conv.weight", "layer_norm.weight", "layer_norm.bias"):
            names[f"embed.feature_extractor.conv_layers.{i}.{part}"] = f"feature_extractor.conv_layers.{i}.{part}"
    for i in range(cfg.model.pos_conv_layers):
        for part in ("weight", "bias"):
            names[f"embed.pos_conv.convs.{i}.{part}"] = f"encoder.pos_conv_embed.layers.{i}.conv.{part}"
    return names | block_names(cfg.encoder.depth, "encoder.layers", AUDIO_BLOCK)


def text_names(cfg) -> dict[str, str]:
    names = {"embed.tokens.weight": "embeddings.word_embeddings.weight",
             "embed.positions.weight": "embeddings.position_embeddings.weight",
             "embed.norm.weight": "embeddings.LayerNorm.weight", "embed.norm.bias": "embeddings.LayerNorm.bias"}
    return names | block_names(cfg.encoder.depth, "encoder.layer", TEXT_BLOCK)


def block_names(depth: int, hf_prefix: str, table: dict[str, str]) -> dict[str, str]:
    return {f"encoder.blocks.{i}.{ours}": f"{hf_prefix}.{i}.{theirs}"
            for i in range(depth) for ours, theirs in table.items()}


NAMES = {"vision": vision_names, "speech": speech_names, "text": text_names}


def name_map(cfg) -> dict[str, str]:
    """Our backbone parameter name -> the HF model's, for this experiment (every parameter of both)."""
    names = NAMES[cfg.modality](cfg)
    if cfg.modality == "vision" and cfg.encoder.layer_scale_init <= 0:
        names = {k: v for k, v in names.items() if ".gamma_" not in k}
    return names


# ---------------------------------------------------------------------------------------------
# What HF cannot express
# ---------------------------------------------------------------------------------------------

# modality -> (encoder option, the value HF's architecture fixes, why)
FIXED_BY_HF = {
    "vision": [("norm_first", True, "Data2VecVisionModel is pre-LN (BEiT)"),
               ("key_bias", False, "Data2VecVisionModel's key projection has no bias")],
    "speech": [("norm_first", False, "Data2VecAudioModel is post-LN (wav2vec 2.0)"),
               ("key_bias", True, "Data2VecAudioModel's key projection has a bias"),
               ("layer_scale_init", 0.0, "Data2VecAudioModel has no layer scale")],
    "text": [("norm_first", False, "Data2VecTextModel is post-LN (RoBERTa)"),
             ("key_bias", True, "Data2VecTextModel's key projection has a bias"),
             ("layer_scale_init", 0.0, "Data2VecTextModel has no layer scale")],
}


def unsupported(cfg) -> list[str]:
    """Our options, as set in ``cfg``, that transformers' Data2Vec model cannot express (empty: exportable).
    Each names the option, its value and what HF fixes, so the user knows what to change."""
    problems = []
    for option, wanted, why in FIXED_BY_HF[cfg.modality]:
        value = getattr(cfg.encoder, option)
        if value != wanted:
            problems.append(f"encoder.{option}={value} ({why}; it needs encoder.{option}={wanted})")
    if getattr(cfg.model, "positions", "relative") != "relative":
        problems.append(f"model.positions={cfg.model.positions} (Data2VecVisionModel holds BEiT's relative position "
                        f"bias, not fixed 2-D sin-cos positions, and no LayerNorm after the embedding: a data2vec 2.0 "
                        f"ViT has no transformers class)")
    return problems


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

def hf_config_kwargs(cfg) -> dict[str, Any]:
    """Keyword arguments of the HF config class that make its model compute what our backbone computes."""
    enc, m = cfg.encoder, cfg.model
    common = dict(hidden_size=enc.dim, num_hidden_layers=enc.depth, num_attention_heads=enc.heads,
                  intermediate_size=enc.ffn_dim, hidden_act="gelu", layer_norm_eps=enc.layer_norm_eps,
                  attention_probs_dropout_prob=enc.attn_dropout)
    if cfg.modality == "vision":
        return common | dict(
            image_size=m.image_size, patch_size=m.patch_size, num_channels=m.in_chans, use_mask_token=True,
            use_absolute_position_embeddings=False, use_relative_position_bias=False,
            use_shared_relative_position_bias=True, layer_scale_init_value=enc.layer_scale_init,
            use_mean_pooling=False, drop_path_rate=enc.drop_path, hidden_dropout_prob=enc.dropout)
    if cfg.modality == "speech":
        common.pop("attention_probs_dropout_prob")
        return common | dict(
            conv_dim=[c[0] for c in m.conv_layers], conv_kernel=[c[1] for c in m.conv_layers],
            conv_stride=[c[2] for c in m.conv_layers], num_feat_extract_layers=len(m.conv_layers), conv_bias=False,
            feat_extract_activation="gelu", num_conv_pos_embeddings=m.pos_conv_layers,
            conv_pos_kernel_size=m.pos_conv_kernel, num_conv_pos_embedding_groups=m.pos_conv_groups,
            attention_dropout=enc.attn_dropout, hidden_dropout=enc.dropout, activation_dropout=0.0,
            layerdrop=enc.layerdrop, feat_proj_dropout=0.0)
    return common | dict(
        vocab_size=m.vocab_size, max_position_embeddings=m.max_positions + m.pad_id + 1, type_vocab_size=1,
        pad_token_id=m.pad_id, bos_token_id=m.bos_id, eos_token_id=m.eos_id, hidden_dropout_prob=enc.dropout,
        position_embedding_type="absolute")


# the HF config fields that fix the shapes and the computation (compared before a run starts from HF weights)
ARCHITECTURE = {"common": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "hidden_act"),
                "vision": ("image_size", "patch_size", "num_channels", "use_shared_relative_position_bias",
                           "use_relative_position_bias", "use_absolute_position_embeddings"),
                "speech": ("conv_dim", "conv_kernel", "conv_stride", "conv_bias", "num_conv_pos_embeddings",
                           "conv_pos_kernel_size", "num_conv_pos_embedding_groups", "feat_extract_norm"),
                "text": ("vocab_size", "max_position_embeddings", "pad_token_id", "position_embedding_type")}


def architecture_mismatch(cfg, hf_config_dict: dict) -> list[str]:
    """How an HF config.json differs from what this experiment's backbone computes (empty: it matches)."""
    want = hf_config_kwargs(cfg) | {"feat_extract_norm": "layer"}
    problems = []
    for key in ARCHITECTURE["common"] + ARCHITECTURE[cfg.modality]:
        if key in want and key in hf_config_dict and hf_config_dict[key] != want[key]:
            problems.append(f"{key}={hf_config_dict[key]!r} there, {want[key]!r} here")
    scaled = hf_config_dict.get("layer_scale_init_value", 0) > 0
    if cfg.modality == "vision" and scaled != (cfg.encoder.layer_scale_init > 0):
        problems.append("layer scale on one side only (encoder.layer_scale_init)")
    if cfg.modality == "text" and hf_config_dict.get("type_vocab_size", 1) != 1:
        problems.append(f"type_vocab_size={hf_config_dict['type_vocab_size']} (only 1 maps exactly)")
    return problems


def hf_config(cfg):
    """The transformers config object for this experiment's backbone."""
    import transformers
    name = HF_MODEL_CLASS[cfg.modality].replace("Model", "Config")
    return getattr(transformers, name)(**hf_config_kwargs(cfg))


# ---------------------------------------------------------------------------------------------
# State dicts, both directions
# ---------------------------------------------------------------------------------------------

def to_hf(cfg, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our whole backbone state dict -> the HF model's (every HF parameter present)."""
    names = name_map(cfg)
    missing = sorted(set(names) - set(state))
    if missing:
        raise KeyError(f"backbone state lacks {missing[:5]}: not a {cfg.modality} backbone of this config")
    out = {theirs: state[ours] for ours, theirs in names.items()}
    if cfg.modality == "text":
        out["embeddings.word_embeddings.weight"] = out["embeddings.word_embeddings.weight"][:cfg.model.vocab_size]
        out[TEXT_TOKEN_TYPES] = torch.zeros(1, cfg.encoder.dim, dtype=out["embeddings.LayerNorm.weight"].dtype)
    return out


def from_hf(cfg, state: dict[str, torch.Tensor], padded_vocab: int | None = None,
            strict: bool = True) -> dict[str, torch.Tensor]:
    """An HF model's state dict -> our whole backbone state dict. Text: the token embedding is padded with
    zero rows to ``padded_vocab``, and the token-type row (one, added to every position by HF) is folded into
    the position embeddings, which is exact for HF's type_vocab_size=1. ``strict=False``: parameters the HF
    state lacks (e.g. the mask token of a fine-tuned model) are left out instead of refused."""
    names = name_map(cfg)
    missing = sorted(set(names.values()) - set(state))
    if missing and strict:
        raise KeyError(f"HF state lacks {missing[:5]}: not a {HF_MODEL_CLASS[cfg.modality]} of this config")
    out = {ours: state[theirs] for ours, theirs in names.items() if theirs in state}
    if cfg.modality == "text":
        types = state.get(TEXT_TOKEN_TYPES)
        if types is not None:
            if types.shape[0] != 1:
                raise ValueError(f"{TEXT_TOKEN_TYPES} has {types.shape[0]} rows; only type_vocab_size=1 maps exactly")
            out["embed.positions.weight"] = out["embed.positions.weight"] + types[0]
        out["embed.tokens.weight"] = fit_vocab(out["embed.tokens.weight"], cfg.model.vocab_size, padded_vocab)
    return out


def fit_vocab(tokens: torch.Tensor, vocab_size: int, rows: int | None = None) -> torch.Tensor:
    """A token embedding cut to the real vocabulary's rows, then padded with zero rows up to ``rows`` (a run's
    tensor-parallel padding; exports keep their own run's, HF has none)."""
    real = tokens[:vocab_size]
    return torch.cat([real, real.new_zeros(max((rows or 0) - real.shape[0], 0), real.shape[1])])


# ---------------------------------------------------------------------------------------------
# Model, preprocessor and tokenizer, as transformers loads them
# ---------------------------------------------------------------------------------------------

HF_ONLY = {"text": {"pooler.dense.weight", "pooler.dense.bias"}}  # HF parameters with no counterpart here


def hf_model(cfg, state: dict[str, torch.Tensor]):
    """The HF model holding our backbone ``state``. Text: transformers' Data2VecTextModel adds a pooler
    (dense + tanh on the first token) that data2vec never trains; it keeps HF's own init, drawn from a fixed
    seed, so that the directory loads with nothing left uninitialised."""
    import transformers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, HF_MODEL_CLASS[cfg.modality])(hf_config(cfg))
    result = model.load_state_dict(to_hf(cfg, state), strict=False)
    missing = set(result.missing_keys) - HF_ONLY.get(cfg.modality, set())
    if missing or result.unexpected_keys:
        raise KeyError(f"{HF_MODEL_CLASS[cfg.modality]} does not take this state: missing {sorted(missing)[:5]}, "
                       f"unexpected {sorted(result.unexpected_keys)[:5]}")
    return model.eval()


def hf_preprocessor(cfg, spm_model: str | None = None):
    """The HF preprocessor computing our evaluation transform (``Modality.eval_inputs``): BeitImageProcessor,
    Wav2Vec2FeatureExtractor, or for text a tokenizer giving sentencepiece's own ids (specials included,
    a literal "<mask>" in the text stays text, as in data_prep.text)."""
    import transformers
    m = cfg.model
    if cfg.modality == "vision":
        from transformers.image_utils import PILImageResampling
        return transformers.BeitImageProcessor(
            do_resize=True, size={"height": m.image_size, "width": m.image_size}, resample=PILImageResampling.BICUBIC,
            do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(m.mean),
            image_std=list(m.std), do_reduce_labels=False)
    if cfg.modality == "speech":
        return transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                                     do_normalize=m.normalize, return_attention_mask=False)
    if spm_model is None:
        raise ValueError("a text export needs the shards' sentencepiece model (spm.model next to their manifest)")
    return transformers.BertGenerationTokenizer(
        vocab_file=str(spm_model), bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        mask_token="<mask>", sep_token="</s>", split_special_tokens=True, model_max_length=m.max_positions)


def save_hf(cfg, state: dict[str, torch.Tensor], output, spm_model: str | None = None) -> None:
    """Write a directory that transformers' AutoModel and AutoImageProcessor / AutoFeatureExtractor /
    AutoTokenizer load: config.json, model.safetensors and the preprocessor's files."""
    problems = unsupported(cfg)
    if problems:
        raise ValueError(f"transformers' {HF_MODEL_CLASS[cfg.modality]} cannot compute this model: "
                         + "; ".join(problems) + ". Export it with --format pt instead")
    hf_model(cfg, state).save_pretrained(output)
    hf_preprocessor(cfg, spm_model).save_pretrained(output)
