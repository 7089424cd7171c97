"""Hot reload: a changed policy file (or SIGHUP) swaps the policy atomically.

Requests in flight keep the policy object they started with; new ones see the new one.
Counters, ledgers and stashes live in the store and survive. An invalid file is refused with
one log line and the running policy stays.
"""

from __future__ import annotations

import asyncio

import structlog

from proxy.config import ConfigError, read_config_text
from proxy.policy import Policy, load_policy_text
from proxy.state import AppState
from proxy.watched import fingerprint

log = structlog.get_logger("callgate.reload")

# Settings bound to long-lived resources: a change is logged, and applies after a restart.
_RESTART_ONLY = (
    ("store",),
    ("auth",),  # the keys themselves are re-read by proxy.auth.keys
    ("telemetry",),
    ("server", "max_body_bytes"),
    ("server", "stash_max_bytes"),
    ("server", "drain_delay"),
    ("server", "shutdown_grace"),
    ("server", "reload_interval"),
    ("upstream", "connect_timeout"),
    ("upstream", "timeout"),
    ("upstream", "max_connections"),
)



async def reload_policy(state: AppState, reason: str) -> bool:
    path = state.config_path
    if path is None:
        return False
    try:
        text = await asyncio.to_thread(read_config_text, path)
        policy = load_policy_text(text, path)
    except ConfigError as exc:
        log.error("policy_reload_refused", reason=reason, path=path, errors=exc.errors)
        state.metrics.reloads.labels("refused").inc()
        return False
    except Exception as exc:  # never let a reload take the process (or the watcher) down
        log.exception("policy_reload_refused", reason=reason, path=path, errors=[str(exc)])
        state.metrics.reloads.labels("refused").inc()
        return False
    apply(state, policy)
    log.info("policy_reloaded", reason=reason, path=path, tools=len(policy.tools))
    state.metrics.reloads.labels("ok").inc()
    return True


def apply(state: AppState, policy: Policy) -> None:
    old = state.policy.config
    new = policy.config
    for path in _RESTART_ONLY:
        before, after = old, new
        for part in path:
            before, after = getattr(before, part), getattr(after, part)
        if before != after:
            log.warning(
                "policy_reload_partial", setting=".".join(path), detail="applies after a restart"
            )
    if old.audit.file != new.audit.file:
        log.warning(
            "policy_reload_partial",
            section="audit.file",
            detail="the audit file changes after a restart",
        )
    state.auditor.reconfigure(new.audit)
    state.upstream.reconfigure(new.upstream)
    state.policy = policy  # one reference swap: atomic for every coroutine


async def watch(state: AppState, interval: float = 1.0) -> None:
    """Poll the policy file; reload when what the path resolves to changes."""
    path = state.config_path
    if path is None:
        return
    last = await asyncio.to_thread(fingerprint, path)
    while True:
        await asyncio.sleep(interval)
        try:
            current = await asyncio.to_thread(fingerprint, path)
            if current is not None and current != last:
                last = current
                await reload_policy(state, "file_changed")
        except Exception:
            log.exception("policy_watch_error", path=path)  # keep watching
