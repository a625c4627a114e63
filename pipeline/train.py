"""Entry point: ``python -m pipeline.train --config configs/<preset>.yaml [key.sub=value ...]``.

Run it under ``torchrun --nproc_per_node N`` (or ``srun``) for several ranks; a plain ``python -m``
runs one rank. The config, the DeepSpeed JSON, the parallel layout and the shard list are all checked
before any process group starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.monitor import check_inputs
from pipeline.vocab import check_run
from pipeline.warm_start import check_source


def parse_args(argv=None) -> argparse.Namespace:
    from pipeline.experiment import config_help
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.train", description="Pretrain a data2vec model with DeepSpeed ZeRO-3.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=config_help())
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/vision_tiny.yaml")
    parser.add_argument("--resume", default=None,
                        help="checkpoint directory to resume from (default: the latest complete one in "
                             "<train.output_dir>/checkpoints, if any)")
    parser.add_argument("--no-resume", action="store_true",
                        help="start fresh; refused when <train.output_dir>/checkpoints already holds complete "
                             "checkpoints (two runs would mix there: use a new train.output_dir)")
    parser.add_argument("overrides", nargs="*", help="config overrides such as train.lr=3e-4 data.workers=4")
    return parser.parse_args(argv)


def prepare(args):
    """Everything that can be checked without a process group: config, layout, DeepSpeed JSON, shards."""
    from pipeline.data import check_host_memory, check_shard_count, check_shared_memory, resolve_shards
    from pipeline.distributed import (check_layout, choose_device, launch_env, load_ds_config, shard_size,
                                      student_ds_config)
    from pipeline.experiment import load_experiment

    cfg = load_experiment(args.config, args.overrides)
    env = launch_env()
    dp = check_layout(env.world_size, cfg.parallel.tp)
    choice = choose_device(cfg.train.precision)
    ds_base = load_ds_config(cfg.train.ds_config)
    shard = shard_size(dp, cfg.parallel.shard)
    student_ds_config(ds_base, cfg.train.micro_batch_size, cfg.train.grad_accum, shard, choice.dtype,
                      cfg.train.grad_clip, cfg.train.grad_reduce, dp // shard)
    modality = cfg.make_modality()
    shards = resolve_shards(cfg.data.manifest, modality)
    check_shard_count(len(shards), dp, cfg.data.workers)
    clips = cfg.train.micro_batch_size
    if cfg.data.max_tokens:  # a bucketed batch holds at most max_tokens samples: as many full-length clips
        clips = -(-cfg.data.max_tokens // cfg.model.max_samples)
    check_shared_memory(cfg.data, modality.sample_bytes(), clips, env.local_world_size)
    check_host_memory(cfg.data, modality.sample_bytes(), clips, env.local_world_size)
    ckpt = check_resumable(args, cfg)
    check_source(cfg)
    check_inputs(cfg)
    try:
        check_run(cfg, ckpt)  # text: every model and input meets the shards' tokenizer
    except (ValueError, OSError) as exc:
        raise ConfigError(str(exc)) from None
    return cfg, choice, ds_base, shards, env


def check_resumable(args, cfg) -> Path | None:
    """The checkpoint this run would resume from (None: none) exists, is complete and has this run's TP size."""
    from pipeline import checkpoint
    if args.resume and not Path(args.resume).is_dir():
        raise ConfigError(f"--resume {args.resume}: no such checkpoint directory")
    root = Path(cfg.train.output_dir) / "checkpoints"
    if getattr(args, "no_resume", False):
        existing = checkpoint.find_latest(root)
        if existing is not None:
            raise ConfigError(f"--no-resume: {root} already holds checkpoints of another run (latest {existing.name}); "
                              f"a fresh run there would mix with them. Use a new train.output_dir, or move them away")
        return None
    ckpt = Path(args.resume) if args.resume else checkpoint.find_latest(root)
    if ckpt is not None:
        try:
            checkpoint.read_marker(ckpt, cfg.parallel.tp)
        except checkpoint.DamagedCheckpoint as exc:
            if args.resume or cfg.train.resume_damaged != "previous":  # else the trainer falls back
                raise ConfigError(str(exc)) from None
        except (checkpoint.CheckpointError, OSError, ValueError, KeyError) as exc:
            raise ConfigError(str(exc)) from None
    return ckpt


