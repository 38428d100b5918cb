"""Entry points `finetune run` and `finetune train`: argument parsing, logging, and the exit contract.

Why here and only here: library modules raise domain errors; this boundary turns them into the contract's exit
code and, as the last stderr line, the one-line JSON reason (also written to the termination message file so the
operator reads it from the pod status). Logging is configured here, never at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn

import ray

from finetune_trainer.contract import (
    DEFAULT_METRICS_PORT,
    MANIFEST,
    TERMINATION_MESSAGE_PATH,
    ExitCode,
    Reason,
    failure_line,
)
from finetune_trainer.driver import RunOptions, preflight, run_training
from finetune_trainer.errors import InterruptedRunError, InvalidSpecError, TrainerError, TrainingError
from finetune_trainer.local import run_local
from finetune_trainer.metrics import TrainerMetrics
from finetune_trainer.shape import worker_shape
from finetune_trainer.spec import SpecError, load_job

TERMINATION_LOG_ENV = "FINETUNE_TERMINATION_LOG"
log = logging.getLogger("finetune_trainer")


def _write_termination_message(line: str) -> None:
    path = Path(os.environ.get(TERMINATION_LOG_ENV) or TERMINATION_MESSAGE_PATH)
    with contextlib.suppress(OSError):  # not in a pod (or not writable): stderr carries the same line
        path.write_text(line + "\n", encoding="utf-8")


def _fail(reason: Reason, message: str, code: ExitCode) -> int:
    line = failure_line(reason, message)
    sys.stderr.flush()
    print(line, file=sys.stderr, flush=True)
    _write_termination_message(line)
    return int(code)


def _raise_interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def guarded(body: Callable[[], int], *, verbose: bool) -> int:
    """Run an entry point body and map every outcome onto the exit contract."""
    if threading_main():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return body()
    except SpecError as e:
        return _fail(Reason.INVALID_SPEC, str(e), ExitCode.INVALID_SPEC)
    except TrainerError as e:
        if verbose:
            traceback.print_exc()
        return _fail(e.reason, e.message, e.exit_code)
    except SystemExit as e:  # a library calling sys.exit() must not turn into a silent exit 0
        err = TrainingError(f"exited early (sys.exit({e.code!r})) before the manifest was written")
        return _fail(err.reason, err.message, err.exit_code)
    except KeyboardInterrupt as e:
        stop = InterruptedRunError(
            f"interrupted ({e or 'SIGINT'}); checkpoints are kept: relaunch with the same run name to resume"
        )
        return _fail(stop.reason, stop.message, stop.exit_code)
    except Exception as e:  # the last resort: still honour the contract
        traceback.print_exc()
        err = TrainingError(f"unexpected {type(e).__name__}: {e}")
        return _fail(err.reason, err.message, err.exit_code)


def threading_main() -> bool:
    return threading.current_thread() is threading.main_thread()


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("ray", "ray.train", "ray.data"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)


def run_main(argv: Sequence[str]) -> int:
    """`finetune run JOB.yaml`: fine-tune locally and print the eval metrics and where the artifacts are."""
    parser = argparse.ArgumentParser(prog="finetune run", description=run_main.__doc__)
    parser.add_argument("job", type=Path, help="FineTuneJob manifest (YAML)")
    parser.add_argument("--output", default=None, help="artifact location (default: spec.output.uri or ./runs/<name>)")
    parser.add_argument("--metrics-port", type=int, default=None, help="also serve Prometheus metrics on this port")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="show Ray and worker logs")
    args = parser.parse_args(list(argv))
    _logging(args.verbose)

    def body() -> int:
        job = load_job(args.job)
        result = run_local(
            job,
            output=args.output,
            metrics_port=args.metrics_port,
            progress=not args.no_progress,
            verbose=args.verbose,
        )
        final = result.summary.get("final", {})
        print("eval: " + " ".join(f"{k}={v:.4f}" for k, v in sorted(final.items())))
        summary = result.summary
        print(
            f"trained {summary.get('steps')} steps ({summary.get('strategy')}, "
            f"{summary.get('trainableParameters', 0):,} trainable parameters) in {summary.get('wallSeconds', 0):.0f}s"
        )
        print(f"artifacts: {result.output_uri} ({MANIFEST} lists {len(result.manifest['files'])} files)")
        return int(ExitCode.SUCCEEDED)

    return guarded(body, verbose=args.verbose)


def train_main(argv: Sequence[str]) -> int:
    """`finetune train --config PATH`: the driver in the Ray head pod (after `ray start --head`)."""
    parser = argparse.ArgumentParser(prog="finetune train", description=train_main.__doc__)
    parser.add_argument("--config", type=Path, required=True, help="FineTuneJob manifest (spec.output.uri set)")
    parser.add_argument("--run-name", default=None, help="Ray Train run name (default: metadata.name); same = resume")
    parser.add_argument("--attempt", type=int, default=1, help="attempt number (recorded in the manifest)")
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT, help="Prometheus port (0 = off)")
    parser.add_argument("--ray-address", default="auto", help="Ray cluster address (default: auto)")
    parser.add_argument("--max-failures", type=int, default=3, help="worker failures Ray Train recovers from")
    parser.add_argument(
        "--resource-wait-seconds", type=float, default=600.0, help="how long to wait for worker pods to join"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(list(argv))
    _logging(args.verbose)

    def body() -> int:
        job = load_job(args.config)
        spec = job.spec
        if not spec.output.uri:
            raise InvalidSpecError("spec.output.uri: required for finetune train (the operator fills it in)")
        metrics = TrainerMetrics()
        if args.metrics_port:
            metrics.serve(args.metrics_port)
        preflight(spec, output_uri=spec.output.uri, base_dir=None)
        # Exactly what each worker pod advertises to Ray (the operator starts it from the same shape).
        shape = worker_shape(spec.resources)
        ray.init(address=args.ray_address, log_to_driver=True, logging_level=logging.WARNING)
        try:
            result = run_training(
                spec,
                options=RunOptions(
                    run_name=args.run_name or job.metadata.name,
                    output_uri=spec.output.uri,
                    workers=spec.resources.workers,
                    cpus_per_worker=shape.ray_cpus,
                    gpus_per_worker=shape.gpus,
                    attempt=args.attempt,
                    max_failures=args.max_failures,
                    resource_wait_seconds=args.resource_wait_seconds,
                    metrics=metrics,
                ),
            )
        finally:
            ray.shutdown()
        log.warning("succeeded: %s (%d files in %s)", result.output_uri, len(result.manifest["files"]), MANIFEST)
        print(f"artifacts: {result.output_uri}")
        return int(ExitCode.SUCCEEDED)

    return guarded(body, verbose=args.verbose)
