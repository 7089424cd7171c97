"""Authentication cost per request, per `auth` mode: `Authenticator.authenticate()` on the
headers of a request, as the auth middleware calls it (bounded, loopback-free, in-process).

    python -m bench.bench_auth [--requests 20000]

Modes: keys (a virtual key from a keys file: one SHA-256 and a dict lookup), jwt (a bearer RS256
token against a static PEM key: the first request verifies the signature, later ones hit the
per-token cache), jwt-first (a fresh token every request: the signature check each time, what an
attacker sending new tokens costs), trusted_header (a peer address check). Prints microseconds
per request for each; the README's Authentication section quotes them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.auth import Authenticator
from proxy.auth.keys import FileKeys, KeyRecord, digest, new_id, new_key
from proxy.config import Config

POLICY: dict[str, Any] = {"upstream": {"base_url": "http://127.0.0.1:9/v1"}}


async def per_request(auth: Authenticator, headers: list[dict[str, str]], peer: str) -> float:
    """Microseconds per authenticate() over the given header sets (one each)."""
    started = time.perf_counter()
    for h in headers:
        result = await auth.authenticate(h, peer)
        if not hasattr(result, "principal"):
            raise SystemExit(f"authentication failed in the benchmark: {result}")
    return (time.perf_counter() - started) / len(headers) * 1e6


async def main_async(requests: int) -> list[tuple[str, float]]:
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="callgate-bench-auth-") as tmp:
        key = new_key()
        keys_file = os.path.join(tmp, "callgate.keys.json")
        FileKeys(keys_file).add(
            KeyRecord(new_id(), digest(key), "alice", ["eng"], created=time.time())
        )
        config = Config.model_validate(
            {**POLICY, "auth": {"modes": ["keys"], "keys_file": keys_file}}
        )
        auth = Authenticator(config, os.path.join(tmp, "callgate.yaml"))
        await auth.start()
        rows.append(
            ("keys", await per_request(auth, [{"Authorization": f"Bearer {key}"}] * requests, ""))
        )
        await auth.close()

        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        jwt_config = {
            "public_keys": [pem.decode()],
            "audience": "callgate",
            "algorithms": ["RS256"],
        }
        config = Config.model_validate({**POLICY, "auth": {"modes": ["jwt"], "jwt": jwt_config}})
        auth = Authenticator(config, None)
        await auth.start()

        def token(n: int) -> str:
            claims = {"sub": f"user-{n}", "aud": "callgate", "exp": int(time.time()) + 3600}
            return jwt.encode(claims, private, algorithm="RS256")

        same = {"Authorization": f"Bearer {token(0)}"}
        rows.append(("jwt (cached per token)", await per_request(auth, [same] * requests, "")))
        fresh = [{"Authorization": f"Bearer {token(n)}"} for n in range(1, 1 + requests // 20)]
        rows.append(("jwt-first (signature check)", await per_request(auth, fresh, "")))
        await auth.close()

        trusted = {"peers": ["127.0.0.1/32", "10.0.0.0/8"]}
        config = Config.model_validate(
            {**POLICY, "auth": {"modes": ["trusted_header"], "trusted_header": trusted}}
        )
        auth = Authenticator(config, None)
        await auth.start()
        headers = [{"x-callgate-principal": "bob"}] * requests
        rows.append(("trusted_header", await per_request(auth, headers, "127.0.0.1")))
        await auth.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="per mode (bounded)")
    args = parser.parse_args(argv)
    requests = max(20, min(args.requests, 1_000_000))
    print(f"authenticate() per request, {requests} requests per mode (jwt-first: 1 in 20)")
    for mode, micros in asyncio.run(main_async(requests)):
        print(f"  {mode:<28} {micros:8.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
