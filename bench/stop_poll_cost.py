"""What one look at the driver's stop request costs a training step, against a `head` step (issue 11).

The loop's StopPoll used to ask the ProgressBoard actor (`stop_requested.remote()`, then `ray.wait(timeout=0)`) on
every step; it now looks at most every `loop.STOP_POLL_S`. This prints the old per-step cost, measured inside a
Ray task on a local Ray against a real ProgressBoard actor, and the time of one `head` step in process (a linear
384 -> 2 layer on a batch of 32 cached features, fused AdamW, clipping, one torch thread, as the trainer runs it).

    .venv/bin/python bench/stop_poll_cost.py [--steps 2000]
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from typing import Any

import ray
import torch
from finetune_trainer.progress import ProgressBoard


@ray.remote(num_cpus=1)
def per_step_poll(board: Any, steps: int) -> float:
    """Seconds per step of the old StopPoll: one request in flight, looked at with ray.wait on every step."""
    pending = None
    started = time.perf_counter()
    for _ in range(steps):
        if pending is None:
            pending = board.stop_requested.remote()
        ready, _ = ray.wait([pending], timeout=0)
        if ready:
            ray.get(pending)
            pending = None
    return (time.perf_counter() - started) / steps


def head_step_seconds(steps: int) -> float:
    torch.set_num_threads(1)
    head = torch.nn.Linear(384, 2)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, fused=True)
    x, y = torch.randn(32, 384), torch.randint(0, 2, (32,))
    started = time.perf_counter()
    for _ in range(steps):
        loss: Any = torch.nn.functional.cross_entropy(head(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(head.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())
    return (time.perf_counter() - started) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    ray.init(num_cpus=1, include_dashboard=False, logging_level=logging.WARNING)
    try:
        board: Any = ray.remote(num_cpus=0)(ProgressBoard).remote()
        ray.get(board.snapshot.remote())
        polls = [ray.get(per_step_poll.remote(board, args.steps)) for _ in range(2)]
    finally:
        ray.shutdown()
    head = head_step_seconds(args.steps)
    load = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    print(
        f"old stop poll per step: {', '.join(f'{1000 * p:.2f}' for p in polls)} ms | head step in process: "
        f"{1000 * head:.2f} ms | {load}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
