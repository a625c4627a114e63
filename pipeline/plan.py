"""Capacity planner: layout checks, per-GPU memory and per-step communication for a cluster size.

``python -m pipeline.plan --config configs/vision_large.yaml --nodes 8 --gpus-per-node 8 --tp 1``

No GPU, no multi-rank job: parameter shapes come from building the real ``Student`` / ``Backbone`` on
the meta device (a one-process gloo group + megatron-core parallel state with TP=1 are started for
that, as the parallel layers need them), then every tensor-parallel parameter (megatron's
``tensor_model_parallel`` / ``partition_dim`` attributes, also set on the vision relative-position
table) is divided by TP. The text vocabulary is padded to ``vocab_multiple x TP`` first, as at TP.

Everything else is analytic; the rules (bytes per GPU):

* ZeRO-3 partitions (the DP group of one TP rank): ``ceil(n / DP)`` elements per parameter, as
  DeepSpeed pads each parameter to a multiple of DP. Student parameters and gradients in the compute
  dtype (bf16: 2 B), optimizer fp32 master + Adam m, v (12 B), teacher fp32 EMA partition (4 B, no head or
  decoder) + the bf16 partition it gathers when it computes under the student's bf16 autocast (2 B;
  ``teacher_bytes``).
* Persistent parameters (``stage3_param_persistence_threshold`` of the DeepSpeed JSON; 0 in ours and for the
  teacher): the student keeps them gathered in full all the time (compute dtype), and DeepSpeed gathers them
  again after every optimizer step, one all-gather per parameter (a latency cost at many ranks: why ours is 0).
* Gathered parameters: DeepSpeed 0.19's ``PartitionedParameterCoordinator`` is replayed on the module
  call order (the forward; the backward meets modules in the reverse order of their forward
  completion). Each module fetch all-gathers its parameters and prefetches trace entries until
  ``stage3_prefetch_bucket_size`` not yet gathered elements are queued (at most
  ``stage3_max_live_parameters`` gathered in all); after a module ran its parameters are released
  unless persistent, already prefetched for a later use, or used again within
  ``stage3_max_reuse_distance`` elements of the trace. With ``ds_configs/zero3.json`` (5e7, 1e9, 1e9) the prefetch
  front runs ahead of the compute, so the student's whole TP-local model (up to 1e9 elements) is gathered from the
  forward to the backward (and not re-gathered in the backward). The teacher is gathered by ``pipeline.gather`` (no
  DeepSpeed engine): a module when called, an encoder block with the next one prefetched, each released when it
  returns (``teacher_gathering``). Each encoder block is one ZeRO-3 leaf module (gathered whole; fetched once per
  output in the backward). tests/test_plan.py checks the replay against DeepSpeed on CPU ranks. The nominal ZeRO-3
  working set, 2 x the largest block (one in use, one prefetched), is printed for reference.
* Student activations per micro-batch, stored for backward, no sequence parallelism (with
  ``train.activation_checkpointing``: ``depth x a*s*b*D`` block inputs + one block's activations below, recomputed
  in the backward; without: every block's)
  (Korthikanti et al. 2022, generalised to the FFN width f and our block). With a = activation bytes
  (2 for bf16), s = sequence, b = micro batch, D = width, h = heads, t = TP, per block:
  ``a*s*b*D*(4 + 2*layer_scale) + s*b*D*2*[dropout>0] + (4*a*s*b*D + 2*a*s*b*f)/t + attention``
  with ``attention = s*s*b*h*(a + [attn_dropout>0]*(1 + a))/t`` (softmax output, dropout mask and
  output); with fused SDPA kernels (``--fused-attention``) ``4*s*b*h/t`` (log-sum-exp) instead. For
  f = 4D, bf16, dropout on, this is Korthikanti's ``s*b*D*(10 + 24/t + 5*h*s/(D*t))``. Plus the local
  encoder (patch conv / conv feature encoder / embeddings), the final norm, the head and the loss on
  the masked positions.
* Teacher forward (no grad): the teacher keeps only the top K blocks' taps (``Encoder.forward(keep=K)``),
  counted in fp32 (upper bound: K x s x b x D x 4), plus the targets' normalised copies and one block's
  transients.
* Peak = model states + persistent + ZeRO reduce bucket + a fixed allowance (CUDA context, NCCL,
  allocator: ``--overhead-gb``) + the largest of three phases that do not overlap in time: teacher
  forward (gathered parameters + taps), student forward/backward (gathered parameters at their
  peak + activations), optimizer step (per ``sub_group_size`` group of the partition: DeepSpeed's flat
  copy of the gradients and its fp32 cast, plus one fp32 AdamW temporary).

Communication per GPU (bytes sent; ring algorithms), per micro-batch, x grad_accum per step: all-gather /
reduce-scatter of a whole tensor of ``size`` bytes over DP: ``size * (DP-1)/DP``; all-reduce over n ranks:
``2 * size * (n-1)/n``. Student parameters all-gathered in forward and again in backward (nominally 2x; the
replay above gives what is really gathered: persistent parameters never, parameters still gathered after the
forward not again in the backward), gradients reduce-scattered every micro-batch (1x, fp32 unless
``train.grad_reduce=compute``: ``gradient_bytes``), the
teacher's parameters all-gathered for its forward (1x; in the dtype it computes in: bf16 under the student's
autocast, fp32 for vision's reference teacher). A local encoder the two share (speech's conv features,
``Plan.shared_numel``) the teacher never gathers, and the student gathers twice: on demand for the shared features,
outside its engine's forward, and again in that forward (``Plan.shared_regathered``). With hybrid sharding
(``parallel.shard``) these run over the shard group, and the gradient partition is all-reduced over the replicas
once per step. TP all-reduces of (s, b, D) activations: per block
2 in the student forward (attention and FFN row-parallel outputs), 4 in its backward (the q, k, v and fc1
column-parallel input gradients: q, k, v are separate layers; with ``train.activation_checkpointing`` + the 2 of
the forward it runs again), 2 in the teacher forward; text adds the vocab-parallel embedding (1 each forward).
The student's are in the compute dtype, the teacher's in the dtype it computes in (``teacher_bytes``).
Each micro-step all-reduces its fp32 statistics over DP (loss, moments, per-position statistics:
``statistics_floats``), and the same sums again over TP (agreed there). The EMA update: 0 bytes (shard-local). Not
counted: DeepSpeed's gradient-norm scalars (tens of bytes per step) and its one-off trace check (broadcasts,
second step). tests/test_plan.py checks every category against the bytes measured on CPU ranks
(tests/dist/comm_bytes.py, fp32 and bf16, TP 1 and 2). Not modelled: the gathers of activation checkpointing's
recompute when the window releases parameters before the backward (the default JSON keeps them gathered up to
1e9 elements; with a 2e4-element window the student gathers of vision_tiny measure 11% above the replay).

Inter-node vs intra-node (``Plan.comm_bytes_per_step``, ``--json``: ``comm_bytes_per_step``): megatron puts TP
peers on consecutive ranks, so with TP dividing the G GPUs per node (a layout check on more than one node) TP
all-reduces stay inside a node. A DP group (one per TP rank) has DP ranks, G/TP on each of the N nodes; a ring
over it in rank order has DP equally loaded links of which N cross nodes (none on one node), so a share N/DP of
every DP collective's bytes is inter-node (``ring_inter_node_share``): per node, what leaves it per DP group
equals what one of its ranks sends, as with NCCL's rings. Trees and NCCL's topology tuning are not modelled.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import ConfigError

GiB = 2 ** 30
ROOT = Path(__file__).resolve().parents[1]
DTYPE_BYTES = {"bf16": 2, "fp32": 4}


# ---------------------------------------------------------------------------------------------
# Parameter shapes from the real modules (meta device)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParamInfo:
    name: str  # student parameter name
    module: str  # the module that owns it directly (DeepSpeed fetches per module)
    numel: int  # TP-local elements (what ZeRO-3 partitions over DP on one TP rank)
    full_numel: int  # elements of the whole (TP=1-shaped, padded vocabulary) parameter
    split: bool  # divided over TP ranks
    teacher: bool  # the teacher has it (everything but the head)
    ndim: int  # for the optimizer's decay / no-decay groups


def _ensure_parallel_state() -> None:
    """A one-process gloo group + megatron-core parallel state (TP=1), enough to build parallel layers."""
    from pipeline.distributed import single_process_parallel_state
    with _quiet_fd(1, 2):  # gloo logs one line per group megatron creates
        single_process_parallel_state()


class _quiet_fd:
    """Send OS-level file descriptors to /dev/null for a while (C++ logging bypasses sys.stderr)."""

    def __init__(self, *fds: int):
        self.fds = fds

    def __enter__(self):
        import os
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = [os.dup(fd) for fd in self.fds]
        null = os.open(os.devnull, os.O_WRONLY)
        for fd in self.fds:
            os.dup2(null, fd)
        os.close(null)

    def __exit__(self, *exc):
        import os
        for fd, saved in zip(self.fds, self.saved):
            os.dup2(saved, fd)
            os.close(saved)
        return False


_SHAPES: dict[str, tuple] = {}


def call_kind(module) -> str:
    """How a module appears in DeepSpeed's module trace (see ``forward_events``)."""
    import torch.nn as nn

    from pipeline.distributed import gathered_whole
    from pipeline.model.data2vec import Backbone
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return "container"  # never called itself: its children are
    if isinstance(module, Backbone):
        return "backbone"  # called as the teacher; the student calls backbone.encode(), not the module
    if gathered_whole(module):
        return "block"  # one ZeRO-3 leaf module (pipeline.distributed.gathered_whole)
    return "module"


