"""Announce a checkpoint (status.checkpoint, the `finetune_trainer_checkpoint_info` metric) only once Ray Train has
committed it, i.e. once it is the checkpoint a restart would resume from.

Why not right after `ray.train.report(..., checkpoint=...)` returns: in Ray Train 2.60 (V2) `report` uploads the
checkpoint and puts the result on the worker's own one-slot result queue, then returns (`TrainContext.report`,
`_wait_then_report`). The controller picks the results up when it polls the worker group (every
`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`: Ray's default 2 s, 0.5 s as our driver runs it, longer on a busy node); only
once it holds the report of *every* rank for that round does the `ReportCallbackHandler` consolidate it and the
`CheckpointManager` register it: it becomes `latest_checkpoint_result` and the run snapshot
(`checkpoint_manager_snapshot.json`) is rewritten in storage.
A restarted worker group gets exactly that `latest_checkpoint_result` (`before_init_train_context`), and a new
attempt (a new Ray cluster) gets it from the snapshot. If a worker dies between its report and the controller's
poll, the uploaded directory stays in storage but was never registered: the restart resumes from the previous
checkpoint. That is what the real node showed (issue 9): the status said 8, Ray Train resumed from 4.
(`keep`/`num_to_keep` is not involved: Ray deletes only registered checkpoints other than the latest one.)

What this module does: rank 0 hands each step it checkpointed to a background thread, which asks the controller
for the committed checkpoints (`ray.train.get_all_reported_checkpoints(COMMITTED)`: it blocks until the controller
has processed the reports in flight, bounded by a timeout) and announces the newest step that is committed. So the
announced checkpoint is never ahead of what a restart resumes from, and training never waits for the poll.

Not chosen: resuming from the newest complete directory in storage instead of Ray's latest. It would bypass Ray
Train's bookkeeping (its snapshot, `num_to_keep` deletion, the final result's checkpoint) and leave directories Ray
never registered to pile up, and it would still need Ray's view for every other restart path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)
# How long one question to the controller may wait for the reports in flight (it answers as soon as they are
# processed, normally within one poll interval).
COMMIT_WAIT_S = 10.0
# The least time between two questions, so a controller that answers at once without the step does not spin us.
MIN_INTERVAL_S = 0.5
RETRY_AFTER_ERROR_S = 5.0


def committed_steps(metrics: Iterable[Mapping[str, Any]]) -> set[int]:
    """Steps of the committed training checkpoints, from the metrics each was reported with (the completion
    record, marked `done`, is the run's end, not a training checkpoint)."""
    steps: set[int] = set()
    for values in metrics:
        step = values.get("step")
        if not values.get("done") and isinstance(step, int | float) and not isinstance(step, bool):
            steps.add(int(step))
    return steps


def settle(
    pending: Mapping[int, float], committed: Collection[int]
) -> tuple[tuple[int, float] | None, dict[int, float]]:
    """(newest pending step that is committed with its checkpoint time, or None; the steps still to wait for).

    Pending steps older than the newest committed one are dropped whether committed or not: a newer checkpoint
    is announced, and an older one that was never registered never will be.
    """
    done = [step for step in pending if step in committed]
    if not done:
        return None, dict(pending)
    newest = max(done)
    return (newest, pending[newest]), {step: t for step, t in pending.items() if step > newest}


class CommitWatch:
    """Rank 0's background announcer: `reported(step, time)` after each checkpoint; `announce(step, time)` is called
    (from the watch's thread) for the newest committed one, in increasing step order."""

    def __init__(
        self,
        *,
        fetch: Callable[[float], Iterable[Mapping[str, Any]]],
        announce: Callable[[int, float], None],
        wait_s: float = COMMIT_WAIT_S,
    ) -> None:
        self._fetch, self._announce, self._wait_s = fetch, announce, wait_s
        self._pending: dict[int, float] = {}
        self._announced = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def reported(self, step: int, at: float) -> None:
        with self._cond:
            self._pending[step] = at
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="finetune-commits", daemon=True)
                self._thread.start()

    def check(self) -> None:
        """One round: ask the controller, announce the newest committed step, keep the rest pending."""
        with self._cond:
            pending = dict(self._pending)
        if not pending:
            return
        committed = committed_steps(self._fetch(self._wait_s))
        found, rest = settle(pending, committed)
        with self._cond:
            # Steps reported while we asked stay pending; those settled (announced or superseded) go.
            self._pending = {s: t for s, t in self._pending.items() if s in rest or s not in pending}
            if found is not None and found[0] > self._announced:
                self._announced = found[0]
                self._announce(*found)
            self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait (bounded) until every reported checkpoint is announced or superseded: the end of a run, so the
        driver's last reading shows the last checkpoint. False when some are still pending."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending, timeout=timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending))
            started, pause = time.monotonic(), MIN_INTERVAL_S
            try:
                self.check()
            except Exception as e:  # announcing is best effort: training goes on, the step stays pending
                log.warning("could not ask Ray Train which checkpoints are committed: %s", e)
                pause = RETRY_AFTER_ERROR_S
            time.sleep(max(0.0, pause - (time.monotonic() - started)))
