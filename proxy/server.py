"""Running the app: logging, the event loop, signals, hot reload and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal

import structlog
from aiohttp import web

from proxy.app import create_app
from proxy.logs import configure_logging, flush_logs
from proxy.policy import Policy
from proxy.reload import reload_policy, watch
from proxy.state import STATE

log = structlog.get_logger("callgate")
GC_THRESHOLD = 20_000


async def run(policy: Policy, config_path: str | None, host: str, port: int) -> None:
    app = create_app(policy, config_path=config_path)
    state = app[STATE]
    server = policy.config.server
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=server.shutdown_grace)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    # Everything loaded so far lives as long as the process: keep it out of the cyclic GC's
    # scans, and collect the young generation less often (the request path allocates a lot of
    # short-lived objects, nearly none of them cyclic).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)
    log.info(
        "listening",
        host=host,
        port=port,
        config=config_path,
        upstream=policy.config.upstream.base_url,
        store=policy.config.store.backend,
    )

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        task = loop.create_task(reload_policy(state, "SIGHUP"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    watcher = None
    if config_path and server.reload_interval > 0:
        watcher = loop.create_task(watch(state, server.reload_interval))

    await stop.wait()
    state.draining = True  # /readyz answers 503 from now on
    log.info("draining", drain_delay=server.drain_delay, grace=server.shutdown_grace)
    if server.drain_delay:
        await asyncio.sleep(server.drain_delay)
    if watcher is not None:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    # Stops listening, lets in-flight requests and streams finish (up to shutdown_grace),
    # then runs on_cleanup: the audit file is flushed and closed there.
    await runner.cleanup()
    log.info("stopped")
    flush_logs()


def serve(policy: Policy, config_path: str, host: str, port: int, log_level: str = "info") -> int:
    configure_logging(log_level)
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(policy, config_path, host, port))
    else:
        uvloop.run(run(policy, config_path, host, port))
    return 0
