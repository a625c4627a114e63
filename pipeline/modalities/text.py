"""Text: data2vec v1 text (RoBERTa shapes) with BERT or span masking.

Token embedding (megatron-core ``VocabParallelEmbedding``, vocabulary padded for tensor parallelism)
+ learned positions (RoBERTa numbering: pad_id + 1 + index of the non-pad token) -> embedding
LayerNorm -> post-LN blocks. Masking follows fairseq's ``MaskTokensDataset``: int(mask_prob x n / L + u)
span starts of L tokens (L = 1 for BERT masking), overlaps merged; of the selected, ``leave_unmasked_prob``
stay, ``random_token_prob`` become a random token and the rest ``<mask>`` (BERT: 10/10/80; the released
data2vec recipe: 0/0/100 with spans of 4 at 0.35). Which positions carry loss is ``model.loss_on``:
'mask_token' (the reference: only positions replaced by ``<mask>``) or 'selected' (all, as BERT's MLM).

The teacher sees the original, unmasked block, as the paper describes. The released fairseq code differs:
its teacher input is the task's target tokens, which hold <pad> everywhere except the masked positions,
so that teacher attends only to the masked tokens (fairseq issue 4881, open). We follow the paper.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core.tensor_parallel import VocabParallelEmbedding

from pipeline.config import EncoderConfig, doc, one_of, require
from pipeline.modalities.base import Modality, visible_rows
from pipeline.model.transformer import InitEmbedding, InitLinear, weight_init

TOKEN_KEYS = {"u16": np.uint16, "i32": np.int32}


@dataclass
class TextConfig:
    vocab_size: int = doc("sentencepiece vocabulary size (must match the shards' model; see the manifest)", 50000)
    pad_id: int = doc("<pad> id", 0)
    bos_id: int = doc("<s> id", 1)
    eos_id: int = doc("</s> id", 2)
    unk_id: int = doc("<unk> id", 3)
    mask_id: int = doc("<mask> id", 4)
    max_positions: int = doc("learned positions", 512)
    vocab_multiple: int = doc("pad the embedding rows to a multiple of this x parallel.tp", 128)
    masking: str = doc("'bert' (independent tokens), 'span' (spans of span_length, overlaps merge: fairseq "
                       "mask_multiple_length) or 'random' (exactly int(mask_prob x n) tokens; data2vec 2.0 removes "
                       "L - int(L x (1 - mask_prob)) of the block's L positions from every clone, <pad> included, and "
                       "scores the non-pad ones)", "bert")
    mask_prob: float = doc("span starts are int(mask_prob x tokens / span length + u): BERT 0.15; data2vec's "
                           "released text recipe 0.35 with spans of 4, which masks about 30.7% at 512 tokens", 0.15)
    span_length: int = doc("span length for masking='span'", 4)
    random_token_prob: float = doc("of the selected, fraction replaced by a random token", 0.1)
    leave_unmasked_prob: float = doc("of the selected, fraction left unchanged", 0.1)
    loss_on: str = doc("'mask_token' (only <mask> positions carry loss, as the reference) or 'selected'", "mask_token")
    clone_batch: int = doc("masked clones of each block sharing one teacher pass (data2vec 2.0: 8)", 1)
    mask_specials: bool = doc("<s>, </s>, <unk> can be selected for masking, as fairseq's MaskTokensDataset (<pad> "
                              "never is)", True)

    def __post_init__(self):
        specials = {self.pad_id, self.bos_id, self.eos_id, self.unk_id, self.mask_id}
        require(len(specials) == 5 and max(specials) < self.vocab_size, "model.*_id must be 5 distinct ids < vocab_size")
        one_of("model.masking", self.masking, ("bert", "span", "random"))
        require(1 <= self.clone_batch <= 256, f"model.clone_batch={self.clone_batch} must be in [1, 256]")
        one_of("model.loss_on", self.loss_on, ("mask_token", "selected"))
        require(0 < self.mask_prob < 1, "model.mask_prob must be in (0, 1)")
        require(self.random_token_prob + self.leave_unmasked_prob < 1,
                "model.random_token_prob + model.leave_unmasked_prob must be < 1")
        require(self.span_length >= 1 and self.max_positions >= 1, "model.span_length, max_positions must be >= 1")

    def padded_vocab(self, tp: int) -> int:
        multiple = self.vocab_multiple * tp
        return -(-self.vocab_size // multiple) * multiple


# ---------------------------------------------------------------------------------------------
# Masking (per sample, on CPU in the DataLoader workers)
# ---------------------------------------------------------------------------------------------

def select_positions(candidates: list[int], cfg: TextConfig, rng: random.Random) -> list[int]:
    """fairseq MaskTokensDataset: int(mask_prob * n / L + u) distinct span starts among the n candidates
    (u ~ U[0, 1): probabilistic rounding), each extended to L = span_length candidates (1 for 'bert');
    overlapping spans merge and spans are cut at the end, so spans mask about mask_prob x n or fewer.
    'random': exactly int(mask_prob x n) of them."""
    n = len(candidates)
    if cfg.masking == "random":
        return sorted(rng.sample(candidates, int(cfg.mask_prob * n)))
    length = cfg.span_length if cfg.masking == "span" else 1
    starts = rng.sample(range(n), min(n, int(cfg.mask_prob * n / length + rng.random())))
    return sorted({candidates[i] for s in starts for i in range(s, min(s + length, n))})


def corrupt(tokens: torch.Tensor, cfg: TextConfig, rng: random.Random):
    """-> (student tokens, loss mask). <pad> is never selected; other specials only with model.mask_specials
    (fairseq masks <s> and </s> too); random replacement tokens are never specials."""
    specials = {cfg.pad_id, cfg.bos_id, cfg.eos_id, cfg.unk_id, cfg.mask_id}
    exempt = specials if not cfg.mask_specials else {cfg.pad_id}
    ids = tokens.tolist()
    selected = select_positions([i for i, t in enumerate(ids) if t not in exempt], cfg, rng)
    student = list(ids)
    loss = torch.zeros(len(ids), dtype=torch.bool)
    for i in selected:
        u = rng.random()
        if u < cfg.leave_unmasked_prob:
            pass
        elif u < cfg.leave_unmasked_prob + cfg.random_token_prob:
            t = rng.randrange(cfg.vocab_size)
            while t in specials:
                t = rng.randrange(cfg.vocab_size)
            student[i] = t
        else:
            student[i] = cfg.mask_id
        loss[i] = cfg.loss_on == "selected" or student[i] == cfg.mask_id
    return torch.tensor(student, dtype=torch.long), loss


def removed_positions(content: torch.Tensor, ratio: float, rng: random.Random) -> torch.Tensor:
    """(L,) bool, True at the L - int(L x (1 - ratio)) positions (at most L - 1) a data2vec 2.0 student leaves out, drawn
    uniformly (fairseq random_masking, MAE's): every block of one length removes the same count. ``content`` (L,)
    marks the non-pad tokens: one of them always stays visible, so no clone attends to padding alone."""
    length = content.numel()
    mask = torch.zeros(length, dtype=torch.bool)
    mask[rng.sample(range(length), min(length - 1, length - int(length * (1 - ratio))))] = True  # one stays visible
    if bool(content.any()) and not bool((content & ~mask).any()):  # every token removed: swap one back in
        mask[rng.choice(content.nonzero().flatten().tolist())] = False
        mask[rng.choice((~mask & ~content).nonzero().flatten().tolist())] = True
    return mask


# ---------------------------------------------------------------------------------------------
# Model parts
# ---------------------------------------------------------------------------------------------

class TextEmbedder(nn.Module):
    def __init__(self, cfg: TextConfig, enc: EncoderConfig, mp):
        super().__init__()
        self.pad_id = cfg.pad_id
        self.tokens = VocabParallelEmbedding(cfg.padded_vocab(mp.tensor_model_parallel_size), enc.dim,
                                             init_method=weight_init(enc.init, pad_row=cfg.pad_id), config=mp)
        self.positions = InitEmbedding(cfg.max_positions + cfg.pad_id + 1, enc.dim,
                                       init=weight_init(enc.init, pad_row=cfg.pad_id))
        self.norm = nn.LayerNorm(enc.dim, eps=enc.layer_norm_eps)
        self.dropout = nn.Dropout(enc.dropout)

    def forward(self, batch: dict[str, torch.Tensor], mask: torch.Tensor | None = None,
                visible: torch.Tensor | None = None):
        tokens = batch["tokens"] if mask is None or visible is not None else batch["student_tokens"]  # (B, T)
        not_pad = tokens.ne(self.pad_id)
        positions = torch.cumsum(not_pad, 1) * not_pad + self.pad_id  # RoBERTa numbering
        x = self.dropout(self.norm(self.tokens(tokens) + self.positions(positions)))
        # full_sentences blocks have no <pad>; complete_doc blocks do, and pads leave attention. The trainer decides
        # on the CPU (Text.on_host: pad_mask); other callers let the embedder look, which reads the device once.
        pads = batch["pad_mask"] if "pad_mask" in batch else (~not_pad if not bool(not_pad.all()) else None)
        if visible is not None:  # data2vec 2.0: each clone's visible positions only, (B x M, K, D)
            x = visible_rows(x, visible)
            pads = None if pads is None else visible_rows(pads, visible)
        if pads is None:
            return x, None
        attn_bias = torch.zeros(pads.shape, dtype=x.dtype, device=x.device).masked_fill(pads, float("-inf"))
        return x, attn_bias[:, None, None, :]  # (B, 1, 1, T)


class TwoLayerHead(nn.Module):
    """data2vec v1 text regression head: Linear(D, 2D) -> GELU -> Linear(2D, D), drawn by ``init``
    (fairseq applies init_bert_params to it)."""

    def __init__(self, dim: int, init):
        super().__init__()
        self.fc1, self.fc2 = InitLinear(dim, 2 * dim, init=init), InitLinear(2 * dim, dim, init=init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Text(Modality):
    name = "text"
    data_kind = "text"
    Config = TextConfig
    fixed_shape_keys = ("tokens", "student_tokens", "mask")

    def example(self, sample, rng):
        tokens = self.decode(sample)
        if self.visible_only:  # data2vec 2.0: which positions each clone leaves out; nothing is corrupted
            content = tokens.ne(self.cfg.pad_id)
            masks = [removed_positions(content, self.cfg.mask_prob, rng) for _ in range(self.cfg.clone_batch)]
            return {"tokens": tokens, "mask": masks[0] if len(masks) == 1 else torch.stack(masks)}
        student, mask = corrupt(tokens, self.cfg, rng)
        return {"tokens": tokens, "student_tokens": student, "mask": mask}

    def eval_inputs(self, sample):
        return {"tokens": self.decode(sample).unsqueeze(0)}

    def valid_positions(self, batch):
        return batch["tokens"].ne(self.cfg.pad_id)

    def on_host(self, batch):
        """Whether the block has padding, decided on the CPU: ``pad_mask`` (B, T) True at <pad>, or None."""
        pads = batch["tokens"].eq(self.cfg.pad_id)
        batch["pad_mask"] = pads if bool(pads.any()) else None
        return batch

    def decode(self, sample) -> torch.Tensor:
        """The sample's token block as int64 ids, checked against the model's positions and vocabulary."""
        key = next((k for k in TOKEN_KEYS if k in sample), None)
        if key is None:
            raise ValueError(f"sample {sample.get('__key__')} has no token block (expected one of {list(TOKEN_KEYS)})")
        tokens = torch.from_numpy(np.frombuffer(sample[key], dtype=np.dtype(TOKEN_KEYS[key]).newbyteorder("<"))
                                  .astype(np.int64))
        if tokens.numel() > self.cfg.max_positions:
            raise ValueError(f"token block of {tokens.numel()} > model.max_positions={self.cfg.max_positions}")
        if int(tokens.max()) >= self.cfg.vocab_size:
            raise ValueError(f"token id {int(tokens.max())} >= model.vocab_size={self.cfg.vocab_size}: the shards were "
                             f"made with a different sentencepiece model")
        return tokens

    def check_manifest(self, manifest):
        problem = super().check_manifest(manifest)
        tok = manifest.get("tokenizer") or {}
        if problem is None and tok.get("vocab_size") != self.cfg.vocab_size:
            problem = (f"the shards' sentencepiece model has {tok.get('vocab_size')} pieces but model.vocab_size="
                       f"{self.cfg.vocab_size}: set model.vocab_size={tok.get('vocab_size')}")
        if problem is None:  # the special ids the shards hold (<pad> fills, <s> / </s> delimit) are the model's
            from pipeline.vocab import TokenizerMismatch, check_config, of_manifest
            try:
                check_config(self.cfg, of_manifest(manifest, "the shards' manifest"), "the shards' tokenizer")
            except TokenizerMismatch as exc:
                problem = str(exc)
        if problem is None and manifest.get("block_size", 0) > self.cfg.max_positions:
            problem = (f"blocks of {manifest['block_size']} tokens exceed model.max_positions={self.cfg.max_positions}")
        return problem

    def build_embedder(self, enc, mp):
        return TextEmbedder(self.cfg, enc, mp)

    def build_head(self, enc, mp):
        return TwoLayerHead(enc.dim, weight_init(enc.init))

    def tokens_per_sample(self):
        return self.cfg.max_positions

    def masked_share(self):
        m = self.cfg
        if self.visible_only:
            return m.mask_prob
        keep = 1.0 - m.random_token_prob - m.leave_unmasked_prob
        return m.mask_prob * (keep if m.loss_on == "mask_token" else 1.0)

    def sample_bytes(self):
        return (8 + (8 + 1) * self.cfg.clone_batch) * self.cfg.max_positions  # int64 tokens, student tokens, masks
