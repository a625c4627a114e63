"""Feature quality during pretraining (``eval.every``): DINO's kNN monitor on a held-out labelled set.

Every ``eval.every`` optimizer steps the live student's backbone (or the EMA teacher) embeds ``eval.train``
and ``eval.eval`` exactly as ``python -m pipeline.evaluate`` does (the modality's evaluation transform, the
final layer mean-pooled), and the run logs ``eval/knn_top1`` (and ``eval/linear_top1`` with
``eval.probe=both``) in its log line, metrics.jsonl and TensorBoard.

At scale the work is split: each data-parallel rank embeds every dp-th example (tensor-parallel peers embed
the same ones, as they must), the training features are all-gathered, each rank scores the kNN votes of its
own evaluation examples and one all-reduce sums the hits. Every rank runs the same number of forward passes,
as ZeRO-3's parameter gathers require. The linear probe (cross-validated L-BFGS) splits its cross-validation fits
over the data-parallel ranks and makes its final fit on each.

Evaluation draws no random numbers and changes no state (the RNGs are forked around it), so a resumed run
stays bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import doc, one_of, require

log = logging.getLogger("pipeline")


@dataclass
class EvalConfig:
    every: int = doc("steps between evaluations of the features on a held-out labelled set (0: off); also at the "
                     "last step", 0)
    train: list = doc("labelled inputs the probes are fitted on: data_prep shard directories, class folders "
                      "(CLASS/file) or text .jsonl files (see python -m pipeline.evaluate --help)", [])
    eval: list = doc("labelled inputs the probes are scored on (same kinds as eval.train)", [])
    probe: str = doc("'knn' (DINO's kNN, k=20, T=0.07, split over the data-parallel ranks) or 'both' (and the "
                     "cross-validated linear probe, its fits split over the data-parallel ranks)", "knn")
    weights: str = doc("the features of the 'student' (what pipeline.export writes first and fine-tuning starts "
                       "from) or of the EMA 'teacher'", "student")
    batch_size: int = doc("examples per forward pass (speech clips of different lengths go one by one)", 32)
    label_field: str = doc("text .jsonl inputs: the field holding the label", "label")
    spm_model: str = doc("text .jsonl inputs: the sentencepiece model (empty: spm.model next to data.manifest)", "")

    def __post_init__(self):
        require(self.every >= 0, "eval.every must be >= 0")
        one_of("eval.probe", self.probe, ("knn", "both"))
        one_of("eval.weights", self.weights, ("student", "teacher"))
        require(self.batch_size >= 1, "eval.batch_size must be >= 1")
        require(not self.every or (self.train and self.eval),
                f"eval.every={self.every} needs labelled inputs: set eval.train=[...] and eval.eval=[...] "
                f"(shard directories, class folders or .jsonl files), or eval.every=0")


def check_inputs(cfg) -> None:
    """Before any process group: every eval input exists (and text has a sentencepiece model)."""
    e = cfg.eval
    if not e.every:
        return
    for path in [*e.train, *e.eval]:
        require(Path(path).exists(), f"eval input {path} does not exist (eval.train / eval.eval)")
    if cfg.modality == "text" and any(str(p).endswith((".txt", ".jsonl")) for p in [*e.train, *e.eval]):
        require(spm_model(cfg) is not None, "text eval inputs need the run's sentencepiece model: set eval.spm_model "
                                            "(data_prep.text writes spm.model next to the shards)")


def spm_model(cfg) -> str | None:
    """Text eval inputs' sentencepiece model: eval.spm_model, else the shards' (compared before launch: vocab)."""
    from pipeline.vocab import beside_manifest
    found = cfg.eval.spm_model or beside_manifest(cfg.data.manifest)
    return str(found) if found else None


class FeatureMonitor:
    """Holds this rank's share of the labelled examples (raw samples, read once) and scores the live model."""

    def __init__(self, cfg, rt):
        self.cfg, self.rt = cfg, rt
        self.splits: dict[str, tuple[list[dict], list[int], int]] | None = None  # split -> (samples, labels, total)
        self.classes: dict[str, int] = {}

    def due(self, step: int, steps: int) -> bool:
        """Every eval.every steps and at train.steps (not at a train.stop_after or preemption stop: a resumed
        run logs what an uninterrupted one does)."""
        every = self.cfg.eval.every
        return bool(every) and (step % every == 0 or step == steps)

    # -- inputs -------------------------------------------------------------------------------
    def load(self) -> None:
        """Read every labelled example once; keep the raw samples of this data-parallel rank's share."""
        from pipeline.features import examples
        e = self.cfg.eval
        spm = spm_model(self.cfg)
        read = {}
        for split in ("train", "eval"):
            items = [x for x in examples(list(getattr(e, split)), self.cfg, spm, e.label_field) if x.label is not None]
            if split == "train":
                self.classes = {name: i for i, name in enumerate(sorted({x.label for x in items}))}
            unknown = sorted({x.label for x in items} - set(self.classes))
            if len(self.classes) < 2 or len(items) < self.rt.dp or unknown:  # the same verdict on every rank
                raise ValueError(f"eval.{split} needs labelled examples of at least 2 classes, at least one per "
                                 f"data-parallel rank ({self.rt.dp}), and no eval class the train split lacks; found "
                                 f"{len(items)} labelled examples, classes {sorted(self.classes)[:5]}"
                                 f"{', eval-only classes ' + str(unknown[:5]) if unknown else ''}")
            mine = items[self.rt.dp_rank::self.rt.dp]
            read[split] = ([x.sample for x in mine], [self.classes[x.label] for x in mine], len(items))
        self.splits = read
        if self.rt.is_main:
            log.info("eval: %d train and %d eval examples, %d classes, every %d steps", read["train"][2],
                     read["eval"][2], len(self.classes), e.every)

    # -- features -----------------------------------------------------------------------------
    def features(self, backbone, samples: list[dict]) -> torch.Tensor:
        """(n, D) pooled features of this rank's samples; as many forward passes as every data-parallel peer."""
        from pipeline.data import to_device
        from pipeline.distributed import all_reduce_max
        from pipeline.features import pooled
        modality = self.cfg.make_modality()
        batches = stack_batches([modality.eval_inputs(s) for s in samples], self.cfg.eval.batch_size,
                                getattr(self.cfg.model, "pad_id", 0))
        passes = int(all_reduce_max(torch.tensor([float(len(batches))], device=self.rt.device), self.rt.dp_group))
        out = []
        choice = self.rt.choice
        for i in range(passes):  # extra passes (a peer has more batches) repeat a batch and are dropped
            inputs = to_device(batches[min(i, len(batches) - 1)], self.rt.device, choice.dtype)
            with torch.autocast(choice.device_type, dtype=choice.dtype, enabled=choice.autocast):
                feats = pooled(backbone, self.cfg, inputs)
            if i < len(batches):
                out.append(feats.float())
        return torch.cat(out)

    @torch.no_grad()
    def run(self, trainer) -> dict[str, float]:
        """Score the live model: {"eval/knn_top1", ["eval/linear_top1"], "eval/seconds"} (rank 0's figures)."""
        from pipeline.distributed import all_gather_rows, all_reduce_sum
        from pipeline.probes import knn_predict
        start = time.perf_counter()
        if self.splits is None:
            self.load()
        student = self.cfg.eval.weights == "student"
        backbone = trainer.engine.module.backbone if student else trainer.teacher.module
        training = trainer.engine.module.training
        devices = [self.rt.device.index or 0] if self.rt.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            backbone.eval()
            try:
                feats = {split: self.features(backbone, self.splits[split][0]) for split in ("train", "eval")}
            finally:
                trainer.engine.module.train(training)
        labels = {split: torch.tensor(self.splits[split][1], dtype=torch.long, device=self.rt.device)
                  for split in ("train", "eval")}
        group = self.rt.dp_group
        train_x, train_y = all_gather_rows(feats["train"], group), all_gather_rows(labels["train"], group)
        hits = (knn_predict(train_x, train_y, feats["eval"], len(self.classes)) == labels["eval"]).sum()
        counts = torch.stack([hits.float(), torch.tensor(float(len(labels["eval"])), device=hits.device)])
        all_reduce_sum(counts, group)
        result = {"eval/knn_top1": (counts[0] / counts[1]).item()}
        if self.cfg.eval.probe == "both":
            eval_x, eval_y = all_gather_rows(feats["eval"], group), all_gather_rows(labels["eval"], group)
            result["eval/linear_top1"] = self.linear_probe(train_x.cpu(), train_y.cpu(), eval_x.cpu(), eval_y.cpu())
        result["eval/seconds"] = time.perf_counter() - start
        return result

    def linear_probe(self, train_x, train_y, eval_x, eval_y) -> float:
        """The cross-validated linear probe's top-1, its cross-validation fits split over the data-parallel ranks (one
        sum of their counts), its final fit on every rank alike: no rank works alone while its peers wait in a
        collective, however large the eval set (their wait would count against parallel.timeout_s)."""
        from pipeline.distributed import all_reduce_sum
        from pipeline.probes import best_l2, cv_correct, linear_top1
        classes = len(self.classes)
        correct = cv_correct(train_x, train_y, classes, share=(self.rt.dp_rank, self.rt.dp))
        if correct is not None:  # the folds come from the labels, the same on every rank
            correct = all_reduce_sum(correct.to(self.rt.device), self.rt.dp_group).cpu()
        return linear_top1(train_x, train_y, eval_x, eval_y, l2=best_l2(correct))["top1"]


def stack_batches(inputs: list[dict[str, torch.Tensor]], size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive single-example inputs joined into batches of up to ``size``: same shapes stack, token ids are
    right-padded with ``pad_id`` (pooling and attention leave pads out); anything else starts a new batch."""
    batches, current = [], []
    for item in inputs:
        if current and (len(current) == size or not joinable(current[0], item)):
            batches.append(join(current, pad_id))
            current = []
        current.append(item)
    if current:
        batches.append(join(current, pad_id))
    return batches


def joinable(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(a[k].shape == b[k].shape or (k == "tokens" and a[k].dim() == 2) for k in a)


def join(items: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    out = {}
    for key in items[0]:
        parts = [x[key] for x in items]
        if key == "tokens":
            width = max(p.shape[1] for p in parts)
            parts = [torch.nn.functional.pad(p, (0, width - p.shape[1]), value=pad_id) for p in parts]
        out[key] = torch.cat(parts)
    return out

