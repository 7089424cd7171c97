"""The policy's `auth:` section: how a request proves who it is (keys, JWT, a trusted header).

Split out of `proxy.config`, which re-exports every name here.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from proxy.config_base import _Model, parse_duration

# JWT algorithms callgate verifies: asymmetric only. A shared-secret (HS*) algorithm next to
# public keys is how the RS/HS confusion attack works (a token "signed" with the public key as
# the HMAC secret), and `none` is no signature at all.
JWT_ALGORITHMS = frozenset(
    ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
)
AuthMode = Literal["keys", "jwt", "trusted_header", "none"]


class JwtConfig(_Model):
    # Where the verification keys come from: a JWKS URL (fetched, cached, refreshed on an
    # unknown `kid`), or public keys as PEM text or paths of PEM files, or both.
    jwks_url: str | None = None
    public_keys: list[str] = Field(default_factory=list)
    issuer: str | None = None
    audience: str | list[str] | None = None
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"])
    leeway: float = 30.0
    # Dotted paths into the claims, e.g. "sub", "email", "realm_access.roles".
    principal_claim: str = "sub"
    groups_claim: str | None = "groups"
    # The JWKS is refetched when older than `jwks_max_age`, or on a token whose `kid` it lacks,
    # but never twice within `jwks_min_refresh` (a stream of made-up kids costs one fetch).
    jwks_max_age: float = 300.0
    jwks_min_refresh: float = 10.0
    jwks_timeout: float = 5.0
    # Verified tokens kept (by digest, until their exp): the cost per request is a lookup.
    cache_size: int = Field(default=10_000, ge=0)

    @field_validator("leeway", "jwks_max_age", "jwks_min_refresh", "jwks_timeout", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)

    @field_validator("jwks_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("jwks_url must start with http:// or https://")
        return v

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("list at least one algorithm")
        for alg in v:
            if alg not in JWT_ALGORITHMS:
                raise ValueError(
                    f"algorithm {alg!r} is not allowed: use asymmetric ones ("
                    + ", ".join(sorted(JWT_ALGORITHMS))
                    + "); never none or HS*"
                )
        return v

    @model_validator(mode="after")
    def _keys(self) -> JwtConfig:
        if not self.jwks_url and not self.public_keys:
            raise ValueError("jwt needs jwks_url or public_keys")
        if not self.audience:
            # Without it, a token the same issuer made for any other service would do.
            raise ValueError("jwt needs audience (the aud this callgate accepts)")
        return self


class TrustedHeaderConfig(_Model):
    header: str = "x-callgate-principal"
    # Optional: comma-separated groups, honoured under the same condition as the header.
    groups_header: str | None = None
    # Peer addresses or CIDRs (the mesh sidecar, the authenticating front) whose header counts.
    peers: list[str] = Field(min_length=1)

    @field_validator("peers")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for peer in v:
            try:
                ipaddress.ip_network(peer, strict=False)
            except ValueError:
                raise ValueError(f"{peer!r} is not an IP address or CIDR") from None
        return v


class AuthConfig(_Model):
    # Tried in order; the first whose credential the request carries decides. [none]: no
    # authentication, written out so that listening openly with an upstream key is a choice.
    modes: list[AuthMode] = Field(min_length=1)
    # Memory store: the virtual keys' file (relative: to the policy file's directory).
    # Default: callgate.keys.json beside the policy. Redis store: the keys live in Redis.
    keys_file: str | None = None
    # How often the key set is re-read (the file's stat, or Redis' version counter): a new or
    # revoked key takes effect on every replica within this many seconds.
    keys_refresh: float = Field(default=2.0, gt=0)
    jwt: JwtConfig | None = None
    trusted_header: TrustedHeaderConfig | None = None

    @field_validator("keys_refresh", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)

    @model_validator(mode="after")
    def _consistent(self) -> AuthConfig:
        if "none" in self.modes and len(self.modes) > 1:
            raise ValueError("none cannot be combined with other modes")
        if len(set(self.modes)) != len(self.modes):
            raise ValueError("a mode is listed twice")
        if "jwt" in self.modes and self.jwt is None:
            raise ValueError("mode jwt needs a jwt section")
        if "trusted_header" in self.modes and self.trusted_header is None:
            raise ValueError("mode trusted_header needs a trusted_header section")
        return self

    @property
    def enabled(self) -> bool:
        return self.modes != ["none"]
