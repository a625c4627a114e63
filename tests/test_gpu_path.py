"""GPU-side and cluster-side conditions forced on a CPU (issue 26): one visible device per task, features on another
device than the CPU, SLURM's node-list syntax without scontrol, srun's CPUs per task, ZeRO offload with hybrid
sharding, the process-group timeout and a linear probe split over ranks."""

from __future__ import annotations

import datetime
import os
import subprocess

import pytest
import torch

from conftest import ROOT
from pipeline.config import ConfigError
from pipeline.distributed import DeviceChoice, expand_nodelist, slurm_master_addr, student_ds_config, teacher_ds_config
from pipeline.experiment import load_experiment

LAUNCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE")


class OneVisibleGPU:
    """DeepSpeed's accelerator on a node where this task sees one GPU (srun --gpus-per-task=1): device 0 only."""

    def __init__(self):
        self.current = None

    def device_name(self, index=None):
        return "cuda" if index is None else f"cuda:{index}"

    def device_count(self):
        return 1

    def set_device(self, index):
        assert int(index) < self.device_count(), f"invalid device ordinal {index}"
        self.current = int(index)

    def communication_backend_name(self):
        return "nccl"


class Started(Exception):
    """Raised by the stand-in init_distributed: the test has seen what DeepSpeed would read."""


@pytest.fixture
def restored_environ():
    """init_runtime writes the launch variables into os.environ itself (export_rendezvous, bind_device): put the
    whole environment back, or a later test's subprocess would start as rank 3 of 4 and wait for its peers."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_one_visible_gpu_per_task_names_device_0_everywhere_deepspeed_looks(restored_environ, monkeypatch):
    """srun --gpus-per-task=1: SLURM_LOCALID=3 but one visible device. Before DeepSpeed starts its process group, the
    device is set to 0 and LOCAL_RANK (what DeepSpeed reads for init_process_group's device_id, zero.Init's local
    device and the engine's set_device) names it: left at 3, every rank but the first dies with 'invalid device
    ordinal'."""
    import deepspeed
    import deepspeed.accelerator

    from pipeline import distributed
    for key in LAUNCH_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    accel = OneVisibleGPU()
    seen = {}

    def init_distributed(dist_backend, timeout):
        seen.update(local_rank=os.environ["LOCAL_RANK"], backend=dist_backend, timeout=timeout)
        raise Started

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: accel)
    monkeypatch.setattr(deepspeed, "init_distributed", init_distributed)
    with pytest.raises(Started):
        distributed.init_runtime(1, DeviceChoice("cuda", torch.bfloat16, "nccl"), timeout_s=1234)
    assert accel.current == 0
    assert seen["local_rank"] == "0", seen
    # zero.Init's local device and the engine's device, as DeepSpeed 0.19.8 computes them from LOCAL_RANK
    assert accel.device_name(os.environ["LOCAL_RANK"]) == "cuda:0"
    assert seen["timeout"] == datetime.timedelta(seconds=1234)  # parallel.timeout_s reaches the process group
    # all devices visible (one task per node sees 4): the device is the local rank
    accel.device_count = lambda: 4
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # what the first start exported (restored_environ undoes it)
        os.environ.pop(key)
    with pytest.raises(Started):
        distributed.init_runtime(1, DeviceChoice("cuda", torch.bfloat16, "nccl"))
    assert accel.current == 3 and seen["local_rank"] == "3"


@pytest.mark.parametrize("preset", ["vision_tiny", "speech_tiny", "text_tiny"])
def test_pooled_features_stay_on_the_features_device(preset):
    """The feature monitor pools features on the training device (a GPU); meta stands in for it here, so a tensor
    the pooling makes on the CPU raises, as a CPU tensor multiplied with CUDA features does."""
    from pipeline.features import pooled
    cfg = load_experiment(ROOT / f"configs/{preset}.yaml")

    class OnDevice:
        def encode(self, inputs, mask, keep=None):
            return torch.empty(2, 5, cfg.encoder.dim, device="meta"), []

    inputs = {"tokens": torch.ones(2, 5, dtype=torch.long, device="meta")} if cfg.modality == "text" else {}
    out = pooled(OnDevice(), cfg, inputs)
    assert out.device.type == "meta" and out.shape == (2, cfg.encoder.dim)
    assert pooled(OnDevice(), cfg, inputs, layers=False).dtype == torch.float32


@pytest.mark.parametrize("nodes, hosts", [
    ("gpu[001-004]", ["gpu001", "gpu002", "gpu003", "gpu004"]),
    ("gpu[001-002,007],cpu1", ["gpu001", "gpu002", "gpu007", "cpu1"]),
    ("node7", ["node7"]),
    ("a1,b[09-11]", ["a1", "b09", "b10", "b11"]),
    ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
    ("n[8-10]-ib", ["n8-ib", "n9-ib", "n10-ib"]),
])
def test_slurm_node_lists_expand_as_scontrol_does(nodes, hosts):
    assert expand_nodelist(nodes) == hosts


def test_master_addr_without_scontrol_is_the_first_host(monkeypatch, tmp_path):
    """A node without SLURM's client tools (a container): the rendezvous host comes from the node list itself."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol on it
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[001-004]")
    assert slurm_master_addr() == "gpu001"
    with pytest.raises(ConfigError, match="unbalanced"):
        expand_nodelist("gpu[001-004")


def test_job_scripts_hand_cpus_per_task_to_srun():
    """Slurm >= 22.05's srun does not inherit --cpus-per-task: slurm/env.sh exports SRUN_CPUS_PER_TASK."""
    script = "source slurm/env.sh >/dev/null; echo \"cpus=${SRUN_CPUS_PER_TASK:-unset}\""
    env = {"PATH": os.environ["PATH"], "SLURM_CPUS_PER_TASK": "12"}
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("cpus=12"), out.stdout
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, env={"PATH": os.environ["PATH"]}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip().endswith("cpus=unset"), out.stdout


def test_zero_offload_with_hybrid_sharding_is_refused_and_the_teacher_stays_on_the_device():
    base = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                  "offload_param": {"device": "cpu"}}}
    with pytest.raises(ConfigError, match="offload_optimizer .* with parallel.shard"):
        student_ds_config(base, 2, 1, 2, torch.bfloat16, replicas=2)
    student = student_ds_config(base, 2, 1, 4, torch.bfloat16)  # plain ZeRO-3: DeepSpeed's own path
    assert student["zero_optimization"]["offload_param"] == {"device": "cpu"}
    teacher = teacher_ds_config(student, half=True)
    assert "offload_param" not in teacher["zero_optimization"]  # pipeline.gather all-gathers device tensors


def test_linear_probe_split_over_ranks_counts_what_one_rank_counts():
    """The eval monitor's linear probe: each data-parallel rank fits a share of the cross-validation fits; their
    summed counts are the single process's, so the chosen penalty and score do not depend on the rank count."""
    from pipeline.probes import best_l2, cv_correct
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.randn(60, 8, generator=gen) + torch.nn.functional.one_hot(y, 8).float() * 0.7
    whole = cv_correct(x, y, 3)
    for ranks in (2, 3, 7):
        shares = sum(cv_correct(x, y, 3, share=(r, ranks)) for r in range(ranks))
        assert torch.equal(shares, whole)
    assert whole.sum() > 0 and best_l2(whole) in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    assert cv_correct(x[:3], y[:3], 3) is None and best_l2(None) == 1e-3  # a class too rare for two folds
