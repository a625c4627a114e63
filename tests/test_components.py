"""Small components checked against independent computations."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline import checkpoint
from pipeline.config import TrainConfig
from pipeline.ema import EMAConfig, ShardedEMA, tau_at
from pipeline.objective import (CollapseConfig, collapse_alarm, moment_stats, position_share, position_stats, projection,
                                std_from_stats)
from pipeline.trainer import lr_lambda


def test_std_from_all_reduced_moments_equals_torch_std():
    x = torch.randn(300, 16) * torch.linspace(0.1, 3, 16)
    parts = [x[:100], x[100:250], x[250:]]  # as if on three ranks
    stats = sum(moment_stats(p) for p in parts)
    want = torch.sqrt(x.double().var(0) + 1e-6).mean().item()
    assert abs(std_from_stats(stats) - want) < 1e-4


def test_collapse_alarm():
    cfg = CollapseConfig(min_target_std=0.1, min_prediction_std=0.01, after_steps=10, action="stop")
    assert collapse_alarm(5, 0.0, 0.0, cfg) is None  # too early
    assert "target std" in collapse_alarm(10, 0.05, 1.0, cfg)
    assert "prediction std" in collapse_alarm(11, 1.0, 0.001, cfg)
    assert collapse_alarm(12, 1.0, 1.0, cfg) is None


def anova_share(x, valid):
    """Omega squared of a one-way ANOVA, positions as groups, summed over every dimension (numpy, float64,
    no projection): the textbook estimate of the variance share position explains."""
    import numpy as np
    x, valid = np.asarray(x, dtype=np.float64), np.asarray(valid)
    rows = [(t, x[b, t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if valid[b, t]]
    data = np.stack([r for _, r in rows])
    grand = data.mean(0)
    groups = {}
    for t, r in rows:
        groups.setdefault(t, []).append(r)
    ss_total = ((data - grand) ** 2).sum()
    ss_between = sum(len(g) * ((np.mean(g, 0) - grand) ** 2).sum() for g in groups.values())
    ms_within = (ss_total - ss_between) / (len(rows) - len(groups))
    return (ss_between - (len(groups) - 1) * ms_within) / (ss_total + ms_within)


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0, 3.0, 30.0])
def test_position_share_matches_an_anova_of_the_full_targets(weight):
    """The content-collapse statistic: from per-rank partial sums over a random projection, it agrees with the
    textbook ANOVA on the whole batch in full width; padding is left out."""
    gen = torch.Generator().manual_seed(0)
    batch, length, dim = 12, 40, 256
    by_position = torch.randn(length, dim, generator=gen)
    x = weight * by_position + torch.randn(batch, length, dim, generator=gen)  # position explains w^2 / (w^2 + 1)
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[::3, 30:] = False  # padded tails
    x[~valid] = 5.0  # what padding would contribute if it were counted
    basis = projection(dim, "cpu")
    stats = sum(position_stats(x[i:i + 4], basis, valid[i:i + 4]) for i in (0, 4, 8))  # as if on three ranks
    share, want = position_share(stats), anova_share(x, valid)
    assert abs(want - weight ** 2 / (weight ** 2 + 1)) < 0.03
    assert abs(share - want) < 0.06, (share, want)
    alarm = collapse_alarm(1, 1.0, 1.0, CollapseConfig(after_steps=0), share)  # 0.95
    assert (alarm is not None) == (weight >= 30), alarm


def test_position_share_needs_two_rows_per_position():
    basis = projection(8, "cpu")
    assert torch.isnan(position_share(position_stats(torch.randn(1, 10, 8), basis)))
    assert collapse_alarm(1, 1.0, 1.0, CollapseConfig(after_steps=0), float("nan")) is None


def test_tau_anneals_linearly_then_stays():
    cfg = EMAConfig(tau0=0.999, tau_end=0.9999, anneal_steps=30000)
    assert tau_at(0, cfg) == 0.999
    assert abs(tau_at(15000, cfg) - (0.999 + 0.9999) / 2) < 1e-12
    assert tau_at(30000, cfg) == tau_at(10 ** 6, cfg) == 0.9999
    assert tau_at(5, EMAConfig(tau0=0.5, tau_end=0.9998, anneal_steps=0)) == 0.9998


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = TrainConfig(steps=110, lr=1e-3, min_lr=1e-5, warmup_steps=10)
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.01 + 0.99 * 0.5)  # half way through the cosine
    assert f(110) == pytest.approx(0.01)


def test_tri_stage_schedule_is_fairseqs():
    """3/90/7 over 1000 steps: linear warmup 0.01 -> 1, hold, exponential decay to min_lr/lr = 0.01."""
    cfg = TrainConfig(steps=1000, lr=5e-4, min_lr=5e-6, warmup_steps=30, hold_steps=900, schedule="tri_stage")
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.01) and f(15) == pytest.approx(0.505) and f(29) == pytest.approx(0.01 + 0.99 * 29 / 30)
    assert f(30) == f(500) == f(929) == 1.0
    assert f(965) == pytest.approx(0.1)  # half way through the decay: sqrt(0.01)
    assert f(1000) == pytest.approx(0.01) and f(2000) == pytest.approx(0.01)


@pytest.mark.parametrize("overrides, message", [
    ({"min_lr": 0.0}, "decays exponentially to train.min_lr"),
    ({"warmup_steps": 100, "hold_steps": 900}, r"train.warmup_steps \+ train.hold_steps \(100 \+ 900\)"),
])
def test_tri_stage_schedule_checks(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"steps": 1000, "lr": 5e-4, "min_lr": 5e-6, "schedule": "tri_stage", **overrides})


def test_layerdrop_choice_is_a_function_of_the_seed_with_rate_p():
    from pipeline.model.transformer import layerdrop_choice
    assert layerdrop_choice(0.0, 24, 7) == ()
    assert layerdrop_choice(0.3, 24, 7) == layerdrop_choice(0.3, 24, 7)  # what every rank computes
    dropped = [len(layerdrop_choice(0.05, 24, seed)) for seed in range(2000)]
    assert abs(sum(dropped) / (24 * 2000) - 0.05) < 0.005
    assert len({layerdrop_choice(0.5, 12, seed) for seed in range(50)}) > 40  # varies with the step


def test_dense_ema_update_and_copy():
    teacher = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 3), "embed": torch.nn.Linear(3, 3)})
    student = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 3), "embed": torch.nn.Linear(3, 3)})
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    dense = lambda p: p.data  # noqa: E731
    ema = ShardedEMA(teacher, dict(student.named_parameters()), EMAConfig(copy=["embed.*"]), dense, dense)
    ema.update(0.9)
    s = student.state_dict()
    for k, v in teacher.state_dict().items():
        want = s[k] if k.startswith("embed.") else 0.9 * t0[k] + 0.1 * s[k]
        torch.testing.assert_close(v, want)


def test_bf16_teacher_keeps_an_fp32_ema_and_gathers_its_rounding():
    """A teacher that computes in bf16 holds bf16 weights; the EMA runs on its own fp32 state (initial copy,
    updates, checkpoint round trip) and every change is rounded into the bf16 weights, never accumulated there."""
    student = torch.nn.Linear(64, 64)
    teacher = torch.nn.Linear(64, 64).to(torch.bfloat16)
    dense = lambda p: p.data  # noqa: E731
    ema = ShardedEMA(teacher, dict(student.named_parameters()), EMAConfig(), dense, dense)
    ema.copy_student()
    want = {k: v.clone() for k, v in student.state_dict().items()}
    for step in range(50):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step)) * 1e-3)
        ema.update(0.999)
        want = {k: 0.999 * want[k] + 0.001 * v for k, v in student.state_dict().items()}
    state = ema.state_dict()
    for k, v in teacher.state_dict().items():
        assert state[k].dtype == torch.float32 and v.dtype == torch.bfloat16
        torch.testing.assert_close(state[k], want[k], rtol=1e-6, atol=1e-7)
        assert torch.equal(v, want[k].to(torch.bfloat16))  # 1e-3 steps at tau 0.999 vanish in bf16 accumulation
    fresh = torch.nn.Linear(64, 64).to(torch.bfloat16)
    resumed = ShardedEMA(fresh, dict(student.named_parameters()), EMAConfig(), dense, dense)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), teacher.parameters()))
    assert all(torch.equal(a, state[n]) for n, a in zip(resumed.names, resumed.teacher_parts))


def sharded_vision_teacher(monkeypatch):
    """(dense Backbone of vision_tiny, the same module built under zero.Init on one rank, an image batch)."""
    import deepspeed
    from conftest import ROOT
    from pipeline.distributed import model_parallel_config, skip_shm_comm_build
    from pipeline.experiment import load_experiment
    from pipeline.model.data2vec import Backbone
    cfg = load_experiment(ROOT / "configs/vision_tiny.yaml")
    mp = model_parallel_config(1)
    dense = Backbone(cfg.make_modality(), cfg.encoder, mp).eval()
    zero = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "memory_efficient_linear": False}}
    monkeypatch.setenv("LOCAL_RANK", "0")
    skip_shm_comm_build()
    with deepspeed.zero.Init(config_dict_or_path=zero):
        sharded = Backbone(cfg.make_modality(), cfg.encoder, mp)
    image = {"image": torch.randn(2, cfg.model.in_chans, cfg.model.image_size, cfg.model.image_size)}
    return dense, sharded, image


def test_teacher_forward_gathers_each_unit_then_releases_it(single_process_group, monkeypatch):
    """pipeline.gather on one rank (the multi-rank gathers: the next test, tests/test_distributed.py's equivalence
    with plain PyTorch and tests/test_plan.py's measured bytes): a ZeRO-3 teacher computes what the same weights
    compute densely, holds no gathered parameter afterwards, and computes with its partitions as they are now (the
    EMA writes them)."""
    from pipeline.gather import GatheredForward
    dense, sharded, image = sharded_vision_teacher(monkeypatch)
    teacher = GatheredForward(sharded, None, 1).eval()
    assert len(teacher.next_block) == len(dense.encoder.blocks) - 1
    with torch.no_grad():
        for part, weight in zip(sharded.parameters(), dense.parameters()):
            part.ds_tensor.copy_(weight.reshape(-1))
        for _ in range(2):
            for got, want in zip(teacher(image, keep=3), dense(image, keep=3)):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
            assert all(p.numel() == 0 for p in sharded.parameters()) and not teacher.pending
            for part, weight in zip(sharded.parameters(), dense.parameters()):  # as the EMA update does
                part.ds_tensor.mul_(0.5)
                weight.mul_(0.5)


def test_teacher_prefetches_the_next_block_and_unpacks_every_ranks_partitions(single_process_group, monkeypatch):
    """pipeline.gather's collective path, in one process: this rank holds the first half of every parameter (padded
    as ZeRO-3 pads it), a stand-in for all_gather_into_tensor appends the other rank's halves as rank 1's row and
    logs the call. The unpacked weights compute what the dense ones do, and each block's collective is issued
    before the block before it computes (its prefetch), never after."""
    import pipeline.gather as gather
    dense, sharded, image = sharded_vision_teacher(monkeypatch)
    other = {}  # partition of "rank 1", by parameter
    for p, w in zip(sharded.parameters(), dense.parameters()):
        half = -(-w.numel() // 2)
        padded = torch.cat([w.detach().reshape(-1), w.new_zeros(2 * half - w.numel())])
        p.ds_tensor, other[p] = padded[:half].clone(), padded[half:].clone()
    teacher = gather.GatheredForward(sharded, None, 2).eval()
    names = {m: name for name, m in sharded.named_modules()}
    events = []

    class Done:
        def wait(self):
            pass

    def all_gather_into_tensor(out, send, group=None, async_op=False):
        unit = next(m for m, u in teacher.units.items()
                    if torch.equal(send, torch.cat([p.ds_tensor for p in u.params])))
        out.copy_(torch.cat([send, *[other[p] for p in teacher.units[unit].params]]))
        events.append(("gather", names[unit]))
        return Done()

    monkeypatch.setattr(gather.dist, "all_gather_into_tensor", all_gather_into_tensor)
    for block in sharded.encoder.blocks:  # after the gather hooks: runs when the block is about to compute
        block.register_forward_pre_hook(lambda m, _a: events.append(("compute", names[m])))
    with torch.no_grad():
        for got, want in zip(teacher(image, keep=3), dense(image, keep=3)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    blocks = [names[b] for b in sharded.encoder.blocks]
    assert [e for e in events if e[0] == "gather"].count(("gather", blocks[-1])) == 1  # each unit gathered once
    for earlier, later in zip(blocks, blocks[1:]):
        assert events.index(("gather", later)) < events.index(("compute", earlier))
    assert all(p.numel() == 0 for p in sharded.parameters()) and not teacher.pending


@pytest.mark.parametrize("numel", [1, 3, 7, 1001])
@pytest.mark.parametrize("saved_dp", [1, 3, 4])
def test_partitions_carry_over_to_any_data_parallel_size(tmp_path, numel, saved_dp):
    """ZeRO-3 pads a flattened parameter to a multiple of DP and gives rank r the r-th equal slice.
    Reading a checkpoint saved at one DP size with another must give exactly those slices, also for
    ranks whose slice is all padding, and read only the saved files it overlaps."""
    flat = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    ckpt = tmp_path / f"{numel}_{saved_dp}"
    ckpt.mkdir()

    def padded_slices(dp):
        size = -(-numel // dp)
        padded = torch.cat([flat, torch.zeros(size * dp - numel)])
        return [padded[r * size:(r + 1) * size].clone() for r in range(dp)]

    grid = []
    for dp_rank, part in enumerate(padded_slices(saved_dp)):
        for tp_rank in range(2):  # two TP ranks interleaved, as megatron orders them
            torch.save({"partitions": {"student": {"w": part * (1 - 2 * tp_rank)}}},  # TP rank 1 holds -w
                       checkpoint.rank_file(ckpt, len(grid)))
            grid.append([tp_rank, dp_rank])
    saved = checkpoint.SavedGrid(ckpt, {"dp": saved_dp, "grid": grid}, tp_rank=1)
    for dp in (1, 2, 3, 4, 8):
        for rank, want in enumerate(padded_slices(dp)):
            assert torch.equal(saved.partitions("student", "w", want.numel(), rank), -want), (dp, rank)
    last = checkpoint.SavedGrid(ckpt, {"dp": saved_dp, "grid": grid}, tp_rank=1)
    last.partitions("student", "w", -(-numel // saved_dp), saved_dp - 1)
    assert set(last.cache) == {0, saved_dp - 1}  # the sizes come from rank 0's file, the data from its own


def test_prune_keeps_the_newest_and_never_touches_later_checkpoints(tmp_path):
    for step in (1, 2, 3, 4, 6, 9):
        (tmp_path / checkpoint.tag_for(step)).mkdir()
    for step in (1, 2, 4, 6, 9):
        (tmp_path / checkpoint.tag_for(step) / checkpoint.COMPLETE).write_text("{}")
    checkpoint.prune(tmp_path, keep=2, newest=tmp_path / checkpoint.tag_for(6))
    # kept: step 6 and one complete before it (4); later ones (9) untouched; the crashed save (3) removed
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.tag_for(s) for s in (4, 6, 9)]


def test_resumed_schedule_takes_its_position_from_the_checkpoint_and_its_peak_from_the_config():
    def scheduler(lr):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(TrainConfig(steps=10, warmup_steps=4, lr=lr,
                                                                            min_lr=0.0)))
    old = scheduler(1.0)
    for _ in range(3):
        old.optimizer.step()
        old.step()
    new = scheduler(2.0)
    checkpoint.restore_schedule(new, old.state_dict())
    assert new.last_epoch == 3 and new.get_last_lr() == [2.0 * 4 / 4] == [new.optimizer.param_groups[0]["lr"]]
    checkpoint.restore_schedule(old, old.state_dict())
    assert old.get_last_lr() == [1.0] == [old.optimizer.param_groups[0]["lr"]]


def test_only_complete_checkpoints_are_resumed(tmp_path):
    for step in (1, 2, 3):
        (tmp_path / checkpoint.tag_for(step)).mkdir()
    for step in (1, 2):
        (tmp_path / checkpoint.tag_for(step) / checkpoint.COMPLETE).write_text(json.dumps({"step": step}))
    (tmp_path / checkpoint.LATEST).write_text(checkpoint.tag_for(3))  # points at an incomplete save
    assert checkpoint.find_latest(tmp_path).name == "step_00000002"
    (tmp_path / checkpoint.LATEST).write_text("../../etc")  # a pointer may not leave the directory
    assert checkpoint.find_latest(tmp_path).name == "step_00000002"
    assert checkpoint.find_latest(tmp_path / "nothing") is None


def test_activation_checkpointing_recomputes_each_block_once_with_equal_gradients(single_process_group):
    """Encoder.recompute (train.activation_checkpointing): every block runs again in the backward, and the
    gradients equal a plain backward's, dropout included (its masks are replayed)."""
    from pipeline.config import EncoderConfig
    from pipeline.distributed import model_parallel_config
    from pipeline.model.transformer import Encoder
    cfg = EncoderConfig(dim=32, depth=3, heads=4, ffn_dim=64, dropout=0.2, attn_dropout=0.2, drop_path=0.2)
    grads, calls = [], []
    for recompute in (False, True):
        torch.manual_seed(0)
        encoder = Encoder(cfg, model_parallel_config(1))
        encoder.recompute = recompute
        # the attention's hook: the recomputation stops once the saved tensors are back, before a block returns
        hooks = [b.attn.register_forward_hook(lambda *_: calls.append(recompute)) for b in encoder.blocks]
        x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(2)
        final, taps = encoder(x)
        (final.pow(2).sum() + sum(t.sum() for t in taps)).backward()
        grads.append([x.grad] + [p.grad for p in encoder.parameters()])
        for h in hooks:
            h.remove()
    assert calls.count(False) == 3 and calls.count(True) == 6  # forward, then the backward's recomputation
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_attention_dropout_has_a_stream_per_tensor_parallel_rank(single_process_group):
    """TP peers keep their global RNG in step; the attention dropout of each TP rank (different heads of the model)
    draws its own masks, replays them from the same global state, and leaves the global RNG where its peers'
    is."""
    from pipeline.config import EncoderConfig
    from pipeline.distributed import model_parallel_config
    from pipeline.model.transformer import Attention
    attention = Attention(EncoderConfig(dim=16, depth=1, heads=2, ffn_dim=32, attn_dropout=0.5),
                          model_parallel_config(1), 0.02).train()
    x = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(0))
    outputs, after = {}, {}
    for rank in (0, 1, 1):
        attention.tp_size, attention.tp_rank = 2, rank
        torch.manual_seed(0)
        out = attention(x, None)
        assert rank not in outputs or torch.equal(out, outputs[rank])  # replayed from the same global state
        outputs[rank], after[rank] = out, torch.rand(3)
    assert not torch.equal(outputs[0], outputs[1])
    assert torch.equal(after[0], after[1])


def test_mask_stats_count_the_masked_share_of_input_positions():
    """metrics.jsonl's masked_fraction: masked / input positions over every clone row, padding left out."""
    from pipeline.objective import mask_stats
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[:, :5] = True
    assert mask_stats(mask).tolist() == [20.0, 40.0]
    valid = torch.ones(2, 10, dtype=torch.bool)  # 2 samples x 2 clones; the second sample padded after 4
    valid[1, 4:] = False
    assert mask_stats(mask, valid).tolist() == [5 + 5 + 4 + 4, 10 + 10 + 4 + 4]
