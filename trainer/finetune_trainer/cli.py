"""Entry points `finetune run` and `finetune train`: argument parsing, logging, and the exit contract.

Why here and only here: library modules raise domain errors; this boundary turns them into the contract's exit
code and, as the last stderr line, the one-line JSON reason (also written to the termination message file so the
operator reads it from the pod status). Logging is configured here, never at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray

from finetune_trainer import signals
from finetune_trainer.contract import (
    DEFAULT_METRICS_PORT,
    MANIFEST,
    STOP_DRAIN_ENV,
    SUCCEEDED,
    TERMINATION_MESSAGE_PATH,
    ExitCode,
    TrainerReport,
)
from finetune_trainer.driver import RunOptions, RunResult, preflight, run_training
from finetune_trainer.driverlog import DriverLog
from finetune_trainer.errors import (
    InterruptedRunError,
    InvalidSpecError,
    QualityGateFailedError,
    TrainerError,
    TrainingError,
)
from finetune_trainer.local import default_output, run_local
from finetune_trainer.metrics import TrainerMetrics
from finetune_trainer.shape import worker_shape
from finetune_trainer.spec import SpecError, load_job

TERMINATION_LOG_ENV = "FINETUNE_TERMINATION_LOG"
log = logging.getLogger("finetune_trainer")


def _write_termination_message(line: str) -> None:
    path = Path(os.environ.get(TERMINATION_LOG_ENV) or TERMINATION_MESSAGE_PATH)
    with contextlib.suppress(OSError):  # not in a pod (or not writable): stderr carries the same line
        path.write_text(line + "\n", encoding="utf-8")


def _finish(report: TrainerReport, code: ExitCode, driver_log: DriverLog | None) -> int:
    """Upload this attempt's log (best effort), then write the report as the last stderr line and the
    termination message. The report names the log only if the upload worked."""
    signals.disarm()  # the run is over: a drain timer must not cut the report
    if driver_log is not None:
        report = dataclasses.replace(report, log_uri=driver_log.uri())
        if report.log_uri is not None and not driver_log.upload(last_line=report.to_line()):
            report = dataclasses.replace(report, log_uri=None)
    line = report.to_line()
    sys.stdout.flush()
    sys.stderr.flush()
    print(line, file=sys.stderr, flush=True)
    _write_termination_message(line)
    return int(code)


def _fail(error: TrainerError, driver_log: DriverLog | None) -> int:
    tail = driver_log.tail() if driver_log is not None else ()
    report = TrainerReport(reason=error.reason.value, message=error.message, log_tail=tail)
    if isinstance(error, QualityGateFailedError):
        report = dataclasses.replace(report, **_outcome_fields(error.outcome))
    return _finish(report, error.exit_code, driver_log)


def _succeed(result: RunResult, driver_log: DriverLog | None) -> int:
    return _finish(success_report(result), ExitCode.SUCCEEDED, driver_log)


def success_report(result: RunResult) -> TrainerReport:
    """The report of a finished run: the kept model's outcome and the step the run resumed from.

    The resume step travels in the report because the terminated pod's message is durable: the operator records
    it in status.attempts[].resumedFromStep even when no scrape saw the trainer after Ray Train restarted workers.
    """
    files = len(result.manifest.get("files", []))
    resumed = result.summary.get("resumedFromStep")
    return TrainerReport(
        reason=SUCCEEDED,
        message=f"{MANIFEST} written: {files} files under {result.output_uri}",
        resumed_from_step=resumed if isinstance(resumed, int) and not isinstance(resumed, bool) else None,
        **_outcome_fields(result.outcome),
    )


def _outcome_fields(outcome: dict[str, Any]) -> dict[str, Any]:
    """The report's result fields from the run's outcome (finish.py): the kept model's watched metric etc."""
    value, baseline, kept = outcome.get("value"), outcome.get("baseline"), outcome.get("keptStep")
    negative = outcome.get("negativeTransfer")
    return {
        "metric_name": outcome.get("metric") if isinstance(outcome.get("metric"), str) else None,
        "metric": float(value) if isinstance(value, int | float) else None,
        "baseline": float(baseline) if isinstance(baseline, int | float) else None,
        "negative_transfer": negative if isinstance(negative, bool) else None,
        "kept_step": int(kept) if isinstance(kept, int) else None,
    }


