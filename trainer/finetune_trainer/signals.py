"""SIGTERM in the driver: raise KeyboardInterrupt so the exit contract reports Interrupted (exit 7).

Why a module: `ray.init` replaces the process's SIGTERM handling twice (a Python handler that calls sys.exit, and
the C++ core worker's failure-signal handler that prints a stack and leaves the process to abort at exit, exit
code 134 instead of 7). So the handler is installed before the run and again right after `ray.init`.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import NoReturn


def _raise_interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def install() -> None:
    """Make SIGTERM raise KeyboardInterrupt in the main thread (a no-op elsewhere: only it may set handlers)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
