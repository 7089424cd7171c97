"""The resolved policy: the config with every expression and schema compiled once, at load time.

Nothing here runs per request except lookups; a bad CEL expression or JSON Schema is a load error
(`callgate check` reports it with its YAML line), never a runtime crash.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

import cel
import jsonschema
import orjson
import structlog
from cel.stdlib import STDLIB_FUNCTIONS

from proxy.cel import Fallback, ascii_lower, ascii_upper, compile_native
from proxy.config import (
    MICROS,
    BudgetUse,
    Config,
    ConfigError,
    LedgerConfig,
    OnBlock,
    RateLimitConfig,
    ToolConfig,
    line_of,
    looks_numeric,
    parse_config,
    parse_money,
    read_config_text,
)
from proxy.overlays import Entry, Loc, apply, base_entries, layers_of
from proxy.schemafast import compile_check
from proxy.toolcalls import CallContext

log = structlog.get_logger("callgate.policy")
DEFAULT_TOOL = "*"
# Effective policies of identities with several overlays (groups, or groups and a principal
# overlay), merged when first needed: bounded, the oldest dropped first.
MAX_COMBINATIONS = 1024
# (principal, groups) -> the overlays that apply, so that a request does not sort its groups.
MAX_IDENTITIES = 50_000
_UNSEEN: Any = object()

# The CEL extension functions, with the two that rules use most replaced by C-speed versions
# of the same semantics (the package's walk the string one character at a time in Python).
FUNCTIONS: dict[str, Callable[..., Any]] = {
    **STDLIB_FUNCTIONS,
    "lowerAscii": ascii_lower,
    "upperAscii": ascii_upper,
}


# CEL string and bytes literals (raw, triple-quoted), which may contain anything.
_LITERAL = re.compile(
    r"""[rRbB]{0,2}(?:'''[\s\S]*?'''|\"\"\"[\s\S]*?\"\"\"|'(?:\\.|[^'\\\n])*'|"(?:\\.|[^"\\\n])*")"""
)
_ARGS_USE = re.compile(r"(?<![\w.])args\b(\s*\.\s*([A-Za-z_]\w*))?")


def args_fields(source: str) -> frozenset[str] | None:
    """The fields of `args` an expression reads, when it only ever reads `args.<field>`
    (None when it uses `args` any other way: `args["k"]`, `size(args)`, a macro over it, ...).

    Converting a value into CEL costs in proportion to its size, and tool arguments can be
    large (a file's content, a patch): an expression that reads `args.path` gets only `path`.
    """
    text = _LITERAL.sub('""', source)
    if "'" in text or '"' in text.replace('""', ""):
        return None  # a literal the pattern did not understand: assume nothing
    fields = set()
    for match in _ARGS_USE.finditer(text):
        if match.group(2) is None:
            return None
        fields.add(match.group(2))
    return frozenset(fields)


@dataclass(frozen=True, slots=True)
class Expr:
    """A compiled CEL expression, with what it needs from its environment worked out once.

    Most expressions also get a compiled Python form (proxy.cel) that answers the common
    case in a fraction of the interpreter's time and defers to it for everything else. For the
    interpreter, converting values into CEL dominates an evaluation, so only the variables the
    expression names are passed, and only the extension functions it calls are registered.
    """

    program: cel.Program
    variables: tuple[str, ...]
    functions: dict[str, Callable[..., Any]]
    fields: frozenset[str] | None = None  # of `args`, when only those are read
    native: Callable[[dict[str, Any]], Any] | None = None

    @classmethod
    def compile(cls, source: str) -> Expr:
        program = cel.compile(source)
        used = {n: FUNCTIONS[n] for n in program.functions() if n in FUNCTIONS}
        variables = tuple(program.variables())
        fields = args_fields(source) if "args" in variables else None
        return cls(program, variables, used, fields, compile_native(source))

    def run(self, env: dict[str, Any]) -> Any:
        """Evaluate; an env value may be a zero-argument callable, called only if needed."""
        if self.native is not None:
            try:
                return self.native(env)
            except Fallback:
                pass
        return self.interpret(env)

    def interpret(self, env: dict[str, Any]) -> Any:
        """Evaluate with the CEL interpreter alone."""
        variables = {}
        for name in self.variables:
            if name in env:
                value = env[name]
                variables[name] = value() if callable(value) else value
        fields = self.fields
        if fields is not None:
            args = variables.get("args")
            if isinstance(args, dict) and len(args) > len(fields):
                variables["args"] = {k: args[k] for k in fields if k in args}
        if self.functions:
            return self.program.execute(cel.Context(variables=variables, functions=self.functions))
        return self.program.execute(variables)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    program: Expr
    deny: bool  # True for deny_if, False for allow_if
    message: str | None


@dataclass(frozen=True, slots=True)
class Budget:
    ledger: str
    ledger_config: LedgerConfig
    cost_micros: int | None  # a constant cost, or None when `cost_program` computes it
    cost_program: Expr | None
    use: BudgetUse
    max_micros: int = 0  # the ledger's max_spend, converted once


@dataclass(frozen=True, slots=True)
class Approval:
    """A tool's `approval`, compiled (proxy.gates.approval)."""

    when: Expr | None  # None: every call needs approval
    ttl: float
    approvers: tuple[str, ...]
    wait: float
    notify: str | None
    # A digest of the tool's whole policy entry: a grant made under one policy does not
    # pass a call under a changed one.
    identity: str
    # upstream.max_duration: a held call never outlasts its request's deadline (a stream holds
    # its upstream answer open while the call waits).
    max_duration: float


def policy_identity(name: str, tool: ToolConfig) -> str:
    data = {"tool": name, "policy": tool.model_dump(mode="json", by_alias=True)}
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True, slots=True)
class ToolPolicy:
    name: str
    namespace: str
    allow: bool
    on_block: OnBlock
    rules: tuple[Rule, ...]
    rules_mode: str
    schema: jsonschema.protocols.Validator | None
    # The same schema as a compiled validity check (proxy.schemafast, jsonschema-rs), when it
    # can be one: jsonschema then runs only to word errors (and to judge what it calls invalid).
    schema_check: Callable[[Any], bool] | None
    rate_limit: RateLimitConfig | None
    budget: Budget | None
    approval: Approval | None = None
    # The gates a call to this tool passes, in order (proxy.gates.registry): what the pipeline
    # runs and what `callgate explain` reports.
    checks: tuple[Any, ...] = ()
    reservations: tuple[Any, ...] = ()
    config: ToolConfig | None = None  # the (merged) entry it was compiled from


# Which overlays apply: the identity's groups that have one, in policy order, and the principal
# when it has one.
OverlayKey = tuple[tuple[str, ...], str | None]


@dataclass(frozen=True, slots=True)
class Policy:
    config: Config
    tools: dict[str, ToolPolicy]
    default: ToolPolicy
    source: str = "<string>"
    # What the gates derive from this policy per (tool, principal), e.g. the store requests of
    # a call: built once, dropped with the policy on reload (see proxy.gates.pipeline).
    derived: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)
    # The base policy's overlays (None when it has none, and on an effective policy).
    overlays: Overlays | None = field(default=None, compare=False, repr=False)
    # On an effective policy: the overlays merged into it.
    overlay_key: OverlayKey | None = None

    def for_tool(self, name: str, ctx: CallContext | None = None) -> ToolPolicy:
        """The tool's policy; with `ctx`, as the overlays of the request's identity make it."""
        policy = self if ctx is None else self.effective(ctx)
        return policy.tools.get(name) or policy.default

    def effective(self, ctx: CallContext) -> Policy:
        """The policy for this identity: self when no overlay applies (or self is already an
        effective policy), else the merged policy, compiled at load for one overlay and once,
        on first use, for a combination. The request path's cost is a key and a dict lookup."""
        overlays = self.overlays
        if overlays is None:
            return self
        ident = (ctx.principal, ctx.groups)
        key = overlays.keys.get(ident, _UNSEEN)
        if key is _UNSEEN:
            key = overlays.key(*ident)
            if len(overlays.keys) >= MAX_IDENTITIES:
                overlays.keys.clear()
            overlays.keys[ident] = key
        if key is None:
            return self
        found = overlays.policies.get(key) or overlays.combined.get(key)
        return found if found is not None else overlays.combine(self, key)

    @property
    def has_error_mode(self) -> bool:
        """Whether some tool fails the whole request on a block: streams then hold allowed calls
        until the response is settled, so a request that fails has sent none of its calls."""
        return self.default.on_block == "error" or any(
            t.on_block == "error" for t in self.tools.values()
        )


@dataclass(slots=True)
class Overlays:
    """The compiled overlays of a base policy (see proxy.overlays for the merge)."""

    rank: dict[str, int]  # group name -> its position in the policy
    principals: frozenset[str]
    base_tools: dict[str, Entry]
    base_default: Entry
    policies: dict[OverlayKey, Policy] = field(default_factory=dict)  # one overlay each
    combined: dict[OverlayKey, Policy] = field(default_factory=dict)
    keys: dict[tuple[str, tuple[str, ...]], OverlayKey | None] = field(default_factory=dict)

    def key(self, principal: str, groups: tuple[str, ...]) -> OverlayKey | None:
        rank = self.rank
        found: tuple[str, ...] = ()
        if groups and rank:
            hit = [g for g in groups if g in rank]
            if len(hit) > 1:
                hit = sorted(set(hit), key=rank.__getitem__)
            found = tuple(hit)
        who = principal if principal in self.principals else None
        if not found and who is None:
            return None
        return found, who

    def combine(self, base: Policy, key: OverlayKey) -> Policy:
        """Merge and compile a combination of overlays, once. Each overlay compiled on its own
        at load, but a merge of two can still be invalid (one removes `max_calls`, another
        `cooldown`): such a tool is denied for that identity (fail closed) and logged."""
        errors: list[tuple[Loc, str]] = []
        policy = _effective(base, self, key, errors, deny_broken=True)
        if errors:
            log.error(
                "overlay_combination_invalid",
                groups=list(key[0]),
                principal=key[1],
                errors=[f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in errors],
            )
        while len(self.combined) >= MAX_COMBINATIONS:
            del self.combined[next(iter(self.combined))]
        self.combined[key] = policy
        return policy


def _effective(
    base: Policy,
    overlays: Overlays,
    key: OverlayKey,
    errors: list[tuple[Loc, str]],
    deny_broken: bool,
) -> Policy:
    config = base.config
    tools, default = overlays.base_tools, overlays.base_default
    broken: set[str] = set()
    for section in layers_of(config, *key):
        tools, default = apply(config, tools, default, section, errors, broken)
    compiled: dict[str, ToolPolicy] = {}
    for name, entry in tools.items():
        if deny_broken and name in broken:
            compiled[name] = _denied(name, config)
        elif overlays.base_tools.get(name) is entry:
            compiled[name] = base.tools[name]  # untouched by every layer: shared
        else:
            compiled[name] = _compile_entry(name, entry, config, errors)
    if deny_broken and DEFAULT_TOOL in broken:
        default_policy = _denied(DEFAULT_TOOL, config)
    elif default is overlays.base_default:
        default_policy = base.default
    else:
        default_policy = _compile_entry(DEFAULT_TOOL, default, config, errors)
    return Policy(
        config=config,
        tools=compiled,
        default=default_policy,
        source=base.source,
        overlay_key=key,
    )


def _compile_entry(
    name: str, entry: Entry, config: Config, errors: list[tuple[Loc, str]]
) -> ToolPolicy:
    return _compile_tool(name, entry.config, config, errors, entry.section, entry.rule_locs)


def _denied(name: str, config: Config) -> ToolPolicy:
    return _compile_tool(name, ToolConfig(allow=False), config, [], ("default",))


def to_micros(amount: Decimal) -> int:
    return int(amount.quantize(MICROS) / MICROS)


def _compile_tool(
    name: str,
    tool: ToolConfig,
    config: Config,
    errors: list[tuple[tuple[Any, ...], str]],
    section: tuple[Any, ...],
    rule_locs: tuple[Loc, ...] | None = None,
) -> ToolPolicy:
    rules = []
    for i, rule in enumerate(tool.rules):
        source = rule.deny_if if rule.deny_if is not None else rule.allow_if
        field = "deny_if" if rule.deny_if is not None else "allow_if"
        try:
            program = Expr.compile(source or "")
        except Exception as exc:  # the CEL binding raises ValueError or RuntimeError
            where = rule_locs[i] if rule_locs is not None else (*section, "rules", i)
            errors.append(((*where, field), f"invalid CEL expression: {exc}"))
            continue
        rules.append(Rule(rule.name, program, rule.deny_if is not None, rule.message))

    schema = schema_check = None
    if tool.arguments_schema is not None:
        try:
            cls = jsonschema.validators.validator_for(tool.arguments_schema)
            cls.check_schema(tool.arguments_schema)
            schema = cls(tool.arguments_schema)
            schema_check = compile_check(tool.arguments_schema)
        except jsonschema.SchemaError as exc:
            errors.append(((*section, "arguments_schema"), f"invalid JSON Schema: {exc.message}"))

    budget = None
    if tool.budget is not None:
        ledger = config.budgets.get(tool.budget.ledger)
        cost_micros: int | None = None
        cost_program = None
        if looks_numeric(tool.budget.cost):
            try:
                cost_micros = to_micros(parse_money(tool.budget.cost))
            except ValueError as exc:
                errors.append(((*section, "budget", "cost"), str(exc)))
        else:
            try:
                cost_program = Expr.compile(str(tool.budget.cost))
            except Exception as exc:
                errors.append(
                    (
                        (*section, "budget", "cost"),
                        "neither a decimal amount nor a valid CEL expression: "
                        + " ".join(str(exc).split()),
                    )
                )
        if ledger is not None:
            budget = Budget(
                tool.budget.ledger,
                ledger,
                cost_micros,
                cost_program,
                tool.budget,
                to_micros(ledger.max_spend),
            )

    approval = None
    if tool.approval is not None:
        when = None
        if tool.approval.when is not None:
            try:
                when = Expr.compile(tool.approval.when)
            except Exception as exc:
                errors.append(((*section, "approval", "when"), f"invalid CEL expression: {exc}"))
        approval = Approval(
            when,
            tool.approval.ttl,
            tuple(tool.approval.approvers),
            tool.approval.wait,
            tool.approval.notify,
            policy_identity(name, tool),
            config.upstream.max_duration,
        )

    # Imported here: the gates' modules import this one (Rule, Budget).
    from proxy.gates.registry import compile_gates

    tool_policy = ToolPolicy(
        name=name,
        namespace=tool.namespace,
        allow=tool.allow,
        on_block=tool.on_block or config.on_block,
        rules=tuple(rules),
        rules_mode=tool.rules_mode,
        schema=schema,
        schema_check=schema_check,
        rate_limit=tool.rate_limit,
        budget=budget,
        approval=approval,
        config=tool,
    )
    checks, reservations = compile_gates(tool_policy)
    return replace(tool_policy, checks=checks, reservations=reservations)


def compile_policy(config: Config, node: Any = None, source: str = "<string>") -> Policy:
    errors: list[tuple[tuple[Any, ...], str]] = []
    tools = {
        name: _compile_tool(name, tool, config, errors, ("tools", name))
        for name, tool in config.tools.items()
    }
    default = _compile_tool(DEFAULT_TOOL, config.default, config, errors, ("default",))
    policy = Policy(config=config, tools=tools, default=default, source=source)
    if config.groups or config.principals:
        # Each overlay on its own, compiled now: its errors are load errors, with their lines.
        base_tools, base_default = base_entries(config)
        overlays = Overlays(
            rank={g: i for i, g in enumerate(config.groups)},
            principals=frozenset(config.principals),
            base_tools=base_tools,
            base_default=base_default,
        )
        keys: list[OverlayKey] = [((g,), None) for g in config.groups]
        keys += [((), p) for p in config.principals]
        if not errors:  # the base must compile for an overlay's merge to mean anything
            for key in keys:
                overlays.policies[key] = _effective(policy, overlays, key, errors, False)
        policy = replace(policy, overlays=overlays)
    if errors:
        lines = []
        for loc, msg in errors:
            line = line_of(node, loc)
            where = ".".join(str(p) for p in loc)
            lines.append(f"{where}: {msg}" + (f" (line {line})" if line else ""))
        raise ConfigError(source, lines)
    return policy


def load_policy_text(text: str, source: str = "<string>") -> Policy:
    config, node = parse_config(text, source)
    return compile_policy(config, node, source)


def load_policy(path: str) -> Policy:
    return load_policy_text(read_config_text(path), path)
