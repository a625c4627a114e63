"""The teacher's forward over its ZeRO-3 partitions, without a DeepSpeed engine: gather a unit, compute, release.

The teacher takes no gradient and no optimizer step, so all it needs from ZeRO-3 is its partitions (built by
``deepspeed.zero.Init`` in ``pipeline.distributed.build_sharded``, laid out as the student's, read and written by
``pipeline.ema.ShardedEMA``) and a gather around its forward. DeepSpeed's engine does that with Python hooks on
every module, a trace of the module order and a coordinator that walks the parameters at every fetch and release,
which costs more host time than the gathers themselves on small and mid-sized models (BENCHMARKS.md section 17).
Here a unit (an encoder block, gathered whole as ZeRO-3 gathers it: ``pipeline.distributed.gathered_whole``; or
another module's own parameters) is gathered with one collective into one buffer; each block issues the next
block's collective before it computes (``async_op``: on a GPU it runs on the communication stream meanwhile, and
the compute stream waits for it on the device, not the host), and every unit is released when it returns. With
one rank per shard group nothing is sent or copied: a parameter's data is a view of its partition.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from pipeline.distributed import gathered_whole


def gather_units(module: nn.Module) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    """(module, the parameters gathered for its forward), in module order: a ``gathered_whole`` module with all of
    its parameters (its children get no unit), any other module with its own parameters only."""
    if gathered_whole(module):
        return [(module, list(module.parameters()))]
    own = list(module.parameters(recurse=False))
    units = [(module, own)] if own else []
    for child in module.children():
        units += gather_units(child)
    return units


class Gathered:
    """Parameters of one unit being gathered: ``start`` issues the collective, ``finish`` waits for it (on the
    device) and points each parameter at its full tensor, ``release`` empties them again."""

    def __init__(self, params: list[nn.Parameter], group, size: int):
        self.params, self.group, self.size = params, group, size
        self.work = self.buffer = self.send = None

    def start(self) -> "Gathered":
        if self.size > 1:  # the send buffer is kept until the collective is waited for
            self.send = torch.cat([p.ds_tensor.reshape(-1) for p in self.params])
            self.buffer = torch.empty(self.size * self.send.numel(), dtype=self.send.dtype, device=self.send.device)
            self.work = dist.all_gather_into_tensor(self.buffer, self.send, group=self.group, async_op=True)
        return self

    def finish(self) -> None:
        if self.size == 1:  # the partition is the whole parameter
            for p in self.params:
                p.data = p.ds_tensor.data[:p.ds_numel].view(p.ds_shape)
            return
        self.work.wait()
        rows, offset = self.buffer.view(self.size, -1), 0  # row r: rank r's partitions, one after the other
        for p in self.params:
            n = p.ds_tensor.numel()
            p.data = rows[:, offset:offset + n].reshape(-1)[:p.ds_numel].view(p.ds_shape)
            offset += n
        self.work = self.buffer = self.send = None

    def release(self) -> None:
        for p in self.params:
            p.data = torch.empty(0, dtype=p.ds_tensor.dtype, device=p.ds_tensor.device)


class GatheredForward:
    """Runs ``module`` (built by ``build_sharded``, never trained) with each unit gathered for its forward and
    released after, the next encoder block prefetched. ``module`` is the teacher itself (hooks on its modules);
    this object calls it, switches it to eval, and drops a prefetch an interrupted forward left behind."""

    def __init__(self, module: nn.Module, group, size: int):
        self.module = module
        self.units = {m: Gathered(params, group, size) for m, params in gather_units(module)}
        blocks = [m for m in self.units if gathered_whole(m)]
        self.next_block = dict(zip(blocks, blocks[1:]))
        self.first_block = blocks[0] if blocks else None
        self.pending: dict[nn.Module, Gathered] = {}
        for m in self.units:
            m.register_forward_pre_hook(self.gather)
            m.register_forward_hook(self.release, always_call=True)

    def gather(self, m: nn.Module, _args) -> None:
        if m is self.first_block:  # a new forward: nothing prefetched may be left from an interrupted one
            self.discard_prefetched()
        unit = self.pending.pop(m, None) or self.units[m].start()
        following = self.next_block.get(m)
        if following is not None and following not in self.pending:
            self.pending[following] = self.units[following].start()  # its collective runs while m computes
        unit.finish()

    def release(self, m: nn.Module, _args, _output) -> None:
        self.units[m].release()

    def discard_prefetched(self) -> None:
        for unit in self.pending.values():
            if unit.work is not None:
                unit.work.wait()
            unit.work = unit.buffer = unit.send = None
        self.pending.clear()

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def eval(self) -> "GatheredForward":
        self.module.eval()
        return self
