"""WebDataset shards -> batches, split by data-parallel rank and DataLoader worker, resumable exactly.

Every (data-parallel rank, worker) pair reads an infinite stream: in epoch e it takes its slice
``perm_e[dp_rank::dp][worker::workers]`` of a seeded shard permutation, shuffles samples through a
seeded buffer and yields whole batches. The DataLoader visits workers round-robin, so batch i of a
rank comes from worker ``i % workers`` and the whole stream is a function of (seed, layout). Every
batch carries its stream's position (raw samples consumed); a checkpoint saves the batch count and
these positions, and on resume each worker takes over the stream whose turn it is and skips that
stream's raw samples *before* decoding. With ``data.max_tokens`` (speech) a stream sorts windows of
examples by length and cuts them into batches by a token budget; the position then also counts the
batches taken from the current window, which a resume rebuilds (``bucketed_batches``). Tensor-parallel
peers share a data-parallel rank and so see identical batches (we do not use webdataset's RANK-based node
splitter for that reason).
Decoding, augmentation and masking run in the workers; sample bytes are never unpickled.

Bad data does not stop a run: a shard that cannot be read (truncated, corrupt, missing) is logged and
the stream moves on to the next one; a sample that fails to decode is logged and skipped. Both are
deterministic, so exact resume still holds. A worker gives up with a clear error when
``data.max_bad_samples`` samples in a row fail, or when a whole pass over its shards yields nothing.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import shutil
import signal
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.config import ConfigError, DataConfig
from pipeline.modalities.base import Modality

log = logging.getLogger("pipeline")
UNREADABLE = (tarfile.TarError, OSError, EOFError, ValueError, KeyError)  # what a damaged tar raises


def resolve_shards(manifest: str, modality: Modality | None = None) -> list[str]:
    """Absolute shard paths from a data_prep manifest (file or directory), validated (and checked against
    what ``modality`` needs, when given)."""
    from data_prep.core import read_manifest
    if not manifest:
        raise ConfigError("data.manifest is empty: point it at a data_prep output (e.g. data.manifest=runs/shards)")
    path = Path(manifest)
    if not path.exists():
        raise ConfigError(f"data.manifest={manifest} does not exist; create shards with python -m data_prep.images")
    try:
        info = read_manifest(path)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"data.manifest={manifest}: {exc}") from None
    if modality is not None:
        problem = modality.check_manifest(info)
        if problem:
            raise ConfigError(f"data.manifest={manifest}: {problem}")
    listed_empty = [s["name"] for s in info["shards"] if s["samples"] == 0 and tar_has_members(s["path"])]
    if listed_empty:  # data_prep lists a shard whose every input was skipped with 0 samples: it is an empty tar
        raise ConfigError(f"data.manifest={manifest} lists {listed_empty[:3]} with 0 samples, but the file holds "
                          f"samples: the manifest is stale or was edited. Re-create it with data_prep")
    shards = [s["path"] for s in info["shards"] if s["samples"] > 0]
    if not shards:
        raise ConfigError(f"data.manifest={manifest} lists no shards: the data prep produced no samples")
    return shards


def tar_has_members(path: str) -> bool:
    """Whether a tar holds any member: its first 512-byte block is a header, not the end-of-archive zeros."""
    try:
        with open(path, "rb") as f:
            return any(f.read(512))
    except OSError as exc:
        raise ConfigError(f"shard {path} cannot be read ({exc.strerror or exc})") from None


def check_shard_count(num_shards: int, dp: int, workers: int) -> None:
    needed = dp * max(workers, 1)
    if num_shards < needed:
        raise ConfigError(
            f"{num_shards} shard(s) for {dp} data-parallel rank(s) x {max(workers, 1)} worker(s): need at least "
            f"{needed}. Re-shard with a smaller --shard-size, or lower data.workers")


SHARED_MEMORY = "/dev/shm"


def check_shared_memory(cfg: DataConfig, sample_bytes: int, batch_size: int, ranks_on_node: int,
                        shm: str = SHARED_MEMORY) -> None:
    """DataLoader workers hand batches to their rank through shared memory (/dev/shm). Containers often
    give it 64 MB, and a worker that runs out dies with a bus error mid-run: refuse such a layout now.
    Budget per rank: the batches its workers prefetch (workers x prefetch) plus the one it is training on.
    data.workers=0 needs none. No /dev/shm (not Linux): nothing to check."""
    if cfg.workers == 0 or not os.path.isdir(shm):
        return
    need = ranks_on_node * (cfg.workers * cfg.prefetch + 1) * batch_size * sample_bytes
    free = shutil.disk_usage(shm).free
    if free < need:
        mib = 2 ** 20
        raise ConfigError(
            f"{shm} has {free / mib:.0f} MiB free, but the DataLoader workers of {ranks_on_node} rank(s) on this "
            f"node need about {need / mib:.0f} MiB of it to pass batches ({cfg.workers} worker(s) x {cfg.prefetch} "
            f"prefetched batch(es) + 1, of {batch_size} x {sample_bytes / mib:.2f} MiB, per rank). Give the "
            f"container more shared memory (docker run --shm-size=...), or lower data.workers / data.prefetch "
            f"(data.workers=0 needs none)")


MEMINFO = "/proc/meminfo"
CGROUP_MEMORY = "/sys/fs/cgroup"  # cgroup v2: memory.max and memory.current of this process's group (SLURM, docker)


def available_memory(meminfo: str | None = None, cgroup: str | None = None) -> int | None:
    """Bytes this job can still allocate: the node's MemAvailable, or less under a cgroup v2 memory limit (a SLURM
    allocation, docker --memory). None: unknown (not Linux)."""
    try:
        with open(meminfo or MEMINFO, encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    try:
        group = Path(cgroup or CGROUP_MEMORY)
        limit = (group / "memory.max").read_text("ascii").strip()
        if limit != "max":
            available = min(available, int(limit) - int((group / "memory.current").read_text("ascii")))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit to read
    return available


def check_host_memory(cfg: DataConfig, sample_bytes: int, batch_size: int, ranks_on_node: int,
                      meminfo: str | None = None, cgroup: str | None = None) -> None:
    """Every rank holds decoded batches in host memory (with data.workers=0 as well, where /dev/shm plays no
    part): the one being made, the one training and each worker's prefetched ones. Refuse a micro-batch size
    that cannot fit in the node's available memory now, rather than have the kernel kill a rank mid-run.
    No /proc/meminfo (not Linux): nothing to check."""
    available = available_memory(meminfo, cgroup)
    if available is None:
        return
    need = ranks_on_node * (cfg.workers * cfg.prefetch + 2) * batch_size * sample_bytes
    if need > available:
        gib = 2 ** 30
        raise ConfigError(
            f"micro-batches of {batch_size} x {sample_bytes / 2 ** 20:.2f} MiB need about {need / gib:.1f} GiB of host "
            f"memory on this node ({ranks_on_node} rank(s) x {cfg.workers * cfg.prefetch + 2} batches in flight), but "
            f"{available / gib:.1f} GiB is available (MemAvailable, or the job's cgroup limit): lower train.micro_batch_size (raise train.grad_accum to keep "
            f"the global batch) or data.workers / data.prefetch")


def raw_samples(paths: list[str], verify=None) -> Iterator[dict]:
    """Samples (dict of key -> bytes) from local tar shards. Files are opened here, never via a URL
    handler, so a shard name cannot run a command (webdataset's 'pipe:'). A shard that cannot be read
    to its end is logged and left; the sample being assembled when the damage was hit is lost too.
    ``verify(path)``, when given, runs before a shard is opened (data.verify=sha256)."""
    for path in paths:
        if verify is not None:
            verify(path)
        count = 0
        try:
            with open(path, "rb") as stream:
                for sample in group_by_keys(tar_file_expander([{"url": path, "stream": stream}])):
                    count += 1
                    yield sample
        except UNREADABLE as exc:
            log.warning("data: shard %s is unreadable after %d samples (%s: %s); skipping the rest of it. "
                        "Re-create it with data_prep (its sha256 is in the manifest)", path, count,
                        type(exc).__name__, exc)


def shuffled(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    buffer: list[dict] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(IterableDataset):
    def __init__(self, shards: list[str], modality: Modality, cfg: DataConfig, batch_size: int, seed: int,
                 dp_rank: int, dp: int, start_batch: int = 0, positions: list[int] | None = None):
        self.shards, self.modality, self.cfg = list(shards), modality, cfg
        self.batch_size, self.seed, self.dp_rank, self.dp = batch_size, seed, dp_rank, dp
        self.start_batch, self.positions = start_batch, positions
        if cfg.max_tokens and not hasattr(modality, "token_batches"):
            raise ConfigError(f"data.max_tokens={cfg.max_tokens}: the {modality.name} modality has no length-"
                              f"bucketed batching (speech only); set data.max_tokens=0")

    def worker_shards(self, epoch: int, worker: int, workers: int) -> list[str]:
        order = list(self.shards)
        random.Random(f"shards/{self.seed}/{epoch}").shuffle(order)
        return order[self.dp_rank::self.dp][worker::workers]

    def worker_samples(self, worker: int, workers: int) -> Iterator[dict]:
        epoch = 0
        while True:
            rng = random.Random(f"shuffle/{self.seed}/{epoch}/{self.dp_rank}/{worker}")
            shards = self.worker_shards(epoch, worker, workers)
            count = 0
            for sample in shuffled(raw_samples(shards, self.verifier()), self.cfg.shuffle_buffer, rng):
                count += 1
                yield sample
            if count == 0:
                raise DataError(f"data-parallel rank {self.dp_rank}, worker {worker}: its {len(shards)} shard(s) "
                                f"yielded no sample in a whole pass (see the warnings above): {shards[:3]}")
            yield PASS_END
            epoch += 1

    def verifier(self):
        """data.verify=sha256: a check of each shard's sha256 against the manifest, once per worker."""
        if self.cfg.verify != "sha256":
            return None
        if not hasattr(self, "expected"):
            from data_prep.core import read_manifest
            self.expected = {s["path"]: s["sha256"] for s in read_manifest(self.cfg.manifest)["shards"]}
            self.verified: set[str] = set()

        def verify(path: str) -> None:
            from data_prep.core import sha256_file
            if path in self.verified:
                return
            try:
                digest = sha256_file(Path(path))
            except OSError:
                return  # unreadable: raw_samples logs and skips it like any damaged shard
            if path in self.expected and digest != self.expected[path]:
                raise DataError(f"shard {path} does not match the sha256 in its manifest {self.cfg.manifest}: it "
                                f"changed or is damaged. Re-create it with data_prep")
            self.verified.add(path)
        return verify

    def decode(self, sample: dict, rng: random.Random) -> dict | None:
        """The modality's example, or None for a sample that fails to decode (logged)."""
        try:
            return self.modality.example(sample, rng)
        except Exception as exc:  # noqa: BLE001 - any decoder error; repeated failures stop the run below
            self.reject(sample, exc)
            return None

    def same_shapes(self, example: dict, sample: dict) -> bool:
        """Collate stacks the modality's fixed-shape keys: an example whose shapes differ from this stream's
        first good example (e.g. a text block a token short) is a bad sample, skipped and counted here
        rather than a crash in collate."""
        shapes = {key: tuple(example[key].shape) for key in self.modality.fixed_shape_keys if key in example}
        if self.shapes is None:
            self.shapes = shapes
        if shapes == self.shapes:
            return True
        self.reject(sample, ValueError(f"shapes {shapes} differ from this stream's first example's {self.shapes}"))
        return False

    def reject(self, sample: dict, exc: Exception) -> None:
        """Count (and log the first 20 of) the bad samples; too many in a row stop the run."""
        self.bad += 1
        if self.bad <= 20:
            log.warning("data: skipped sample %s of %s (%s: %s)%s", sample.get("__key__"), sample.get("__url__"),
                        type(exc).__name__, exc, "; further bad samples are not logged" if self.bad == 20 else "")
        self.bad_in_a_row += 1
        if self.bad_in_a_row > self.cfg.max_bad_samples:
            raise DataError(f"{self.bad_in_a_row} samples in a row failed to decode (data.max_bad_samples="
                            f"{self.cfg.max_bad_samples}); the last, {sample.get('__key__')} of "
                            f"{sample.get('__url__')}: {type(exc).__name__}: {exc}. Check the shards and the "
                            f"model settings") from exc

    def __iter__(self):
        info = get_worker_info()
        loader_worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader always starts at its worker 0, but the next batch (index start_batch) belongs to
        # stream start_batch % workers: rotate the roles so every stream continues where it stopped.
        worker = (loader_worker + self.start_batch) % workers
        skip, taken = unpack_position(self.positions[worker] if self.positions else 0)
        examples = self.examples(worker, workers, skip)
        if self.cfg.max_tokens:
            batches = self.bucketed_batches(examples, worker, skip, taken)
        else:
            if taken:
                log.warning("data: worker stream %d resumes a data.max_tokens (bucketed) position with "
                            "data.max_tokens=0: it restarts at its last window's start, so up to "
                            "data.bucket_window examples are seen again", worker)
            batches = self.fixed_batches(examples)
        for batch, position in batches:
            # where this stream stands: what a checkpoint saves
            yield {**self.modality.collate(batch), STREAM_KEY: torch.tensor([worker, position])}

    def examples(self, worker: int, workers: int, skip: int) -> Iterator[tuple[int, dict]]:
        """(raw samples consumed, example) for each usable example of a stream, after skipping its first
        ``skip`` raw samples undecoded (examples may be fewer than raw samples: the modality can drop a
        sample, a damaged one is skipped)."""
        index = 0
        self.bad = self.bad_in_a_row = 0
        self.shapes = None
        decoded = usable = 0  # in the current pass over this stream's shards
        for sample in self.worker_samples(worker, workers):
            if sample is PASS_END:
                if decoded and not usable:
                    raise DataError(f"data-parallel rank {self.dp_rank}, worker {worker}: none of the {decoded} "
                                    f"samples of a whole pass gave a training example (the {self.modality.name} "
                                    f"modality dropped or failed them all; see model.* in --help)")
                decoded = usable = 0
                continue
            index += 1
            if index <= skip:
                continue
            rng = random.Random(f"sample/{self.seed}/{self.dp_rank}/{worker}/{index}")
            example = self.decode(sample, rng)
            decoded += 1
            if example is not None and not self.same_shapes(example, sample):
                example = None
            if example is not None:
                self.bad_in_a_row = 0
                usable += 1
                yield index, example

    def fixed_batches(self, examples: Iterator[tuple[int, dict]]) -> Iterator[tuple[list[dict], int]]:
        """train.micro_batch_size examples per batch, in stream order; position: raw samples consumed."""
        batch = []
        for index, example in examples:
            batch.append(example)
            if len(batch) == self.batch_size:
                yield batch, index
                batch = []

    def bucketed_batches(self, examples: Iterator[tuple[int, dict]], worker: int, start: int,
                         taken: int) -> Iterator[tuple[list[dict], int]]:
        """data.max_tokens: windows of data.bucket_window examples, each sorted by length, cut into batches
        within the budget (the modality's ``token_batches``) and emitted in an order shuffled by (seed,
        stream, window start). A window is a function of where it starts, so a position is (window start,
        its batches taken): a resume rebuilds that window and drops the batches taken. After a window's
        last batch the position is its end with none taken, i.e. plain raw samples consumed."""
        while True:
            window = list(itertools.islice(examples, self.cfg.bucket_window))
            end = window[-1][0]
            batches = self.modality.token_batches([example for _, example in window], self.cfg.max_tokens)
            random.Random(f"buckets/{self.seed}/{self.dp_rank}/{worker}/{start}").shuffle(batches)
            for done in range(taken + 1, len(batches) + 1):
                position = pack_position(end, 0) if done == len(batches) else pack_position(start, done)
                yield batches[done - 1], position
            start, taken = end, 0


class DataError(RuntimeError):
    pass


PASS_END = None  # what worker_samples yields after each pass over a stream's shards
STREAM_KEY = "stream_position"  # (worker stream, its position) of every batch

# A stream position is one int: raw samples consumed, below bit 40. With data.max_tokens it is the start of
# the window being batched, and the batches of that window already taken sit above bit 40 (none taken:
# the plain count, so a position saved without data.max_tokens resumes under it at that count).
WINDOW_SHIFT = 40


def pack_position(raw: int, taken: int = 0) -> int:
    if raw >> WINDOW_SHIFT:
        raise DataError(f"a data stream consumed {raw} raw samples, more than a position holds (2^{WINDOW_SHIFT})")
    return raw | taken << WINDOW_SHIFT


def unpack_position(position: int) -> tuple[int, int]:
    """(raw samples consumed before the current window, batches of that window taken)."""
    return position & ((1 << WINDOW_SHIFT) - 1), position >> WINDOW_SHIFT


def stream_count(cfg: DataConfig) -> int:
    return max(cfg.workers, 1)


def make_loader(shards: list[str], modality: Modality, cfg: DataConfig, batch_size: int, seed: int,
                dp_rank: int, dp: int, start_batch: int = 0, positions: list[int] | None = None,
                pin_memory: bool = False) -> DataLoader:
    """Batches of this data-parallel rank. To resume, pass the batches consumed so far and the stream
    positions (one int per worker stream, from the batches' ``STREAM_KEY`` entries: raw samples consumed,
    with data.max_tokens packed with the batches taken from the current window; see ``pack_position``).
    ``pin_memory``: batches in page-locked memory (for a GPU: their copy to the device does not block)."""
    stream = ShardStream(shards, modality, cfg, batch_size, seed, dp_rank, dp, start_batch, positions)
    kwargs = {"prefetch_factor": cfg.prefetch, "persistent_workers": False} if cfg.workers else {}
    # Own generator: creating the loader must not draw from the global RNG that dropout uses, or a
    # resumed run (loader created after the RNG state is restored) would drift from an uninterrupted one.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(stream, batch_size=None, num_workers=cfg.workers, generator=generator,
                      worker_init_fn=init_worker, pin_memory=pin_memory, **kwargs)


