"""data2vec (v1): the student encodes the whole input, masked positions replaced by a learned mask embedding, and
a regression head predicts the teacher's targets at the masked positions."""

from __future__ import annotations

from pipeline.methods.base import Method, Predictions, flat_index
from pipeline.model.transformer import matmul_flops_per_token


class Data2Vec(Method):
    name = "data2vec"

    @staticmethod
    def problems(cfg):
        found = []
        if cfg.model.clone_batch != 1:
            found.append(f"model.clone_batch={cfg.model.clone_batch}: masked clones are data2vec 2.0's (method: "
                         f"data2vec2); set model.clone_batch=1")
        if cfg.objective.cls_loss:
            found.append("objective.cls_loss is data2vec 2.0's image CLS loss (method: data2vec2); set it to 0")
        if getattr(cfg.model, "positions", "relative") != "relative":
            found.append("model.positions=sincos embeds only visible patches (method: data2vec2); data2vec v1 needs "
                         "model.positions=relative")
        return found

    def build_student(self, mp):
        from pipeline.model.data2vec import Student
        return Student(self.modality, self.cfg.encoder, mp)

    def predict(self, student, batch, mask, skip, index):
        return Predictions(student(batch, mask, skip, index))

    def on_host(self, batch):
        batch["masked_index"] = batch["target_index"] = flat_index(batch["mask"])
        return batch

    def predictor_activation_bytes(self, samples, tokens, a):
        """The head's input at the masked positions (text: + its 2D-wide hidden layer)."""
        masked = max(1, round(self.modality.masked_share() * tokens)) * samples
        return masked * self.cfg.encoder.dim * a * (3 if self.cfg.modality == "text" else 1)

    def flops_per_sample(self, tokens, share_features):
        enc, mod = self.cfg.encoder, self.modality
        seq = tokens + mod.prefix_tokens
        forward = mod.embed_flops_per_sample(enc, tokens) + seq * matmul_flops_per_token(enc, seq)
        shared = mod.shared_flops_per_sample(enc, tokens) if share_features else 0.0
        return {"teacher": forward - shared, "student": 3 * forward, "decoder": 0.0}
