"""Bearer JWTs: verified with PyJWT against a JWKS URL and/or static public keys.

Verification costs 50-200 µs of CPU (an RSA or ECDSA signature check); a client sends the same
token for many requests, so a verified token's identity is cached by the token's digest until
its `exp` (bounded LRU): the cost per request is a SHA-256 and a dict lookup. A cached entry is
also dropped when its signing key leaves the JWKS (a rotated-out key stops working at the next
refresh, not at the token's exp).

Only asymmetric algorithms are accepted (proxy.config.JWT_ALGORITHMS), and a token's `alg` must
be in the configured allow-list before any key is looked at: an `alg: none` token or an HS256
token "signed" with the public key as its HMAC secret fails there.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections import OrderedDict
from typing import Any

import aiohttp
import jwt
import structlog
from jwt.algorithms import get_default_algorithms

from proxy.auth.identity import AuthFailure, Identity
from proxy.config import JwtConfig
from proxy.principal import canonical

log = structlog.get_logger("callgate.auth")

# PyJWT's verification options: an expiry is required (a token without one would be cached and
# honoured for ever).
_OPTIONS = {"require": ["exp"]}
_FAMILY = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


def _family(alg: str) -> str:
    return _FAMILY.get(alg[:2], "?")


def _claim(claims: dict[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _groups(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(canonical(g) for g in value.replace(",", " ").split())
    if isinstance(value, list):
        return tuple(canonical(g.strip()) for g in value if isinstance(g, str) and g.strip())
    return ()


def _load_pem(text_or_path: str) -> Any:
    """A public key from PEM text, or from the PEM file a path names."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data = text_or_path
    if "-----BEGIN" not in data:
        with open(os.path.expanduser(data), encoding="ascii") as fh:
            data = fh.read()
    return load_pem_public_key(data.encode("ascii"))


def _key_family(key: Any) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "EC"
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return "OKP"
    return "?"


