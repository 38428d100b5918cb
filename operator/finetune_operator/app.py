"""Wiring of the operator process: client, context, HTTP servers, leader election, kopf, resync, shutdown.

Why one place: everything operator-scoped is created here from the Settings and handed down explicitly (kopf memo),
so an operator can run in-process in a test (`run_operator(settings, stop=...)`) exactly as `finetune operator`
runs it, and two operators in one process share nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from typing import Any

import aiohttp
import kopf
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config

from finetune_operator import handlers
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.services.http import start_servers
from finetune_operator.services.kube import Kube
from finetune_operator.services.leader import LeaderElector, LeadershipLostError
from finetune_operator.services.progress import HttpProgressSource, ProgressSource, SimulatedProgressSource
from finetune_operator.services.reconcile import Context, resync_forever
from finetune_operator.settings import MetricsSource, Settings

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_LEADERSHIP_LOST = 3
EXIT_ERROR = 1


async def load_client_config(settings: Settings) -> k8s.Configuration:
    configuration = k8s.Configuration()
    if settings.kubeconfig:
        await k8s_config.load_kube_config(config_file=settings.kubeconfig, client_configuration=configuration)
    else:
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except k8s_config.ConfigException:
            await k8s_config.load_kube_config(client_configuration=configuration)
    return configuration


async def connection_info(configuration: k8s.Configuration) -> kopf.ConnectionInfo:
    """The same credentials for kopf's watches as for our own client."""
    token: str | None = None
    header: Any = configuration.get_api_key_with_prefix("BearerToken")
    if asyncio.iscoroutine(header):
        header = await header
    if header:
        token = str(header).split(" ", 1)[-1]
    return kopf.ConnectionInfo(
        server=str(configuration.host),
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        token=token,
        scheme="Bearer" if token else None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


def _progress_source(settings: Settings, session: aiohttp.ClientSession) -> ProgressSource:
    if settings.metrics_source is MetricsSource.SIMULATED:
        logger.warning("metrics_source=simulated: training progress is SIMULATED (test mode only)")
        return SimulatedProgressSource()
    return HttpProgressSource(session, timeout=settings.trainer_metrics_timeout_seconds)


async def run_operator(settings: Settings, *, stop: threading.Event | asyncio.Event | None = None) -> int:
    """Run until stopped (signal or `stop`), leadership is lost, or kopf fails; returns the exit code."""
    if stop is None:
        stop = _stop_on_signals()
    configuration = await load_client_config(settings)
    metrics = OperatorMetrics()
    async with k8s.ApiClient(configuration) as api, aiohttp.ClientSession() as session:
        kube = Kube(api, on_request=lambda method: metrics.api_requests.labels(method=method).inc())
        ctx = Context(settings=settings, kube=kube, metrics=metrics, progress=_progress_source(settings, session))
        runners = await start_servers(
            host=settings.bind_address,
            health_port=settings.health_port,
            metrics_port=settings.metrics_port,
            metrics=metrics,
            ready=lambda: ctx.ready,
        )
        ctx.ready = True  # a standby is ready too: it is healthy and will take over when needed
        elector = None
        if settings.leader_election:
            elector = LeaderElector(
                ctx.kube,
                namespace=settings.lease_namespace,
                name=settings.lease_name,
                identity=settings.identity,
                duration=settings.lease_duration_seconds,
                renew=settings.lease_renew_seconds,
            )
        try:
            return await _lead(ctx, elector=elector, configuration=configuration, stop=stop)
        finally:
            if elector is not None:
                await elector.release()
            for runner in runners:
                await runner.cleanup()


def _stop_on_signals() -> asyncio.Event:
    """SIGTERM/SIGINT stop a standby replica gracefully too (exit 0, nothing to release).

    kopf installs its own handlers once this replica leads (and then stops kopf, which ends `_lead`); before that,
    without these, SIGTERM would kill a standby with the default action (exit -15) — a rolling update or a
    scale-down would look like a crash.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread / platform
            loop.add_signal_handler(sig, stop.set)
    return stop


async def _wait_flag(stop: threading.Event | asyncio.Event) -> None:
    if isinstance(stop, asyncio.Event):
        await stop.wait()
        return
    while not stop.is_set():
        await asyncio.sleep(0.2)


async def _lead(
    ctx: Context,
    *,
    elector: LeaderElector | None,
    configuration: k8s.Configuration,
    stop: threading.Event | asyncio.Event | None,
) -> int:
    settings = ctx.settings
    tasks: dict[str, asyncio.Task[Any]] = {}
    if stop is not None:
        tasks["stop"] = asyncio.create_task(_wait_flag(stop))
    if elector is not None:
        acquire = asyncio.create_task(elector.acquire())
        waiting = {acquire, *tasks.values()}
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if acquire not in done:
            acquire.cancel()
            await _cancel(tasks.values())
            return EXIT_OK
        tasks["lease"] = asyncio.create_task(elector.hold())
    kopf_stop = asyncio.Event()
    registry = handlers.build_registry(connection=await connection_info(configuration), kueue=settings.kueue_enabled)
    tasks["kopf"] = asyncio.create_task(
        kopf.operator(
            registry=registry,
            settings=handlers.kopf_settings(max_workers=settings.max_concurrency),
            standalone=True,
            clusterwide=settings.clusterwide,
            namespaces=list(settings.namespaces),
            memo=kopf.Memo(ctx=ctx),
            stop_flag=kopf_stop,
        )
    )
    tasks["resync"] = asyncio.create_task(resync_forever(ctx))
    logger.info("operator active as %s (namespaces: %s)", settings.identity, settings.namespaces or "all")
    done, _ = await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_COMPLETED)
    code = EXIT_OK
    for name, task in tasks.items():
        if task in done and not task.cancelled() and task.exception() is not None:
            error = task.exception()
            if isinstance(error, LeadershipLostError):
                logger.error("leadership lost: %s; exiting so a standby takes over", error)
                code = EXIT_LEADERSHIP_LOST
            else:
                logger.error("%s stopped: %r", name, error)
                code = EXIT_ERROR
    kopf_stop.set()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(tasks["kopf"]), timeout=10)
    await _cancel(tasks.values())
    return code


async def _cancel(tasks: Any) -> None:
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
