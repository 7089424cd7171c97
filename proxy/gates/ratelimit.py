"""The rate-limit gate: `max_calls` per sliding `window`, and a `cooldown` between calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.config import RateLimitConfig
from proxy.gates.decision import Block, Decision
from proxy.store import ChargeRequest, Outcome, SlotRequest, key_part
from proxy.toolcalls import CallContext

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


@dataclass(frozen=True, slots=True)
class RateLimit:
    namespace: str
    config: RateLimitConfig
    name: str = GATE
    kind: str = GATE
    constant: bool = True

    @property
    def enforce(self) -> bool:
        return self.config.mode == "enforce"

    @property
    def on_store_error(self) -> str:
        return self.config.on_store_error

    def request(self, decision: Decision, ctx: CallContext) -> SlotRequest:
        return slot_request(self.namespace, decision.call.name, ctx.principal, self.config)

    def block_for(self, outcome: Outcome, item: SlotRequest | ChargeRequest) -> Block:
        return block_for(outcome, self.config)

    def describe_item(self, item: SlotRequest | ChargeRequest) -> str:
        rl = self.config
        return f"max_calls={rl.max_calls} window={rl.window:g}s cooldown={rl.cooldown:g}s"


def build(tool: Any) -> RateLimit | None:
    return None if tool.rate_limit is None else RateLimit(tool.namespace, tool.rate_limit)
