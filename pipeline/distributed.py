"""The one place that knows about the cluster.

Rendezvous (torchrun, SLURM or a single process), the device / dtype / backend choice, megatron-core
parallel state, the ``mpu`` object DeepSpeed uses for the data-parallel group, and the DeepSpeed
JSON derived for student and teacher. Model code never imports this module.
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.config import ConfigError, require


# ---------------------------------------------------------------------------------------------
# Launch environment (read before any process group exists)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int = 1  # ranks on this node


def launch_env(environ: dict | None = None) -> LaunchEnv:
    """Ranks from torchrun/deepspeed (RANK, WORLD_SIZE, LOCAL_RANK), else SLURM, else one process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         int(env.get("LOCAL_WORLD_SIZE", 1)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        local = env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                         int(local) if local.isdigit() else 1)
    return LaunchEnv(0, 1, 0)


def export_rendezvous(env: LaunchEnv) -> None:
    """Make torch.distributed's env:// rendezvous work for every launcher (SLURM sets none of it)."""
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    # DeepSpeed's CPU accelerator counts its "devices" from LOCAL_SIZE (its own launcher sets it); without it, it
    # runs `numactl --hardware` in a subprocess each time, and ZeRO-3 asks once per backward
    os.environ.setdefault("LOCAL_SIZE", str(env.local_world_size))
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = slurm_master_addr() or "127.0.0.1"
    if "MASTER_PORT" not in os.environ:
        # Every rank of a SLURM job derives the same port from the job id, below Linux's ephemeral
        # range (32768+) so that no outgoing connection on the first node can be holding it.
        job = os.environ.get("SLURM_JOB_ID")
        os.environ["MASTER_PORT"] = str(10000 + int(job) % 20000) if job else str(free_port())


def slurm_master_addr() -> str | None:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return None
    import subprocess
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):  # no scontrol here: read SLURM's syntax ourselves
        return expand_nodelist(nodes)[0]


def expand_nodelist(nodes: str) -> list[str]:
    """The hosts of a SLURM node list, in order, as ``scontrol show hostnames`` prints them: ``gpu[001-003,7]`` ->
    gpu001 gpu002 gpu003 gpu7 (zero padding kept); several bracket groups in a name multiply out
    (``r[1-2]-n[1-2]`` -> r1-n1 r1-n2 r2-n1 r2-n2); names are separated by commas outside brackets."""
    hosts = []
    for name in split_outside_brackets(nodes):
        expanded = [""]
        for literal, ranges in bracket_parts(name):
            expanded = [head + literal + tail for head in expanded for tail in ranges]
        hosts.extend(expanded)
    require(bool(hosts), f"the SLURM node list {nodes!r} names no host")
    return hosts


def split_outside_brackets(text: str) -> list[str]:
    names, depth, start = [], 0, 0
    for i, char in enumerate(text + ","):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            names.append(text[start:i].strip())
            start = i + 1
    require(depth == 0, f"unbalanced brackets in the SLURM node list {text!r}")
    return [n for n in names if n]


def bracket_parts(name: str) -> list[tuple[str, list[str]]]:
    """``gpu[1-2]x`` -> [("gpu", ["1", "2"]), ("x", [""])]: each literal with the values of the bracket after it."""
    parts = []
    while name:
        head, bracket, rest = name.partition("[")
        if not bracket:
            parts.append((head, [""]))
            break
        inside, closed, name = rest.partition("]")
        require(bool(closed), f"unbalanced '[' in the SLURM node name {head}[{rest}")
        parts.append((head, [value for item in inside.split(",") for value in bracket_range(item)]))
    return parts


def bracket_range(item: str) -> list[str]:
    """``001-003`` -> 001 002 003 (the width of the first bound kept); ``7`` -> 7."""
    lo, dash, hi = item.strip().partition("-")
    if not dash:
        return [lo]
    require(lo.isdigit() and hi.isdigit() and int(lo) <= int(hi), f"bad range {item!r} in a SLURM node list")
    return [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]