def guarded(
    body: Callable[[], RunResult],
    *,
    verbose: bool,
    driver_log: DriverLog | None = None,
    stop: signals.StopRequest | None = None,
) -> int:
    """Run an entry point body and map every outcome onto the exit contract (report line last)."""
    signals.install(stop)
    try:
        result = body()
    except SpecError as e:
        return _fail(InvalidSpecError(str(e)), driver_log)
    except TrainerError as e:
        if verbose:
            traceback.print_exc()
        return _fail(e, driver_log)
    except SystemExit as e:  # a library calling sys.exit() must not turn into a silent exit 0
        return _fail(TrainingError(f"exited early (sys.exit({e.code!r})) before the manifest was written"), driver_log)
    except KeyboardInterrupt as e:
        interrupted = InterruptedRunError(
            f"interrupted ({e or 'SIGTERM or SIGINT'}); checkpoints are kept: relaunch with the same run name to resume"
        )
        return _fail(interrupted, driver_log)
    except Exception as e:  # the last resort: still honour the contract
        traceback.print_exc()
        return _fail(TrainingError(f"unexpected {type(e).__name__}: {e}"), driver_log)
    return _succeed(result, driver_log)


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
    driver_log = DriverLog(attempt=1)

    def body() -> RunResult:
        job = load_job(args.job)
        driver_log.target(default_output(job, args.output), storage_spec=job.spec.storage, base_dir=Path.cwd())
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
        _print_outcome(result.outcome)
        print(f"artifacts: {result.output_uri} ({MANIFEST} lists {len(result.manifest['files'])} files)")
        return result

    with driver_log.capture():
        _logging(args.verbose)
        return guarded(body, verbose=args.verbose, driver_log=driver_log)


def _print_outcome(outcome: dict[str, Any]) -> None:
    print(f"kept: step {outcome.get('keptStep')}: {outcome.get('keptReason')}")
    if outcome.get("baseline") is not None:
        verdict = "NEGATIVE TRANSFER" if outcome.get("negativeTransfer") else "fine-tuning beats it"
        print(
            f"baseline ({outcome.get('baselineKind')}): {outcome.get('metric')}={outcome['baseline']:.4f} "
            f"vs {outcome.get('value', float('nan')):.4f}: {verdict}"
        )


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
    driver_log = DriverLog(attempt=args.attempt)
    stop = signals.StopRequest.from_env(os.environ, STOP_DRAIN_ENV)  # set by the operator on the head pod

    def body() -> RunResult:
        job = load_job(args.config)
        spec = job.spec
        if not spec.output.uri:
            raise InvalidSpecError("spec.output.uri: required for finetune train (the operator fills it in)")
        driver_log.target(spec.output.uri, storage_spec=spec.storage)
        metrics = TrainerMetrics()
        if args.metrics_port:
            metrics.serve(args.metrics_port)
        preflight(spec, output_uri=spec.output.uri, base_dir=None)
        # Exactly what each worker pod advertises to Ray (the operator starts it from the same shape).
        shape = worker_shape(spec.resources)
        ray.init(address=args.ray_address, log_to_driver=True, logging_level=logging.WARNING)
        signals.install(stop)  # ray.init replaced it
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
                    stop=stop,
                ),
            )
        finally:
            ray.shutdown()
        log.warning("succeeded: %s (%d files in %s)", result.output_uri, len(result.manifest["files"]), MANIFEST)
        print(f"artifacts: {result.output_uri}")
        return result

    with driver_log.capture():
        _logging(args.verbose)
        return guarded(body, verbose=args.verbose, driver_log=driver_log, stop=stop)
