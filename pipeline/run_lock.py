"""One run at a time per ``train.output_dir``: rank 0 holds an exclusive lock on ``<output_dir>/.run.lock``.

Two jobs in one directory would resume from each other's checkpoints, overwrite each other's ``metrics.jsonl``
and report each other's files as saved. The lock is ``flock`` on an open file: the kernel releases it when the
holding process ends in any way (exit, crash, kill -9, a node's reboot for a local disk; NFS clients emulate it with
byte-range locks their server releases with the client's lease). The file names its holder (host, pid, SLURM job,
start time) so that a refusal can say who holds it. On a filesystem without lock support (Lustre mounted without
``-o flock``) the run goes on with a warning: nothing can be checked there.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".run.lock"
NOT_SUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class OutputDirInUse(RuntimeError):
    """Another process holds train.output_dir."""


def holder_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def describe(record: str) -> str:
    try:
        held = json.loads(record)
        job = f", SLURM job {held['slurm_job']}" if held.get("slurm_job") else ""
        return f"pid {held['pid']} on {held['host']}{job}, since {held['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that left no record"


def claim(output_dir: str | Path) -> tuple[int | None, str | None]:
    """Take the lock of ``output_dir`` for this process. -> (the open descriptor, to keep open for the run; None
    where the filesystem cannot lock, with a warning text). OutputDirInUse, naming the holder, if it is held."""
    import fcntl
    path = Path(output_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            record = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            raise OutputDirInUse(f"train.output_dir={output_dir} is in use by another run ({describe(record)}): two "
                                 f"runs there would resume from and overwrite each other's checkpoints. Wait for it "
                                 f"to end, stop it, or use another train.output_dir") from None
        os.close(fd)
        if exc.errno in NOT_SUPPORTED:
            return None, (f"train.output_dir={output_dir}: its filesystem does not support locks ({exc.strerror}); "
                          f"make sure no other run uses this directory")
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder_record()).encode(), 0)
    os.fsync(fd)
    return fd, None
