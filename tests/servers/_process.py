"""Start a server subprocess, wait until it answers, stop it: the part every real test server shares.

Why a helper: each server (MinIO, moto, Prometheus) needs the same care so that a test session never leaves a
process behind or hangs on a server that died at start-up — free port, log file, readiness poll that notices
an early exit (and shows the log), SIGTERM then SIGKILL, and a parent-death signal for when pytest itself is
killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


class ServerStartError(RuntimeError):
    """The server process exited or never became ready; the message carries the tail of its log."""


def free_port(host: str = "0.0.0.0") -> int:
    """Return a TCP port that is free right now on ``host``.

    Another process could take it before the server binds it; callers retry start-up on "address already in
    use" (see :func:`start_with_port_retry`).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends SIGTERM to the server when the test process dies.

    Without this a ``kill -9`` of pytest (CI timeout, Ctrl-\\) would orphan the server and keep its port.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class ManagedProcess:
    """One server subprocess whose stdout and stderr go to a log file."""

    def __init__(self, *, name: str, popen: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._popen = popen

    @classmethod
    def spawn(
        cls,
        *,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ManagedProcess:
        """Start ``argv`` with output appended to ``log_path``; does not wait for readiness."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            log.write(f"\n==> {' '.join(argv)}\n".encode())
            log.flush()
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - fixtures start servers from the main thread
            )
        return cls(name=name, popen=popen, log_path=log_path)

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """None while running, else the exit status."""
        return self._popen.poll()

    def log_tail(self, *, lines: int = 60) -> str:
        """Last lines of the server log, for error messages and failed-test reports."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log written)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_until(self, probe: Callable[[], bool], *, what: str, timeout: float) -> None:
        """Poll ``probe`` until it returns True; fail fast (with the log) if the process exits meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            code = self.returncode
            if code is not None:
                raise ServerStartError(
                    f"{self.name} exited with status {code} before {what}; log {self.log_path}:\n{self.log_tail()}"
                )
            if probe():
                return
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"{self.name} (pid {self.pid}) not {what} after {timeout:.0f}s; log {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.1)

    def wait_http_ok(self, url: str, *, timeout: float) -> None:
        """Wait until ``GET url`` answers 200 (the server's own readiness endpoint)."""
        self.wait_until(lambda: http_ok(url), what=f"ready at {url}", timeout=timeout)

    def stop(self, *, timeout: float = 15.0) -> None:
        """SIGTERM, wait, then SIGKILL: the process is gone when this returns."""
        if self._popen.poll() is not None:
            return
        self._popen.terminate()
        try:
            self._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            self._popen.wait(timeout=timeout)


def http_ok(url: str) -> bool:
    """True when ``GET url`` returns 200 within a second; connection errors mean "not yet"."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            status: int = resp.status
            return status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def start_with_port_retry(
    start_once: Callable[[int], ManagedProcess],
    *,
    ready: Callable[[ManagedProcess, int], None],
    host: str = "0.0.0.0",
    attempts: int = 3,
) -> tuple[ManagedProcess, int]:
    """Pick a free port, start, wait for readiness; retry with a new port if another process took it first.

    Any other start-up failure is raised at once: retrying a misconfigured server only hides the error.
    """
    last: ServerStartError | None = None
    for _ in range(attempts):
        port = free_port(host)
        proc = start_once(port)
        try:
            ready(proc, port)
        except ServerStartError as err:
            proc.stop()
            if "address already in use" not in proc.log_tail().lower():
                raise
            last = err
            continue
        return proc, port
    assert last is not None
    raise last


def scrub_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The test process's environment minus settings that would leak into a server, plus ``extra``.

    AWS_* from a developer's shell would otherwise point a client at a real cloud account, and MINIO_* could
    change the server's behaviour behind the test's back.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MINIO_"))}
    env.update(extra)
    return env


def remove_quietly(path: Path) -> None:
    """Delete a file if present; used when tearing down generated config."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
