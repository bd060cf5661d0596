"""A private single-node Slurm cluster for the tests: munged, slurmctld and slurmd started from
Debian's `slurm-wlm` and `munge` with everything (key, socket, ports, state, spool, logs, pid files)
under one temp folder, so nothing system-wide is read or changed.

`running_cluster(root)` is a context manager: it yields a `SlurmCluster` once the node is idle, with
`SLURM_CONF` in `os.environ` pointing at the generated slurm.conf, and on exit cancels the jobs left,
stops the three daemons by pid and restores the environment. Where the cluster cannot start it raises
`ClusterUnavailable` with the reason (the fixture turns that into a skip).

Root is not needed: the daemons run as the current user (SlurmUser = SlurmdUser = that user), which
can run that user's own jobs; as root it is the same with root.

Why these settings: `proctrack/linuxproc` and `task/none` need no cgroup hierarchy (containers and CI
runners rarely give one); no accounting daemon, so `sacct` knows nothing here (the library does not
need it); `SlurmdParameters=config_overrides` keeps the node up if `slurmd -C` and the configured
size disagree by a rounding; a short `KillWait` so that `scancel` is quick.
"""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
START_TIMEOUT_S = 60.0
CRED_EXPIRE_S = 5


class ClusterUnavailable(RuntimeError):
    """The private cluster cannot run on this machine; the message says why."""


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    node: str
    partition: str
    cpus: int
    memory_mb: int
    version: str
    start_seconds: float
    processes: dict = field(default_factory=dict)

    def log(self, daemon: str) -> str:
        path = self.root / "log" / f"{daemon}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def unavailable_reason() -> str | None:
    """Why the cluster cannot start here (None: it should)."""
    missing = [name for name in DAEMONS + CLIENTS + ("munge",)
               if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]
    if missing:
        return f"Slurm/munge not installed ({', '.join(missing)} not found): apt-get install slurm-wlm munge"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _node_size() -> tuple[int, int]:
    """CPUs and memory (MB) as slurmd itself measures them, so the node registers without a mismatch."""
    out = subprocess.run([_binary("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
    values = dict(item.split("=", 1) for item in out.split() if "=" in item)
    cpus = int(values.get("CPUs", os.cpu_count() or 1))
    memory = int(values.get("RealMemory", 1024))
    return cpus, max(memory - 256, 256)


def _write_conf(root: Path, node: str, partition: str, cpus: int, memory_mb: int, munge_socket: Path) -> Path:
    user = pwd.getpwuid(os.geteuid()).pw_name
    ctld_port, slurmd_port = _free_ports(2)
    (root / "plugstack.conf").write_text("")  # keeps /etc/slurm/plugstack.conf (and its plugins) out
    lines = [
        "ClusterName=mugcptest",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        f"SlurmUser={user}",
        f"SlurmdUser={user}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire is also how long a requeued job waits before it may start again (default 120 s)
        f"AuthInfo=socket={munge_socket},cred_expire={CRED_EXPIRE_S}",
        "MailProg=/bin/true",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        f"PlugStackConfig={root / 'plugstack.conf'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "JobCompType=jobcomp/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SchedulerType=sched/backfill",
        # test all pending jobs every second, not every 60/30 s: a requeued job starts as soon as it may
        "SchedulerParameters=sched_interval=1,bf_interval=1",
        "ReturnToService=2",
        "SlurmdParameters=config_overrides",
        "KillWait=5",
        "InactiveLimit=0",
        "MinJobAge=600",
        "SlurmctldTimeout=60",
        "SlurmdTimeout=60",
        f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={node} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
        f"PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP",
    ]
    conf = root / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def _spawn(name: str, args: list[str], root: Path, env: dict) -> subprocess.Popen:
    """A daemon in the foreground as our own child (its pid is ours to stop), in its own session so
    that a Ctrl-C at the terminal reaches pytest, which then stops it in order."""
    out = open(root / "log" / f"{name}.out", "ab")
    return subprocess.Popen(
        [_binary(name), *args], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        env=env, start_new_session=True, cwd=root,
    )


def _wait_for(check, what: str, processes: dict, root: Path, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in processes.items():
            if proc.poll() is not None:
                raise ClusterUnavailable(f"{name} exited with {proc.returncode} while waiting for {what}: "
                                         f"{_tail(root, name)}")
        if check():
            return
        time.sleep(0.2)
    raise ClusterUnavailable(f"timed out after {timeout:.0f} s waiting for {what}: "
                             f"{_tail(root, 'slurmd')} {_tail(root, 'slurmctld')}")


def _tail(root: Path, daemon: str) -> str:
    text = ""
    for suffix in (".log", ".out"):
        path = root / "log" / f"{daemon}{suffix}"
        if path.exists():
            text += path.read_text(errors="replace")
    return " | ".join(text.strip().splitlines()[-5:])


def _stop(processes: dict, timeout: float = 15.0) -> None:
    for name in reversed(list(processes)):  # slurmd, slurmctld, then munged: the others still authenticate
        proc = processes[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _cancel_all_jobs(env: dict) -> None:
    """Jobs still queued or running at the end are cancelled, so no slurmstepd outlives the cluster."""
    def run(*cmd):
        return subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=30)

    with contextlib.suppress(Exception):
        run("scancel", "--user", pwd.getpwuid(os.geteuid()).pw_name)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and run("squeue", "-h", "-o", "%i").stdout.strip():
            time.sleep(0.5)


@contextlib.contextmanager
def running_cluster(root: Path, partition: str = "debug"):
    reason = unavailable_reason()
    if reason:
        raise ClusterUnavailable(reason)
    started = time.monotonic()
    root = Path(root)
    for sub in ("munge", "state", "spool", "log", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    munge_socket = root / "munge" / "munge.socket"
    if len(str(munge_socket)) > 100:
        raise ClusterUnavailable(f"temp folder too deep for a unix socket path: {munge_socket}")
    node = socket.gethostname().split(".")[0]
    cpus, memory_mb = _node_size()
    conf = _write_conf(root, node, partition, cpus, memory_mb, munge_socket)

    saved = {name: value for name, value in os.environ.items()
             if name.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_"))}
    env = {name: value for name, value in os.environ.items() if name not in saved}
    env["SLURM_CONF"] = str(conf)
    processes: dict[str, subprocess.Popen] = {}
    try:
        processes["munged"] = _spawn("munged", [
            "--foreground", "--force", f"--socket={munge_socket}", f"--key-file={key}",
            f"--pid-file={root / 'run' / 'munged.pid'}", f"--log-file={root / 'log' / 'munged.log'}",
            f"--seed-file={root / 'munge' / 'munged.seed'}",
        ], root, env)
        _wait_for(munge_socket.exists, "munged's socket", processes, root)
        processes["slurmctld"] = _spawn("slurmctld", ["-D", "-c", "-f", str(conf)], root, env)
        processes["slurmd"] = _spawn("slurmd", ["-D", "-f", str(conf), "-N", node], root, env)

        def node_idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True,
                                 timeout=10).stdout
            return out.strip() == "idle"

        _wait_for(node_idle, "the node to come up idle", processes, root)
        version = subprocess.run(["sinfo", "--version"], env=env, capture_output=True, text=True).stdout.strip()
        cluster = SlurmCluster(root, conf, node, partition, cpus, memory_mb, version, time.monotonic() - started,
                               processes)
        for name in saved:
            del os.environ[name]
        os.environ["SLURM_CONF"] = str(conf)
        try:
            yield cluster
        finally:
            os.environ.pop("SLURM_CONF", None)
            os.environ.update(saved)
            _cancel_all_jobs(env)
    finally:
        _stop(processes)


@contextlib.contextmanager
def cluster_or_skip(folder: Path):
    """A running private cluster for the ``with`` body; the calling test (or fixture) skips with the reason
    where one cannot start."""
    import pytest

    cluster = running_cluster(folder)
    try:
        running = cluster.__enter__()
    except ClusterUnavailable as err:
        pytest.skip(f"no private Slurm cluster here: {err}")
    try:
        yield running
    finally:
        cluster.__exit__(None, None, None)