def created_in_order(module, leaf: bool):
    """(name, parameter) of a module in the order its constructor creates them (DeepSpeed's ds_id order): its own;
    for a leaf block (whose children are built before its layer-scale gammas) every descendant's, then its own."""
    if not leaf:
        return list(module.named_parameters(recurse=False))
    inner = [(f"{name}.{pname}", p) for name, child in module.named_modules() if child is not module
             for pname, p in child.named_parameters(recurse=False)]
    return inner + list(module.named_parameters(recurse=False))


def param_infos(cfg, tp: int) -> tuple[list[ParamInfo], list[tuple[str, list[int], list[int], str]]]:
    """TP-local parameters, and the module tree: (name, indices of its direct parameters, child nodes,
    call kind), node 0 the student.

    Built once per (model, tp) on the meta device with a TP=1 layer config; split parameters are
    divided by ``tp`` along megatron's ``partition_dim`` (which must divide evenly).
    """
    key = json.dumps([cfg.modality, cfg.method, dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.encoder),
                      dataclasses.asdict(cfg.decoder), tp], sort_keys=True, default=str)
    if key in _SHAPES:
        return _SHAPES[key]
    import torch

    from pipeline.distributed import model_parallel_config
    from pipeline.model.data2vec import teacher_parameter_name

    _ensure_parallel_state()
    model_cfg = cfg.model
    if hasattr(model_cfg, "vocab_multiple"):  # build the vocabulary padded as at TP=tp (a multiple of 128 x tp)
        model_cfg = dataclasses.replace(model_cfg, vocab_multiple=model_cfg.vocab_multiple * tp)
    built = cfg.make_modality()
    modality = type(built)(model_cfg, built.visible_only)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        student = cfg.make_method(modality).build_student(model_parallel_config(1))
    from pipeline.distributed import gathered_whole
    infos, tree, index, inside_block = [], [], {}, set()
    for mod_name, module in student.named_modules():
        if id(module) in inside_block:  # a block is one ZeRO-3 leaf module: its parameters are its own
            continue
        leaf = gathered_whole(module)
        if leaf:
            inside_block.update(id(m) for m in module.modules() if m is not module)
        index[id(module)] = len(tree)
        mine = []
        for pname, p in created_in_order(module, leaf):
            name = f"{mod_name}.{pname}" if mod_name else pname
            shape = list(p.shape)
            split = bool(getattr(p, "tensor_model_parallel", False))
            if split and tp > 1:
                dim = p.partition_dim
                if shape[dim] % tp:
                    raise ConfigError(f"parameter {name} has {shape[dim]} entries on its tensor-parallel dim, "
                                      f"not divisible by TP={tp}")
                shape[dim] //= tp
            mine.append(len(infos))
            infos.append(ParamInfo(name, mod_name, math.prod(shape), p.numel(), split,
                                   teacher_parameter_name(name) is not None, p.dim()))
        tree.append((mod_name, mine, [] if leaf else [id(c) for c in module.children()], call_kind(module)))
    tree = [(name, mine, [index[c] for c in kids], kind) for name, mine, kids, kind in tree]
    _SHAPES[key] = (infos, tree)
    return infos, tree


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------

