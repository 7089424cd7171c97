"""A private `redis-server` for tests: a free loopback port, no persistence, stoppable mid-test.

Usage: `from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401`, then
take a `redis_server: RedisServer` argument (the fixture's name). `server.url` is
redis://127.0.0.1:PORT/0; `server.stop()` makes it go away (clients see connection refused);
`server.start()` brings a fresh, empty server back on the same port. `start_redis()` gives an
unmanaged one (for wider-scoped fixtures; call `cleanup()`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, port: int | None = None, workdir: str | None = None) -> None:
        self.port = port or free_port()
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="callgate-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 5.0) -> None:
        assert self.proc is None, "already running"
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no"]
        with open(self.dir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, *args], stdout=log, stderr=subprocess.STDOUT, cwd=self.dir
            )
        deadline = time.monotonic() + timeout
        while not _pong(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{tail}")
            time.sleep(0.01)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"FLUSHALL\r\n")
            assert s.recv(16).startswith(b"+OK")

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_redis() -> RedisServer:
    """A running server on a free port (retried once if the port was taken meanwhile)."""
    if not os.access(REDIS_SERVER, os.X_OK):
        pytest.skip("redis-server is not installed (Debian package redis-server; tests/run)")
    for attempt in range(3):
        server = RedisServer()
        try:
            server.start()
            return server
        except RuntimeError:
            server.cleanup()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(name="redis_server")
def redis_server_fixture() -> Iterator[RedisServer]:
    """A fresh redis-server for one test; the test may stop and start it."""
    server = start_redis()
    try:
        yield server
    finally:
        server.cleanup()
