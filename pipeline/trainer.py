"""The training loop: student_forward, teacher_targets, regression_loss, ema update, log, checkpoint.

The trainer wraps plain modules with DeepSpeed from the outside: the student is a ZeRO-3 engine with
an optimizer; the teacher is partitioned by ZeRO-3 too (its fp32 partitions, or an fp32 copy of its bf16 ones, are
the EMA state) and gathered for its forward by pipeline.gather, without an engine.
"""

from __future__ import annotations

import json
import logging
import math
import signal
from pathlib import Path

import torch

from pipeline import checkpoint
from pipeline.data import STREAM_KEY, make_loader, stream_count, to_device
from pipeline.distributed import (LaggedRead, Runtime, agree_over_tp, all_reduce_mean, all_reduce_sum, build_sharded,
                                  mark_gathered_whole, model_parallel_config, student_ds_config, teacher_ds_config)
from pipeline.consistency import check_due
from pipeline.ema import ShardedEMA, shared_encoder, tau_at
from pipeline.experiment import ExperimentConfig, experiment_dict
from pipeline.gather import GatheredForward
from pipeline.metrics import MetricsLogger, step_summary, summary_values
from pipeline.model.data2vec import Backbone, teacher_parameter_name
from pipeline.model.transformer import layerdrop_choice
from pipeline.monitor import FeatureMonitor
from pipeline.nonfinite import NonFiniteError, nonfinite_step, weights_finite
from pipeline.objective import (class_targets, collapse_alarm, mask_stats, moment_stats, position_share, position_stats,
                                projection, regression_loss, std_from_stats, teacher_targets)
from pipeline.vocab import checkpoint_files

log = logging.getLogger("pipeline")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
EARLY_SIGNALS: set[int] = set()  # stop signals that arrived before the trainer was built


