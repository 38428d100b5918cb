"""The operator's HTTP endpoints: /healthz, /readyz (health port) and /metrics (metrics port).

Why our own server rather than kopf's liveness endpoint: a standby replica (not leader, kopf not running) is healthy
and ready to take over, and /metrics must serve the operator's own registry, not the process-global one.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from finetune_operator.metrics import OperatorMetrics


def _health_app(*, ready: Callable[[], bool]) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n") if ready() else web.Response(status=503, text="not ready\n")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def _metrics_app(metrics: OperatorMetrics) -> web.Application:
    async def handle(_: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", handle)
    return app


async def start_servers(
    *, host: str, health_port: int, metrics_port: int, metrics: OperatorMetrics, ready: Callable[[], bool]
) -> list[web.AppRunner]:
    """Start the servers (a port of 0 disables one); the caller cleans the runners up on shutdown."""
    runners = []
    for port, app in ((health_port, _health_app(ready=ready)), (metrics_port, _metrics_app(metrics))):
        if not port:
            continue
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        runners.append(runner)
    return runners