@dataclass
class Plan:
    config: str
    modality: str
    nodes: int
    gpus_per_node: int
    world: int
    tp: int
    dp: int
    micro: int
    accum: int
    global_batch: int
    dtype: str
    seq: int
    checks: list = field(default_factory=list)  # (ok: bool, message)
    # element counts per rank (TP-local, ZeRO partitions)
    student_numel: int = 0  # whole model, TP=1 shapes (padded vocabulary)
    teacher_numel: int = 0
    student_tp_numel: int = 0  # one TP rank's share, before ZeRO
    teacher_tp_numel: int = 0
    shard: int = 0  # data-parallel ranks one ZeRO-3 partition spans (parallel.shard; = dp without hybrid sharding)
    student_partition: int = 0  # sum ceil(n / DP): parameters = gradients = fp32 master = Adam m = Adam v
    teacher_partition: int = 0
    persistent_numel: int = 0  # student parameters kept gathered (persistence threshold)
    kept_numel: int = 0  # student parameters still gathered after the forward (persistent included)
    largest_block: int = 0
    student_gather_peak: int = 0  # most non-persistent student elements gathered at once (simulated)
    teacher_gather_peak: int = 0
    # the local encoder student and teacher share (speech's conv features, pipeline.ema.shared_encoder): the
    # teacher never calls it; the student gathers it on demand for the shared features, then again in its forward
    shared_numel: int = 0
    shared_regathered: int = 0  # its non-persistent elements
    memory: dict = field(default_factory=dict)  # bytes per GPU held all the time
    phases: dict = field(default_factory=dict)  # phase -> {item: bytes}; the largest phase adds to the peak
    peak_phase: str = ""
    peak: int = 0
    gpu_memory_gb: float = 80.0
    fits: bool = False
    comm: dict = field(default_factory=dict)  # bytes per GPU per micro-batch
    comm_inter_node: dict = field(default_factory=dict)  # the part of comm that crosses node boundaries
    suggestions: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(ok for ok, _ in self.checks)

    def comm_per_step(self) -> dict:
        return {k: v * self.accum for k, v in self.comm.items()}

    def comm_bytes_per_step(self) -> dict:
        """Bytes one GPU sends per optimizer step across node boundaries and inside its node."""
        inter = sum(self.comm_inter_node.values()) * self.accum
        return {"inter_node": inter, "intra_node": sum(self.comm.values()) * self.accum - inter}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_ds_config(cfg) -> dict:
    from pipeline.distributed import load_ds_config
    path = Path(cfg.train.ds_config)
    if not path.is_file() and not path.is_absolute():
        path = ROOT / path
    return load_ds_config(path)


def layout_checks(cfg, world: int, tp: int, micro: int, accum: int, global_batch: int | None,
                  ds: dict, dtype: str, nodes: int, gpus: int) -> list[tuple[bool, str]]:
    enc = cfg.encoder
    checks = []
    good_tp = [d for d in _divisors(enc.heads) if enc.ffn_dim % d == 0]
    fit_tp = [d for d in good_tp if world % d == 0]
    ok = enc.heads % tp == 0
    checks.append((ok, f"encoder.heads={enc.heads} divisible by TP {tp} ({enc.heads // tp} heads per rank)" if ok else
                   f"encoder.heads={enc.heads} is not divisible by --tp {tp}: use a TP that divides the heads and "
                   f"encoder.ffn_dim (here {', '.join(map(str, good_tp))}), or change encoder.heads"))
    ok = enc.ffn_dim % tp == 0
    checks.append((ok, f"encoder.ffn_dim={enc.ffn_dim} divisible by TP {tp}" if ok else
                   f"encoder.ffn_dim={enc.ffn_dim} is not divisible by --tp {tp}: use a TP that divides it "
                   f"(with the heads: {', '.join(map(str, good_tp))}), or change encoder.ffn_dim"))
    ok = world % tp == 0
    checks.append((ok, f"world {world} divisible by TP {tp}: DP = {world // tp}" if ok else
                   f"world size {world} ({nodes} node(s) x {gpus} GPUs) is not divisible by --tp {tp}: use --tp in "
                   f"{{{', '.join(map(str, fit_tp))}}} or a world size that is a multiple of {tp}"))
    if nodes > 1:  # megatron puts TP peers on consecutive ranks: inside a node when TP divides its GPUs
        ok = gpus % tp == 0
        in_node = [d for d in good_tp if gpus % d == 0]
        checks.append((ok, f"TP {tp} divides the {gpus} GPUs per node: tensor-parallel groups stay inside a node" if ok
                       else f"--tp {tp} does not divide the {gpus} GPUs per node: tensor-parallel groups would span "
                            f"nodes (their all-reduces over the inter-node network); use --tp in "
                            f"{{{', '.join(map(str, in_node))}}}"))
    if cfg.modality == "text":
        m = cfg.model
        padded = m.padded_vocab(tp) if tp >= 1 else m.vocab_size
        ok = padded % (m.vocab_multiple * tp) == 0 and padded >= m.vocab_size
        checks.append((ok, f"text vocabulary {m.vocab_size} padded to {padded} (a multiple of {m.vocab_multiple} x TP "
                           f"{tp}): {padded // tp} rows per TP rank, {padded - m.vocab_size} padding rows"))
    dp = world // tp if world % tp == 0 else None
    if dp:
        gb = micro * accum * dp
        if global_batch is not None and gb != global_batch:
            per_rank = global_batch / dp
            if per_rank != int(per_rank):
                divs = _divisors(global_batch)
                near = sorted({max(d for d in divs if d <= dp), min((d for d in divs if d >= dp), default=dp)} - {dp})
                options = " or ".join(f"DP {d} (world {d * tp} at TP {tp})" for d in near)
                msg = (f"global batch {micro} x {accum} x DP {dp} = {gb}, not the requested {global_batch}; "
                       f"{global_batch} is not a multiple of DP {dp}: change the world size to one whose DP divides "
                       f"it, e.g. {options}, or change --tp")
            else:
                per_rank = int(per_rank)
                m2 = max(d for d in _divisors(per_rank) if d <= max(micro, 1))
                msg = (f"global batch {micro} x {accum} x DP {dp} = {gb}, not the requested {global_batch}: use "
                       f"--micro-batch {m2} --grad-accum {per_rank // m2} (train.micro_batch_size={m2} "
                       f"train.grad_accum={per_rank // m2})")
            checks.append((False, msg))
        else:
            import torch

            from pipeline.distributed import student_ds_config
            try:
                student_ds_config(ds, micro, accum, dp, torch.bfloat16 if dtype == "bf16" else torch.float32,
                                  cfg.train.grad_clip, cfg.train.grad_reduce)
                checks.append((True, f"global batch = micro {micro} x accumulation {accum} x DP {dp} = {gb} "
                                     f"(the DeepSpeed JSON agrees)"))
            except ConfigError as exc:
                checks.append((False, f"global batch {gb}: {exc}"))
        shard = cfg.parallel.shard
        if shard:
            from pipeline.distributed import shard_size
            try:
                shard_size(dp, shard)
                span = shard * tp  # consecutive global ranks
                where = ("a shard group stays inside a node" if nodes == 1 or gpus % span == 0 else
                         f"a shard group spans {-(-span // gpus)} nodes (shard x TP = {span} > {gpus} GPUs per node): "
                         f"its gathers cross nodes; {gpus // tp} keeps them inside one")
                checks.append((True, f"parallel.shard={shard}: ZeRO-3 partitions over {shard} data-parallel ranks, "
                                     f"{dp // shard} replicas; {where}"))
            except ConfigError as exc:
                checks.append((False, str(exc)))
    return checks