def catch_early_signals() -> None:
    """From a rank's start: remember SIGTERM/SIGUSR2 until the trainer installs its handlers (it then stops, with
    a checkpoint, at its first step) instead of dying mid start-up while its peers wait in a collective."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, _frame: EARLY_SIGNALS.add(signum))

# train.decay_exempt -> the parameters AdamW's weight decay leaves alone
EXEMPT_SUFFIXES = {"beit": (".bias", "cls_token"),  # + every 1-D parameter (BEiT optim_factory.get_parameter_groups)
                   "1d": ("bias", "cls_token", "mask_token", "rel_pos_bias.table"),  # + every 1-D parameter
                   "bias": (".bias",)}  # + every 1-D parameter (fairseq data2vec2.py)


class CollapseError(RuntimeError):
    pass


def full_shape(p: torch.nn.Parameter) -> torch.Size:
    return getattr(p, "ds_shape", p.shape)  # ZeRO-3 parameters are empty outside a gather


def shares_local_encoder(modality, ema: ShardedEMA) -> bool:
    """Whether the teacher can take the student's local-encoder output: the modality has one to share and every
    teacher parameter of it is copied from the student each step (ema.copy), so both hold the same weights."""
    return bool(shared_encoder(ema.names, modality.shared_prefixes, ema.cfg))


def decay_rule(cfg: ExperimentConfig) -> str:
    """train.decay_exempt with 'reference' resolved to the released recipe (the method's, for the modality)."""
    rule = cfg.train.decay_exempt
    return cfg.make_method().decay_exempt() if rule == "reference" else rule


def decays(name: str, ndim: int, rule: str) -> bool:
    """Whether AdamW decays a parameter under ``rule`` ('none': every parameter decays, as fairseq v1)."""
    if rule == "none":
        return True
    return not (ndim <= 1 or name.endswith(EXEMPT_SUFFIXES[rule]))


def param_groups(model: torch.nn.Module, weight_decay: float, rule: str) -> list[dict]:
    """AdamW groups: decayed, and exempt under ``rule`` (see ``decays``); an empty group is left out (DeepSpeed
    drops it from the optimizer, and the LR scheduler, built on the optimizer before, would then hold one rate
    more than there are groups: torch >= 2.10 refuses that at the first step)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name, len(full_shape(p)), rule) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_lambda(cfg):
    """The learning rate at an optimizer step as a multiplier of train.lr: warmup then cosine decay to
    min_lr, warmup then constant, or fairseq's tri-stage (warmup from init_lr_scale, hold, exponential
    decay reaching min_lr at train.steps)."""
    floor = cfg.min_lr / cfg.lr
    if cfg.schedule == "tri_stage":
        return tri_stage(cfg.warmup_steps, cfg.hold_steps, cfg.steps - cfg.warmup_steps - cfg.hold_steps,
                         cfg.init_lr_scale, floor)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def tri_stage(warmup: int, hold: int, decay: int, init_scale: float, final_scale: float):
    def factor(step: int) -> float:
        if step < warmup:
            return init_scale + (1 - init_scale) * step / warmup
        if step < warmup + hold:
            return 1.0
        return math.exp(math.log(final_scale) * min(1.0, (step - warmup - hold) / decay))
    return factor


class Trainer:
    def __init__(self, cfg: ExperimentConfig, rt: Runtime, ds_base: dict, shards: list[str]):
        self.cfg, self.rt, self.shards = cfg, rt, shards
        self.modality = cfg.make_modality()
        self.method = cfg.make_method(self.modality)
        tcfg = cfg.train
        self.ds_student = student_ds_config(ds_base, tcfg.micro_batch_size, tcfg.grad_accum, rt.shard,
                                            rt.choice.dtype, tcfg.grad_clip, tcfg.grad_reduce, rt.replicas)
        self.ds_teacher = teacher_ds_config(self.ds_student, half=self.teacher_autocast())
        self.output = Path(tcfg.output_dir)
        self.ckpt_root = self.output / "checkpoints"
        self.step = 0  # optimizer steps done
        self.micro = 0  # micro-batch within the step
        # the data position: micro-batches taken, and raw samples consumed by each worker's stream
        self.batches_consumed, self.stream_positions = 0, [0] * stream_count(cfg.data)
        self.data_seed = tcfg.seed  # seeds the data streams; changes when a resume changes the data layout
        self.stop_requested = False
        self.nonfinite_run = 0  # steps in a row whose gradients were not finite (train.nonfinite=skip)
        self.own_checkpoints: set[str] = set()  # checkpoints of this trajectory: saved or resumed from by this run
        self.resumed_from: Path | None = None
        self.requeue_requested = False  # SIGUSR2: stop with a checkpoint and ask SLURM to requeue the job
        self.monitor = FeatureMonitor(cfg, rt)  # eval.every
        self.tokenizer_files = checkpoint_files(cfg)  # text: the shards' tokenizer, as each checkpoint records it
        self.build()

    # -- construction -------------------------------------------------------------------------
    def build(self) -> None:
        import deepspeed
        cfg, rt = self.cfg, self.rt
        mp = model_parallel_config(rt.tp)
        torch.manual_seed(cfg.train.seed)
        # dtypes come from the DeepSpeed configs: the student's bf16 section (on GPU), the teacher's fp32
        student = build_sharded(lambda: self.method.build_student(mp), self.ds_student, rt)
        student.backbone.encoder.recompute = cfg.train.activation_checkpointing
        teacher = build_sharded(lambda: Backbone(self.modality, cfg.encoder, mp), self.ds_teacher, rt)
        teacher.requires_grad_(False)
        mark_gathered_whole(student)
        t = cfg.train
        groups = param_groups(student, t.weight_decay, decay_rule(cfg))
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t))
        from deepspeed.utils import nvtx
        nvtx.enable_nvtx = t.nvtx  # read at each call of DeepSpeed's instrumented functions
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=student, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_student, mpu=rt.mpu)
        # the teacher's forward gathers its partitions without a DeepSpeed engine (it never trains: pipeline.gather)
        self.teacher = GatheredForward(teacher, rt.shard_group, rt.shard).eval()  # no dropout / drop-path
        student_params = {teacher_parameter_name(n): p for n, p in student.named_parameters()}
        self.ema = ShardedEMA(teacher, student_params, cfg.ema)
        self.ema.copy_student()
        self.share_features = shares_local_encoder(self.modality, self.ema)
        self.basis = projection(cfg.encoder.dim, rt.device)  # for the content-collapse statistic
        self.seed_dropout(cfg.train.seed)

    def seed_dropout(self, seed: int) -> None:
        # Initialisation drew the same numbers on every rank (megatron slices a full CPU-initialised weight
        # per tensor-parallel rank). From here on dropout differs between data-parallel ranks and agrees
        # between tensor-parallel peers, whose draws have equal shapes and so stay in step.
        torch.manual_seed(seed + 1000003 * (self.rt.dp_rank + 1))

    # -- the data2vec step --------------------------------------------------------------------
    @torch.no_grad()
    def teacher_targets(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Teacher (bf16 weights and autocast on GPU, fp32 where train.teacher_precision says so; its EMA state is
        fp32 either way) on the unmasked input -> (B, T, D) fp32 targets."""
        autocast = self.teacher_autocast()
        if self.rt.choice.autocast and not autocast:  # fp32 compute: the batch's floating inputs came in bf16
            inputs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
        with torch.autocast(self.rt.choice.device_type, dtype=self.rt.choice.dtype, enabled=autocast):
            taps = self.teacher(inputs, keep=self.cfg.objective.top_k)  # only the K layers the targets use
        return teacher_targets(taps, self.cfg.objective)

    def teacher_autocast(self) -> bool:
        """Whether the teacher computes under the student's autocast (train.teacher_precision, 'reference':
        the release's, by method and modality)."""
        rule = self.cfg.train.teacher_precision
        rule = self.method.teacher_precision() if rule == "reference" else rule
        return self.rt.choice.autocast and rule == "autocast"

    def student_forward(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor, index: torch.Tensor):
        """-> Predictions: (N, D) at the scored positions (and the CLS outputs, for objective.cls_loss)."""
        return self.method.predict(self.engine, inputs, mask, self.layers_to_drop(), index)

    def layers_to_drop(self) -> tuple[int, ...]:
        """Layerdrop: the same blocks on every rank, drawn from (seed, step, micro-batch) so a resumed
        run draws what an uninterrupted one would."""
        seed = self.cfg.train.seed * 1000003 + self.step * self.cfg.train.grad_accum + self.micro
        return layerdrop_choice(self.cfg.encoder.layerdrop, self.cfg.encoder.depth, seed)

    def on_host(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Work on the CPU batch before it goes to the device, so that nothing in the step waits for the device:
        the modality's own (text: where the padding is), then the method's (the scored positions as flat indices
        into the student's and the teacher's rows; data2vec 2.0: each clone's visible positions)."""
        return self.method.on_host(self.modality.on_host(batch))

    def micro_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """Targets, predictions, loss, backward. -> (the micro-batch's SUMMARY on the device, all ranks agreeing on
        it; whether collapse.action=skip skipped it). Nothing here waits for the device (tests/test_host_syncs.py)
        except the alarm check of collapse.action=skip, whose update depends on it."""
        if self.micro == 0 and self.cfg.encoder.layerdrop > 0:
            self.clear_gradients()
        batch = to_device(self.on_host(batch), self.rt.device, self.rt.choice.dtype)
        mask, index, target_index = batch.pop("mask"), batch.pop("masked_index"), batch.pop("target_index")
        student_batch, teacher_batch = self.shared_inputs(batch)
        all_targets = self.teacher_targets(teacher_batch)  # (B, T, D)
        targets = all_targets.flatten(0, 1).index_select(0, target_index)  # (N, D)
        predictions = self.student_forward(student_batch, mask, index)
        loss_sums = self.loss_sums(predictions, targets, all_targets)  # [regression, CLS]
        # one all-reduce over data-parallel ranks: loss sums, target and prediction moments, the targets' per-position
        # statistics (content collapse), the batch's samples and positions (they vary per rank with
        # data.max_tokens), stop and requeue flags
        samples = mask.shape[0] // self.modality.clones
        counts = torch.tensor([samples, samples * mask.shape[1], self.stop_requested, self.requeue_requested],
                              dtype=torch.float32).to(targets.device, non_blocking=True)
        valid = self.modality.valid_positions(batch)
        parts = [loss_sums.detach().float(), moment_stats(targets), moment_stats(predictions.masked),
                 position_stats(all_targets, self.basis, valid), mask_stats(mask, valid), counts]
        stats = torch.cat(parts)
        all_reduce_sum(stats, self.rt.dp_group)
        stats = agree_over_tp(stats, self.rt)  # every decision below the same on every rank
        loss, target_stats, prediction_stats, position, masked, extra = stats.split([p.numel() for p in parts])
        flags = extra[2:]
        # the loss: regression over the global masked count (a batch may, rarely for text, select no position at
        # all) + objective.cls_loss x the CLS loss over the global batch's clone rows
        weights = torch.stack([1.0 / target_stats[0].clamp_min(1.0),
                               self.cfg.objective.cls_loss / (extra[0] * self.modality.clones)])
        summary = torch.stack([(loss * weights).sum(), std_from_stats(target_stats), std_from_stats(prediction_stats),
                               position_share(position), masked[0] / masked[1].clamp_min(1.0), extra[0], extra[1],
                               flags[0], flags[1]])
        skip_rule = self.cfg.collapse.action == "skip" and self.step >= self.cfg.collapse.after_steps
        if skip_rule and self.collapse_check(self.step, summary.tolist()):
            return summary, True
        # DeepSpeed averages gradients over the data-parallel ranks: scale by dp to get the global loss's gradient
        self.engine.backward((loss_sums * weights).sum() * self.rt.dp)
        return summary, False

    def loss_sums(self, predictions, targets: torch.Tensor, all_targets: torch.Tensor) -> torch.Tensor:
        """[regression loss summed over the scored positions, CLS loss summed over the clone rows (0 without)]."""
        obj = self.cfg.objective
        regression = regression_loss(predictions.masked, targets, obj)
        if predictions.cls is None or obj.cls_loss == 0:
            return torch.stack([regression, regression.new_zeros(())])
        return torch.stack([regression,
                            regression_loss(predictions.cls, class_targets(all_targets, self.modality.clones), obj)])

    def shared_inputs(self, batch: dict) -> tuple[dict, dict]:
        """(student batch, teacher batch). With a shared local encoder (speech: fairseq computes the conv features
        once and gives the teacher a copy), the student's runs once and the teacher takes its detached output."""
        if not self.share_features:
            return batch, batch
        features = self.engine.module.backbone.embed.features(batch)
        return {**batch, "features": features}, {**batch, "features": features.detach()}

    def collapse_check(self, step: int, summary: list[float]) -> bool:
        """Whether a step's summary raises the collapse alarm (then handled by collapse.action)."""
        values = summary_values(summary)
        alarm = collapse_alarm(step, values["target_std"], values["prediction_std"], self.cfg.collapse,
                               values["position_share"])
        if alarm:
            self.handle_collapse(alarm, step)
        return bool(alarm)

    def clear_gradients(self) -> None:
        """ZeRO-3 overwrites a parameter's gradient partition at the first micro-step of an optimizer step
        and adds to it later, but only for parameters that received a gradient: a block that layerdrop
        skips (or a parameter only skipped blocks use, like vision's shared relative position bias)
        keeps the previous step's gradient. Zero every partition before the step starts."""
        from deepspeed.utils import safe_set_local_grad
        params = list(self.engine.module.parameters())
        zeros = torch.zeros(max(p.ds_tensor.numel() for p in params), device=params[0].ds_tensor.device)
        for p in params:
            safe_set_local_grad(p, zeros[:p.ds_tensor.numel()])

    def handle_collapse(self, alarm: str, step: int) -> None:
        action = self.cfg.collapse.action
        log.warning("step %d: representation collapse alarm: %s (collapse.action=%s)", step, alarm, action)
        if action == "stop":
            raise CollapseError(alarm)

    def optimizer_step(self) -> dict:
        """grad_accum micro-steps, one optimizer step, then the EMA update of the teacher partitions.
        -> {"summary": the step's SUMMARY (device), "lr", "tau", "skipped"}."""
        summaries, skipped = [], False
        lr = self.scheduler.get_last_lr()[0]  # what this step uses; the engine's step advances the schedule
        tau = tau_at(self.step + 1, self.cfg.ema)  # the EMA after update n (from 1) decays by tau(n), as fairseq
        for self.micro in range(self.cfg.train.grad_accum):
            batch = next(self.batches)
            self.batches_consumed += 1
            if STREAM_KEY in batch:
                stream, position = batch.pop(STREAM_KEY).tolist()
                self.stream_positions[stream] = position
            summary, skipped = self.micro_step(batch)
            summaries.append(summary)
            if not skipped:
                if self.micro == self.cfg.train.grad_accum - 1:
                    self.reduce_over_replicas()
                self.engine.step()
        # DeepSpeed skipped its update when the gradient norm was not finite (its own host read of the norm, the
        # same on every rank: the norm is reduced over all of them); the step then does not count
        nonfinite = not skipped and bool(getattr(self.engine.optimizer, "overflow", False))
        if not skipped and not nonfinite:
            self.ema.update(tau)
            self.step += 1
        return {"summary": step_summary(summaries), "lr": lr, "tau": tau, "skipped": skipped or nonfinite,
                "nonfinite": nonfinite}

    def reduce_over_replicas(self) -> None:
        """Hybrid sharding (parallel.shard): DeepSpeed reduced the gradients over the shard group into this rank's
        partitions; average them over the replicas holding the same partitions (train.grad_reduce's dtype), so
        that every replica takes the same optimizer step, with the gradient of the whole global batch."""
        if self.rt.replica_group is not None:
            all_reduce_mean(self.engine.optimizer.grad_partitions_flat_buffer, self.rt.replica_group,
                            fp32=self.cfg.train.grad_reduce == "fp32")

    # -- the loop -----------------------------------------------------------------------------
    def train_step(self, logger: MetricsLogger, lagged: "LaggedRead") -> tuple[dict, bool, bool]:
        """One optimizer step as the loop runs it between log steps: the step, the previous step's summary read
        (stop / requeue flags, collapse alarm), this one's recorded. Waits for the device nowhere."""
        metrics = self.optimizer_step()
        if metrics["nonfinite"]:
            self.nonfinite_run = nonfinite_step(self.cfg.train, self.step, self.nonfinite_run + 1,
                                                self.rt.is_main)
        stop, requeue = self.read_previous(lagged, metrics)
        if not metrics["skipped"]:
            logger.record(metrics["summary"], metrics["lr"], metrics["tau"])
        return metrics, stop, requeue

    def read_previous(self, lagged: "LaggedRead", metrics: dict) -> tuple[bool, bool]:
        """The previous step's summary, now on the host: its stop / requeue flags (every rank reads the same
        all-reduced values, so all stop at the same step, one step after the signal was agreed on) and, unless
        collapse.action=skip checked it already, its collapse alarm."""
        step = self.step if metrics["skipped"] else self.step - 1  # the step this summary belongs to (from 0)
        seen = lagged.exchange(metrics["summary"], (step, metrics["skipped"]))
        if seen is None:
            return False, False
        (seen_step, was_skipped), summary = seen
        values = summary_values(summary)
        if not was_skipped and not math.isfinite(values["loss"]):  # all-reduced: every rank raises together
            raise NonFiniteError(f"step {seen_step + 1}: the loss is {values['loss']} while its gradients were finite "
                                 f"and applied")
        if self.cfg.collapse.action != "skip":
            self.collapse_check(seen_step, summary)
        return values["stop"] > 0, values["requeue"] > 0

    def batch_flops(self, samples: float, positions: float) -> float:
        """Model FLOPs of a step of ``samples`` samples holding ``positions`` positions in all (data.max_tokens
        batches vary in clips and length): FLOPs per sample at the step's mean length."""
        return samples * self.flops_per_sample(round(positions / max(samples, 1.0)))

    def flops_per_sample(self, tokens: int | None = None) -> float:
        """Model FLOPs of the full training step per sample of ``tokens`` positions (default: the modality's
        nominal length): the method's teacher forward, student forward + backward and decoder (if any)."""
        return sum(self.method.flops_per_sample(tokens or self.modality.tokens_per_sample(),
                                                self.share_features).values())

    def resume(self, path: Path | None) -> bool:
        """Load ``path`` or the latest complete checkpoint of this run; False when there is none."""
        latest = path if path is not None else checkpoint.find_latest(self.ckpt_root)
        if latest is None:
            return False
        # on damage (train.resume_damaged=previous) the complete checkpoints before it, newest first
        candidates = [latest] + [c for c in checkpoint.complete_checkpoints(self.ckpt_root) if c.name < latest.name]
        for ckpt in candidates:
            try:
                state = checkpoint.load(self, ckpt)
                break
            except checkpoint.DamagedCheckpoint as exc:  # raised on every rank together, before any state is set
                if path is not None or self.cfg.train.resume_damaged != "previous" or ckpt == candidates[-1]:
                    raise
                if self.rt.is_main:
                    log.warning("%s; train.resume_damaged=previous: set aside as %s, trying the previous complete "
                                "checkpoint", exc, checkpoint.set_aside(ckpt).name)
                self.barrier()
        self.step = state["step"]
        self.claim_trajectory(ckpt)
        t = self.cfg.train
        self.engine.global_steps, self.engine.micro_steps = self.step, self.step * t.grad_accum
        self.engine.global_samples = self.step * t.micro_batch_size * t.grad_accum * self.rt.dp
        saved_streams = state.get("stream_positions", [])
        same_streams = len(saved_streams) == len(self.stream_positions)
        if state["saved_dp"] == self.rt.dp and same_streams:
            self.batches_consumed, self.stream_positions = state["batches_consumed"], saved_streams
            self.data_seed = state["data_seed"]
            if self.rt.is_main:
                log.info("resumed from %s at step %d", ckpt, self.step)
            return True
        # A new data-parallel size or worker count: weights, optimizer moments, teacher and LR schedule
        # carry over exactly; the data streams cannot, so they restart from a seed tied to the step.
        self.data_seed = t.seed + 7919 * self.step
        if state["saved_dp"] != self.rt.dp:  # dropout: the RNG states saved were per data-parallel rank
            self.seed_dropout(self.data_seed)
        if self.rt.is_main:
            log.warning("resumed from %s at step %d onto a different data layout (data-parallel size %d -> %d, "
                        "data.workers streams %d -> %d): model, optimizer and teacher state are exact; the data "
                        "order restarts from a new shuffle seeded by the step", ckpt, self.step, state["saved_dp"],
                        self.rt.dp, len(saved_streams), len(self.stream_positions))
        return True

    def claim_trajectory(self, ckpt: Path) -> None:
        """After resuming from ``ckpt``: it is this run's, and the checkpoints of this run's directory past its step
        (a rollback: --resume from an older one) belong to the trajectory left behind; set aside as
        superseded_step_N, never resumed from again nor taken for this run's saves."""
        self.resumed_from = ckpt
        if ckpt.parent.resolve() == self.ckpt_root.resolve():
            self.own_checkpoints.add(ckpt.name)
        if self.rt.is_main:
            moved = checkpoint.supersede_newer(self.ckpt_root, self.step)
            if moved:
                log.warning("resumed from step %d, an older checkpoint than this run's newest: the newer ones belong "
                            "to the trajectory left behind and are set aside as %s", self.step,
                            ", ".join(p.name for p in moved))
        self.barrier()

    def warm_start(self) -> None:
        """A new run from init.from's weights (student, and the teacher as its copy)."""
        from pipeline.warm_start import warm_start
        kept = warm_start(self)
        if self.rt.is_main:
            log.info("started from init.from=%s%s", self.cfg.init.from_,
                     f"; kept their own initialisation: {', '.join(kept)}" if kept else "")

    def load_eval_inputs(self) -> None:
        """Read eval.train / eval.eval now (when eval.every is set), so that a problem shows before training."""
        if self.cfg.eval.every:
            self.monitor.load()

    def barrier(self) -> None:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()

    def position(self) -> dict:
        """Where training stands, as saved in a checkpoint."""
        return {"step": self.step, "batches_consumed": self.batches_consumed, "data_seed": self.data_seed,
                "stream_positions": list(self.stream_positions)}

    def save(self) -> Path:
        if not weights_finite(self):
            raise NonFiniteError(f"step {self.step}: a student or teacher weight is not finite; not saved, so the "
                                 f"checkpoints before it stay")
        files = {"config.json": json.dumps(experiment_dict(self.cfg), indent=1).encode(), **self.tokenizer_files}
        path, written = checkpoint.save(self, self.ckpt_root, self.cfg.train.keep_checkpoints, files,
                                        self.own_checkpoints)
        self.own_checkpoints.add(path.name)
        if self.rt.is_main:
            log.info("checkpoint saved: %s" if written else "checkpoint %s already holds this state (this run resumed "
                     "from it or saved it)", path)
        return path

    def install_signal_handlers(self) -> None:
        def request_stop(signum, _frame):
            # Agreed on by all ranks through the next step's all-reduce. SIGUSR2 is what the SLURM scripts
            # ask for before the time limit (--signal=USR2@T): stop and requeue. SIGTERM (scancel, node
            # shutdown, scheduler preemption, which requeues by itself if configured to) only stops.
            self.stop_requested = True
            self.requeue_requested |= signum == signal.SIGUSR2
        for sig in STOP_SIGNALS:
            signal.signal(sig, request_stop)
        for signum in sorted(EARLY_SIGNALS):  # caught during start-up, before this trainer existed
            request_stop(signum, None)

    def train(self) -> str:
        """Run to train.steps. Returns 'done', 'stopped' (train.stop_after), or after a signal, with a
        checkpoint at a step all ranks agreed on: 'requeue' (SIGUSR2) or 'preempted' (SIGTERM)."""
        t = self.cfg.train
        self.install_signal_handlers()  # takes over the signals train.main caught during start-up
        loader = make_loader(self.shards, self.modality, self.cfg.data, t.micro_batch_size, self.data_seed,
                             self.rt.dp_rank, self.rt.dp, self.batches_consumed, self.stream_positions,
                             pin_memory=self.rt.device.type != "cpu")
        self.batches = iter(loader)
        logger = MetricsLogger(self.output, self.rt.is_main, start_step=self.step, flops=self.batch_flops,
                               devices=self.rt.world_size)
        lagged = LaggedRead(self.rt.device)  # each step's summary reaches the host one step later, without a wait
        status = "done"
        last = min(t.steps, t.stop_after) if t.stop_after else t.steps
        skips, self.nonfinite_run = 0, 0
        try:
            check_due(self, start=True)
            while self.step < last:
                metrics, stop, requeue = self.train_step(logger, lagged)
                if not metrics["skipped"]:
                    check_due(self)  # before anything of this step is saved
                skips = skips + 1 if metrics["skipped"] and not metrics["nonfinite"] else 0
                self.nonfinite_run = self.nonfinite_run if metrics["nonfinite"] else 0
                if skips >= self.cfg.collapse.max_skips:
                    raise CollapseError(f"{skips} consecutive steps skipped (collapse.max_skips)")
                if not metrics["skipped"]:
                    evaluate = self.monitor.due(self.step, t.steps) and not stop
                    if evaluate:
                        figures = self.monitor.run(self)
                        logger.add(figures, figures["eval/seconds"])
                    if self.step % t.log_every == 0 or self.step == last or evaluate:
                        logger.flush(self.step, t.steps)
                if stop:
                    self.save()
                    status = "requeue" if requeue else "preempted"
                    break
                if not metrics["skipped"] and t.save_every and self.step % t.save_every == 0 and self.step < last:
                    self.save()
            else:
                self.save()
                status = "done" if self.step >= t.steps else "stopped"
        except CollapseError:
            self.save()  # every rank raises at the same step: the statistics were all-reduced
            raise
        finally:
            logger.close()
            self.batches = None  # stop the DataLoader workers now, not when SLURM ends the job (requeue)
        return status
