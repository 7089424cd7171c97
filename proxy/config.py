"""The YAML policy: its schema, loading, and error reporting with YAML line numbers.

Validation is pydantic's: it gives every error a location path, which we map back to the
line of the YAML file so `callgate check` can say `tools.search_web.budget.cost: ... (line 12)`.
The `auth:` section's models are in `proxy.config_auth`, the shared base model and the duration
and money parsers in `proxy.config_base`; both are re-exported here.
"""

from __future__ import annotations

import os
import re
from decimal import Decimal
from typing import Any, Literal, NoReturn

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

# The shared base and the `auth:` section live in their own modules; every name is importable
# from here as before.
from proxy.config_auth import (
    JWT_ALGORITHMS,
    AuthConfig,
    AuthMode,
    JwtConfig,
    TrustedHeaderConfig,
)
from proxy.config_base import (
    MAX_MONEY,
    MICROS,
    _Model,
    looks_numeric,
    parse_duration,
    parse_money,
)

__all__ = [
    "JWT_ALGORITHMS",
    "MAX_MONEY",
    "MICROS",
    "ApprovalConfig",
    "AuditConfig",
    "AuthConfig",
    "AuthMode",
    "BudgetOverlay",
    "BudgetUse",
    "Config",
    "ConfigError",
    "JwtConfig",
    "LedgerConfig",
    "Mode",
    "OnBlock",
    "OnStoreError",
    "OverlayConfig",
    "PrincipalConfig",
    "RateLimitConfig",
    "RateLimitOverlay",
    "RuleConfig",
    "Scope",
    "ServerConfig",
    "StoreConfig",
    "TelemetryConfig",
    "ToolConfig",
    "ToolOverlay",
    "TrustedHeaderConfig",
    "UpstreamConfig",
    "line_of",
    "looks_numeric",
    "overlay_sections",
    "parse_config",
    "parse_duration",
    "parse_money",
    "read_config_text",
]

Mode = Literal["enforce", "shadow"]
OnStoreError = Literal["fail_closed", "fail_open"]
OnBlock = Literal["reprompt", "strip", "error"]
Scope = Literal["principal", "global"]

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class UpstreamConfig(_Model):
    base_url: str = "https://api.openai.com/v1"
    api_key: str | None = None
    connect_timeout: float = 10.0
    timeout: float = 600.0
    max_connections: int = Field(default=256, ge=1)
    # Bounds on one upstream answer (gated routes): its decoded size, streamed or not; how far
    # its compressed bytes may inflate (checked past 1 MiB decoded: JSON and live event
    # streams inflate 10-50x, a deflate bomb ~1000x); and its whole duration, from the request
    # sent to the last byte, so keep-alive comments cannot hold a call open for ever.
    max_response_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_decompression_ratio: float = Field(default=100.0, ge=1.0)
    max_duration: float = Field(default=1800.0, gt=0.0)

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return v.rstrip("/")

    @field_validator("api_key")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None

    @field_validator("connect_timeout", "timeout", "max_duration", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)


class PrincipalConfig(_Model):
    # Sources tried in order; the first that yields a value names the principal.
    from_: list[str] = Field(
        default_factory=lambda: ["header:x-callgate-principal", "body:user", "api_key"],
        alias="from",
    )

    @field_validator("from_")
    @classmethod
    def _sources(cls, v: list[str]) -> list[str]:
        for source in v:
            kind, _, name = source.partition(":")
            if kind == "api_key" and not name:
                continue
            if kind in ("header", "body", "metadata") and name:
                continue
            raise ValueError(
                f"unknown principal source {source!r}: use header:NAME, body:FIELD, "
                "metadata:KEY or api_key"
            )
        return v


class RuleConfig(_Model):
    name: str
    deny_if: str | None = None
    allow_if: str | None = None
    message: str | None = None

    @model_validator(mode="after")
    def _one_condition(self) -> RuleConfig:
        if (self.deny_if is None) == (self.allow_if is None):
            raise ValueError("a rule needs exactly one of deny_if or allow_if")
        return self


class RateLimitConfig(_Model):
    max_calls: int | None = Field(default=None, ge=0)
    window: float = 60.0
    cooldown: float = 0.0
    scope: Scope = "principal"
    mode: Mode = "enforce"
    on_store_error: OnStoreError = "fail_closed"

    @field_validator("window", "cooldown", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)

    @model_validator(mode="after")
    def _something_to_limit(self) -> RateLimitConfig:
        if self.max_calls is None and not self.cooldown:
            raise ValueError("rate_limit needs max_calls, cooldown, or both")
        if self.max_calls is not None and self.window <= 0:
            raise ValueError("window must be positive")
        return self


