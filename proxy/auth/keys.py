"""Virtual keys: callgate-issued bearer keys, stored only as SHA-256 digests.

A key is `cg-` and 32 URL-safe characters (192 random bits). What is stored per key: its id
(what logs, records and `callgate keys revoke` use), the digest, the principal and groups, the
creation, expiry and revocation times, and a note. The key itself is printed once, at creation.

Two stores, following `store.backend`:
- memory: a JSON file (`auth.keys_file`), written by the CLI under a lock and replaced atomically;
  each process re-reads it when its stat changes (polled every `auth.keys_refresh` seconds).
- redis: one hash (`<prefix>auth:keys`, digest -> record JSON) and a version counter bumped by
  every change; each process polls the counter every `auth.keys_refresh` seconds and reloads the
  hash when it moved. So a new or revoked key takes effect on every replica within
  `keys_refresh` seconds (default 2) plus one Redis round trip.

Either way the request path does one SHA-256 of the presented key and one dict lookup: no I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import structlog

from proxy.timestamps import utc_iso
from proxy.watched import fingerprint

log = structlog.get_logger("callgate.auth")

PREFIX = "cg-"
REDIS_HASH = "auth:keys"
REDIS_VERSION = "auth:version"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key() -> str:
    return PREFIX + secrets.token_urlsafe(24)  # 24 bytes: 192 bits


def new_id() -> str:
    return "key_" + secrets.token_hex(6)


@dataclass(slots=True)
class KeyRecord:
    id: str
    digest: str
    principal: str
    groups: list[str]
    created: float
    expires: float | None = None
    revoked: float | None = None
    note: str | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KeyRecord:
        return cls(
            id=str(data["id"]),
            digest=str(data["digest"]),
            principal=str(data["principal"]),
            groups=[str(g) for g in data.get("groups") or []],
            created=float(data.get("created") or 0.0),
            expires=None if data.get("expires") is None else float(data["expires"]),
            revoked=None if data.get("revoked") is None else float(data["revoked"]),
            note=data.get("note"),
        )

    def status(self, now: float) -> str:
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        return "active"

    def listing(self, now: float) -> dict[str, Any]:
        """What `callgate keys list` shows: never the digest's whole value, never the key."""
        return {
            "id": self.id,
            "principal": self.principal,
            "groups": self.groups,
            "status": self.status(now),
            "created": utc_iso(self.created),
            "expires": utc_iso(self.expires) if self.expires is not None else None,
            "revoked": utc_iso(self.revoked) if self.revoked is not None else None,
            "note": self.note,
            "digest_prefix": self.digest[:12],
        }


Table = dict[str, KeyRecord]


def table_of(records: Iterable[KeyRecord]) -> Table:
    return {r.digest: r for r in records}


# --- the memory store: a JSON file -------------------------------------------------------


def read_file(path: str) -> list[KeyRecord]:
    """The file's records; an absent file has none."""
    try:
        with open(path, "rb") as fh:
            data = orjson.loads(fh.read() or b"{}")
    except FileNotFoundError:
        return []
    return [KeyRecord.from_dict(r) for r in data.get("keys", [])]


@contextlib.contextmanager
def _locked(path: str) -> Any:
    # Two CLI invocations at once must not lose each other's key: read-modify-write under a lock.
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_file(path: str, records: list[KeyRecord]) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    body = orjson.dumps(
        {"version": 1, "keys": [asdict(r) for r in records]}, option=orjson.OPT_INDENT_2
    )
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(body)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


class FileKeys:
    """The CLI's side of the memory store."""

    def __init__(self, path: str) -> None:
        self.path = path

    def add(self, record: KeyRecord) -> None:
        with _locked(self.path):
            _write_file(self.path, [*read_file(self.path), record])

    def list(self) -> list[KeyRecord]:
        return read_file(self.path)

    def revoke(self, key_id: str, now: float) -> KeyRecord | None:
        with _locked(self.path):
            records = read_file(self.path)
            found = next((r for r in records if r.id == key_id), None)
            if found is not None and found.revoked is None:
                found.revoked = now
                _write_file(self.path, records)
            return found


