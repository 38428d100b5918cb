"""SIGTERM in the driver: stop with a checkpoint when there is a drain budget, else raise KeyboardInterrupt at once;
either way the exit contract reports Interrupted (exit 7).

Why a module: `ray.init` replaces the process's SIGTERM handling twice (a Python handler that calls sys.exit, and
the C++ core worker's failure-signal handler that prints a stack and leaves the process to abort at exit, exit
code 134 instead of 7). So the handler is installed before the run and again right after `ray.init`.

Draining (the operator sets contract.STOP_DRAIN_ENV on the head when it suspends a job or Kueue preempts it): the
first SIGTERM only records the request (`StopRequest.requested`); the driver's progress poller passes it on to the
workers, which write a checkpoint at their next step and return, and `fit()` returns. A timer (SIGALRM) bounds the
wait: when the budget is spent, or when the poller finds nothing to wait for (training has not started), SIGALRM
raises KeyboardInterrupt in the main thread as SIGTERM did before. A second SIGTERM does so at once.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from collections.abc import Mapping
from enum import Enum
from types import FrameType
from typing import NoReturn


class StopAction(Enum):
    DRAIN = "drain"  # ask the workers for a checkpoint, then stop
    INTERRUPT = "interrupt"  # stop now (KeyboardInterrupt in the main thread)


@dataclasses.dataclass(frozen=True)
class StopRequest:
    """What a stop signal means for this process; `requested` is set by the first SIGTERM when it means drain."""

    drain_seconds: float = 0.0
    requested: threading.Event = dataclasses.field(default_factory=threading.Event)

    @staticmethod
    def from_env(environ: Mapping[str, str], name: str) -> StopRequest:
        """The budget from the environment variable `name` (unset, empty, invalid or <= 0: no drain)."""
        try:
            seconds = float(environ.get(name) or 0)
        except ValueError:
            seconds = 0.0
        return StopRequest(drain_seconds=max(seconds, 0.0))

    def on_signal(self, signum: int) -> StopAction:
        """The first SIGTERM with a budget drains; anything else (no budget, a second SIGTERM, SIGINT) interrupts."""
        if signum == signal.SIGTERM and self.drain_seconds > 0 and not self.requested.is_set():
            self.requested.set()
            return StopAction.DRAIN
        return StopAction.INTERRUPT


def _raise_interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _raise_drain_over(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt("SIGTERM")


def install(stop: StopRequest | None = None) -> None:
    """Make SIGTERM stop the run (a no-op outside the main thread: only it may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if stop is None or stop.drain_seconds <= 0:
        signal.signal(signal.SIGTERM, _raise_interrupt)
        return

    def on_term(signum: int, frame: FrameType | None) -> None:
        if stop.on_signal(signum) is StopAction.INTERRUPT:
            _raise_interrupt(signum, frame)
        signal.setitimer(signal.ITIMER_REAL, stop.drain_seconds)

    signal.signal(signal.SIGALRM, _raise_drain_over)
    signal.signal(signal.SIGTERM, on_term)


def interrupt_now() -> None:
    """From any thread: end the drain at once (KeyboardInterrupt in the main thread, as on SIGTERM)."""
    os.kill(os.getpid(), signal.SIGALRM)


def disarm() -> None:
    """The run has ended: no drain timer may interrupt what follows (the report, the log upload)."""
    if threading.current_thread() is threading.main_thread():
        signal.setitimer(signal.ITIMER_REAL, 0)