def sequence_length(cfg) -> int:
    mod = cfg.make_modality()
    return mod.tokens_per_sample() + mod.prefix_tokens


def masked_fraction(cfg) -> float:
    return cfg.make_modality().masked_share()


def block_activation_bytes(enc, s: int, b: int, tp: int, a: int, fused: bool) -> tuple[float, float]:
    """(stored bytes of one block for backward, of which attention scores) — the formula above."""
    d, f, h = enc.dim, enc.ffn_dim, enc.heads
    sbd = s * b * d
    replicated = a * sbd * (4 + (2 if enc.layer_scale_init > 0 else 0)) + (2 * sbd if enc.dropout > 0 else 0)
    split = (4 * a * sbd + 2 * a * s * b * f) / tp
    if fused:
        scores = 4.0 * s * b * h / tp
    else:
        scores = s * s * b * h * (a + ((1 + a) if enc.attn_dropout > 0 else 0)) / tp
    return replicated + split + scores, scores


def clone_embed_bytes(cfg, s: int, s_student: int, b: int, clones: int, a: int) -> float:
    """data2vec 2.0 (``clones`` > 1): what the local encoder stores per clone beyond ``embed_activation_bytes``: the
    gathered visible positions, their LayerNorm and dropout; speech also the positional convs on each clone's
    masked sequence (conv, LayerNorm, GELU per layer, the zeroed input and the sum)."""
    if clones == 1:
        return 0.0
    d, rows = cfg.encoder.dim, b * clones
    extra = 3 * a * s_student * rows * d
    if cfg.modality == "speech":
        extra += a * s * rows * d * (3 * cfg.model.pos_conv_layers + 2)
    return extra


def embed_activation_bytes(cfg, s: int, b: int, a: int) -> float:
    """Stored activations of the local encoder (student)."""
    d = cfg.encoder.dim
    if cfg.modality == "vision":
        m = cfg.model
        return a * (b * m.in_chans * m.image_size ** 2 + 3 * s * b * d)
    if cfg.modality == "speech":
        m = cfg.model
        total, length, in_ch = a * b * m.max_samples, m.max_samples, 1
        for ch, kernel, stride in m.conv_layers:
            length = (length - kernel) // stride + 1
            total += 3 * a * b * ch * length  # conv output (LayerNorm input), LayerNorm output (GELU input), GELU out
            in_ch = ch
        total += 2 * a * b * length * in_ch  # feature LayerNorm in, projection in
        total += a * s * b * d * (3 * m.pos_conv_layers + 3)  # positional convs (conv, LN, GELU), residual, norm
        return total
    return a * s * b * d * 3 + s * b * d  # text: embeddings sum, LayerNorm, dropout mask


@dataclass
class GatherSim:
    """What DeepSpeed's ZeRO-3 parameter coordinator keeps gathered (elements, TP-local, one rank)."""
    peak: int = 0  # most elements gathered at once (persistent ones excluded)
    kept_after_forward: int = 0  # still gathered when the backward starts (persistent ones excluded)
    gathered_forward: int = 0  # elements all-gathered during the forward
    gathered_backward: int = 0  # re-gathered during the backward


_SIMS: dict = {}


def forward_events(tree, root: int) -> list[tuple[str, int]]:
    """("fetch" | "release", node) in the order DeepSpeed's hooks see them in one forward: a module is
    fetched when called and released when it returns. Calls follow registration order; containers and the
    student's backbone are not called; an encoder block is one leaf module (its children are not hooked)."""
    events = []

    def visit(node: int, is_root: bool = False):
        name, _, kids, kind = tree[node]
        called = is_root or kind not in ("container", "backbone")
        if called:
            events.append(("fetch", node))
        for kid in kids:
            visit(kid)
        if called:
            events.append(("release", node))
    visit(root, is_root=True)
    return events


