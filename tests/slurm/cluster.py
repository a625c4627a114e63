"""A throwaway one-node SLURM cluster (munged + slurmctld + slurmd) for tests/test_slurm.py.

Everything lives in one temporary directory: munge key and socket, slurm.conf, state, spool, pid and
log files, on free ports. Clients find it through SLURM_CONF. The daemons run in the foreground as
children of the test process (and take SIGTERM if it dies), so ``stop()`` ends exactly them (by pid),
plus any ``slurmstepd`` our slurmd left (recognised by our SLURM_CONF in its environment).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "sinfo", "srun")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Variables of an enclosing job or launcher that must not leak into the jobs we submit.
LEAKY_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")
LEAKY = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_WORLD_SIZE"}


class Unavailable(Exception):
    """This machine cannot run the test cluster; the message is the skip reason."""


def program(name: str) -> str | None:
    """Full path of a SLURM or munge program (daemons live in /usr/sbin, which a user's PATH may lack)."""
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def missing_programs() -> list[str]:
    return [p for p in (*DAEMONS, *CLIENTS) if program(p) is None]


def die_with_parent() -> None:
    """In a daemon we start: get SIGTERM if the test process dies, even by SIGKILL (Linux prctl)."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def ensure_installed() -> None:
    """Install Debian's slurm-wlm and munge packages if they are missing (needs root and apt-get)."""
    if not missing_programs():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable(f"SLURM is not installed ({', '.join(missing_programs())} missing) and cannot be "
                          f"installed here: apt-get install {' '.join(PACKAGES)} needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode:
            raise Unavailable(f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    if missing_programs():
        raise Unavailable(f"installed {' '.join(PACKAGES)} but {', '.join(missing_programs())} still missing")


def processes_named(names) -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                comm = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if comm in names:
                found[int(entry.name)] = comm
    return found


def environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def alive(pid: int) -> bool:
    """Running (a zombie has exited already; its reaper is init, not us)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cmdline_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if os.geteuid() != 0:
            raise Unavailable("slurmd must run as root to launch jobs; run the suite as root")
        running = processes_named({"slurmctld", "slurmd"})
        if running:
            raise Unavailable(f"SLURM daemons already run on this machine ({running}); not starting a second "
                              f"cluster beside them")
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.write_munge_key()
        self.conf.write_text(self.config())
        try:
            m = self.root / "munge"
            self.spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                                  f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'pid'}",
                                  f"--seed-file={m / 'seed'}",
                                  f"--log-file={self.root / 'log/munged.log'}"])
            self.wait_for(lambda: self.munge_socket.exists(), 20, "munged to create its socket")
            self.spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self.spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
            self.wait_for(self.node_idle, 60, f"node {self.host} to become idle")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Cancel our jobs, then stop exactly the processes this object started (and their slurmstepd)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--quiet", f"--user={os.getuid()}"], check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.5)
        stepds = self.our_stepds()
        for name in reversed(DAEMONS):
            proc = self.procs.pop(name, None)
            if proc is not None:
                self.terminate(proc.pid, proc)
        for pid in set(stepds) | set(self.our_stepds()):
            self.terminate(pid)

    def terminate(self, pid: int, proc: subprocess.Popen | None = None) -> None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                return
            if proc is None and not alive(pid):
                return
            time.sleep(0.1)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc is not None:
            proc.wait(timeout=10)

    def our_stepds(self) -> list[int]:
        return [pid for pid in processes_named({"slurmstepd"}) if environ_of(pid).get("SLURM_CONF") == str(self.conf)]

    # -- configuration ------------------------------------------------------------------------
    @property
    def munge_socket(self) -> Path:
        return self.root / "munge/munge.socket"

    def write_munge_key(self) -> None:
        key = self.root / "munge/munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (self.root / "munge").chmod(0o755)  # munged checks that the socket directory is reachable

    def config(self) -> str:
        r, cpus = self.root, max(2, os.cpu_count() or 1)
        return "\n".join([
            "ClusterName=d2vtest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            # cred_expire is also how long a requeued job waits before it may start again (default 120 s)
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log/slurmctld.log'}", f"SlurmdLogFile={r / 'log/slurmd.log'}",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=1,bf_interval=1",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2", "MpiDefault=none", "JobCompType=jobcomp/none",
            "AccountingStorageType=accounting_storage/none", "MailProg=/bin/true",
            "KillWait=5", "MinJobAge=600", "InactiveLimit=0",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n"

    # -- processes and clients ----------------------------------------------------------------
    def env(self, extra: dict | None = None) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(LEAKY_PREFIXES) and k not in LEAKY}
        return {**env, "SLURM_CONF": str(self.conf), **(extra or {})}

    def spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"log/{name}.out", "wb")
        self.procs[name] = subprocess.Popen([program(cmd[0]), *cmd[1:]], env=self.env(), stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, preexec_fn=die_with_parent)
        log.close()

    def run(self, cmd: list[str], check: bool = True, cwd: Path | None = None, env: dict | None = None):
        proc = subprocess.run(cmd, env=self.env(env), cwd=cwd, capture_output=True, text=True, timeout=60)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}\n{self.logs()}")
        return proc

    def wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for {what}\n{self.logs()}")
            if condition():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")

    def node_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout.split()
        return "idle" in out

    def logs(self, tail: int = 2000) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # -- jobs ---------------------------------------------------------------------------------
    def sbatch(self, args: list[str], cwd: Path, env: dict | None = None) -> str:
        return self.run(["sbatch", "--parsable", *args], cwd=cwd, env=env).stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict]:
        """``scontrol show job -o`` as dicts (one per array task; one for a plain job)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id], check=False).stdout
        return [dict(tok.split("=", 1) for tok in line.split() if "=" in tok) for line in out.splitlines() if line]

    def job(self, job_id: str) -> dict:
        jobs = self.jobs(job_id)
        assert len(jobs) == 1, jobs
        return jobs[0]

    def wait_done(self, job_id: str, timeout: float) -> list[dict]:
        """Wait until the job (every task of an array) reached a final state; returns their records."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs(job_id)
            if jobs and all(j.get("JobState") in TERMINAL for j in jobs):
                return jobs
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s: {jobs}\n{self.logs()}")
            time.sleep(0.5)

    def task_pid(self, job_id: str, rank: int, marker: str) -> int | None:
        """Pid of the process of ``rank`` (SLURM_PROCID) in the job whose command line has ``marker``
        (the rank itself, not its DataLoader workers, which are its children)."""
        def matches(pid):
            env = environ_of(pid)
            return (env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(rank)
                    and marker in cmdline_of(pid))
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and matches(int(entry.name)):
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                if not matches(ppid):
                    return int(entry.name)
        return None