def main(argv=None) -> int:
    launcher = os.getppid()  # torchrun's agent for a torchrun rank (it may be PID 1 in a container)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    log = logging.getLogger("pipeline")
    try:
        cfg, choice, ds_base, shards, env = prepare(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    lock = None  # the output directory's lock: its descriptor stays open until this process ends
    if env.rank == 0:  # one run per output directory (the launcher ends the other ranks if this one refuses)
        from pipeline.run_lock import OutputDirInUse, claim
        try:
            lock, warning = claim(cfg.train.output_dir)
        except OutputDirInUse as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"error: train.output_dir={cfg.train.output_dir} cannot be written ({exc.strerror}): choose a "
                  f"writable directory", file=sys.stderr)
            return 2
        if warning:
            log.warning("%s", warning)
    from pipeline import distributed, heartbeat
    from pipeline.consistency import ConsistencyError
    from pipeline.experiment import experiment_dict
    from pipeline.trainer import CollapseError, NonFiniteError, Trainer, catch_early_signals

    catch_early_signals()  # from here a rank's peers would wait for it in collectives
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # a torchrun rank: its parent is the launcher's agent
        from pipeline.data import die_with_parent
        die_with_parent(signal.SIGTERM, launcher, orphan_exit=1)  # the agent killed: stop with a checkpoint
    rt = distributed.init_runtime(cfg.parallel.tp, choice, cfg.parallel.timeout_s, cfg.parallel.shard)
    timeout = cfg.parallel.timeout_s
    beat = heartbeat.start(rt.rank, rt.world_size, timeout, lambda why: silent_peer(rt, why, timeout))
    try:
        if rt.is_main:
            log.info("layout: %s", " ".join(f"{k}={v}" for k, v in parallel_layout(cfg, rt).items()))
            log.info("config: %s", distributed_summary(cfg, rt, experiment_dict))
        trainer = Trainer(cfg, rt, ds_base, shards)
        try:
            start(trainer, args, cfg, rt, log)
        except StartError as exc:  # every rank reads the same files and stops here together
            if rt.is_main:
                log.error("%s", exc)
            return 2
        status = trainer.train()
        if rt.is_main:
            log.info("%s at step %d; checkpoints in %s", status, trainer.step, trainer.ckpt_root)
    except ConsistencyError as exc:  # raised on every rank at the same step, with the same text
        if rt.is_main:
            log.error("stopped: %s", exc)
        return 4
    except NonFiniteError as exc:  # every rank at the same step: the norm and the loss are reduced over all
        if rt.is_main:
            from pipeline.checkpoint import find_latest
            good = find_latest(trainer.ckpt_root) or trainer.resumed_from
            log.error("stopped: %s. %s with a lower train.lr or train.grad_clip, or check the data (train.nonfinite "
                      "in --help)", exc, f"The last checkpoint, {good}, precedes it: resume from it" if good else
                      "No checkpoint was written before it: start again")
        return 5
    except CollapseError as exc:
        if rt.is_main:
            log.error("stopped: representation collapse: %s; checkpoint in %s (see collapse.* in --help)",
                      exc, trainer.ckpt_root)
        return 3
    except Exception as exc:  # name the rank: the launcher (srun --kill-on-bad-exit, torchrun) ends the others
        log.exception("rank %d of %d failed: %r", rt.rank, rt.world_size, exc)
        fail_fast(1)
    finally:
        if beat is not None:
            beat.stop()
        distributed.shutdown()
    # SIGUSR2 (SLURM's warning before the time limit): the checkpoint is complete, the rest runs after a requeue
    if status == "requeue" and trainer.step < cfg.train.steps and rt.is_main:
        distributed.requeue_slurm_job()
    return 0


class StartError(RuntimeError):
    """A problem every rank finds alike while the trainer starts (the same files read): all stop with exit 2."""


def start(trainer, args, cfg, rt, log) -> None:
    """Resume (the default) or start from init.from, and read the eval.* inputs: before the first step."""
    from pipeline.checkpoint import CheckpointError
    resumed = False
    if not args.no_resume:
        try:
            resumed = trainer.resume(Path(args.resume) if args.resume else None)
        except CheckpointError as exc:
            raise StartError(f"cannot resume: {exc}") from exc
    if not resumed and cfg.init.from_:
        try:
            trainer.warm_start()
        except (ConfigError, KeyError) as exc:
            raise StartError(f"cannot start from init.from: {exc}") from exc
    elif resumed and cfg.init.from_ and rt.is_main:
        log.info("init.from=%s is not used: the run resumed from its own checkpoint", cfg.init.from_)
    try:
        trainer.load_eval_inputs()
    except (ValueError, OSError) as exc:
        raise StartError(f"cannot evaluate during training (eval.*): {exc}") from exc


def silent_peer(rt, why: str, timeout_s: int) -> None:
    """The heartbeat found a peer (or the rendezvous store) silent for half of parallel.timeout_s: say which, and
    end this rank now (the launcher ends the rest) rather than wait out the collectives' timeout."""
    logging.getLogger("pipeline").error("rank %d of %d: %s; ending the job (a peer silent for half of "
                                        "parallel.timeout_s=%d)", rt.rank, rt.world_size, why, timeout_s)
    fail_fast(1)


def fail_fast(code: int) -> None:
    """End this rank now. A normal exit would wait for what a failed rank cannot finish: collectives in
    flight (destroy_process_group can block on them) and DataLoader workers held alive by the traceback.
    The launcher sees the exit code at once and stops the other ranks; the workers die with this process
    (data.init_worker)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def parallel_layout(cfg, rt) -> dict:
    from pipeline.distributed import node_count
    t = cfg.train
    return {"nodes": node_count(rt.world_size), "ranks": rt.world_size, "tp": rt.tp, "dp": rt.dp,
            **({"shard": rt.shard, "replicas": rt.replicas} if rt.replicas > 1 else {}),
            "global_batch": t.micro_batch_size * t.grad_accum * rt.dp, "micro_batch": t.micro_batch_size,
            "grad_accum": t.grad_accum, "device": str(rt.device), "dtype": str(rt.choice.dtype).replace("torch.", ""),
            "backend": rt.choice.backend}


def distributed_summary(cfg, rt, experiment_dict) -> str:
    import json
    layout = {"world_size": rt.world_size, **parallel_layout(cfg, rt)}
    return json.dumps({"layout": layout, **experiment_dict(cfg)})


if __name__ == "__main__":
    sys.exit(main())
