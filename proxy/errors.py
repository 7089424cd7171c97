"""Errors in OpenAI's shape, so every OpenAI SDK raises the right exception class.

A policy block is 403 (`PermissionDeniedError`), never 429/5xx: the SDKs retry those.
"""

from __future__ import annotations

import orjson
from aiohttp import web


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def error_response(
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(message, type_, code, param),
        content_type="application/json",
        headers=headers,
    )


def bad_request(message: str, param: str | None = None) -> web.Response:
    return error_response(400, message, "invalid_request_error", None, param)


def bad_gateway(message: str, code: str = "upstream_error") -> web.Response:
    return error_response(502, message, "upstream_error", code)
