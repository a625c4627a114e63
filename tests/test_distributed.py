"""Multi-rank behaviour on CPU gloo ranks: sharded EMA teacher, exact resume, the real entry point."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import CPU_MACHINES, ROOT, torchrun

pytestmark = pytest.mark.distributed


def run_ema_check(tmp_path, preset, shards, machine=None, precision="fp32") -> dict:
    report = tmp_path / "ema.json"
    proc = torchrun([str(ROOT / "tests/dist/ema_check.py"), str(report), preset, str(shards), precision],
                    machine=machine)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(report.read_text())


@pytest.mark.parametrize("machine", sorted(CPU_MACHINES))
def test_sharded_ema_teacher_matches_dense_reference(tiny_shards, tmp_path, machine):
    """On a CPU with and without oneDNN fp16 (forced in every rank, whatever this machine is)."""
    r = run_ema_check(tmp_path, "configs/vision_tiny.yaml", tiny_shards, machine)
    assert r["dp"] == 2
    for name, part in r["partitions"].items():
        assert part["dtype"] == "torch.float32", name
        assert part["ceil"] <= part["numel"] < part["ceil"] + 64, (name, part)  # ceil(N/DP) + alignment padding
    assert sum(p["numel"] for p in r["partitions"].values()) < 0.6 * sum(p["full"] for p in r["partitions"].values())
    assert r["init_err"] == 0.0  # the teacher starts as an exact copy of the student
    assert r["teacher_moved"] > 1e-4  # the updates were applied...
    assert r["max_err"] < 1e-6  # ...and equal the dense EMA of the gathered student
    assert r["bad_recipe_changed"] == 0.0  # the broken recipe's edits vanish: our check above would catch it


def test_speech_two_rank_zero3_with_sharded_bf16_teacher(tiny_audio_shards, tmp_path):
    """Speech, student in bf16 as on a GPU: the conv feature encoder and positional conv are copied, the rest
    averaged, all shard-local. Its teacher computes under the student's autocast, so it gathers bf16 weights: its
    ZeRO-3 partitions are bf16 and hold exactly the rounding of the fp32 EMA state, which equals the dense EMA of
    the student's fp32 weights."""
    r = run_ema_check(tmp_path, "configs/speech_tiny.yaml", tiny_audio_shards, precision="bf16")
    assert r["dp"] == 2 and r["init_err"] == 0.0 and r["teacher_moved"] > 1e-4 and r["max_err"] < 1e-6
    assert r["published_err"] == 0.0
    assert any(n.startswith("embed.feature_extractor.") for n in r["copied"])
    assert any(n.startswith("embed.pos_conv.") for n in r["copied"])
    assert not any(n.startswith("encoder.") for n in r["copied"])
    for name, part in r["partitions"].items():
        assert part["dtype"] == "torch.bfloat16" and part["ceil"] <= part["numel"] < part["ceil"] + 64, name


def read_losses(run_dir, key="loss"):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec[key] for rec in map(json.loads, lines) if key in rec}


def monitored(tiny_shards, every=2, weights="student"):
    """eval.* overrides: the kNN monitor fitted on the labelled shards, scored on their raw class folders."""
    return [f"eval.every={every}", f"eval.train=[{tiny_shards}]", f"eval.eval=[{tiny_shards.parent / 'raw'}]",
            f"eval.weights={weights}", "eval.batch_size=5"]


