"""Start and stop background processes so that nothing outlives the cluster.

Every component runs in its own session (hence its own process group) and is recorded in a pidfile holding
the pid *and* its start time: `down` may run in a different Python process long after `up`, and must never
signal an unrelated process that happens to reuse a pid. Stopping is SIGTERM to the whole group, a grace
period, then SIGKILL.

A cluster that belongs to one Python process (the pytest session) is spawned with `die_with_parent`: the
kernel SIGTERMs each component when that process dies, even by SIGKILL, so a killed session leaves nothing
running. `make cluster-up` must outlive its `up` command, so it does not use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Recorded:
    """A process this cluster started, as written to its pidfile."""

    name: str
    pid: int
    create_time: float

    def alive(self) -> bool:
        """True when the pid still belongs to the process we started (not a reused pid)."""
        try:
            proc = psutil.Process(self.pid)
            same = abs(float(proc.create_time()) - self.create_time) < 1.0
            return same and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


def _die_with(parent: int, sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A preexec function: the kernel sends `sig` to the child when the thread that spawned it dies.

    Linux only (prctl PR_SET_PDEATHSIG, kept across exec). If the parent died before prctl took effect, the
    child exits at once instead of running unsupervised.
    """

    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def spawn(
    *,
    name: str,
    argv: Sequence[str],
    log_path: Path,
    pid_dir: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    die_with_parent: bool = False,
    death_signal: int = signal.SIGTERM,
) -> subprocess.Popen[bytes]:
    """Start `argv` in a new session with stdout+stderr appended to `log_path`; record it in `pid_dir`.

    With `die_with_parent` the process gets `death_signal` when the calling thread's process dies (call it
    from the main thread: the kernel watches the spawning thread, not the process).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pid_dir.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            preexec_fn=_die_with(os.getpid(), death_signal) if die_with_parent else None,  # noqa: PLW1509
        )
    try:
        created = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        created = 0.0
    (pid_dir / f"{name}.pid").write_text(json.dumps({"name": name, "pid": proc.pid, "create_time": created}))
    return proc


def recorded(pid_dir: Path) -> list[Recorded]:
    """All processes recorded in `pid_dir` (alive or not)."""
    out: list[Recorded] = []
    if not pid_dir.is_dir():
        return out
    for f in sorted(pid_dir.glob("*.pid")):
        try:
            data = json.loads(f.read_text())
            out.append(Recorded(name=str(data["name"]), pid=int(data["pid"]), create_time=float(data["create_time"])))
        except (OSError, ValueError, KeyError):
            continue
    return out


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for p in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                members.append(p)
    return members


def stop_group(pid: int, *, grace: float = 10.0) -> None:
    """SIGTERM the process group led by `pid`, wait up to `grace` seconds, then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _group_members(pid):
            return
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(-pid, os.WNOHANG)
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _group_members(pid):
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(-pid, os.WNOHANG)
        time.sleep(0.05)


def stop_recorded(pid_dir: Path, *, order: Sequence[str] = (), grace: float = 10.0) -> None:
    """Stop every recorded process (those named in `order` first, in that order) and remove the pidfiles."""
    procs = recorded(pid_dir)
    rank = {n: i for i, n in enumerate(order)}
    procs.sort(key=lambda r: rank.get(r.name, len(rank)))
    for rec in procs:
        if rec.alive():
            stop_group(rec.pid, grace=grace)
        with contextlib.suppress(FileNotFoundError):
            (pid_dir / f"{rec.name}.pid").unlink()
