"""Running the app: logging, the event loop, signals, hot reload and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import resource
import signal
import sys

import structlog
from aiohttp import web

from proxy.app import create_app
from proxy.config import ServerConfig
from proxy.http_guard import GuardedAppRunner
from proxy.logs import configure_logging, flush_logs
from proxy.policy import Policy
from proxy.reload import reload_policy, watch
from proxy.state import STATE

log = structlog.get_logger("callgate")
GC_THRESHOLD = 20_000
# File descriptors beyond the client connections: upstream pool, store, audit file, listener.
SPARE_FDS = 1024


def make_runner(app: web.Application, server: ServerConfig) -> GuardedAppRunner:
    """The runner `callgate serve` uses: protocol errors in OpenAI's shape, the request-head
    and idle timeouts and the connection bound of `server` (see proxy.http_guard)."""
    return GuardedAppRunner(
        app,
        header_timeout=server.header_timeout,
        idle_timeout=server.idle_timeout,
        max_connections=server.max_connections,
        shutdown_timeout=server.shutdown_grace,
    )


def _raise_fd_limit(max_connections: int) -> None:
    """Room for `max_connections` clients: past the soft limit of open files, accept() fails
    and the bound would never be the one reached. Raised up to the hard limit if needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + SPARE_FDS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        if soft < wanted:
            log.warning(
                "open_files_limit",
                limit=soft,
                max_connections=max_connections,
                hint="raise `ulimit -n` or lower server.max_connections",
            )


def banner(policy: Policy, config_path: str | None, host: str, port: int) -> str:
    """What a person starting callgate in a terminal needs to know (log lines are JSON, for
    machines: a terminal gets this instead of the `listening` line)."""
    config = policy.config
    store = config.store.backend
    if store == "redis":
        from proxy.cli import _mask_url  # a password in the URL is never printed

        store += f" ({_mask_url(config.store.url)})"
    else:
        store += " (counters and budgets live in this process)"
    tools = ", ".join(
        f"{name}{'' if tool.allow else ' (denied)'}" for name, tool in config.tools.items()
    )
    unknown = "allowed" if config.default.allow else "denied"
    url = f"http://{host}:{port}/v1"
    reload = "reloaded when it changes" if config.server.reload_interval > 0 else "SIGHUP reloads"
    return "\n".join(
        (
            f"callgate listening on {url}  (foreground; Ctrl-C stops it)",
            f"  upstream:  {config.upstream.base_url}",
            f"  policy:    {config_path or '-'} ({reload})",
            f"  store:     {store}",
            f"  tools:     {tools or 'none listed'}; other tools {unknown}",
            f"  try it:    export OPENAI_BASE_URL={url}",
            "  offline?   `callgate demo` shows gated calls without an upstream or API key",
            "Log lines (JSON) follow.",
        )
    )


async def run(policy: Policy, config_path: str | None, host: str, port: int) -> None:
    app = create_app(policy, config_path=config_path)
    state = app[STATE]
    server = policy.config.server
    _raise_fd_limit(server.max_connections)
    runner = make_runner(app, server)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    # Everything loaded so far lives as long as the process: keep it out of the cyclic GC's
    # scans, and collect the young generation less often (the request path allocates a lot of
    # short-lived objects, nearly none of them cyclic).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)
    if sys.stdout.isatty():
        print(banner(policy, config_path, host, port), flush=True)
    else:
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
