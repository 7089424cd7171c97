"""Running the app: logging, the event loop, and signals."""

from __future__ import annotations

import structlog
from aiohttp import web

from proxy.app import create_app
from proxy.logs import configure_logging
from proxy.policy import Policy

log = structlog.get_logger("callgate")


def serve(policy: Policy, config_path: str, host: str, port: int, log_level: str = "info") -> int:
    configure_logging(log_level)
    app = create_app(policy, config_path=config_path)
    log.info(
        "starting",
        host=host,
        port=port,
        config=config_path,
        upstream=policy.config.upstream.base_url,
        store=policy.config.store.backend,
    )
    web.run_app(app, host=host, port=port, print=None, access_log=None)
    return 0