def local_launch_command(nproc: int, args: list[str]) -> list[str]:
    """``torchrun`` for ``nproc`` ranks on this machine alone (the demo, tests, benchmarks). The ranks meet on
    the loopback address: by default torchrun hands them this machine's hostname, which on many fresh machines
    and containers does not resolve (a 5-minute hang, then a failure; tests/test_machines.py forces it)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
            "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}", "--local-addr=127.0.0.1", *args]


def source_tree_env(root: Path | str, **extra: str) -> dict:
    """The environment for a process that runs this repository's code from its source tree: ``root`` first on
    PYTHONPATH, ahead of the caller's own entries (which stay: a machine whose packages live on PYTHONPATH, as
    wheels unpacked into a folder, keeps them), plus ``extra``."""
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH", "")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_count(world_size: int, environ: dict | None = None) -> int:
    """Nodes this job runs on, as the launcher says (SLURM step/job, torchrun), for the layout line."""
    env = os.environ if environ is None else environ
    for key in ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "GROUP_WORLD_SIZE"):
        if env.get(key, "").isdigit():
            return int(env[key])
    local = env.get("LOCAL_WORLD_SIZE", "")
    return max(1, world_size // int(local)) if local.isdigit() and int(local) > 0 else 1


def requeue_slurm_job() -> None:
    """Put this SLURM job back in the queue (it resumes from its latest checkpoint); a no-op outside SLURM.

    Called by rank 0 after the checkpoint is complete; SLURM then ends the current run (the job shows
    as requeued, not failed). Needs the job to be requeueable (sbatch --requeue, as slurm/*.sh are).
    """
    import logging
    import subprocess
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    log = logging.getLogger("pipeline")
    log.info("requeueing SLURM job %s: it resumes from the latest checkpoint", job)
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        error = proc.stderr.strip() if proc.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as exc:
        error = str(exc)
    if error:
        log.error("could not requeue SLURM job %s (%s): resubmit it to resume", job, error)


# ---------------------------------------------------------------------------------------------
# Device, dtype, backend: decided here only
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceChoice:
    device_type: str  # 'cuda', 'cpu', ... as DeepSpeed's accelerator names it
    dtype: torch.dtype  # student compute dtype; the teacher computes in it or in fp32 (its EMA is fp32)
    backend: str

    @property
    def autocast(self) -> bool:
        return self.dtype != torch.float32


def choose_device(precision: str) -> DeviceChoice:
    from deepspeed.accelerator import get_accelerator
    accel = get_accelerator()
    kind = accel.device_name()
    on_cpu = kind == "cpu"
    if precision == "auto":
        dtype = torch.float32 if on_cpu or not accel.is_bf16_supported() else torch.bfloat16
    elif precision == "bf16":
        require(not on_cpu and accel.is_bf16_supported(),
                "train.precision=bf16 needs a GPU with bf16 support; use train.precision=auto on CPU")
        dtype = torch.bfloat16
    else:
        dtype = torch.float32
    return DeviceChoice(kind, dtype, accel.communication_backend_name())


# ---------------------------------------------------------------------------------------------
# DeepSpeed JSON: DeepSpeed's own file; we derive and check only what must agree
# ---------------------------------------------------------------------------------------------

BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def load_ds_config(path: str | Path) -> dict:
    path = Path(path)
    require(path.is_file(), f"DeepSpeed config {path} does not exist (see ds_configs/)")
    try:
        return json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {exc}") from None


def student_ds_config(base: dict, micro: int, accum: int, dp: int, dtype: torch.dtype,
                      grad_clip: float = 0.0, grad_reduce: str = "fp32", replicas: int = 1) -> dict:
    """Fill batch, clipping, precision and gradient-reduction keys; reject settings that contradict the experiment
    config. ``dp``: the ranks DeepSpeed partitions over (with hybrid sharding, the shard group's, of ``replicas``)."""
    cfg = copy.deepcopy(base)
    want = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
            "train_batch_size": micro * accum * dp}
    for key, value in want.items():
        if key in cfg and cfg[key] != "auto" and cfg[key] != value:
            raise ConfigError(
                f"DeepSpeed config sets {key}={cfg[key]} but the experiment needs {value} "
                f"(train.micro_batch_size={micro} x train.grad_accum={accum} x data-parallel size {dp}); "
                f"remove {key} from the JSON or change train.micro_batch_size / train.grad_accum")
        cfg[key] = value
    if cfg.get("gradient_clipping", grad_clip) not in ("auto", grad_clip):
        raise ConfigError(f"DeepSpeed config sets gradient_clipping={cfg['gradient_clipping']} but train.grad_clip="
                          f"{grad_clip}; remove it from the JSON and set train.grad_clip in the experiment YAML")
    cfg["gradient_clipping"] = grad_clip
    for section in ("optimizer", "scheduler"):
        require(section not in cfg, f"DeepSpeed config has an '{section}' section; the optimizer and LR schedule "
                                    f"are set in the experiment YAML (train.lr, train.schedule, ...): remove it")
    stage = cfg.get("zero_optimization", {}).get("stage")
    require(stage == 3, f"DeepSpeed config must use ZeRO stage 3 (zero_optimization.stage=3), got {stage}")
    bf16 = dtype == torch.bfloat16
    for section, wanted in (("bf16", bf16), ("fp16", False)):
        declared = cfg.get(section, {}).get("enabled", wanted)
        if declared not in ("auto", wanted):
            raise ConfigError(f"DeepSpeed config sets {section}.enabled={declared}, but this run computes in "
                              f"{str(dtype).replace('torch.', '')} (train.precision); remove it from the JSON")
        cfg[section] = {**cfg.get(section, {}), "enabled": wanted}
    reduce = "bf16" if bf16 and grad_reduce == "compute" else "fp32"
    declared = cfg.get("communication_data_type", reduce)
    if declared not in ("auto", reduce):
        raise ConfigError(f"DeepSpeed config sets communication_data_type={declared}, but this run reduces gradients "
                          f"in {reduce} (train.grad_reduce={grad_reduce}, compute {str(dtype).replace('torch.', '')}); "
                          f"remove it from the JSON and set train.grad_reduce in the experiment YAML")
    cfg["communication_data_type"] = reduce
    hpz = cfg.get("zero_optimization", {}).get("zero_hpz_partition_size", 1)
    require(isinstance(hpz, int) and hpz >= 1 and dp % hpz == 0,
            f"zero_optimization.zero_hpz_partition_size={hpz} (ZeRO++ hpZ: a second copy of the student's partitions "
            f"over groups of that many data-parallel ranks, one node's) must divide the data-parallel size {dp}")
    require(hpz == 1 or replicas == 1,
            f"zero_optimization.zero_hpz_partition_size={hpz} with parallel.shard: hybrid sharding already keeps "
            f"every gather inside a shard group; remove zero_hpz_partition_size from the DeepSpeed JSON or set "
            f"parallel.shard=0")
    offload = (cfg.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
    require(offload in (None, "none") or replicas == 1,
            f"zero_optimization.offload_optimizer (device {offload}) with parallel.shard: DeepSpeed copies each "
            f"gradient partition into host memory during the backward, before the all-reduce over the replicas, "
            f"which would then average device buffers no longer read (NCCL refuses host tensors): remove "
            f"offload_optimizer from the DeepSpeed JSON or set parallel.shard=0")
    # DeepSpeed's memory_efficient_linear (on unless a config says otherwise) replaces torch.nn.functional.linear for
    # the whole process, from the first zero.Init on, with its own autograd function (matmul, then a separate bias
    # add, and Python in every backward). Our layers need none of it: ZeRO-3's hooks gather a layer's weight for its
    # backward. Off unless the JSON asks for it.
    cfg.setdefault("zero_optimization", {}).setdefault("memory_efficient_linear", False)
    cfg["zero_allow_untested_optimizer"] = True
    return cfg


def config_dtype(ds_config: dict) -> torch.dtype:
    """The parameter dtype a DeepSpeed config asks for: bf16 or fp16 when its section is enabled, else fp32."""
    if ds_config.get("bf16", {}).get("enabled") is True:
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled") is True:
        return torch.float16
    return torch.float32


def build_sharded(factory, ds_config: dict, rt: "Runtime") -> torch.nn.Module:
    """``factory()`` built under ``deepspeed.zero.Init``: ZeRO-3 partitions over the data-parallel group (its shard
    group with parallel.shard),
    in the dtype the DeepSpeed config declares (``config_dtype``), checked parameter by parameter.

    Never pass ``dtype=`` to zero.Init: DeepSpeed 0.19 parses its explicit-dtype line as
    ``(dtype or fp16) if accelerator.is_fp16_supported() else bf16``, so on a CPU whose oneDNN lacks fp16
    ``dtype=torch.float32`` builds bf16 parameters. With no ``dtype`` the config's bf16/fp16 sections decide.
    Modules must initialise their own parameters in their own constructor: zero.Init partitions a
    module's parameters as soon as its ``__init__`` returns, so an init applied afterwards by a parent
    writes into an empty placeholder and is silently lost (tests/test_init.py builds every preset).
    """
    import deepspeed
    want = config_dtype(ds_config)
    with deepspeed.zero.Init(config_dict_or_path=ds_config, data_parallel_group=rt.shard_group, mpu=rt.mpu):
        module = factory()
    wrong = {name: p.ds_tensor.dtype for name, p in module.named_parameters() if p.ds_tensor.dtype != want}
    if wrong:
        name, got = next(iter(wrong.items()))
        raise ConfigError(f"DeepSpeed built {len(wrong)} {type(module).__name__} parameters in {got} (first: {name}) "
                          f"where the config asks for {want}; this DeepSpeed version chooses dtypes differently: "
                          f"install the version setup.py pins")
    return module


def gathered_whole(module: torch.nn.Module) -> bool:
    """Whether ZeRO-3 treats ``module`` as one leaf module (gathered and released whole, one set of hooks, its
    children unhooked): each encoder block, as FSDP wraps per block. Layerdrop then only changes what runs inside a
    block (Block.forward's ``skip``), never the module order ZeRO-3 traces, so its prefetch trace survives every
    step (tests/dist/layerdrop_check.py counts invalidations); pipeline.plan replays the same granularity."""
    from pipeline.model.transformer import Block
    return isinstance(module, Block)


def mark_gathered_whole(model: torch.nn.Module) -> None:
    """Set DeepSpeed's leaf flag on every ``gathered_whole`` module (before ``deepspeed.initialize``). DeepSpeed gives
    a leaf's parameters that got no gradient a zero one when the module's backward ends."""
    from deepspeed.utils import set_z3_leaf_module
    for module in model.modules():
        if gathered_whole(module):
            set_z3_leaf_module(module, True)


def teacher_ds_config(student: dict, half: bool = False) -> dict:
    """The teacher's ZeRO-3 config (for zero.Init only: pipeline.gather runs its forward): same partitioning, no
    optimizer and no gradients; fp32, or with ``half`` the student's bf16 (a teacher that computes under the
    student's autocast gathers bf16 weights, half the bytes; its EMA state stays fp32 in pipeline.ema)."""
    cfg = copy.deepcopy(student)
    if not (half and cfg.get("bf16", {}).get("enabled") is True):
        cfg["bf16"], cfg["fp16"] = {"enabled": False}, {"enabled": False}
    cfg.pop("gradient_clipping", None)
    cfg.pop("communication_data_type", None)  # no gradients
    # The teacher lives only as its partitions (ds_tensor: the EMA writes them, pipeline.gather reads them): no
    # persistent parameters and no ZeRO++ hierarchical copy (zero_hpz_partition_size), a second partition that
    # zero.Init would allocate and only an optimizer step, which the teacher never takes, would refresh.
    zero = cfg.setdefault("zero_optimization", {})
    zero["stage3_param_persistence_threshold"] = 0
    zero["stage3_model_persistence_threshold"] = 0
    zero["zero_hpz_partition_size"] = 1
    # and on the device, whatever offload_param does for the student: pipeline.gather all-gathers them itself
    # (NCCL takes device tensors only); the planner counts them on the device
    zero.pop("offload_param", None)
    return cfg


# ---------------------------------------------------------------------------------------------
# Process groups
# ---------------------------------------------------------------------------------------------

@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    tp: int
    tp_rank: int
    dp: int
    dp_rank: int
    device: torch.device
    choice: DeviceChoice
    dp_group: object
    mpu: object
    tp_group: object = None
    # hybrid sharding (parallel.shard): ZeRO-3 partitions over ``shard`` consecutive data-parallel ranks
    # (shard_group), dp / shard replicas of them (replica_group: the ranks holding the same partitions). Without
    # it, shard = dp, shard_group = dp_group, replica_group = None.
    shard: int = 0
    shard_rank: int = 0
    shard_group: object = None
    replica_group: object = None

    def __post_init__(self):
        if not self.shard:
            self.shard, self.shard_rank, self.shard_group = self.dp, self.dp_rank, self.dp_group

    @property
    def replicas(self) -> int:
        return self.dp // self.shard

    @property
    def replica_rank(self) -> int:
        return self.dp_rank // self.shard

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_layout(world_size: int, tp: int) -> int:
    """Data-parallel size for this world, or a ConfigError saying what to change."""
    if world_size % tp:
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tp={tp}: launch a multiple of {tp} "
                          f"ranks or change parallel.tp")
    return world_size // tp


def shard_size(dp: int, shard: int) -> int:
    """The data-parallel ranks one ZeRO-3 partition spans (parallel.shard; 0: all ``dp``), or a ConfigError."""
    if shard and dp % shard:
        raise ConfigError(f"parallel.shard={shard} does not divide the data-parallel size {dp}: set it to a divisor "
                          f"of {dp} (one node's data-parallel ranks: GPUs per node / parallel.tp), or 0")
    return shard or dp


def single_process_parallel_state() -> None:
    """A one-process gloo group + megatron-core parallel state (TP=1): enough to build the parallel layers
    in a tool that runs a model on one process (planner, feature extraction)."""
    from megatron.core import parallel_state as ps
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
    if ps.get_tensor_model_parallel_world_size() != 1:
        raise RuntimeError("this tool builds TP=1 models; call it from a process whose megatron parallel state "
                           "has tensor_model_parallel_size=1 (or none)")


def device_index(local_rank: int, visible_devices: int) -> int:
    """The device a rank drives: its local rank among the devices it can see. With srun --gpus-per-task=1 or
    --gpu-bind each rank sees one device, its device 0; with all of a node's devices visible, device local_rank."""
    return local_rank % max(visible_devices, 1)


def bind_device(local_rank: int, choice: DeviceChoice, accel) -> int:
    """Make this rank's device current, and name it in LOCAL_RANK, where DeepSpeed reads its device
    (init_process_group's device_id, zero.Init's local device, the engine's set_device). With one visible device per
    task (srun --gpus-per-task=1, --gpu-bind=single, a per-process CUDA_VISIBLE_DEVICES) the device is 0 whatever the
    local rank, and a LOCAL_RANK left at SLURM_LOCALID would name a device that does not exist. -> the index."""
    if choice.device_type == "cpu":
        return 0
    index = device_index(local_rank, accel.device_count())
    accel.set_device(index)
    os.environ["LOCAL_RANK"] = str(index)
    return index


def init_runtime(tp: int, choice: DeviceChoice, timeout_s: float = 600.0, shard: int = 0) -> Runtime:
    """Start the process group, megatron-core parallel state and the device; returns the layout (``shard``:
    parallel.shard, hybrid sharding's groups)."""
    import datetime

    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from megatron.core import parallel_state as ps

    env = launch_env()
    export_rendezvous(env)
    size = shard_size(check_layout(env.world_size, tp), shard)  # checked before any process group starts
    accel = get_accelerator()
    index = bind_device(env.local_rank, choice, accel)
    skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend=choice.backend, timeout=datetime.timedelta(seconds=timeout_s))
    # megatron's groups: the world group's timeout, and none of the gloo side groups it would otherwise create
    # (three per rank, unused here; at 512 ranks they cost start-up time and memory)
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, create_gloo_process_groups=False,
                                 distributed_timeout_minutes=math.ceil(timeout_s / 60))  # whole minutes, not less
    device = torch.device(accel.device_name(index) if choice.device_type != "cpu" else "cpu")
    dp, dp_rank, dp_group = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank(), ps.get_data_parallel_group()
    shard_group, replica_group = hybrid_groups(size, timeout_s) if size < dp else (dp_group, None)
    return Runtime(rank=env.rank, world_size=env.world_size, local_rank=env.local_rank, tp=tp,
                   tp_rank=ps.get_tensor_model_parallel_rank(), dp=dp, dp_rank=dp_rank, device=device, choice=choice,
                   dp_group=dp_group, mpu=MegatronMPU(shard_group if size < dp else None),
                   tp_group=ps.get_tensor_model_parallel_group(), shard=size, shard_rank=dp_rank % size,
                   shard_group=shard_group, replica_group=replica_group)


def hybrid_groups(shard: int, timeout_s: float) -> tuple[object, object]:
    """(this rank's shard group, its replica group). Every data-parallel group (the ranks of one TP rank,
    megatron's) splits into groups of ``shard`` consecutive members (a node's, with consecutive ranks per node)
    and into the groups of the members at the same place in each: every rank creates every group, in one order."""
    import datetime

    from megatron.core import parallel_state as ps
    world, tp = dist.get_world_size(), ps.get_tensor_model_parallel_world_size()
    timeout = datetime.timedelta(seconds=timeout_s)
    mine = dist.get_rank()
    dp_groups = [list(range(t, world, tp)) for t in range(tp)]  # megatron's DP groups at TP = tp (no PP / CP)
    shard_group = replica_group = None
    for members in dp_groups:
        for start in range(0, len(members), shard):
            ranks = members[start:start + shard]
            group = dist.new_group(ranks, timeout=timeout)
            if mine in ranks:
                shard_group = group
    for members in dp_groups:
        for offset in range(shard):
            ranks = members[offset::shard]
            group = dist.new_group(ranks, timeout=timeout)
            if mine in ranks:
                replica_group = group
    return shard_group, replica_group


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory comm op at ``init_distributed``.

    The op serves only ``inference_all_reduce`` (DeepSpeed inference), which training never calls; ZeRO-3
    collectives go through torch.distributed (gloo on CPU, NCCL on GPU). Building it needs a C++ compiler,
    Python headers and ninja, takes about a minute on first use, and its kernels need AVX2/AVX-512. Without
    it, a machine with none of those runs the same job (tests/test_machines.py forces a missing compiler).
    """
    import importlib
    # by module name: the attribute deepspeed.comm.torch is the torch package itself, not this module
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    require(hasattr(ds_torch_comm, "build_shm_op"), "this DeepSpeed version has no deepspeed.comm.torch.build_shm_op: "
                                                    "install the version setup.py pins")
    ds_torch_comm.build_shm_op = lambda: None


class MegatronMPU:
    """The ``mpu`` interface DeepSpeed expects, backed by megatron-core's parallel state. With hybrid sharding
    (``shard_group``), DeepSpeed's data-parallel group is the shard group: it partitions, gathers and reduces
    over it, and Trainer.reduce_over_replicas completes the gradient."""

    def __init__(self, shard_group=None):
        self.shard_group = shard_group

    def get_data_parallel_group(self):
        from megatron.core import parallel_state as ps
        return self.shard_group if self.shard_group is not None else ps.get_data_parallel_group()

    def get_data_parallel_world_size(self):
        return dist.get_world_size(self.get_data_parallel_group())

    def get_data_parallel_rank(self):
        return dist.get_rank(self.get_data_parallel_group())

    def __getattr__(self, name):
        from megatron.core import parallel_state as ps
        aliases = {"get_model_parallel_group": ps.get_tensor_model_parallel_group,
                   "get_model_parallel_world_size": ps.get_tensor_model_parallel_world_size,
                   "get_model_parallel_rank": ps.get_tensor_model_parallel_rank}
        if name in aliases:
            return aliases[name]
        return getattr(ps, name)


def model_parallel_config(tp: int):
    """megatron-core layer config. Weights are initialised from the default RNG (use_cpu_initialization: one
    device-agnostic path; megatron's GPU init needs its CUDA RNG tracker): on a CPU, on the CPU; under ZeRO-3 on a
    GPU, DeepSpeed's tensor-creation wrappers create them on the device, so the device's RNG draws them. ZeRO-3
    then partitions them, in the dtype its config sets."""
    from megatron.core import parallel_state as ps
    from megatron.core.model_parallel_config import ModelParallelConfig
    # megatron's parallel layers take the TP size from parallel_state, our head/table splits from this
    # config: they must agree or shapes would silently disagree.
    if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() != tp:
        raise ConfigError(f"model_parallel_config(tp={tp}) inside a tensor-parallel group of "
                          f"{ps.get_tensor_model_parallel_world_size()}")
    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               perform_initialization=True)


def all_reduce_mean(tensor: torch.Tensor, group, fp32: bool = True) -> torch.Tensor:
    """``tensor`` <- its mean over ``group``, in place; summed in fp32 (a bf16 tensor is cast and back) unless
    ``fp32`` is False."""
    work = tensor.float() if fp32 and tensor.dtype != torch.float32 else tensor
    dist.all_reduce(work, op=dist.ReduceOp.SUM, group=group)
    work.div_(dist.get_world_size(group))
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_max(tensor: torch.Tensor, group=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def all_gather_rows(rows: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's (n_rank, ...) rows, concatenated in rank order; n_rank may differ between ranks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return rows
    size = dist.get_world_size(group)
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(size)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))
    padded[:rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


class LaggedRead:
    """A small device tensor read on the host one step late, so the step never waits for the device: each
    ``exchange`` queues a copy of this step's tensor into pinned host memory and returns the previous step's
    (with its tag), whose copy landed long ago (an event wait, not a device-wide sync). On CPU: no copy."""

    def __init__(self, device: torch.device):
        from deepspeed.accelerator import get_accelerator
        self.accel, self.on_host = get_accelerator(), device.type == "cpu"
        self.pending = None

    def exchange(self, tensor: torch.Tensor, tag=None) -> tuple[object, list[float]] | None:
        previous = self.pending
        if self.on_host:
            self.pending = (tag, tensor.detach().clone(), None)
        else:
            host = self.accel.pin_memory(torch.empty(tensor.shape, dtype=tensor.dtype))
            host.copy_(tensor.detach(), non_blocking=True)
            event = self.accel.Event()
            event.record()
            self.pending = (tag, host, event)
        if previous is None:
            return None
        tag, host, event = previous
        if event is not None:
            event.synchronize()
        return tag, host.tolist()


def agree_over_tp(stats: torch.Tensor, rt: "Runtime") -> torch.Tensor:
    """A step's statistics, already summed over this rank's data-parallel group, made the same on every rank: their
    mean over its tensor-parallel group. With TP >= 2 each TP rank sums over its own data-parallel group, so the
    sums can differ in the last bits, and flags (a stop signal read by one TP peer before the other) can differ
    outright; a decision taken per rank (stop and save, collapse.action=skip) would then split the job and hang it.
    Flags become the share of peers that raised them: > 0 when any did."""
    if rt.tp > 1 and dist.is_available() and dist.is_initialized():
        stats = stats.clone()
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=rt.tp_group)
        stats.div_(rt.tp)
    return stats


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            from megatron.core import parallel_state as ps
            ps.destroy_model_parallel()
        finally:
            dist.destroy_process_group()
