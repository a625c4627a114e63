"""Name a frozen or lost rank, within a bounded time: heartbeats through the rendezvous store.

A rank that stops (SIGSTOP, a hung driver, a node that drops off the network) leaves its peers waiting in a
collective until the process-group timeout, which then names no one. Here each rank runs a daemon thread that, every
``period`` seconds, bumps its own counter in the store the ranks met through (MASTER_ADDR:MASTER_PORT: torchrun's
agent or rank 0's TCPStore) and reads everyone's. A peer whose counter has not moved for ``silent_after`` seconds (of
this rank's clock: no clock is compared across nodes), or a store that stops answering for that long, is reported in
one line naming the rank, its host and pid, and this rank then ends (the launcher ends the others). The thread keeps
beating while its own rank computes, saves or waits in a collective: only a stopped process, or a lost node, falls
silent. Under torchrun the store lives in the launcher's agent: after the agent dies the ranks have that long to save
(the SIGTERM it leaves them; train.main) before their heartbeat ends them.
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
import time

PREFIX = "d2v/heartbeat"


class Heartbeat(threading.Thread):
    def __init__(self, rank: int, world: int, silent_after: float, on_silence, period: float | None = None):
        super().__init__(name="d2v-heartbeat", daemon=True)
        self.rank, self.world, self.silent_after, self.on_silence = rank, world, silent_after, on_silence
        self.period = period or max(1.0, min(10.0, silent_after / 6))
        self.halt = threading.Event()
        self.store = None

    def connect(self):
        import torch.distributed as dist
        timeout = datetime.timedelta(seconds=self.silent_after)
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timeout, wait_for_workers=False)

    def run(self) -> None:
        me = f"{socket.gethostname()} pid {os.getpid()}"
        seen: dict[int, tuple[bytes, float]] = {}  # rank -> (its last beat, when this rank first saw it)
        beat = 0
        started = answered = time.monotonic()
        while not self.halt.is_set():
            try:
                self.store = self.store or self.connect()
                beat += 1
                self.store.set(f"{PREFIX}/{self.rank}", f"{beat} {me}")
                keys = [f"{PREFIX}/{r}" for r in range(self.world)]
                values = self.store.multi_get(keys) if self.store.check(keys) else None
                missing = [] if values is not None else [r for r, k in enumerate(keys) if not self.store.check([k])]
                answered = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - a store silent for long is the finding itself
                self.store = None  # reconnect at the next beat; the ranks go on meanwhile (a stop can still save)
                if time.monotonic() - answered > self.silent_after and not self.halt.is_set():
                    self.on_silence(f"the rendezvous store at {os.environ.get('MASTER_ADDR')}:"
                                    f"{os.environ.get('MASTER_PORT')} (the launcher's agent, or rank 0 under srun) "
                                    f"has not answered for {time.monotonic() - answered:.0f} s ({type(exc).__name__}): "
                                    f"its host or process is frozen or lost")
                    return
                self.halt.wait(self.period)
                continue
            now = time.monotonic()
            if values is None:  # a peer has not beaten yet: allow start-up the same grace
                if missing and now - started > self.silent_after:
                    self.on_silence(f"rank {missing[0]} never sent a heartbeat in {self.silent_after:.0f} s")
                    return
            else:
                for rank, value in enumerate(values):
                    if rank not in seen or seen[rank][0] != value:
                        seen[rank] = (value, now)
                    elif now - seen[rank][1] > self.silent_after:
                        where = value.decode("utf-8", "replace").partition(" ")[2]
                        self.on_silence(f"rank {rank} ({where}) has not answered for {now - seen[rank][1]:.0f} s: "
                                        f"it is stopped, frozen or its node is lost")
                        return
            self.halt.wait(self.period)

    def stop(self) -> None:
        self.halt.set()


def start(rank: int, world: int, timeout_s: float, on_silence) -> Heartbeat | None:
    """A running heartbeat for a job of several ranks (None for one): a peer silent for half the process-group
    timeout (parallel.timeout_s) is reported through ``on_silence(message)``, before the collectives time out."""
    if world < 2:
        return None
    beat = Heartbeat(rank, world, timeout_s / 2, on_silence)
    beat.start()
    return beat
