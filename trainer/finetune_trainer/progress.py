"""Live progress from the rank-0 worker to the driver: a tiny state holder run as a Ray actor.

Why an actor: in Ray Train V2 the training function runs in worker actors started by a controller actor, not in
the driver process that serves /metrics (and draws the progress bar). Rank 0 fires `update` at it (no waiting, so
training never blocks on it) and the driver polls `snapshot` about once a second. The class itself is plain
Python so it can be unit-tested and used without Ray.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from finetune_trainer.contract import TrainerPhase

# Timeline values that describe the attempt, not the latest worker group: a worker group that Ray Train restarts
# inside the attempt loads the model and takes a first step again, but the attempt's first ones stay.
FIRST_ONLY = frozenset({"model_loaded_time", "first_step_time"})
# The latest committed checkpoint only moves forward: an announcement older than the one shown is dropped whole.
CHECKPOINT_KEYS = frozenset({"last_checkpoint_step", "last_checkpoint_time", "checkpoint_uri"})
PUSH_INTERVAL_S = 1.0


class ProgressBoard:
    """The latest progress of a run; keys are the snake_case fields of `Progress` in docs/trainer-contract.md."""

    def __init__(self) -> None:
        self._state: dict[str, Any] = {"phase": TrainerPhase.INITIALIZING.value, "step": 0, "updated_at": 0.0}
        self._stop = False

    def update(self, values: dict[str, Any]) -> None:
        """Merge new values; eval metrics merge into the `eval` mapping rather than replacing it."""
        values = dict(values)
        evals = values.pop("eval", None)
        for key in FIRST_ONLY & values.keys():
            if key in self._state:
                del values[key]
        if values.get("last_checkpoint_step", 0) < self._state.get("last_checkpoint_step", 0):
            for key in CHECKPOINT_KEYS & values.keys():
                del values[key]
        self._state.update(values)
        if evals:
            self._state.setdefault("eval", {}).update(evals)
        self._state["updated_at"] = time.time()

    def snapshot(self) -> dict[str, Any]:
        return dict(self._state)

    def request_stop(self) -> None:
        """The driver got SIGTERM with a drain budget: the workers checkpoint at their next step and return."""
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop


def should_drain(snapshot: dict[str, Any]) -> bool:
    """Whether a stop request is worth waiting for: only the training loop answers it (at its next step), so before
    training (loading, waiting for workers) and after it (saving) the driver stops at once."""
    return snapshot.get("phase") in {TrainerPhase.TRAINING.value, TrainerPhase.EVALUATING.value}


class Board:
    """Rank 0's handle on the driver's ProgressBoard actor (a no-op on other ranks or without a board)."""

    def __init__(self, handle: Any, *, enabled: bool) -> None:
        self.handle = handle if enabled else None
        self.last = 0.0

    def push(self, values: dict[str, Any], *, force: bool = False) -> None:
        """Send values (fire and forget); unforced pushes are rate-limited to one per PUSH_INTERVAL_S."""
        if self.handle is None:
            return
        now = time.monotonic()
        if force or now - self.last >= PUSH_INTERVAL_S:
            self.last = now
            with contextlib.suppress(Exception):  # progress must never break training
                self.handle.update.remote(values)