class JwtVerifier:
    def __init__(self, config: JwtConfig, clock: Any = time.time) -> None:
        self.config = config
        self.clock = clock
        self.allowed = frozenset(config.algorithms)
        known = get_default_algorithms()
        missing = self.allowed - set(known)
        if missing:
            raise RuntimeError(f"PyJWT lacks algorithms {sorted(missing)}: install cryptography")
        # (family, key) of the configured PEM keys, tried for a token without a known kid.
        self.static: list[tuple[str, Any]] = [
            (_key_family(k), k) for k in (_load_pem(p) for p in config.public_keys)
        ]
        self.jwks: dict[str, tuple[str, Any, str | None]] = {}  # kid -> (family, key, alg)
        self.jwks_loaded = 0.0  # monotonic time of the last successful fetch
        self._last_attempt = -1e9
        self._fetching: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        # token digest -> (identity, exp, kid or None for a static key)
        self.cache: OrderedDict[bytes, tuple[Identity, float, str | None]] = OrderedDict()
        self.fetches = 0

    async def start(self) -> None:
        if self.config.jwks_url:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.config.jwks_timeout)
            )
            await self._refresh(force=True)

    async def close(self) -> None:
        if self._fetching is not None and not self._fetching.done():
            self._fetching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._fetching
        if self._session is not None:
            await self._session.close()

    # --- the JWKS ------------------------------------------------------------------------

    async def _fetch(self) -> None:
        assert self._session is not None and self.config.jwks_url
        self.fetches += 1
        try:
            async with self._session.get(self.config.jwks_url) as resp:
                resp.raise_for_status()
                data = await resp.json(content_type=None)
            keys: dict[str, tuple[str, Any, str | None]] = {}
            for jwk in data.get("keys", []) if isinstance(data, dict) else []:
                if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
                    continue
                try:
                    parsed = jwt.PyJWK(jwk)
                except jwt.PyJWTError:
                    continue  # a key type or curve we cannot use: skip it, keep the others
                kid = jwk.get("kid")
                if isinstance(kid, str) and kid:
                    keys[kid] = (_key_family(parsed.key), parsed.key, jwk.get("alg"))
            self.jwks = keys
            self.jwks_loaded = time.monotonic()
            log.info("jwks_loaded", url=self.config.jwks_url, keys=len(keys))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            # Keep the keys we have: the IdP being briefly away must not lock everyone out.
            log.warning("jwks_fetch_failed", url=self.config.jwks_url, error=str(exc))

    async def _refresh(self, force: bool = False) -> None:
        """Fetch the JWKS, at most once per jwks_min_refresh; concurrent callers share a fetch."""
        if self._session is None:
            return
        if self._fetching is not None and not self._fetching.done():
            await asyncio.shield(self._fetching)
            return
        now = time.monotonic()
        if not force and now - self._last_attempt < self.config.jwks_min_refresh:
            return
        self._last_attempt = now
        self._fetching = asyncio.get_running_loop().create_task(self._fetch())
        await asyncio.shield(self._fetching)

    def _maybe_age_out(self) -> None:
        """A JWKS older than jwks_max_age is refetched in the background; requests go on."""
        if (
            self._session is not None
            and time.monotonic() - self.jwks_loaded > self.config.jwks_max_age
            and (self._fetching is None or self._fetching.done())
            and time.monotonic() - self._last_attempt >= self.config.jwks_min_refresh
        ):
            self._last_attempt = time.monotonic()
            self._fetching = asyncio.get_running_loop().create_task(self._fetch())

    # --- tokens --------------------------------------------------------------------------

    async def verify(self, token: str) -> Identity | AuthFailure:
        self._maybe_age_out()
        key = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        hit = self.cache.get(key)
        if hit is not None:
            identity, exp, kid = hit
            if self.clock() < exp and (kid is None or kid in self.jwks):
                return identity
            del self.cache[key]
        result, exp, kid = await self._verify(token, key)
        if isinstance(result, Identity) and self.config.cache_size:
            self.cache[key] = (result, exp, kid)
            if len(self.cache) > self.config.cache_size:
                self.cache.popitem(last=False)  # the oldest verified
        return result

    async def _verify(
        self, token: str, digest: bytes
    ) -> tuple[Identity | AuthFailure, float, str | None]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return AuthFailure("malformed", "The bearer token is not a well-formed JWT."), 0, None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.allowed:
            return AuthFailure("invalid", "The token's algorithm is not accepted."), 0, None
        kid = header.get("kid") if isinstance(header.get("kid"), str) else None
        candidates: list[tuple[Any, str | None]] = []
        if kid is not None and self.config.jwks_url:
            if kid not in self.jwks:
                await self._refresh()  # a rotated-in key; rate limited
            found = self.jwks.get(kid)
            if found is not None:
                family, jwk_key, jwk_alg = found
                if family == _family(alg) and (jwk_alg is None or jwk_alg == alg):
                    candidates.append((jwk_key, kid))
        candidates += [(k, None) for family, k in self.static if family == _family(alg)]
        if not candidates:
            return AuthFailure("invalid", "The token's signing key is not known."), 0, None
        for signing_key, used_kid in candidates:
            try:
                claims = jwt.decode(
                    token,
                    signing_key,
                    algorithms=[alg],
                    audience=self.config.audience,
                    issuer=self.config.issuer,
                    leeway=self.config.leeway,
                    options=_OPTIONS,  # type: ignore[arg-type]
                )
            except jwt.InvalidSignatureError:
                continue  # the next candidate key may be the one
            except jwt.ExpiredSignatureError:
                return AuthFailure("expired", "The token has expired."), 0, None
            except jwt.PyJWTError as exc:
                return AuthFailure("invalid", f"The token is not valid: {exc}"), 0, None
            return self._identity(claims, digest, used_kid)
        return AuthFailure("invalid", "The token's signature does not verify."), 0, None

    def _identity(
        self, claims: dict[str, Any], digest: bytes, kid: str | None
    ) -> tuple[Identity | AuthFailure, float, str | None]:
        value = _claim(claims, self.config.principal_claim)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            message = f"The token has no {self.config.principal_claim!r} claim to name a principal."
            return AuthFailure("invalid", message), 0, None
        groups = (
            _groups(_claim(claims, self.config.groups_claim)) if self.config.groups_claim else ()
        )
        jti = claims.get("jti")
        credential = "jwt:" + (
            jti[:64] if isinstance(jti, str) and jti.isprintable() and jti else digest.hex()[:16]
        )
        identity = Identity(canonical(value.strip()), groups, credential, "jwt")
        # Honoured until exp (+ leeway, as PyJWT checked it).
        return identity, float(claims["exp"]) + self.config.leeway, kid
