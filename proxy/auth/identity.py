"""Who an authenticated request is, or why it is not one."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web


@dataclass(frozen=True, slots=True)
class Identity:
    principal: str
    groups: tuple[str, ...]
    # What logs and audit records name the credential by: a key's id, a token's jti or digest
    # prefix, the trusted peer. Never the credential itself.
    credential_id: str
    mode: str


@dataclass(frozen=True, slots=True)
class AuthFailure:
    # missing | malformed | unknown | expired | revoked | invalid | untrusted_peer (the label of
    # callgate_auth_failures_total)
    reason: str
    message: str


IDENTITY: web.RequestKey[Identity] = web.RequestKey("callgate_identity", Identity)
