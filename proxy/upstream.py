"""The upstream OpenAI-compatible server: a keep-alive pool, header hygiene, clear failures."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy import http1
from proxy.config import UpstreamConfig
from proxy.metrics import Counts

log = structlog.get_logger("callgate.upstream")

# Hop-by-hop headers (RFC 9110 7.6.1) and those aiohttp recomputes for us.
_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
    )
)
_CLIENT_ONLY = frozenset(("x-callgate-principal",))
# Client headers not sent upstream, by (relayed raw, a configured key replaces the client's).
_DROP = {
    (raw, keyed): _HOP
    | _CLIENT_ONLY
    | (frozenset() if raw else {"accept-encoding"})
    | ({"authorization", "api-key"} if keyed else frozenset())
    for raw in (False, True)
    for keyed in (False, True)
}


class UpstreamError(Exception):
    """The upstream could not be reached or did not answer in time."""

    def __init__(self, message: str, status: int = 502, code: str = "upstream_unreachable"):
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(slots=True)
class UpstreamReply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


def response_headers(headers: Mapping[str, str], decoded: bool) -> CIMultiDict[str]:
    """Upstream response headers to send on (x-request-id, x-ratelimit-*, retry-after, ...)."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low in _HOP or (decoded and low == "content-encoding"):
            continue
        out.add(name, value)
    return out


@dataclass(frozen=True, slots=True)
class Target:
    """A base URL taken apart once: where to connect, and the path requests go under."""

    origin: http1.Origin
    path: str  # the base URL's path, e.g. "/v1" (no trailing slash)
    encoded: str  # the base URL as yarl encodes it, for aiohttp's client


def parse_target(base_url: str) -> Target:
    url = URL(base_url)
    if url.host is None:
        raise ValueError(f"upstream base_url {base_url!r} has no host")
    origin = http1.Origin(url.scheme, url.host, url.explicit_port)
    return Target(origin, url.raw_path.rstrip("/"), str(url))


