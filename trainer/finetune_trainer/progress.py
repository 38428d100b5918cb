"""Live progress from the rank-0 worker to the driver: a tiny state holder run as a Ray actor.

Why an actor: in Ray Train V2 the training function runs in worker actors started by a controller actor, not in
the driver process that serves /metrics (and draws the progress bar). Rank 0 fires `update` at it (no waiting, so
training never blocks on it) and the driver polls `snapshot` about once a second. The class itself is plain
Python so it can be unit-tested and used without Ray.
"""

from __future__ import annotations

import time
from typing import Any

from finetune_trainer.contract import TrainerPhase


class ProgressBoard:
    """The latest progress of a run; keys are the snake_case fields of `Progress` in docs/trainer-contract.md."""

    def __init__(self) -> None:
        self._state: dict[str, Any] = {"phase": TrainerPhase.INITIALIZING.value, "step": 0, "updated_at": 0.0}

    def update(self, values: dict[str, Any]) -> None:
        """Merge new values; eval metrics merge into the `eval` mapping rather than replacing it."""
        evals = values.pop("eval", None)
        self._state.update(values)
        if evals:
            self._state.setdefault("eval", {}).update(evals)
        self._state["updated_at"] = time.time()

    def snapshot(self) -> dict[str, Any]:
        return dict(self._state)
