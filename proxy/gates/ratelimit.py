"""The rate-limit gate: `max_calls` per sliding `window`, and a `cooldown` between calls."""

from __future__ import annotations

from proxy.config import RateLimitConfig
from proxy.gates.decision import Block
from proxy.store import Outcome, SlotRequest, key_part

GATE = "rate_limit"


def scope_key(scope: str, principal: str) -> str:
    """The key's last part: "*" for a global limit, else the principal, which never is "*"."""
    return "*" if scope == "global" else key_part(principal, "*")


def slot_request(namespace: str, tool: str, principal: str, cfg: RateLimitConfig) -> SlotRequest:
    # The model names the tool: neither it nor the namespace may move the "@" (key_part).
    scope = scope_key(cfg.scope, principal)
    key = f"rl:{key_part(namespace, ':@')}:{key_part(tool, '@')}@{scope}"
    return SlotRequest(key, cfg.max_calls, cfg.window, cfg.cooldown, cfg.mode == "enforce")


def block_for(outcome: Outcome, cfg: RateLimitConfig) -> Block:
    if outcome.limit == "cooldown":
        message = f"Cooldown: {outcome.elapsed:.1f}s < {cfg.cooldown:.1f}s"
    else:
        message = f"Rate limit: {outcome.count} >= {cfg.max_calls}"
    return Block(GATE, outcome.limit, message, outcome.retry_after)
