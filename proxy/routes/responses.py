"""`/v1/responses`: gated like Chat Completions (work in progress: forwarded for now)."""

from __future__ import annotations

from aiohttp import web


def add_routes(router: web.UrlDispatcher) -> None:
    """Register the Responses API routes; called before the catch-all pass-through."""
    return None
