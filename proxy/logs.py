"""structlog set-up: one JSON object per line on stdout, request id bound per request."""

from __future__ import annotations

import logging

import orjson
import structlog


def configure_logging(level: str = "info", json: bool = True) -> None:
    renderer = (
        structlog.processors.JSONRenderer(
            serializer=lambda o, **_: orjson.dumps(o, default=str).decode()
        )
        if json
        else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        cache_logger_on_first_use=True,
    )
