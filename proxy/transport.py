"""The transport below the routes: where a request goes upstream, an upstream answer relayed
to the client as it arrives, and an upstream failure in OpenAI's error shape.

The pass-through route and the gated routes (proxy.forward, proxy.routes.*) share these; none
of it knows an API's shape.
"""

from __future__ import annotations

import aiohttp
import structlog
from aiohttp import web

from proxy import http1
from proxy.errors import error_response
from proxy.paths import Target
from proxy.upstream import UpstreamError, response_headers

log = structlog.get_logger("callgate.passthrough")  # relay's events: as they always were


# The request target as checked by proxy.app's path guard (proxy.paths): canonical, so what
# callgate routed on is what the upstream gets.
TARGET: web.RequestKey[Target] = web.RequestKey("callgate_target", Target)


def upstream_path(request: web.Request) -> str:
    """The path and query relative to /v1, as sent by the client: the path the guard checked
    (never aiohttp's re-parsed URL, which can differ for an absolute-form request line) and the
    query as sent."""
    return request[TARGET].upstream()


def upstream_failure(exc: UpstreamError) -> web.Response:
    """The client's answer when the upstream could not be had (502, or 504 for a timeout)."""
    return error_response(exc.status, str(exc), "upstream_error", exc.code)


async def relay(
    request: web.Request,
    resp: aiohttp.ClientResponse | http1.Response,
    *,
    decoded: bool = False,
) -> web.StreamResponse:
    """Send an upstream response on as it arrives; the caller has not read its body."""
    out = web.StreamResponse(status=resp.status, reason=resp.reason)
    out.headers.extend(response_headers(resp.headers, decoded))
    try:
        await out.prepare(request)
        async for chunk in resp.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
    except ConnectionResetError:
        # First: aiohttp's ClientConnectionResetError (writing to a client that left) is also a
        # ClientError, and must not be reported as the upstream's fault.
        log.info("client_disconnected")
        resp.close()  # stop reading the upstream: its connection cannot be reused mid-body
    except (aiohttp.ClientError, TimeoutError) as exc:
        # Headers are gone already: all we can do is cut the connection so the client sees it.
        log.warning("upstream_stream_broken", error=f"{type(exc).__name__}: {exc}")
        if request.transport is not None:
            request.transport.close()
    finally:
        resp.release()
    return out