def backward_events(tree, forward: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The backward meets the modules in the reverse order of their forward completion: fetched where the forward
    released them, released where it fetched them; a block (a leaf module of two outputs) is fetched once per
    output."""
    events = []
    for kind, node in reversed(forward):
        if kind == "fetch":
            events.append(("release", node))
        else:
            events += [("fetch", node)] * (2 if tree[node][3] == "block" else 1)
    return events


def simulate_gathering(key, tree, root: int, sizes: list[int], persistent: set[int], prefetch: int, max_live: int,
                       reuse: int, backward: bool) -> GatherSim:
    """Replay ``PartitionedParameterCoordinator`` (deepspeed 0.19) on one step with a complete trace.

    Modules run in the tree's order (forward: registration order, parent first; backward: ``backward_events``);
    each fetch all-gathers the module's own parameters, then prefetches
    trace entries until ``stage3_prefetch_bucket_size`` new elements are queued (at most
    ``stage3_max_live_parameters`` gathered in all): with the default JSON the prefetch front runs far
    ahead. A module's parameters are released after it ran unless they are persistent, already
    prefetched for a later use, or used again within ``stage3_max_reuse_distance`` elements of the
    trace. ``backward=False``: the teacher's forward-only trace."""
    if key in _SIMS:
        return _SIMS[key]
    import collections
    events = forward_events(tree, root)
    forward_count = len(events)
    if backward:
        events += backward_events(tree, events)
    trace = [node for kind, node in events if kind == "fetch"]  # submodule order; index = step id
    queue = collections.deque((p, step) for step, node in enumerate(trace) for p in sorted(tree[node][1]))
    trace_numel = [sum(sizes[p] for p in tree[node][1]) for node in trace]
    available = set(persistent)
    recent = collections.defaultdict(lambda: -10 ** 12)
    sim = GatherSim()
    n_avail, step = 0, 0
    for i, (kind, node) in enumerate(events):
        own = tree[node][1]
        if kind == "fetch":
            new = [p for p in own if p not in available]
            gathered = sum(sizes[p] for p in new)
            available.update(new)
            n_avail += gathered
            not_fetched = [p for p in own if recent[p] < step]
            for _ in range(len(not_fetched)):
                if queue:
                    p, used_at = queue.popleft()
                    recent[p] = used_at
            budget, queued, chosen = min(max_live - n_avail, prefetch), 0, set()
            while queue and queued < budget:
                p, used_at = queue.popleft()
                recent[p] = max(recent[p], used_at)
                if p not in available and p not in chosen:
                    chosen.add(p)
                    queued += sizes[p]
            available.update(chosen)
            n_avail += queued
            gathered += queued
            if i < forward_count:
                sim.gathered_forward += gathered
            else:
                sim.gathered_backward += gathered
            step += 1
            sim.peak = max(sim.peak, n_avail)
        else:
            release = {p for p in own if p not in persistent and recent[p] <= step}
            traversed = 0
            for later in range(step, len(trace)):
                if traversed >= reuse or not release:
                    break
                release -= set(tree[trace[later]][1])
                traversed += trace_numel[later]
            for p in release:
                if p in available:
                    available.discard(p)
                    n_avail -= sizes[p]
        if i == forward_count - 1:
            sim.kept_after_forward = n_avail
    _SIMS[key] = sim
    return sim


def teacher_gathering(tree, root: int, sizes: list[int]) -> GatherSim:
    """Replay ``pipeline.gather.GatheredForward`` on the teacher's forward: a module's parameters gathered when it is
    called and released when it returns, each encoder block gathering the next one while it computes. The peak
    counts the gathered buffer of the unit being unpacked into its parameters (one unit more, for a moment)."""
    events = forward_events(tree, root)
    blocks = [node for kind, node in events if kind == "fetch" and tree[node][3] == "block"]
    following = dict(zip(blocks, blocks[1:]))
    numel = lambda node: sum(sizes[k] for k in tree[node][1])  # noqa: E731
    sim, held = GatherSim(), set()
    for kind, node in events:
        if kind == "release":
            held.discard(node)
            continue
        for unit in (node, following.get(node)):
            if unit is not None and unit not in held:
                held.add(unit)
                sim.gathered_forward += numel(unit)
        sim.peak = max(sim.peak, sum(numel(n) for n in held) + numel(node))
    return sim


def plan(cfg, world: int, tp: int, micro: int | None = None, accum: int | None = None, *,
         gpu_memory_gb: float = 80.0, dtype: str = "bf16", fused_attention: bool = False,
         overhead_gb: float = 2.0, global_batch: int | None = None, ds: dict | None = None,
         nodes: int | None = None, gpus_per_node: int | None = None, config_name: str = "",
         suggest: bool = True) -> Plan:
    """The plan for ``world`` GPUs at tensor-parallel size ``tp`` (see the module docstring)."""
    micro = micro or cfg.train.micro_batch_size
    accum = accum or cfg.train.grad_accum
    nodes = nodes or 1
    gpus_per_node = gpus_per_node or world
    ds = resolve_ds_config(cfg) if ds is None else ds
    dp = world // tp if tp >= 1 and world % tp == 0 else 0
    p = Plan(config=config_name, modality=cfg.modality, nodes=nodes, gpus_per_node=gpus_per_node, world=world, tp=tp,
             dp=dp, micro=micro, accum=accum, global_batch=micro * accum * dp, dtype=dtype,
             seq=sequence_length(cfg), gpu_memory_gb=gpu_memory_gb)
    p.checks = layout_checks(cfg, world, tp, micro, accum, global_batch, ds, dtype, nodes, gpus_per_node)
    if not (cfg.encoder.heads % tp == 0 and cfg.encoder.ffn_dim % tp == 0 and dp) or dp % (cfg.parallel.shard or dp):
        return p
    p.shard = cfg.parallel.shard or dp
    parts = p.shard  # ZeRO-3 partitions per parameter
    infos, tree = param_infos(cfg, tp)
    enc = cfg.encoder
    cb = DTYPE_BYTES[dtype]
    zero = ds.get("zero_optimization", {})
    threshold = int(zero.get("stage3_param_persistence_threshold", 100000))
    model_threshold = int(zero.get("stage3_model_persistence_threshold", sys.maxsize)) // parts
    reuse = int(zero.get("stage3_max_reuse_distance", 1000000000))
    prefetch = int(zero.get("stage3_prefetch_bucket_size", 50000000))
    max_live = int(zero.get("stage3_max_live_parameters", 1000000000))
    reduce_bucket = int(zero.get("reduce_bucket_size", 500000000))
    sub_group = int(zero.get("sub_group_size", 1000000000))
    contiguous = bool(zero.get("contiguous_gradients", True))

    ceil = lambda n: -(-n // parts)  # noqa: E731
    p.student_numel = sum(i.full_numel for i in infos)
    p.teacher_numel = sum(i.full_numel for i in infos if i.teacher)
    p.student_tp_numel = sum(i.numel for i in infos)
    p.teacher_tp_numel = sum(i.numel for i in infos if i.teacher)
    p.student_partition = sum(ceil(i.numel) for i in infos)
    p.teacher_partition = sum(ceil(i.numel) for i in infos if i.teacher)
    persistent, total_persist = set(), 0  # zero.Init marks them in creation order, up to the model threshold
    for k, i in enumerate(infos):
        if i.numel <= threshold and total_persist + i.numel <= model_threshold:
            persistent.add(k)
            total_persist += i.numel
    p.persistent_numel = total_persist
    sizes = [i.numel for i in infos]
    base = (id(tree), prefetch, max_live, reuse)
    student_sim = simulate_gathering(("student", *base, threshold, model_threshold), tree, 0, sizes, persistent,
                                     prefetch, max_live, reuse, backward=True)
    backbone = next(k for k, node in enumerate(tree) if node[0] == "backbone")
    teacher_sim = teacher_gathering(tree, backbone, sizes)
    p.kept_numel = student_sim.kept_after_forward + p.persistent_numel
    from pipeline.ema import shared_encoder
    from pipeline.model.data2vec import teacher_parameter_name
    teacher_names = {k: teacher_parameter_name(i.name) for k, i in enumerate(infos) if i.teacher}
    shared = set(shared_encoder(list(teacher_names.values()), cfg.make_modality().shared_prefixes, cfg.ema))
    shared_keys = [k for k, n in teacher_names.items() if n in shared]
    p.shared_numel = sum(sizes[k] for k in shared_keys)
    p.shared_regathered = sum(sizes[k] for k in shared_keys if k not in persistent)
    p.student_gather_peak = student_sim.peak
    p.teacher_gather_peak = teacher_sim.peak
    blocks: dict[str, int] = {}
    for i in infos:
        if i.name.startswith("backbone.encoder.blocks."):
            key = ".".join(i.name.split(".")[:4])
            blocks[key] = blocks.get(key, 0) + i.numel
    p.largest_block = max(blocks.values())
    in_flight = p.largest_block + min(prefetch, p.largest_block)  # the nominal working set

    # optimizer groups (decay / no decay, as pipeline.trainer.param_groups), split into sub-groups
    from pipeline.trainer import decay_rule, decays
    groups, rule = [0, 0], decay_rule(cfg)
    for i in infos:
        groups[int(not decays(i.name, i.ndim, rule))] += ceil(i.numel)
    largest_sub = max(min(g, sub_group) for g in groups)

    s, b = p.seq, micro
    if cfg.modality == "speech" and cfg.data.max_tokens:  # bucketed batches: at most max_tokens samples each,
        b = -(-cfg.data.max_tokens // cfg.model.max_samples)  # so at most this many full-length clips' activations
    a = cb
    method = cfg.make_method()
    prefix = method.modality.prefix_tokens
    clones, s_student = method.student_shape(s - prefix)  # data2vec 2.0: M rows per sample of the visible positions
    rows = b * clones
    block_act, scores = block_activation_bytes(enc, s_student, rows, tp, a, fused_attention)
    masked = max(1, round(masked_fraction(cfg) * (s - prefix))) * rows
    head = method.predictor_activation_bytes(b, s - prefix, a)
    loss = masked * enc.dim * 4 * 3  # fp32 prediction copy, targets, loss elements
    # train.activation_checkpointing: each block's (s, b, D) input is kept, and one block's activations live again
    # while the backward recomputes it
    student_sbd = s_student * rows * enc.dim
    blocks_act = (enc.depth * a * student_sbd + block_act) if cfg.train.activation_checkpointing \
        else enc.depth * block_act
    student_act = (blocks_act + embed_activation_bytes(cfg, s, b, a) + clone_embed_bytes(cfg, s, s_student, b, clones, a)
                   + (a * student_sbd if enc.norm_first else 0) + a * masked * enc.dim + head + loss)
    sbd = s * b * enc.dim
    teacher_taps = cfg.objective.top_k * sbd * 4
    tb = teacher_bytes(cfg, dtype)
    teacher_block = block_activation_bytes(enc, s, b, tp, tb, fused_attention)[0]
    teacher_phase = teacher_taps + 3 * sbd * 4 + teacher_block + teacher_sim.peak * tb
    step_phase = largest_sub * (cb + 4 + 4)  # flat gradient copy, its fp32 cast, one AdamW temporary

    p.memory = {
        f"student parameters (ZeRO-3 partition, {dtype})": p.student_partition * cb,
        f"gradients (partition, {dtype})": p.student_partition * cb,
        "optimizer states (fp32 master + Adam m, v)": p.student_partition * 12,
        "teacher (fp32 EMA partition)": p.teacher_partition * 4,
        "teacher (bf16 partition it gathers)": p.teacher_partition * tb if tb != 4 else 0,
        f"persistent student parameters (full, {dtype})": p.persistent_numel * cb,
        "ZeRO reduce bucket (reduce_bucket_size, contiguous_gradients; + its fp32 cast for an fp32 reduce)":
            (reduce_bucket * cb if contiguous else 0) + (reduce_bucket * 4 if gradient_bytes(cfg, dtype) != cb else 0),
        "CUDA context, NCCL, allocator (--overhead-gb)": int(overhead_gb * GiB),
    }
    p.phases = {
        "student forward/backward": {
            f"gathered student parameters (peak; nominal 2 x largest block: {in_flight * cb / GiB:.3f})":
                student_sim.peak * cb,
            f"activations{' (activation checkpointing)' if cfg.train.activation_checkpointing else ''} (attention "
            f"scores {scores * (1 if cfg.train.activation_checkpointing else enc.depth) / GiB:.3f} of it"
            f"{'' if fused_attention else '; ~0 with --fused-attention'})": student_act},
        "teacher forward": {
            f"gathered teacher parameters (peak, {'fp32' if tb == 4 else dtype})": teacher_sim.peak * tb,
            f"taps of the top {cfg.objective.top_k} blocks, fp32": teacher_taps,
            "targets + one block's transients": teacher_phase - teacher_taps - teacher_sim.peak * tb},
        "optimizer step": {"largest sub-group: flat gradient copy, its fp32 cast, an AdamW temporary": step_phase},
    }
    totals = {name: sum(parts.values()) for name, parts in p.phases.items()}
    p.peak_phase = max(totals, key=totals.get)
    p.peak = int(sum(p.memory.values()) + totals[p.peak_phase])
    p.fits = p.peak <= gpu_memory_gb * GiB

    p.comm, p.comm_inter_node = communication(cfg, p, student_sim, teacher_sim, sbd, student_sbd, dtype, tb)
    p.notes.append(f"nominal ZeRO-3 student all-gather (2 x parameters) would be "
                   f"{2 * p.student_tp_numel * cb * (parts - 1) / parts / GiB:.3f} GiB per micro-batch; persistent "
                   f"parameters and those still gathered after the forward are not gathered again (DeepSpeed JSON: "
                   f"prefetch bucket {prefetch:.0e}, max live {max_live:.0e}, max reuse distance {reuse:.0e} elements)")
    if suggest and not p.fits:
        p.suggestions = suggestions(cfg, p, gpu_memory_gb=gpu_memory_gb, dtype=dtype, fused_attention=fused_attention,
                                    overhead_gb=overhead_gb, ds=ds)
    node_ranks = gpus_per_node // tp if gpus_per_node % tp == 0 else 0
    if suggest and nodes > 1 and p.shard == dp and node_ranks and dp % node_ranks == 0:
        hybrid = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, shard=node_ranks),
                                     train=dataclasses.replace(cfg.train, grad_reduce="compute"))
        alt = plan(hybrid, world, tp, micro, accum, gpu_memory_gb=gpu_memory_gb, dtype=dtype,
                   fused_attention=fused_attention, overhead_gb=overhead_gb, ds=ds, nodes=nodes,
                   gpus_per_node=gpus_per_node, suggest=False)
        now, then = p.comm_bytes_per_step()["inter_node"], alt.comm_bytes_per_step()["inter_node"]
        p.notes.append(f"hybrid sharding (parallel.shard={node_ranks} train.grad_reduce=compute: ZeRO-3 inside each "
                       f"node, gradients all-reduced in bf16 across nodes) would send {then / GiB:.3f} GiB per GPU per "
                       f"step across nodes instead of {now / GiB:.3f} ({then / now:.2f}x), peak "
                       f"{alt.peak / GiB:.1f} GiB")
    return p


def teacher_bytes(cfg, dtype: str) -> int:
    """Bytes per element of the teacher's gathered parameters and of its activations, as the Trainer runs it: the
    student's compute dtype under its autocast (``train.teacher_precision=autocast``; ``reference``: the release's,
    autocast for speech, text and data2vec 2.0, fp32 for data2vec vision), else fp32. Its EMA state is fp32."""
    rule = cfg.train.teacher_precision
    rule = cfg.make_method().teacher_precision() if rule == "reference" else rule
    return DTYPE_BYTES[dtype] if rule == "autocast" else 4


def gradient_bytes(cfg, dtype: str) -> int:
    """Bytes per element of the gradient reduce-scatter: fp32 unless a bf16 run sets train.grad_reduce=compute."""
    return 2 if dtype == "bf16" and cfg.train.grad_reduce == "compute" else 4


def statistics_floats(cfg) -> int:
    """fp32 values in the micro-step's data-parallel all-reduce (``Trainer.micro_step``): the loss sums (regression,
    CLS), the targets' and the predictions' moments (count, per-dimension sums and sums of squares), the targets'
    per-position statistics (``pipeline.objective.position_stats``) and four counts / flags."""
    from pipeline.objective import POSITION_BINS, PROJECTED_DIMS
    return 2 + 2 * (1 + 2 * cfg.encoder.dim) + POSITION_BINS * (1 + PROJECTED_DIMS) + 1 + 4


def ring_inter_node_share(ranks: int, nodes: int) -> float:
    """Of what a ring collective over ``ranks`` ranks laid out in rank order over ``nodes`` nodes sends, the share
    that crosses node boundaries: ``nodes`` of its ``ranks`` equally loaded links (none on one node)."""
    return nodes / ranks if nodes > 1 else 0.0


def communication(cfg, p: Plan, student_sim: GatherSim, teacher_sim: GatherSim, sbd: int, student_sbd: int,
                  dtype: str, tb: int) -> tuple[dict, dict]:
    """Bytes one GPU sends per micro-batch, per category, and the inter-node part of each (module docstring).
    ``sbd``: elements of one (s, b, D) activation of the full samples; ``student_sbd``: of the student's blocks'
    (data2vec 2.0: M clone rows of the visible positions); ``tb``: ``teacher_bytes``."""
    enc, dp, tp, cb, shard = cfg.encoder, p.dp, p.tp, DTYPE_BYTES[dtype], p.shard
    gather = (shard - 1) / shard  # all-gather / reduce-scatter over a shard group, per byte of the whole tensor
    reduce = 2 * (tp - 1) / tp  # all-reduce over TP, per byte
    replicas = dp // shard
    embed = 1 if cfg.modality == "text" else 0  # vocab-parallel embedding: one all-reduce per forward
    recompute = 2 if cfg.train.activation_checkpointing else 0  # the backward runs each block's forward again
    over_shard = {
        "student all-gather, forward": (student_sim.gathered_forward + p.shared_regathered) * cb * gather,
        "student all-gather, backward": student_sim.gathered_backward * cb * gather,
        "gradient reduce-scatter": p.student_tp_numel * gradient_bytes(cfg, dtype) * gather,
        "teacher all-gather": (teacher_sim.gathered_forward - p.shared_numel) * tb * gather,
        # persistent parameters: gathered again after every optimizer step, one collective each (per micro-batch)
        "student all-gather of persistent parameters, after the step": p.persistent_numel * cb * gather / p.accum,
    }
    over_dp = {"statistics all-reduce": statistics_floats(cfg) * 4 * 2 * (dp - 1) / dp}
    # hybrid sharding: the gradient partition all-reduced over the replicas once per optimizer step (as bytes per
    # micro-batch, the unit of this table)
    over_replicas = {"gradient all-reduce over replicas":
                     2 * (replicas - 1) / replicas * p.student_partition * gradient_bytes(cfg, dtype) / p.accum
                     } if replicas > 1 else {}
    over_tp = {
        "TP all-reduce, student forward": (2 * enc.depth * student_sbd + embed * sbd) * cb * reduce,
        "TP all-reduce, student backward": (4 + recompute) * enc.depth * student_sbd * cb * reduce,
        "TP all-reduce, teacher forward": (2 * enc.depth + embed) * tb * sbd * reduce,
        "statistics all-reduce over TP": statistics_floats(cfg) * 4 * reduce,  # agreed there (agree_over_tp)
        "EMA update": 0,
    }
    groups = [(over_shard, shard_inter_node_share(p)), (over_dp, ring_inter_node_share(dp, p.nodes)),
              (over_replicas, ring_inter_node_share(replicas, min(replicas, p.nodes))), (over_tp, 0.0)]
    comm = {k: sum(part.get(k, 0) for part, _ in groups) for part, _ in groups for k in part}
    inter = {k: sum(part.get(k, 0) * share for part, share in groups) for k in comm}  # TP groups stay in a node
    return comm, inter


def shard_inter_node_share(p: Plan) -> float:
    """``ring_inter_node_share`` of a shard group: ``p.shard`` data-parallel ranks, TP apart, so spanning
    shard x TP consecutive ranks (all of them without hybrid sharding)."""
    span = p.shard * p.tp
    return ring_inter_node_share(p.shard, max(1, min(p.nodes, -(-span // p.gpus_per_node))))


def suggestions(cfg, p: Plan, **kw) -> list[str]:
    out = []
    rerun = lambda world, tp, micro, accum, **extra: plan(  # noqa: E731
        cfg, world, tp, micro, accum, suggest=False, **{**kw, **extra})
    per_rank = p.micro * p.accum
    for m in range(p.micro - 1, 0, -1):
        if per_rank % m == 0 and rerun(p.world, p.tp, m, per_rank // m).fits:
            out.append(f"lower the micro batch: --micro-batch {m} --grad-accum {per_rank // m} keeps the global "
                       f"batch {p.global_batch} and fits")
            break
    else:
        if rerun(p.world, p.tp, 1, p.accum).fits:
            out.append("lower the micro batch (--micro-batch 1 fits; raise --grad-accum to keep the global batch)")
    enc = cfg.encoder
    for t in _divisors(enc.heads):
        valid = t > p.tp and enc.ffn_dim % t == 0 and p.world % t == 0
        in_node = p.nodes == 1 or p.gpus_per_node % t == 0  # the layout check on TP groups across nodes
        if valid and in_node and rerun(p.world, t, p.micro, p.accum).fits:
            dp2 = p.world // t
            keep = (f"; --grad-accum {p.global_batch // (p.micro * dp2)} keeps the global batch {p.global_batch}"
                    if p.global_batch % (p.micro * dp2) == 0 else "")
            out.append(f"raise TP: --tp {t} fits (DP {dp2}, global batch {p.micro * p.accum * dp2}{keep})")
            break
    if not kw.get("fused_attention"):
        if rerun(p.world, p.tp, p.micro, p.accum, fused_attention=True).fits:
            out.append("fits if attention runs in a fused SDPA kernel (--fused-attention: no stored scores)")
    for mult in (2, 4, 8, 16, 32):
        world = p.world * mult
        if rerun(world, p.tp, p.micro, p.accum).fits:
            out.append(f"more GPUs: {world} GPUs ({-(-world // p.gpus_per_node)} nodes of {p.gpus_per_node}) fit "
                       f"(DP {world // p.tp} shrinks every ZeRO partition)")
            break
    if not out:
        out.append("no single change fits: combine a higher TP, a smaller micro batch and more GPUs, "
                   "or shrink the model")
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def gib(x: float) -> str:
    return f"{x / GiB:8.3f}"


def report(p: Plan, cfg) -> str:
    enc = cfg.encoder
    lines = [f"plan: {p.config} ({p.modality}, {enc.depth} x {enc.dim}, {enc.heads} heads, ffn {enc.ffn_dim}; "
             f"sequence {p.seq}, compute dtype {p.dtype})",
             f"layout: {p.nodes} node(s) x {p.gpus_per_node} GPUs = world {p.world}; TP {p.tp}, DP "
             f"{p.dp if p.dp else '-'}; global batch = micro {p.micro} x accumulation {p.accum} x DP "
             f"{p.dp if p.dp else '-'} = {p.global_batch if p.dp else '-'}",
             "checks:"]
    lines += [f"  {'ok ' if ok else 'FIX'}  {msg}" for ok, msg in p.checks]
    if not p.ok:
        return "\n".join(lines)
    lines += [f"parameters: student {p.student_numel / 1e6:.1f}M (teacher {p.teacher_numel / 1e6:.1f}M, no head or "
              f"decoder); per "
              f"TP rank {p.student_tp_numel / 1e6:.2f}M / {p.teacher_tp_numel / 1e6:.2f}M; ZeRO-3 partition per GPU "
              f"{p.student_partition / 1e6:.3f}M / {p.teacher_partition / 1e6:.3f}M elements; largest block "
              f"{p.largest_block / 1e6:.2f}M",
              "memory per GPU (GiB), held all the time:"]
    for k, v in p.memory.items():
        lines.append(f"  {gib(v)}  {k}")
    lines.append("  phases that do not overlap (the largest, marked *, adds to the peak):")
    for phase, parts in p.phases.items():
        mark = "*" if phase == p.peak_phase else " "
        lines.append(f"  {gib(sum(parts.values()))} {mark}{phase}")
        lines += [f"      {gib(v)}  {k}" for k, v in parts.items()]
    verdict = "fits" if p.fits else "DOES NOT FIT"
    lines.append(f"  {gib(p.peak)}  total (peak): {verdict} in {p.gpu_memory_gb:g} GiB "
                 f"({(p.gpu_memory_gb * GiB - p.peak) / GiB:+.2f} GiB headroom)")
    for s in p.suggestions:
        lines.append(f"  -> {s}")
    lines.append(f"communication per GPU (GiB sent; per micro-batch, per step = x {p.accum} accumulation, and the "
                 f"step's inter-node / intra-node parts: rings over {p.nodes} node(s) of {p.gpus_per_node} GPUs):")
    lines.append(f"  {'micro':>8}  {'step':>8}  {'inter':>8}  {'intra':>8}")
    for k, v in p.comm.items():
        inter = p.comm_inter_node[k] * p.accum
        lines.append(f"  {gib(v)}  {gib(v * p.accum)}  {gib(inter)}  {gib(v * p.accum - inter)}  {k}")
    total, split = sum(p.comm.values()), p.comm_bytes_per_step()
    inter, intra = gib(split["inter_node"]), gib(split["intra_node"])
    lines.append(f"  {gib(total)}  {gib(total * p.accum)}  {inter}  {intra}  total")
    per_rank = checkpoint_bytes(p)
    writers = p.world // (p.dp // p.shard) if p.shard else p.world  # hybrid sharding: replica 0's ranks write
    lines.append(f"checkpoint: {gib(per_rank).strip()} GiB per writing GPU, {per_rank * writers / GiB:.1f} GiB per "
                 f"checkpoint (fp32 student, Adam m and v, teacher: 16 bytes per parameter per TP rank; any DP size "
                 f"can resume it)")
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def checkpoint_bytes(p: Plan) -> int:
    """One rank's checkpoint file: its fp32 partitions of the student's master weights, both Adam moments
    and the teacher (pipeline.checkpoint)."""
    return 4 * (3 * p.student_partition + p.teacher_partition)


def plan_dict(p: Plan) -> dict:
    d = dataclasses.asdict(p)
    d["ok"], d["comm_per_step"], d["comm_bytes_per_step"] = p.ok, p.comm_per_step(), p.comm_bytes_per_step()
    return d


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.plan",
        description="Capacity plan for a cluster size: layout checks, per-GPU memory (ZeRO-3 partitions, sharded "
                    "fp32 EMA teacher, gathered parameters, activations) and per-step communication. Analytic: no GPU "
                    "and no multi-rank job. Exit status: 0 fits, 1 does not fit, 2 a layout or config problem.",
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/vision_large.yaml")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--tp", type=int, default=None,
                        help="tensor-parallel size (default: parallel.tp of the config)")
    parser.add_argument("--micro-batch", type=int, default=None, help="default: train.micro_batch_size")
    parser.add_argument("--grad-accum", type=int, default=None, help="default: train.grad_accum")
    parser.add_argument("--global-batch", type=int, default=None, help="check that the layout gives this global batch")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="GPU memory in GiB (default 80)")
    parser.add_argument("--precision", choices=sorted(DTYPE_BYTES), default="bf16",
                        help="student compute dtype on the GPUs (default bf16; the teacher computes in it or in fp32, "
                             "by train.teacher_precision, and keeps an fp32 EMA)")
    parser.add_argument("--fused-attention", action="store_true",
                        help="assume fused SDPA kernels (flash / memory-efficient): no stored attention scores")
    parser.add_argument("--overhead-gb", type=float, default=2.0,
                        help="fixed allowance for CUDA context, NCCL buffers and allocator fragmentation (GiB)")
    parser.add_argument("--json", action="store_true",
                        help="print the plan as one JSON object (comm_per_step: bytes per GPU per optimizer step "
                             "per category; comm_bytes_per_step: their inter_node / intra_node split)")
    parser.add_argument("overrides", nargs="*",
                        help="config overrides such as encoder.depth=32 train.micro_batch_size=16")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """The CLI; returns the exit status (0 fits, 1 does not fit, 2 a layout or config problem)."""
    args = parse_args(argv)
    from pipeline.experiment import load_experiment
    try:
        for name in ("nodes", "gpus_per_node", "tp", "micro_batch", "grad_accum", "global_batch"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        cfg = load_experiment(args.config, args.overrides)
        tp = args.tp or cfg.parallel.tp
        p = plan(cfg, args.nodes * args.gpus_per_node, tp, args.micro_batch, args.grad_accum,
                 gpu_memory_gb=args.gpu_memory_gb, dtype=args.precision, fused_attention=args.fused_attention,
                 overhead_gb=args.overhead_gb, global_batch=args.global_batch, nodes=args.nodes,
                 gpus_per_node=args.gpus_per_node, config_name=str(args.config))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan_dict(p), indent=1) if args.json else report(p, cfg))
    if not p.ok:
        return 2
    return 0 if p.fits else 1


if __name__ == "__main__":
    import logging
    import os
    import warnings
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # torch's "no CUDA runtime" notice
    warnings.filterwarnings("ignore")  # megatron-core's "Transformer Engine and Apex are not installed"
    logging.disable(logging.WARNING)
    sys.exit(main())
