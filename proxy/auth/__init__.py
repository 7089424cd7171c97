"""Authentication: who a request is, from a credential callgate can check (the `auth:` section).

Modes are tried in the configured order; the first whose credential the request carries decides
(a presented key that is revoked does not fall through to another mode):
- keys: a bearer `cg-...` virtual key (proxy.auth.keys),
- jwt: a bearer JWT (proxy.auth.jwt),
- trusted_header: a principal header from a listed peer address (proxy.auth.trusted).

The credential is read from `Authorization: Bearer ...` or `api-key:` (what the OpenAI and Azure
SDKs send). With auth on, it is never forwarded upstream (proxy.upstream drops both headers),
and the principal the gates see is the identity's: no header or body field overrides it.
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from proxy.auth.identity import IDENTITY, AuthFailure, Identity
from proxy.auth.keys import PREFIX, FileKeySet, KeySet, RedisKeySet
from proxy.config import AuthConfig, Config
from proxy.principal import api_key_of, canonical

if TYPE_CHECKING:  # imported when their mode is on: pyjwt and cryptography load only then
    from proxy.auth.jwt import JwtVerifier
    from proxy.auth.trusted import TrustedHeader

__all__ = ["IDENTITY", "AuthFailure", "Authenticator", "Identity", "keys_file", "open_relay"]

KEYS_FILE = "callgate.keys.json"
MISSING = AuthFailure(
    "missing",
    "You didn't provide a callgate credential: send your key as 'Authorization: Bearer KEY'.",
)


def keys_file(auth: AuthConfig | None, config_path: str | None) -> str:
    """Where the memory store's keys live: `auth.keys_file`, relative to the policy's directory,
    or callgate.keys.json beside the policy."""
    base = os.path.dirname(os.path.abspath(config_path)) if config_path else os.getcwd()
    name = auth.keys_file if auth is not None and auth.keys_file else KEYS_FILE
    return os.path.join(base, os.path.expanduser(name))


def _looks_like_jwt(credential: str) -> bool:
    return credential.count(".") == 2


class Authenticator:
    def __init__(self, config: Config, config_path: str | None, clock: Any = time.time) -> None:
        auth = config.auth
        assert auth is not None and auth.enabled
        self.modes = tuple(auth.modes)
        self.keys: KeySet | None = None
        self.jwt: JwtVerifier | None = None
        self.trusted: TrustedHeader | None = None
        if "keys" in self.modes:
            if config.store.backend == "redis":
                self.keys = RedisKeySet(
                    config.store.url,
                    config.store.key_prefix,
                    auth.keys_refresh,
                    max(config.store.timeout, 1.0),
                    clock,
                )
            else:
                self.keys = FileKeySet(keys_file(auth, config_path), auth.keys_refresh, clock)
        if "jwt" in self.modes:
            from proxy.auth.jwt import JwtVerifier

            assert auth.jwt is not None
            self.jwt = JwtVerifier(auth.jwt, clock)
        if "trusted_header" in self.modes:
            from proxy.auth.trusted import TrustedHeader

            assert auth.trusted_header is not None
            self.trusted = TrustedHeader(auth.trusted_header)

    async def start(self) -> None:
        if self.keys is not None:
            await self.keys.start()
        if self.jwt is not None:
            await self.jwt.start()

    async def close(self) -> None:
        if self.keys is not None:
            await self.keys.close()
        if self.jwt is not None:
            await self.jwt.close()

    async def authenticate(
        self, headers: Mapping[str, str], peer: str | None
    ) -> Identity | AuthFailure:
        credential = api_key_of(headers)
        for mode in self.modes:
            if mode == "keys":
                if credential is not None and credential.startswith(PREFIX):
                    return self._key(credential)
            elif mode == "jwt":
                if credential is not None and _looks_like_jwt(credential):
                    assert self.jwt is not None  # set up for its mode
                    return await self.jwt.verify(credential)
            elif mode == "trusted_header":
                assert self.trusted is not None  # set up for its mode
                if self.trusted.present(headers):
                    return self.trusted.authenticate(headers, peer)
        if credential is not None:
            return AuthFailure("malformed", "The credential is not one callgate accepts.")
        return MISSING

    def _key(self, credential: str) -> Identity | AuthFailure:
        assert self.keys is not None
        record, status = self.keys.lookup(credential)
        if record is None:
            return AuthFailure("unknown", "Incorrect API key provided.")
        if status != "ok":
            return AuthFailure(status, f"The API key {record.id} is {status}.")
        return Identity(
            canonical(record.principal),
            tuple(canonical(g) for g in record.groups),
            record.id,
            "keys",
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def open_relay(config: Config) -> bool:
    """Whether anyone who reaches callgate spends its upstream key: a key and no `auth:`."""
    return config.upstream.api_key is not None and config.auth is None


def open_relay_refusal(config: Config, host: str) -> str | None:
    """Why `callgate serve --host HOST` must not start, or None."""
    if not open_relay(config) or is_loopback(host):
        return None
    return (
        f"refusing to listen on {host}: upstream.api_key is set and there is no auth section, "
        "so anyone who reaches callgate would spend that key. Configure auth (modes: keys, jwt "
        "or trusted_header), or write `auth: {modes: [none]}` to run open on purpose, or listen "
        "on 127.0.0.1."
    )