class _Failures:
    """Failures to get an answer's head, as UpstreamError (502, or 504 for timeouts).

    A class rather than @contextmanager: entered on every upstream request, and a generator's
    set-up costs more than the check."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _: Any) -> None:
        if exc is None:
            return
        if isinstance(exc, http1.DeadlinePassed):
            log.warning("upstream_bound_exceeded", bound=exc.bound, error=str(exc))
            raise UpstreamError(str(exc), 504, "upstream_timeout") from None
        if isinstance(exc, TimeoutError):
            raise UpstreamError(
                "upstream timed out before answering", 504, "upstream_timeout"
            ) from None
        if isinstance(exc, aiohttp.ClientConnectorError):
            raise UpstreamError(f"upstream unreachable: {exc.os_error or exc}") from None
        if isinstance(exc, OSError):  # callgate's client: refused, unresolvable, TLS failures
            raise UpstreamError(f"upstream unreachable: {exc}") from None
        if isinstance(exc, aiohttp.ClientError):
            raise UpstreamError(f"upstream request failed: {type(exc).__name__}: {exc}") from None


_failures = _Failures()


class Upstream:
    # With auth on, the client's Authorization / api-key is callgate's credential, never the
    # upstream's: always dropped (set once by create_app; survives reconfigure()).
    strip_client_credentials = False

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        # Answers cut off by a bound, by the setting that cut them (a Prometheus counter).
        self.bounds_exceeded = Counts(
            "callgate_upstream_bounds_exceeded",
            "Upstream answers cut off by an upstream.max_* bound",
            ("bound",),
        )
        self.base_url = config.base_url
        self._target = parse_target(config.base_url)
        self._targets = {config.base_url: self._target}  # other policies' (after a reload)
        self._json: http1.Pool | None = None
        self._raw: aiohttp.ClientSession | None = None

    def reconfigure(self, config: UpstreamConfig) -> None:
        """Apply a reloaded policy's upstream URL, key and bounds (to requests from now on);
        pool and timeouts stay until restart."""
        kept = (self._json, self._raw, self.bounds_exceeded)
        self.__init__(config)  # type: ignore[misc]  # re-derives every URL-dependent field
        self._json, self._raw, self.bounds_exceeded = kept
        if self._json is not None:
            self._json.limits = self._limits()

    def _limits(self) -> http1.Limits:
        return http1.Limits(
            max_bytes=self.config.max_response_bytes,
            max_ratio=self.config.max_decompression_ratio,
            max_duration=self.config.max_duration,
            on_exceeded=self.bounds_exceeded.inc,
        )

    async def start(self) -> None:
        # Gated routes: callgate's own client (proxy.http1), decoding gzip and deflate.
        self._json = http1.Pool(
            limit=self.config.max_connections,
            connect_timeout=self.config.connect_timeout,
            read_timeout=self.config.timeout,
            limits=self._limits(),
        )
        # Everything else streams verbatim, both ways, through aiohttp's client. Not bounded by
        # max_response_bytes or max_duration: nothing is decoded or held (the body streams on
        # with back-pressure), and a file download may rightly be large and slow.
        self._raw = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self.config.max_connections, ttl_dns_cache=300, enable_cleanup_closed=True
            ),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self.config.connect_timeout, sock_read=self.config.timeout
            ),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Content-Type"),
        )

    async def close(self) -> None:
        if self._json is not None:
            await self._json.close()
        if self._raw is not None:
            await self._raw.close()

    def target(self, config: UpstreamConfig | None) -> Target:
        if config is None or config.base_url == self.base_url:
            return self._target
        found = self._targets.get(config.base_url)
        if found is None:
            if len(self._targets) > 16:  # reloads come and go: keep the cache small
                self._targets = {self.base_url: self._target}
            found = self._targets[config.base_url] = parse_target(config.base_url)
        return found

    def request_headers(
        self, headers: Mapping[str, str], raw: bool, target: UpstreamConfig | None = None
    ) -> list[tuple[str, str]]:
        """The client's headers as the upstream gets them: hop-by-hop and callgate's own
        dropped, Accept-Encoding limited to what callgate decodes (unless relayed raw), and
        the configured key, if any, in place of the client's."""
        api_key = (target or self.config).api_key
        drop = _DROP[raw, bool(api_key) or self.strip_client_credentials]
        out = [(name, value) for name, value in headers.items() if name.lower() not in drop]
        if not raw:
            # Only encodings callgate can decode; the client's may include br or zstd.
            out.append(("Accept-Encoding", "gzip, deflate"))
        if api_key:
            out.append(("Authorization", f"Bearer {api_key}"))
        return out

    def url(self, path_qs: str, target: UpstreamConfig | None = None) -> URL:
        # path_qs is relative to /v1 (e.g. "/chat/completions?x=1"); base_url ends in /v1.
        # It is the client's raw, already-encoded text: sent as is (yarl would otherwise
        # re-quote it, e.g. turning "%2F" into "/", which can change what the upstream sees).
        return URL(self.target(target).encoded + path_qs, encoded=True)

    async def open(
        self,
        method: str,
        path_qs: str,
        headers: Mapping[str, str],
        body: bytes | None,
        *,
        target: UpstreamConfig | None = None,
    ) -> http1.Response:
        """Send a gated route's request (its whole body in hand) through callgate's own client;
        the caller reads or streams the (decoded) answer and releases it.

        `target`: the upstream settings of the policy the request started under."""
        assert self._json is not None, "Upstream.start() was not called"
        where = self.target(target)
        out_headers = self.request_headers(headers, False, target)
        with _failures:
            return await self._json.request(
                where.origin, method, where.path + path_qs, out_headers, body
            )

    async def open_raw(
        self,
        method: str,
        path_qs: str,
        headers: Mapping[str, str],
        data: object,
        *,
        content_length: int | None = None,
    ) -> aiohttp.ClientResponse:
        """Send a pass-through request (body streamed, nothing decoded) through aiohttp."""
        assert self._raw is not None, "Upstream.start() was not called"
        out_headers = self.request_headers(headers, True)
        if content_length is not None:
            # A streamed body keeps its length: some servers refuse chunked uploads.
            out_headers.append(("Content-Length", str(content_length)))
        with _failures:
            return await self._raw.request(
                method,
                self.url(path_qs),
                headers=CIMultiDict(out_headers),
                data=data,
                allow_redirects=False,
            )

    async def fetch(
        self,
        method: str,
        path_qs: str,
        headers: Mapping[str, str],
        body: bytes | None,
        *,
        target: UpstreamConfig | None = None,
    ) -> UpstreamReply:
        """Send a request and read the whole (decoded) answer."""
        resp = await self.open(method, path_qs, headers, body, target=target)
        try:
            payload = await resp.read()
        except http1.BoundExceeded as exc:
            log.warning("upstream_bound_exceeded", bound=exc.bound, error=str(exc))
            raise UpstreamError(str(exc), 502, "upstream_too_large") from None
        except http1.DeadlinePassed as exc:
            log.warning("upstream_bound_exceeded", bound=exc.bound, error=str(exc))
            raise UpstreamError(str(exc), 504, "upstream_timeout") from None
        except TimeoutError:
            raise UpstreamError(
                "upstream timed out mid-response", 504, "upstream_timeout"
            ) from None
        except (aiohttp.ClientError, asyncio.IncompleteReadError) as exc:
            raise UpstreamError(f"upstream disconnected mid-response: {exc}") from None
        finally:
            resp.release()
        return UpstreamReply(resp.status, resp.headers, payload)