# --- the Redis store ----------------------------------------------------------------------


class RedisKeys:
    """The CLI's side of the Redis store (a synchronous client: one command per invocation)."""

    def __init__(self, url: str, prefix: str, timeout: float = 5.0) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=timeout)
        self.hash = prefix + REDIS_HASH
        self.version = prefix + REDIS_VERSION

    def add(self, record: KeyRecord) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.hash, record.digest, record.to_json())
        pipe.incr(self.version)
        pipe.execute()

    def list(self) -> list[KeyRecord]:
        raw = self.client.hgetall(self.hash)
        return [KeyRecord.from_dict(orjson.loads(v)) for v in raw.values()]

    def revoke(self, key_id: str, now: float) -> KeyRecord | None:
        found = next((r for r in self.list() if r.id == key_id), None)
        if found is not None and found.revoked is None:
            found.revoked = now
            self.add(found)
        return found


# --- what a running callgate holds ---------------------------------------------------------


class KeySet:
    """The current table of keys (digest -> record), kept up to date in the background."""

    def __init__(self, refresh: float, clock: Any = time.time) -> None:
        self.table: Table = {}
        self.refresh = refresh
        self.clock = clock
        self._task: asyncio.Task[None] | None = None

    def lookup(self, key: str) -> tuple[KeyRecord | None, str]:
        """The key's record and "ok", or None/the record and why it does not authenticate."""
        record = self.table.get(digest(key))
        if record is None:
            return None, "unknown"
        if record.revoked is not None:
            return record, "revoked"
        if record.expires is not None and self.clock() >= record.expires:
            return record, "expired"
        return record, "ok"

    async def load(self) -> None:
        raise NotImplementedError

    async def poll(self) -> bool:
        """Reload when the source changed; True when it did."""
        raise NotImplementedError

    async def start(self) -> None:
        await self.load()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.refresh)
            try:
                await self.poll()
            except Exception as exc:
                # Keep the last table: a store hiccup must not lock everyone out. Revocations
                # made meanwhile apply once the source answers again.
                log.warning("auth_keys_refresh_failed", error=f"{type(exc).__name__}: {exc}")



class FileKeySet(KeySet):
    def __init__(self, path: str, refresh: float, clock: Any = time.time) -> None:
        super().__init__(refresh, clock)
        self.path = path
        self._seen: tuple[int, int, int, int] | None = None

    async def load(self) -> None:
        self._seen = await asyncio.to_thread(fingerprint, self.path)
        records = await asyncio.to_thread(read_file, self.path)
        self.table = table_of(records)
        log.info("auth_keys_loaded", source=self.path, keys=len(self.table))

    async def poll(self) -> bool:
        current = await asyncio.to_thread(fingerprint, self.path)
        if current == self._seen:
            return False
        await self.load()
        return True


class RedisKeySet(KeySet):
    def __init__(
        self, url: str, prefix: str, refresh: float, timeout: float, clock: Any = time.time
    ) -> None:
        super().__init__(refresh, clock)
        from redis.asyncio import Redis

        # Its own two connections: key refreshes never wait behind the gates' store traffic.
        self.client = Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, max_connections=2
        )
        self.hash = prefix + REDIS_HASH
        self.version_key = prefix + REDIS_VERSION
        self._version: bytes | None = b"unloaded"

    async def load(self) -> None:
        try:
            await self.poll()
        except Exception as exc:
            # Started while Redis is away: no key works until it answers (fails closed).
            log.warning("auth_keys_refresh_failed", error=f"{type(exc).__name__}: {exc}")

    async def poll(self) -> bool:
        found = await self.client.get(self.version_key)
        version = found.encode() if isinstance(found, str) else found
        if version == self._version:
            return False
        raw = await self.client.hgetall(self.hash)
        self.table = table_of(KeyRecord.from_dict(orjson.loads(v)) for v in raw.values())
        self._version = version
        log.info("auth_keys_loaded", source="redis", keys=len(self.table))
        return True

    async def close(self) -> None:
        await super().close()
        await self.client.aclose()
