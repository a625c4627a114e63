"""data2vec 2.0: M masked clones of each sample share one teacher pass; the student encodes only each clone's
visible positions and a light convolutional decoder predicts the teacher's targets at the masked ones."""

from __future__ import annotations

from pipeline.methods.base import Method, flat_index
from pipeline.model.decoder import decoder_flops_per_row, projection_widths
from pipeline.model.transformer import matmul_flops_per_token


class Data2Vec2(Method):
    name = "data2vec2"
    visible_only = True

    @staticmethod
    def problems(cfg):
        found, model = [], cfg.model
        if getattr(model, "positions", "sincos") != "sincos":
            found.append("method: data2vec2 embeds only visible patches and needs model.positions=sincos (fixed 2-D "
                         "sin-cos positions; the relative position bias is data2vec v1's)")
        if cfg.modality == "vision" and model.masking != "inverse_block":
            found.append("method: data2vec2 with modality: vision masks by model.masking=inverse_block")
        if cfg.modality == "text" and model.masking != "random":
            found.append("method: data2vec2 with modality: text removes an exact share of tokens: set "
                         "model.masking=random")
        if cfg.objective.cls_loss and cfg.make_modality().prefix_tokens == 0:
            found.append(f"objective.cls_loss={cfg.objective.cls_loss} needs a CLS token; modality {cfg.modality} "
                         f"has none: set it to 0")
        return found

    @property
    def clones(self) -> int:
        return self.modality.clones

    def build_student(self, mp):
        from pipeline.model.data2vec2 import Student2
        return Student2(self.modality, self.cfg.encoder, self.cfg.decoder, mp)

    def on_host(self, batch):
        """``visible`` (R, K): the positions each clone row keeps, and the scored positions: masked ones holding
        input (text: not <pad>), indexed into the student's (R x T) rows and the teacher's (B x T) rows."""
        mask = batch["mask"]  # (R, T), R = B x M
        rows, length = mask.shape
        counts = (~mask).sum(1)
        if rows and not bool((counts == counts[0]).all()):
            raise ValueError(f"data2vec 2.0 needs the same count of visible positions in every row of a batch; got "
                             f"{sorted(set(counts.tolist()))}: the modality's masking must fix the count per row")
        batch["visible"] = (~mask).nonzero()[:, 1].view(rows, -1)
        valid = self.modality.valid_positions(batch)  # (B, T) or None
        scored = mask if valid is None else mask & valid.repeat_interleave(self.clones, 0)
        index = flat_index(scored)
        batch["masked_index"] = index
        batch["target_index"] = index // (length * self.clones) * length + index % length
        return batch

    def student_shape(self, tokens):
        """M clone rows per sample, each of its visible positions (+ CLS)."""
        return self.clones, tokens - round(tokens * self.modality.masked_share()) + self.modality.prefix_tokens

    def predictor_activation_bytes(self, samples, tokens, a):
        """The decoder on every clone's full sequence: its filled input, per block the conv output, LayerNorm output
        and GELU output (+ the residual sum), and the projection's hidden layers."""
        dec, rows = self.cfg.decoder, samples * self.clones
        per_position = self.cfg.encoder.dim + dec.layers * 4 * dec.dim + sum(projection_widths(dec, 0)[1:-1])
        return a * rows * tokens * per_position

    def flops_per_sample(self, tokens, share_features):
        enc, mod, m = self.cfg.encoder, self.modality, self.clones
        seq = tokens + mod.prefix_tokens
        visible = self.student_shape(tokens)[1]
        embed = mod.embed_flops_per_sample(enc, tokens)
        shared = mod.shared_flops_per_sample(enc, tokens) if share_features else 0.0
        per_clone = mod.clone_flops_per_sample(enc, tokens)
        student = embed + (m - 1) * per_clone + m * visible * matmul_flops_per_token(enc, visible)
        decoder = m * decoder_flops_per_row(self.cfg.decoder, enc.dim, tokens, mod.decoder_dims)
        teacher = embed + seq * matmul_flops_per_token(enc, seq) - shared
        return {"teacher": teacher, "student": 3 * student, "decoder": 3 * decoder}

    def decay_exempt(self):
        return "bias"  # fairseq data2vec2.py: every 1-D parameter and every bias, in all modalities

    def teacher_precision(self):
        return "autocast"  # fairseq data2vec2.py ema_same_dtype: the teacher runs in the student's half precision