def init_worker(_worker_id: int) -> None:
    """DataLoader worker init. SIGTERM and SIGUSR2 are the rank's to handle (it saves a checkpoint first):
    SLURM signals every process of a step, and torch's workers otherwise die on SIGTERM, crashing the rank.
    Ignoring them also ignores what multiprocessing uses to stop workers at exit, so a worker is tied to
    its rank instead: the kernel kills it the moment the rank's process dies (Linux), and a rank that fails
    never waits on its workers (train.main leaves with os._exit)."""
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent()


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None, orphan_exit: int = 0) -> None:
    """prctl(PR_SET_PDEATHSIG, sig): this process gets ``sig`` when its parent exits (Linux only). If the parent
    (``parent``: its pid as read at start; default: now) is already gone, exit with ``orphan_exit``. A parent that is
    PID 1 itself (torchrun as a container's entry point) is a live parent, not a sign of orphaning."""
    if sys.platform.startswith("linux"):
        import ctypes
        parent = os.getppid() if parent is None else parent
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, sig, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the call: nobody will read our batches
            os._exit(orphan_exit)


def to_device(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Move a batch; floating inputs take the compute dtype, masks and ids keep theirs (non-tensor entries, such as a
    text batch's ``pad_mask=None``, stay as they are)."""
    return {k: v.to(device, dtype if v.is_floating_point() else v.dtype, non_blocking=True) if torch.is_tensor(v)
            else v for k, v in batch.items()}
