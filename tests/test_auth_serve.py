"""`callgate serve` as a process: the open-relay warning and refusal, and no credential in any
log line or audit record (the real logging set-up, stdout grepped)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import openai
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.auth import open_relay_refusal
from proxy.cli import main
from proxy.policy import load_policy_text
from tests.conftest import completion
from tests.native_pass import proxy_cli
from tests.redis_server import free_port

UPSTREAM_KEY = "sk-upstream-do-not-log-4f1c9a"


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "CALLGATE_UPSTREAM_URL"}


def write(tmp_path: Path, config: dict[str, Any]) -> str:
    path = tmp_path / "callgate.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_refuses_to_listen_openly_with_an_upstream_key_and_no_auth(tmp_path: Path) -> None:
    path = write(tmp_path, {"upstream": {"api_key": UPSTREAM_KEY}})
    for host in ("0.0.0.0", "::"):
        done = subprocess.run(
            [*proxy_cli(), "serve", "--config", path, "--host", host],
            env=env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert f"refusing to listen on {host}" in done.stderr
        assert "auth: {modes: [none]}" in done.stderr
        assert UPSTREAM_KEY not in done.stderr + done.stdout


def test_refusal_rules() -> None:
    keyed = load_policy_text(yaml.safe_dump({"upstream": {"api_key": "k"}})).config
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.5"):
        assert open_relay_refusal(keyed, host) is None
    for host in ("0.0.0.0", "10.1.2.3", "callgate.internal", "::"):
        assert open_relay_refusal(keyed, host) is not None
    keyless = load_policy_text("{}").config
    assert open_relay_refusal(keyless, "0.0.0.0") is None  # nothing to spend: the client's key
    explicit = load_policy_text(
        yaml.safe_dump({"upstream": {"api_key": "k"}, "auth": {"modes": ["none"]}})
    ).config
    assert open_relay_refusal(explicit, "0.0.0.0") is None
    with pytest.raises(Exception, match="none cannot be combined"):
        load_policy_text(yaml.safe_dump({"auth": {"modes": ["none", "keys"]}}))


async def start(path: str, port: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        path,
        "--port",
        str(port),
        "--log-level",
        "debug",  # every line there is, so the grep sees the most
        env=env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    if resp.status == 200:
                        return proc
            except aiohttp.ClientError:
                pass
            assert proc.returncode is None and time.monotonic() < deadline, "did not start"
            await asyncio.sleep(0.05)


async def stop(proc: asyncio.subprocess.Process) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    return out.decode()


async def test_loopback_start_warns_of_the_open_relay(tmp_path: Path, upstream: Any) -> None:
    path = write(tmp_path, {"upstream": {"base_url": upstream.url, "api_key": UPSTREAM_KEY}})
    proc = await start(path, free_port())
    out = await stop(proc)
    assert '"event":"open_relay"' in out and '"level":"warning"' in out
    assert UPSTREAM_KEY not in out


async def test_no_credential_in_any_log_line_or_record(
    tmp_path: Path, upstream: Any, capsys: Any
) -> None:
    signer = ec.generate_private_key(ec.SECP256R1())
    pem = (
        signer.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    audit = tmp_path / "audit.jsonl"
    path = write(
        tmp_path,
        {
            "upstream": {"base_url": upstream.url, "api_key": UPSTREAM_KEY},
            "audit": {"file": str(audit)},
            "auth": {
                "modes": ["keys", "jwt"],
                "jwt": {"public_keys": [pem], "audience": "cg", "algorithms": ["ES256"]},
            },
        },
    )
    capsys.readouterr()
    assert main(["keys", "create", "--config", path, "--principal", "lena"]) == 0
    key = capsys.readouterr().out.splitlines()[-1]
    now = int(time.time())
    token = jwt.encode({"sub": "max", "aud": "cg", "exp": now + 300}, signer, "ES256")
    expired = jwt.encode({"sub": "max", "aud": "cg", "exp": now - 300}, signer, "ES256")
    secrets = {
        "key": key,
        "key body": key[3:],
        "unknown key": "cg-unknownUnknownUnknown0123456789",
        "token": token,
        "token signature": token.rsplit(".", 1)[1],
        "expired token": expired,
        "upstream key": UPSTREAM_KEY,
    }
    port = free_port()
    proc = await start(path, port)
    try:
        base = f"http://127.0.0.1:{port}/v1"
        for credential, ok in (
            (key, True),
            (token, True),
            (secrets["unknown key"], False),
            (expired, False),
        ):
            client = openai.AsyncOpenAI(base_url=base, api_key=credential, max_retries=0)
            upstream.push(completion(("lookup", {"q": "x"})))
            try:
                await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "x"}]
                )
                assert ok
            except openai.AuthenticationError:
                assert not ok
                upstream.replies.clear()
            finally:
                await client.close()
    finally:
        out = await stop(proc)
    assert '"event":"auth_failed"' in out and '"principal":"lena"' in out
    assert '"principal":"max"' in out
    written = audit.read_text()
    assert '"principal":"lena"' in written and '"credential":"key_' in written
    for name, secret in secrets.items():
        assert secret not in out, f"{name} in the log"
        assert secret not in written, f"{name} in the audit file"
