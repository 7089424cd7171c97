"""The first five minutes: `callgate demo` shows gated calls offline, and `callgate serve` tells
a person in a terminal what it is doing (JSON lines for everyone else)."""

from __future__ import annotations

import os
import pty
import select
import socket
import subprocess
import time
from pathlib import Path

import orjson

from tests.native_pass import proxy_cli

ROOT = Path(__file__).resolve().parent.parent
CALLGATE = proxy_cli()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLGATE_", "OTEL_"))}
    env["OPENAI_API_KEY"] = ""
    return env


def _rows(out: str) -> list[tuple[str, str, str]]:
    """The decision table's (tool, decision, gate) columns (fixed width: arguments hold
    spaces)."""
    return [
        (line[4:16].strip(), line[50:58].strip(), line[59:69].strip())
        for line in out.splitlines()
        if line[:2].strip().isdigit()
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_prints_each_decision_offline() -> None:
    proc = subprocess.run(
        [*CALLGATE, "demo"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()
    assert _rows(out) == [
        ("get_weather", "allowed", "-"),
        ("get_weather", "allowed", "-"),
        ("get_weather", "blocked", "rate_limit"),
        ("search_web", "blocked", "rules"),
        ("search_web", "allowed", "-"),
        ("search_web", "allowed", "-"),
        ("search_web", "blocked", "budget"),
        ("delete_file", "blocked", "rules"),
    ]
    # A blocked call never reached the agent: the reprompted model's text did.
    assert 'agent receives text: "I can\'t do that: Rate limit: 2 >= 2"' in out
    assert out.count("agent receives the call:") == 4


def test_demo_runs_a_users_policy(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("default: {allow: false}\ntools: {get_weather: {}}\naudit: {log: false}\n")
    proc = subprocess.run(
        [*CALLGATE, "demo", "--config", str(policy)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert {tool: decision for tool, decision, _ in _rows(proc.stdout.decode())} == {
        "get_weather": "allowed",
        "search_web": "blocked",
        "delete_file": "blocked",
    }


def _serve_output(stdout_is_tty: bool, until: bytes) -> bytes:
    port = _free_port()
    argv = [*CALLGATE, "serve", "--port", str(port)]
    if stdout_is_tty:
        leader, follower = pty.openpty()
        proc = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=follower, stderr=follower)
        os.close(follower)
        read_fd = leader
    else:
        proc = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=subprocess.PIPE)
        assert proc.stdout is not None
        read_fd = proc.stdout.fileno()
    out = b""
    try:
        deadline = time.monotonic() + 30
        while until not in out and time.monotonic() < deadline:
            ready, _, _ = select.select([read_fd], [], [], 0.5)
            if ready:
                try:
                    data = os.read(read_fd, 4096)
                except OSError:  # the pty's other end closed
                    break
                if not data:
                    break
                out += data
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if stdout_is_tty:
            os.close(read_fd)
    return out.replace(b"\r\n", b"\n")


def test_serve_in_a_terminal_prints_a_banner() -> None:
    out = _serve_output(True, b"follow.").decode()
    assert "callgate listening on http://127.0.0.1:" in out
    assert "(foreground; Ctrl-C stops it)" in out
    assert "upstream:  https://api.openai.com/v1" in out
    assert "policy:    config/callgate.yaml" in out
    assert "store:     memory" in out
    assert "get_weather, search_web, delete_file (denied); other tools allowed" in out
    assert "callgate demo" in out
    assert '"event"' not in out.split("follow.")[0]  # the banner, not a JSON line


def test_serve_without_a_terminal_writes_json_lines() -> None:
    out = _serve_output(False, b"\n")
    line = orjson.loads(out.splitlines()[0])
    assert line["event"] == "listening"
    assert line["upstream"] == "https://api.openai.com/v1"
    assert b"Ctrl-C" not in out
