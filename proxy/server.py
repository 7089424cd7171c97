"""Running the app: logging, the event loop, signals, hot reload and graceful shutdown.

`serve --workers N` (N > 1) forks N workers from one parent before any event loop exists. Each
worker is a whole callgate (its own loop, store pool, upstream pool and audit chain) listening
on the same port with SO_REUSEPORT: the kernel spreads connections over them. The parent only
supervises: it forwards SIGHUP (reload) and SIGTERM/SIGINT (drain) to every worker, waits for
them to drain (up to drain_delay + shutdown_grace, then SIGKILL), and restarts a worker that
exits on its own, unless it exits within WORKER_MIN_LIFE seconds of starting: a worker that
cannot even start (port taken, bad file) would only crash again, so the parent stops them all
and exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from aiohttp import web

from proxy import native
from proxy.app import create_app
from proxy.auth import open_relay
from proxy.config import ServerConfig
from proxy.http_guard import GuardedAppRunner
from proxy.logs import configure_logging, flush_logs
from proxy.metrics import SharedMetrics
from proxy.policy import Policy
from proxy.reload import reload_policy, watch
from proxy.state import STATE

log = structlog.get_logger("callgate")
GC_THRESHOLD = 20_000
# File descriptors beyond the client connections: upstream pool, store, audit file, listener.
SPARE_FDS = 1024
WORKER_MIN_LIFE = 5.0  # seconds: a worker exiting sooner is not restarted (see module doc)
PARENT_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}


class WorkersRefused(Exception):
    """`--workers N` cannot run with this configuration."""


@dataclasses.dataclass(frozen=True)
class Worker:
    """What a worker of `serve --workers N` needs to know about itself."""

    index: int
    metrics_dir: str


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
    store: str = config.store.backend
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


def worker_audit_file(path: str, index: int) -> str:
    """Each worker keeps its own hash chain, so its own file: `audit.jsonl` -> `audit.jsonl.w0`.
    (Two chains interleaved in one file would verify as neither.)"""
    return f"{path}.w{index}"


def _create_app(policy: Policy, config_path: str | None, worker: Worker | None) -> web.Application:
    audit = policy.config.audit
    if worker is None or not audit.file:
        return create_app(policy, config_path=config_path)
    # The app is built with the worker's own audit file; the policy it keeps (and compares
    # reloads against) stays the one the file names.
    config = policy.config.model_copy(
        update={
            "audit": audit.model_copy(update={"file": worker_audit_file(audit.file, worker.index)})
        }
    )
    app = create_app(dataclasses.replace(policy, config=config), config_path=config_path)
    app[STATE].policy = policy
    return app


async def run(
    policy: Policy,
    config_path: str | None,
    host: str,
    port: int,
    worker: Worker | None = None,
) -> None:
    app = _create_app(policy, config_path, worker)
    state = app[STATE]
    server = policy.config.server
    _raise_fd_limit(server.max_connections)
    shared = None
    if worker is not None:
        shared = state.metrics.shared = SharedMetrics(state.metrics, worker.metrics_dir)
    runner = make_runner(app, server)
    await runner.setup()
    # Workers share the port: SO_REUSEPORT, each its own listening socket.
    site = web.TCPSite(runner, host, port, reuse_address=True, reuse_port=worker is not None)
    await site.start()
    # Everything loaded so far lives as long as the process: keep it out of the cyclic GC's
    # scans, and collect the young generation less often (the request path allocates a lot of
    # short-lived objects, nearly none of them cyclic).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)
    if open_relay(policy.config):
        log.warning(
            "open_relay",
            detail="upstream.api_key is set and there is no auth section: anyone who reaches "
            "callgate spends that key. Configure auth (see README, Authentication).",
        )
    if sys.stdout.isatty() and worker is None:
        print(banner(policy, config_path, host, port), flush=True)
    else:
        log.info(
            "listening",
            host=host,
            port=port,
            worker=None if worker is None else worker.index,
            config=config_path,
            upstream=policy.config.upstream.base_url,
            store=policy.config.store.backend,
            compiled=len(native.compiled()),  # of proxy.native.MODULES: 0 for a source install
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
    snapshots = None if shared is None else loop.create_task(shared.run())

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
    if snapshots is not None:
        snapshots.cancel()  # writes this worker's final counts
        with contextlib.suppress(asyncio.CancelledError):
            await snapshots
    log.info("stopped")
    flush_logs()


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    # The loop runs outside the `except`: inside it, every traceback of the whole run would
    # carry the ImportError as its context.
    run: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        pass
    run(main)


def resolve_workers(value: str) -> int:
    """`--workers`: a positive count, or `auto`: the CPUs this process may run on."""
    if value == "auto":
        return len(os.sched_getaffinity(0))
    count = int(value)
    if count < 1:
        raise ValueError("must be at least 1")
    return count


def check_workers(policy: Policy, workers: int) -> None:
    if workers > 1 and policy.config.store.backend != "redis":
        raise WorkersRefused(
            f"--workers {workers} needs store.backend: redis. With the memory store each worker"
            " would keep its own counters, ledgers and stashes: every limit and budget would"
            f" allow up to {workers} times what it says. Use --workers 1, or a Redis store."
        )


def serve(
    policy: Policy,
    config_path: str,
    host: str,
    port: int,
    log_level: str = "info",
    workers: int = 1,
) -> int:
    configure_logging(log_level)
    if workers > 1:
        return supervise(policy, config_path, host, port, workers)
    _run_loop(run(policy, config_path, host, port))
    return 0


def supervise(policy: Policy, config_path: str, host: str, port: int, workers: int) -> int:
    """The parent of `serve --workers N`: fork, forward signals, drain, restart (module doc)."""
    check_workers(policy, workers)
    server = policy.config.server
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    metrics_dir = given or tempfile.mkdtemp(prefix="callgate-metrics-")
    os.makedirs(metrics_dir, exist_ok=True)
    for entry in os.scandir(metrics_dir):  # the convention: wiped when the server starts
        if entry.name.startswith(SharedMetrics.PREFIX):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
    # Signals wait in the parent's queue until it asks (sigtimedwait): no handler races.
    signal.pthread_sigmask(signal.SIG_BLOCK, PARENT_SIGNALS)
    children: dict[int, tuple[int, float]] = {}  # pid -> (worker index, started)

    def spawn(index: int) -> None:
        flush_logs()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, PARENT_SIGNALS)
                _run_loop(run(policy, config_path, host, port, Worker(index, metrics_dir)))
            except BaseException:
                log.exception("worker_failed", worker=index)
                code = 1
            finally:
                flush_logs()
                os._exit(code)
        children[pid] = (index, time.monotonic())
        log.info("worker_started", worker=index, pid=pid)

    def send(sig: signal.Signals) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    for index in range(workers):
        spawn(index)
    stopping = False
    failed = False
    deadline = 0.0
    try:
        while children:
            info = signal.sigtimedwait(PARENT_SIGNALS, 0.5)
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                if not stopping:
                    stopping = True
                    deadline = time.monotonic() + server.drain_delay + server.shutdown_grace + 10
                    log.info("workers_draining", workers=len(children))
                    send(signal.SIGTERM)
            elif info is not None and info.si_signo == signal.SIGHUP:
                send(signal.SIGHUP)
            while children:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                index, started = children.pop(pid)
                if stopping:
                    continue
                code = os.waitstatus_to_exitcode(status)
                if time.monotonic() - started < WORKER_MIN_LIFE:
                    log.error("worker_exited_at_start", worker=index, pid=pid, code=code)
                    failed = stopping = True
                    deadline = time.monotonic() + server.drain_delay + server.shutdown_grace + 10
                    send(signal.SIGTERM)
                else:
                    log.warning("worker_restarted", worker=index, pid=pid, code=code)
                    spawn(index)
            if stopping and time.monotonic() > deadline:
                send(signal.SIGKILL)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, PARENT_SIGNALS)
        if not given:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("stopped", workers=workers)
    flush_logs()
    return 1 if failed else 0