def offline_knn(checkpoint, train, test, weights, extra=()) -> float:
    """pipeline.evaluate's kNN top-1 of a saved checkpoint, in a process of its own."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "pipeline.evaluate", str(checkpoint), "--train", str(train), "--eval",
                           str(test), "--probe", "knn", "--weights", weights, "--json", "--quiet", *extra],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])["knn_top1"]


@pytest.mark.parametrize("modality", ["speech", "text"])
def test_knn_monitor_for_speech_and_text(modality, tiny_audio_shards, tiny_text_shards, tmp_path):
    """Clips of many lengths (one forward pass each; every rank makes as many passes as its busiest peer) and
    padded token batches: the monitor's figure equals pipeline.evaluate's on the saved checkpoint."""
    if modality == "speech":
        shards = tiny_audio_shards
        train_set = test_set = shards.parent / "raw"  # speaker folders at 16, 22.05 and 44.1 kHz
        extra = []
    else:
        from test_evaluate import topic_jsonl
        shards = tiny_text_shards
        train_set, test_set = topic_jsonl(tmp_path / "train.jsonl", 20), topic_jsonl(tmp_path / "eval.jsonl", 9)
        extra = ["--label-field", "topic"]
    out = tmp_path / "run"
    proc = torchrun(["-m", "pipeline.train", "--config", f"configs/{modality}_tiny.yaml", f"data.manifest={shards}",
                     f"train.output_dir={out}", "train.steps=2", "train.micro_batch_size=4", "eval.every=2",
                     f"eval.train=[{train_set}]", f"eval.eval=[{test_set}]", "eval.label_field=topic",
                     "eval.batch_size=3", "eval.probe=both"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= record["eval/linear_top1"] <= 1
    assert record["eval/knn_top1"] == offline_knn(out / "checkpoints/step_00000002", train_set, test_set, "student",
                                                  extra)


def train(tiny_shards, out, steps, extra=(), nproc=2, config="configs/vision_tiny.yaml"):
    args = ["-m", "pipeline.train", "--config", config, f"data.manifest={tiny_shards}",
            f"train.output_dir={out}", f"train.steps={steps}", "train.log_every=1", "train.save_every=3",
            "train.micro_batch_size=4", "encoder.dropout=0.1", "encoder.drop_path=0.1", "data.workers=2",
            "train.warmup_steps=2", *extra]
    proc = torchrun(args, nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def test_stop_and_resume_is_bit_identical(tiny_shards, tmp_path):
    """With the kNN monitor on (eval.every): it logs in the step line and JSONL, changes nothing in training,
    and equals pipeline.evaluate on the same checkpoint."""
    full = tmp_path / "full"
    first = train(tiny_shards, full, 8, monitored(tiny_shards, every=3))
    line = next(ln for ln in first.stdout.splitlines() if "step 8/8 |" in ln)
    for field in ("loss", "lr", "tau", "target_std", "pred_std", "pos_share", "samples/s", "tokens/s", "TFLOP/s",
                  "eval/knn_top1"):
        assert field in line
    assert "checkpoint saved: " in first.stdout
    from pipeline.experiment import load_experiment
    peak = load_experiment(str(ROOT / "configs/vision_tiny.yaml"), []).train.lr
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records[:2]] == [peak / 2, peak]  # the lr each step used (2 warmup steps)
    knn = read_losses(full, "eval/knn_top1")
    assert sorted(knn) == [3, 6, 8]  # every 3 steps and at the last
    assert knn[8] == offline_knn(full / "checkpoints/step_00000008", tiny_shards, tiny_shards.parent / "raw", "student")
    split = tmp_path / "split"
    train(tiny_shards, split, 8, ["train.stop_after=3", *monitored(tiny_shards, every=3)])
    assert (split / "checkpoints/step_00000003/COMPLETE").is_file()
    proc = train(tiny_shards, split, 8, monitored(tiny_shards, every=3))  # resumes from the latest checkpoint
    assert "resumed from" in proc.stdout and "step_00000003" in proc.stdout
    a, b = read_losses(full), read_losses(split)
    assert sorted(a) == list(range(1, 9))
    for step in range(4, 9):
        assert float(a[step]).hex() == float(b[step]).hex(), (step, a[step], b[step])
    assert read_losses(split, "eval/knn_top1") == knn
    assert a[8] < a[1]  # it learns
    ckpts = sorted(p.name for p in (split / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000003", "step_00000006", "step_00000008"]
    assert (split / "checkpoints/latest").read_text() == "step_00000008"
    assert list((full / "tensorboard").glob("events.out.tfevents.*"))
    # the same checkpoint goes on with one rank: a different data-parallel size, through the real entry point
    proc = train(tiny_shards, split, 10, nproc=1)
    assert "onto a different data layout (data-parallel size 2 -> 1" in proc.stdout + proc.stderr
    assert sorted(read_losses(split))[-2:] == [9, 10]
    assert json.loads((split / "checkpoints/step_00000010/COMPLETE").read_text())["dp"] == 1
    # run again when already done: it resumes at step 10 and keeps that checkpoint as it is (no rewrite)
    files = {p.name: p.stat().st_mtime_ns for p in (split / "checkpoints/step_00000010").iterdir()}
    proc = train(tiny_shards, split, 10, nproc=1)
    assert "done at step 10" in proc.stdout + proc.stderr
    assert files == {p.name: p.stat().st_mtime_ns for p in (split / "checkpoints/step_00000010").iterdir()}


def run_layout(tmp_path, nproc: int, tp: int, extra=(), variants: list[dict] | None = None) -> list:
    """tests/dist/dp_equivalence.py on ``nproc`` ranks: (loss, gradient norm) per step; with ``variants`` one such
    list per variant, all trained by the same launch."""
    out = tmp_path / f"n{nproc}_tp{tp}.json"
    more = [f"--variants={json.dumps(variants)}"] if variants else []
    proc = torchrun([str(ROOT / "tests/dist/dp_equivalence.py"), str(out), str(tp), *extra, *more], nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_tp2_dp2_matches_tp1_dp4(tmp_path):
    """Tensor parallel x ZeRO-3: same global batch, same losses and gradient norms as pure data parallel; for
    data2vec v1 and data2vec 2.0 (4 clones per image, the decoder, the CLS loss; the masked slots' noise, like
    dropout, is drawn per data-parallel rank: off here). ZeRO++ hpZ (a second copy of the student's partitions
    over 2 ranks) changes nothing either, bit for bit."""
    variants = [{"config": "configs/vision_tiny.yaml"},
                {"config": "configs/vision_tiny_v2.yaml", "overrides": ["decoder.mask_noise_std=0"]}]
    hpz = json.loads((ROOT / "ds_configs/zero3.json").read_text())
    hpz["zero_optimization"]["zero_hpz_partition_size"] = 2
    (tmp_path / "hpz.json").write_text(json.dumps(hpz))
    a = run_layout(tmp_path, 4, tp=2, variants=variants)
    b = run_layout(tmp_path, 4, tp=1, variants=[*variants, {"overrides": [f"train.ds_config={tmp_path / 'hpz.json'}"]}])
    assert [len(x) for x in a] == [8, 8] and a[1][0] != a[1][-2] and a[0] != a[1]
    assert b[2] == b[0]
    for va, vb in zip(a, b):
        for x, y in zip(va, vb):
            assert math.isclose(x, y, rel_tol=1e-5), (va, vb)


def test_init_from_under_hybrid_sharding_starts_every_replica(single_process_group, tmp_path):
    """init.from with parallel.shard=1 on 2 ranks (2 replicas of one-rank partitions): each replica takes the slice of
    its place in the shard group, so every rank starts from the source's weights (before the fix, replica 1 from
    zeros: its student and teacher partitions had norm 0 and the losses differed by ~50% within 6 steps). The
    hybrid run equals plain ZeRO-3 from the same source, and the consistency check finds the replicas equal at the
    start and after every step."""
    from conftest import randomise
    from pipeline.distributed import model_parallel_config
    from pipeline.experiment import load_experiment
    from pipeline.model.data2vec import Student
    cfg = load_experiment(ROOT / "configs/vision_tiny.yaml")
    source = Student(cfg.make_modality(), cfg.encoder, model_parallel_config(1))
    randomise(source, seed=7, scale=0.05)
    torch.save({"student": {n: p.detach().clone() for n, p in source.named_parameters()}}, tmp_path / "source.pt")
    start = [f"init.from={tmp_path / 'source.pt'}", "train.check_consistency_every=1"]
    hybrid, plain = run_layout(tmp_path, 2, tp=1, extra=["--shard=1", "--steps=6", *start],
                               variants=[{}, {"plain": True}])
    assert len(hybrid) == 12 and hybrid[0] != hybrid[-2]
    for x, y in zip(hybrid, plain):
        assert math.isclose(x, y, rel_tol=1e-5), (hybrid, plain)


def test_consistency_check_finds_one_flipped_bit_and_tp_peers_agree(tmp_path):
    """TP 2 x DP 2 with 2 replicas (parallel.shard=1), dropout on: after optimizer steps checked at each, replicas'
    partitions and the TP-duplicated parameters are bit-identical. One flipped bit in any copy (student master,
    working or teacher partition on one replica; a duplicated parameter on one TP rank) stops every rank with the same
    line naming the parameter and the two ranks. And collapse.action=skip takes the same decision on TP peers whose
    targets differ (tests/dist/consistency_check.py)."""
    proc = torchrun([str(ROOT / "tests/dist/consistency_check.py"), str(tmp_path)], nproc=4)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    cases = reports[0]["cases"]
    assert len(cases) == 5 and all(r["cases"] == cases for r in reports)
    expected = {"replica master": ("ranks 0 and 2", "replicas", "student master"),
                "replica working": ("ranks 0 and 2", "replicas", "student working"),
                "replica teacher": ("ranks 1 and 3", "replicas", "teacher"),
                "tp master": ("ranks 0 and 1", "tensor-parallel peers", "student master"),
                "tp scaled master": ("ranks 0 and 1", "tensor-parallel peers", "student master")}
    for case, message in cases.items():
        kind, name = case.rsplit(" ", 1)
        assert message is not None, case
        assert all(part in message for part in (*expected[kind], name, "Stopped without saving")), (case, message)
    skipped = [r["skipped"] for r in reports]
    assert all(s == skipped[0] for s in skipped), skipped
    print(f"consistency check: {reports[0]['check_ms']:.1f} ms (vision_tiny, TP 2 x DP 2, 2 replicas)")


def test_activation_checkpointing_gives_the_same_steps(tmp_path):
    """train.activation_checkpointing under tensor parallelism and ZeRO-3, dropout, drop-path and attention dropout
    on: the backward recomputes each block from its input, replaying its dropout masks, so losses and gradient
    norms equal those of a run that keeps every activation."""
    extra = ["encoder.dropout=0.1", "encoder.drop_path=0.1", "encoder.attn_dropout=0.1"]
    kept, recomputed = run_layout(tmp_path, 2, tp=2, extra=extra, variants=[
        {}, {"overrides": ["train.activation_checkpointing=true"]}])
    assert len(kept) == 8 and kept[0] != kept[-2]
    for a, b in zip(kept, recomputed):
        assert math.isclose(a, b, rel_tol=1e-6), (kept, recomputed)


@pytest.mark.parametrize("tp, before, after", [(1, 2, 4), (2, 4, 2)], ids=["dp2-to-dp4", "tp2dp2-to-tp2dp1"])
def test_resume_onto_a_different_data_parallel_size(single_process_group, tmp_path, tp, before, after):
    """Same TP, new DP size: student weights, Adam moments, teacher and LR schedule carry over bit for bit,
    and on the same global batches training continues as if uninterrupted (only summation order differs; the
    global batch's masked counts differ per rank, so this also checks the global loss normaliser)."""
    from pipeline.export import consolidate, load_rank_files
    ckpts = tmp_path / "ckpts"
    schedule = ["train.schedule=cosine", "train.warmup_steps=2", "train.min_lr=0.0001"]
    full = run_layout(tmp_path, before, tp, ["--steps=6", f"--ckpt={ckpts}", "--save-at=3", *schedule])
    # at TP 1 the 4 ranks resume twice: as hybrid sharding (parallel.shard=2: 2 replicas of 2-rank partitions,
    # whose checkpoint the DP 1 run below resumes from) and as plain ZeRO-3 over all 4
    hybrid = tp == 1
    resume = ["--steps=6", f"--ckpt={ckpts}", "--resume", *schedule]
    if hybrid:
        runs = run_layout(tmp_path, after, tp, [*resume, "--shard=2"], variants=[{}, {"plain": True}])
    else:
        runs = [run_layout(tmp_path, after, tp, resume)]
    resumed = runs[0]
    assert len(full) == 12 and len(resumed) == 6  # (loss, gradient norm) per step
    for run in runs:
        for x, y in zip(full[6:], run):
            assert math.isclose(x, y, rel_tol=1e-5), (full[6:], run)
    assert full[0] != full[-2]
    saved, resaved = (load_rank_files(ckpts / d / "step_00000003") for d in (".", "resaved"))
    assert {g["grid"]["dp"] for g in saved.values()} == {before // tp}
    assert {g["grid"]["dp"] for g in resaved.values()} == {after // tp}
    for kind in ("student", "teacher", "exp_avg", "exp_avg_sq"):
        a, b = consolidate(saved, kind), consolidate(resaved, kind)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (kind, name)
        assert any(t.abs().sum() > 0 for t in a.values()), kind  # after 3 steps the moments are not zero
    # the planner's checkpoint size is what each rank's file holds in tensors
    from pipeline.experiment import load_experiment
    from pipeline.plan import checkpoint_bytes, plan
    cfg = load_experiment(str(ROOT / "configs/vision_tiny.yaml"), [f"parallel.tp={tp}"])
    planned = checkpoint_bytes(plan(cfg, before, tp, 8 * tp // before, 1, dtype="fp32"))
    for state in saved.values():
        held = sum(t.numel() * t.element_size() for part in state["partitions"].values() for t in part.values())
        assert held == planned, (held, planned)
    first, again = saved[(0, 0)], resaved[(0, 0)]
    assert first["scheduler"] == again["scheduler"] and first["scheduler"]["last_epoch"] == 3
    assert torch.equal(first["optimizer_scalars"]["step"], again["optimizer_scalars"]["step"])
    if hybrid:  # replica 1 (data-parallel ranks 2, 3) writes no partitions: replica 0's are the same
        assert json.loads((ckpts / "resaved/step_00000003/COMPLETE").read_text())["shard"] == 2
        assert [bool(resaved[(0, d)]["partitions"]) for d in range(4)] == [True, True, False, False]
        # and from that hybrid checkpoint onto one rank: the global masked-count normaliser + DeepSpeed's averaging
        # = the global loss
        alone = run_layout(tmp_path, 1, tp, ["--steps=6", f"--ckpt={ckpts / 'resaved'}", "--resume", *schedule])
        for x, y in zip(full[6:], alone):
            assert math.isclose(x, y, rel_tol=1e-5), (full[6:], alone)


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "activation-checkpointing"])
def test_layerdrop_under_zero3_gives_the_dense_gradient_and_keeps_prefetch(tmp_path, recompute):
    """2 ranks, 2 micro-batches per step, layerdrop 0.5: every gathered gradient equals plain PyTorch's on
    the whole global batch with the same skipped blocks, and a block skipped for a whole step gets zero
    (not ZeRO-3's leftover gradient of the previous step). The blocks change every micro-step, yet ZeRO-3 never
    drops its prefetch trace and gathers nothing again in the backward (before the fix: 2 invalidations and
    360,864 elements re-gathered in steps 3-4)."""
    report = tmp_path / "layerdrop.json"
    proc = torchrun([str(ROOT / "tests/dist/layerdrop_check.py"), str(report),
                     f"train.activation_checkpointing={str(recompute).lower()}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(report.read_text())
    steps = result["steps"]
    assert any(s["skipped_all_step"] for s in steps[1:])  # the case that needs the fix happened
    assert any(not s["skips"][0] or not s["skips"][1] for s in steps)  # and steps with all blocks
    assert len({tuple(map(tuple, s["skips"])) for s in steps}) == len(steps)  # different blocks every step
    for s in steps:
        assert s["max_rel_err"] < 1e-5, s
    assert result["invalidations"] == 0 and result["backward_gathered"] == 0, result


def test_text_two_rank_zero3_with_sharded_teacher(tiny_text_shards, tmp_path):
    """Text: embeddings copied, the transformer layers averaged, all shard-local."""
    r = run_ema_check(tmp_path, "configs/text_tiny.yaml", tiny_text_shards)
    assert r["dp"] == 2 and r["init_err"] == 0.0 and r["teacher_moved"] > 1e-4 and r["max_err"] < 1e-6
    assert sorted(r["copied"]) == ["embed.norm.bias", "embed.norm.weight", "embed.positions.weight",
                                   "embed.tokens.weight"]
    for name, part in r["partitions"].items():
        assert part["dtype"] == "torch.float32" and part["ceil"] <= part["numel"] < part["ceil"] + 64, name


def test_data2vec2_stop_and_resume_is_bit_identical(tiny_shards, tmp_path):
    """data2vec 2.0 on 2 ranks with the decoder's input dropout, the masked slots' noise, dropout and drop-path on:
    a run stopped at step 3 and resumed gives the uninterrupted run's losses bit for bit."""
    v2 = dict(config="configs/vision_tiny_v2.yaml")
    full, split = tmp_path / "full", tmp_path / "split"
    train(tiny_shards, full, 5, ["decoder.input_dropout=0.1"], **v2)
    train(tiny_shards, split, 5, ["decoder.input_dropout=0.1", "train.stop_after=3"], **v2)
    proc = train(tiny_shards, split, 5, ["decoder.input_dropout=0.1"], **v2)
    assert "resumed from" in proc.stdout
    a, b = read_losses(full), read_losses(split)
    assert a[4] != a[5]
    for step in (4, 5):
        assert float(a[step]).hex() == float(b[step]).hex(), (step, a[step], b[step])


def test_stop_and_resume_under_tp2_dp2_is_bit_identical(tiny_shards, tmp_path):
    """4 ranks, tensor parallel 2 x ZeRO-3 data parallel 2, dropout on: resume equals an uninterrupted run."""
    layout = ["parallel.tp=2", "data.workers=1", *monitored(tiny_shards, every=2, weights="teacher")]
    full, split = tmp_path / "full", tmp_path / "split"
    train(tiny_shards, full, 5, layout, nproc=4)
    train(tiny_shards, split, 5, [*layout, "train.stop_after=3"], nproc=4)
    proc = train(tiny_shards, split, 5, layout, nproc=4)
    assert "resumed from" in proc.stdout
    a, b = read_losses(full), read_losses(split)
    for step in (4, 5):
        assert float(a[step]).hex() == float(b[step]).hex(), (step, a[step], b[step])
    knn = read_losses(full, "eval/knn_top1")  # the teacher's features, split over 2 DP ranks of TP 2 pairs
    assert sorted(knn) == [2, 4, 5] and read_losses(split, "eval/knn_top1") == knn
    assert knn[5] == offline_knn(full / "checkpoints/step_00000005", tiny_shards, tiny_shards.parent / "raw", "teacher")
    marker = json.loads((split / "checkpoints/step_00000005/COMPLETE").read_text())
    assert (marker["tp"], marker["dp"], marker["world_size"]) == (2, 2, 4)


@pytest.mark.parametrize("action, message, saved", [
    ("stop", "representation collapse: target std", 4),
    ("skip", "representation collapse: 3 consecutive steps skipped (collapse.max_skips)", 2),
])
def test_collapse_action_stops_with_a_checkpoint(tiny_shards, tmp_path, action, message, saved):
    """An impossible threshold trips the monitor: 'stop' saves and exits 3 (the alarm of step index 2 is read one
    step late, after step index 3 is queued, without a host sync: checkpoint at step 4); 'skip' checks before the
    update, skips, then stops."""
    args = ["-m", "pipeline.train", "--config", "configs/vision_tiny.yaml", f"data.manifest={tiny_shards}",
            f"train.output_dir={tmp_path}", "train.steps=20", "train.micro_batch_size=4", "collapse.after_steps=2",
            "collapse.min_target_std=100", f"collapse.action={action}", "collapse.max_skips=3"]
    proc = torchrun(args)
    assert proc.returncode != 0
    assert message in proc.stdout, proc.stdout[-3000:]
    assert "collapse alarm" in proc.stdout
    assert "step 2: representation collapse alarm" in proc.stdout
    assert (tmp_path / f"checkpoints/step_{saved:08d}/COMPLETE").is_file()