class BudgetUse(_Model):
    ledger: str
    # A decimal constant ("0.01") or a CEL expression over args ("0.001 * size(args.urls)").
    cost: str | int | float = "0"
    mode: Mode = "enforce"
    on_store_error: OnStoreError = "fail_closed"


class LedgerConfig(_Model):
    max_spend: Decimal
    window: float = 3600.0
    scope: Scope = "principal"

    @field_validator("max_spend", mode="before")
    @classmethod
    def _money(cls, v: Any) -> Decimal:
        return parse_money(v)

    @field_validator("window", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        seconds = parse_duration(v)
        if seconds <= 0:
            raise ValueError("window must be positive")
        return seconds


class ApprovalConfig(_Model):
    """A person says yes before the call runs (proxy.approvals): `when` (CEL over args, tool,
    principal, request; omitted = always) decides which calls need it."""

    when: str | None = None
    # How long a pending request waits for an answer, and how long a grant stays usable.
    ttl: float = 3600.0
    # Who may approve (groups); recorded with the request and sent to `notify`.
    approvers: list[str] = Field(default_factory=list)
    # Seconds callgate holds the call for a quick approver before answering it blocked.
    wait: float = 0.0
    # A URL POSTed the new request (signed with server.webhook_secret), retried, never awaited.
    notify: str | None = None

    @field_validator("ttl", "wait", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)

    @field_validator("ttl")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("ttl must be positive")
        return v

    @field_validator("notify")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("notify must start with http:// or https://")
        return v or None


class ToolConfig(_Model):
    allow: bool = True
    namespace: str = "tools"
    on_block: OnBlock | None = None
    rules: list[RuleConfig] = Field(default_factory=list)
    rules_mode: Mode = "enforce"
    arguments_schema: dict[str, Any] | None = None
    rate_limit: RateLimitConfig | None = None
    budget: BudgetUse | None = None
    approval: ApprovalConfig | None = None


class RateLimitOverlay(_Model):
    """A rate limit in an overlay: only the fields written replace the tool's (proxy.overlays);
    the merged limit is validated as a RateLimitConfig."""

    max_calls: int | None = Field(default=None, ge=0)
    window: float | None = None
    cooldown: float | None = None
    scope: Scope | None = None
    mode: Mode | None = None
    on_store_error: OnStoreError | None = None

    @field_validator("window", "cooldown", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float | None:
        return None if v is None else parse_duration(v)


class BudgetOverlay(_Model):
    ledger: str | None = None
    cost: str | int | float | None = None
    mode: Mode | None = None
    on_store_error: OnStoreError | None = None


class ToolOverlay(_Model):
    """A tool entry (or `default`) in a group or principal overlay. Every field is optional:
    the ones written (pydantic's model_fields_set) replace the tool's, field by field; `null`
    removes an optional gate (rate_limit, budget, arguments_schema, on_block). See
    proxy.overlays for the merge."""

    allow: bool | None = None
    namespace: str | None = None
    on_block: OnBlock | None = None
    # Merged by name: a rule named like one of the tool's replaces it in place, others append.
    rules: list[RuleConfig] | None = None
    # True: this overlay's `rules` replace the tool's whole list instead.
    replace_rules: bool = False
    rules_mode: Mode | None = None
    arguments_schema: dict[str, Any] | None = None
    rate_limit: RateLimitOverlay | None = None
    budget: BudgetOverlay | None = None

    @field_validator("allow", "namespace", "rules_mode", "replace_rules", mode="before")
    @classmethod
    def _not_null(cls, v: Any) -> Any:
        if v is None:
            raise ValueError("cannot be null in an overlay: leave it out to keep the tool's")
        return v


class OverlayConfig(_Model):
    """`groups.NAME` or `principals.NAME`: tool entries and a default merged over the policy."""

    tools: dict[str, ToolOverlay] = Field(default_factory=dict)
    default: ToolOverlay | None = None


class AuditConfig(_Model):
    log: bool = True
    file: str | None = None
    # Argument keys whose values are replaced by "[REDACTED]" in audit records, at any depth.
    redact: list[str] = Field(default_factory=list)
    # When the file's writes reach the disk itself: never (the OS decides; a record survives a
    # killed callgate, not a power loss), batch (fdatasync right after each write, without
    # holding back the calls it covers), always (fdatasync before the calls a write covers go
    # out). Applies after a restart, like `file`.
    fsync: Literal["never", "batch", "always"] = "never"
    # Arguments whose JSON is longer are recorded as a digest, their size and a preview.
    max_argument_bytes: int = Field(default=64 * 1024, ge=1024)


class StoreConfig(_Model):
    backend: Literal["memory", "redis"] = "memory"
    url: str = "redis://127.0.0.1:6379/0"
    # Bounds one Redis call once it holds a connection (connect, send, read, one retry).
    timeout: float = 0.5
    key_prefix: str = "callgate:"
    # Connections per process, all opened at start. A call waits for a free one up to
    # `pool_timeout` (that wait is not counted in `timeout`; past it, on_store_error applies).
    pool_size: int = Field(default=32, ge=1, le=10_000)
    pool_timeout: float = 5.0

    @field_validator("timeout", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        seconds = parse_duration(v)
        if seconds <= 0:
            raise ValueError("timeout must be positive")
        return seconds

    @field_validator("pool_timeout", mode="before")
    @classmethod
    def _pool_wait(cls, v: Any) -> float:
        seconds = parse_duration(v)
        if seconds <= 0:
            raise ValueError("pool_timeout must be positive")
        return seconds

    @field_validator("url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("url must start with redis://, rediss:// or unix://")
        return v


class ServerConfig(_Model):
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    stash_ttl: float = 86400.0
    # Memory store: stashes past this many bytes evict the oldest (Redis: its maxmemory).
    stash_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    hide_denied_tools: bool = False
    # SIGTERM: readiness goes false, requests keep being served for `drain_delay` seconds (so a
    # load balancer stops sending), then no new connections and in-flight requests and streams
    # get up to `shutdown_grace` seconds to finish.
    drain_delay: float = 0.0
    shutdown_grace: float = 30.0
    # Poll the policy file every `reload_interval` seconds (0 disables; SIGHUP always works).
    reload_interval: float = 1.0
    # Client connections: a request head must be complete `header_timeout` seconds after the
    # connection opens or its first byte arrives (else 408 and close), a keep-alive connection
    # idle for `idle_timeout` seconds is closed, and past `max_connections` open connections a
    # new one is answered 503 and closed while the open ones keep being served.
    header_timeout: float = Field(default=10.0, gt=0)
    idle_timeout: float = Field(default=75.0, gt=0)
    max_connections: int = Field(default=10_000, ge=1)
    # APIs where a model makes tool calls callgate cannot see (proxy.paths.UNGATED_APIS): refused
    # unless listed here, so that no client routes its agent around the gates by accident.
    ungated_apis: list[Literal["assistants", "batches", "realtime"]] = Field(default_factory=list)
    # The admin API and approvals page (/admin): `Authorization: Bearer <admin_token>`; unset or
    # empty (an unset ${VAR}), /admin answers 404. The webhook secret signs approval.notify POSTs.
    admin_token: str | None = None
    webhook_secret: str | None = None

    @field_validator("admin_token", "webhook_secret")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None

    @field_validator(
        "stash_ttl",
        "drain_delay",
        "shutdown_grace",
        "reload_interval",
        "header_timeout",
        "idle_timeout",
        mode="before",
    )
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)


class TelemetryConfig(_Model):
    """OpenTelemetry traces (proxy.telemetry). The standard OTEL_* environment variables apply
    (exporter endpoint, headers, sampler, batch delays, resource attributes); these settings
    override them. Applies at start, like `store`."""

    # true: on; false: off; unset: on when OTEL_TRACES_EXPORTER names an exporter (otlp,
    # console). OTEL_SDK_DISABLED=true turns it off whatever this says.
    traces: bool | None = None
    # OTLP/HTTP traces URL, e.g. http://collector:4318/v1/traces (default: the OTEL_* variables).
    endpoint: str | None = None
    service_name: str | None = None  # default: OTEL_SERVICE_NAME, else "callgate"
    # Share of new traces kept (a client's sampled flag is followed); default: OTEL_TRACES_SAMPLER.
    sample_ratio: float | None = Field(default=None, ge=0.0, le=1.0)
    # Put each call's (redacted) arguments on its decision event: off, arguments can be personal.
    record_arguments: bool = False


class Config(_Model):
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)
    principal: PrincipalConfig = Field(default_factory=PrincipalConfig)
    on_block: OnBlock = "reprompt"
    max_reprompts: int = Field(default=2, ge=0, le=10)
    default: ToolConfig = Field(default_factory=ToolConfig)
    budgets: dict[str, LedgerConfig] = Field(default_factory=dict)
    tools: dict[str, ToolConfig] = Field(default_factory=dict)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    auth: AuthConfig | None = None
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    # Overlays merged over `tools` and `default` for a request's identity (proxy.overlays):
    # groups in the order written here (a later group wins), then the principal's.
    groups: dict[str, OverlayConfig] = Field(default_factory=dict)
    principals: dict[str, OverlayConfig] = Field(default_factory=dict)


class ConfigError(Exception):
    """Every problem found in a policy file, each as `path.to.field: message (line N)`."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = [_one_line(e) for e in errors]
        super().__init__(f"{source}: invalid config:\n  " + "\n  ".join(self.errors))


_LINE_SUFFIX = re.compile(r" \(line \d+\)$")


def _one_line(error: str) -> str:
    """One error, one line: a multi-line message (CEL parse errors draw a caret diagram) keeps
    its first line and its `(line N)` suffix, so every error reads `path: message (line N)`."""
    if "\n" not in error:
        return error
    suffix = _LINE_SUFFIX.search(error)
    head = error.split("\n", 1)[0].rstrip()
    return head + (suffix.group(0) if suffix else "")


def _expand_env(value: Any) -> Any:
    """Replace ${VAR} and ${VAR:-default} in strings (secrets stay out of the YAML)."""
    if isinstance(value, str):
        return _ENV_REF.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    return value


def line_of(node: yaml.Node | None, path: tuple[Any, ...]) -> int | None:
    """The 1-based YAML line of the deepest node along `path` that exists."""
    line = None
    for part in path:
        if node is None:
            break
        line = node.start_mark.line + 1
        nxt = None
        if isinstance(node, yaml.MappingNode):
            for key, val in node.value:
                if key.value == str(part) or (part == "from_" and key.value == "from"):
                    nxt = val
                    line = key.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part < len(node.value):
                nxt = node.value[part]
        node = nxt
    if node is not None:
        line = node.start_mark.line + 1
    return line


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join("from" if p == "from_" else str(p) for p in loc) or "(root)"


def parse_config(text: str, source: str = "<string>") -> tuple[Config, yaml.Node | None]:
    """Parse and validate YAML text. Returns the model and the YAML node tree (for line numbers)."""
    node, raw = _load_yaml(text, source)
    raw = _expand_env(raw)
    if os.environ.get("CALLGATE_UPSTREAM_URL") and isinstance(raw.get("upstream", {}), dict):
        raw["upstream"] = {
            **(raw.get("upstream") or {}),
            "base_url": os.environ["CALLGATE_UPSTREAM_URL"],
        }
    config = _validate(raw, node, source)
    _check_ledgers(config, node, source)
    return config, node


def _load_yaml(text: str, source: str) -> tuple[yaml.Node | None, dict[str, Any]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [f"(yaml): {problem}{where}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, ["(root): the policy must be a YAML mapping"])
    return node, raw


def _located(node: yaml.Node | None, loc: tuple[Any, ...], message: str) -> tuple[int, str]:
    """(line or 0, `path: message (line N)`), to sort errors in the order of the file."""
    line = line_of(node, loc)
    return line or 0, f"{_format_loc(loc)}: {message}" + (f" (line {line})" if line else "")


def _raise_located(source: str, located: list[tuple[int, str]]) -> NoReturn:
    # In the order of the file, not of the schema's fields.
    located.sort(key=lambda item: item[0])
    raise ConfigError(source, [text for _, text in located]) from None


def _validate(raw: dict[str, Any], node: yaml.Node | None, source: str) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        located = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not str(p).startswith("function-"))
            located.append(_located(node, loc, err["msg"].removeprefix("Value error, ")))
        _raise_located(source, located)


def _check_ledgers(config: Config, node: yaml.Node | None, source: str) -> None:
    """Every budget names a declared ledger (in the base policy and every overlay)."""
    errors: list[tuple[int, str]] = []
    sections: list[tuple[tuple[str, ...], ToolConfig | ToolOverlay]] = [
        (("default",), config.default)
    ]
    sections += [(("tools", name), tool) for name, tool in config.tools.items()]
    for section, tool in sections + overlay_sections(config):
        if tool.budget and tool.budget.ledger and tool.budget.ledger not in config.budgets:
            message = f"unknown ledger {tool.budget.ledger!r}; declare it under budgets"
            errors.append(_located(node, (*section, "budget", "ledger"), message))
    if errors:
        _raise_located(source, errors)


def overlay_sections(config: Config) -> list[tuple[tuple[str, ...], ToolOverlay]]:
    """Every tool entry and default of every overlay, with its location in the policy."""
    out: list[tuple[tuple[str, ...], ToolOverlay]] = []
    for kind, overlays in (("groups", config.groups), ("principals", config.principals)):
        for name, overlay in overlays.items():
            if overlay.default is not None:
                out.append(((kind, name, "default"), overlay.default))
            out += [((kind, name, "tools", t), tool) for t, tool in overlay.tools.items()]
    return out


def read_config_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(path, [f"(file): {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            path, [f"(file): not UTF-8 text ({exc.reason} at byte {exc.start})"]
        ) from None
