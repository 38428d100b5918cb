"""This attempt's driver log: everything the driver prints, kept in a file, its tail in the report, uploaded.

Why: when a job fails the operator shows `status.lastFailure.logTail` and `logUri` so the user does not need the
(possibly deleted) head pod's logs. The driver's stdout and stderr (our logging, Ray's forwarded worker lines,
tracebacks) are teed into a local file for the whole attempt; at the end the last lines go into the report and the
file is uploaded, best effort and time-bounded (also on failure and on SIGTERM), to
`<output>/logs/attempt-N.log`.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from finetune_trainer import storage
from finetune_trainer.contract import LOG_TAIL_LINES, attempt_log_path

if TYPE_CHECKING:
    from finetune_trainer.spec import StorageSpec

UPLOAD_TIMEOUT_S = 15.0  # a SIGTERMed pod has ~30 s of grace; the log must not eat all of it


class _Tee:
    """A text stream that writes to the original stream and to the log file."""

    def __init__(self, original: TextIO, log: TextIO, lock: threading.Lock) -> None:
        self.original, self.log, self.lock = original, log, lock

    def write(self, text: str) -> int:
        with self.lock:
            with contextlib.suppress(ValueError, OSError):
                self.log.write(text)
            return self.original.write(text)

    def flush(self) -> None:
        with self.lock, contextlib.suppress(ValueError, OSError):
            self.log.flush()
        self.original.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding... of the real stream
        return getattr(self.original, name)


class DriverLog:
    """Captures sys.stdout/sys.stderr into a file while active; knows where this attempt's log is uploaded."""

    def __init__(self, *, attempt: int) -> None:
        self.attempt = attempt
        self.path = Path(tempfile.mkdtemp(prefix="ftdriverlog-")) / attempt_log_path(attempt).rsplit("/", 1)[-1]
        self.output_uri: str | None = None
        self.storage: StorageSpec | None = None
        self.base_dir: Path | None = None

    def target(self, output_uri: str, *, storage_spec: StorageSpec | None, base_dir: Path | None = None) -> None:
        """Where the log goes once the job (and so its output) is known."""
        self.output_uri, self.storage, self.base_dir = output_uri, storage_spec, base_dir

    @contextlib.contextmanager
    def capture(self) -> Iterator[DriverLog]:
        """Tee stdout/stderr into the log file; the local file is removed afterwards (upload inside the block)."""
        lock = threading.Lock()
        try:
            with self.path.open("a", encoding="utf-8", errors="replace", newline="") as log:
                saved = sys.stdout, sys.stderr
                sys.stdout, sys.stderr = _Tee(saved[0], log, lock), _Tee(saved[1], log, lock)
                try:
                    yield self
                finally:
                    sys.stdout, sys.stderr = saved
        finally:
            shutil.rmtree(self.path.parent, ignore_errors=True)

    def flush(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(ValueError, OSError):
                stream.flush()

    def tail(self, lines: int = LOG_TAIL_LINES) -> tuple[str, ...]:
        """The last non-empty lines (progress-bar carriage returns collapsed to their last state)."""
        self.flush()
        try:
            with self.path.open(encoding="utf-8", errors="replace", newline="") as f:  # keep \r: progress bars
                text = f.read()
        except OSError:
            return ()
        kept: deque[str] = deque(maxlen=lines)
        for raw in text.split("\n"):
            line = raw.rsplit("\r", 1)[-1].rstrip()
            if line:
                kept.append(line)
        return tuple(kept)

    def uri(self) -> str | None:
        if self.output_uri is None:
            return None
        output = storage.resolve(self.output_uri, storage=self.storage, base_dir=self.base_dir)
        return output.child(attempt_log_path(self.attempt)).uri

    def upload(self, *, last_line: str) -> bool:
        """Copy the log (plus the report line) to the output, within UPLOAD_TIMEOUT_S; never raises."""
        if self.output_uri is None:
            return False
        self.flush()
        done = threading.Event()
        ok: list[bool] = []

        def work() -> None:
            try:
                output = storage.resolve(self.output_uri or "", storage=self.storage, base_dir=self.base_dir)
                body = self.path.read_bytes() + last_line.encode("utf-8") + b"\n"
                storage.write_bytes(output.child(attempt_log_path(self.attempt)), body)
                ok.append(True)
            except Exception:  # best effort: a log upload never changes the outcome
                ok.append(False)
            finally:
                done.set()

        threading.Thread(target=work, name="finetune-log-upload", daemon=True).start()
        return done.wait(UPLOAD_TIMEOUT_S) and ok == [True]
