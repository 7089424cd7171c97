"""`callgate check` lint: what makes a valid policy wrong, found before it ships.

Each finding is an error (the policy does something nobody means: a rule that blocks every
call, a field that cannot exist) or a warning (probably a mistake: a dead rule, a ledger
nothing charges), with the file, the YAML line and a hint. What is checked, all decidable
cheaply at load time:

- CEL rules and cost expressions, type-checked over their syntax tree (`proxy.lint_expr`)
  against the tool's `arguments_schema` where one is given: a field the schema does not have, a
  string compared with or added to a number, a string method called on a non-string; and
  everywhere: a variable other than args/tool/principal/request, a `request.` field other than
  model/metadata/user. Expressions outside the parser's subset are skipped, not guessed at.
- Constant rules: a rule that evaluates to the same value whatever the call (evaluated with
  nothing but `tool` bound: CEL's error-absorbing `||`/`&&` make that sound).
- Tool names that differ only by case or separators. Names match exactly (`Policy.for_tool`
  is a dict lookup): `Delete_File` is not `delete_file` and gets the `*` policy.
- Ledgers no tool charges; a constant cost above its ledger's max_spend; a rate limit of 0 calls;
  gates configured on a tool that `allow: false` blocks before they run.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from proxy.cel import not_compiled_because
from proxy.config import line_of, overlay_sections
from proxy.lint_expr import check_expression
from proxy.policy import Expr, Policy

__all__ = ["Finding", "check_expression", "constant_value", "iter_lines", "lint", "normalize"]

_SEPARATORS = re.compile(r"[\s_.\-/:]+")


@dataclass(frozen=True, slots=True)
class Finding:
    severity: str  # "error" | "warning" | "note" (never fails a check)
    code: str
    where: str  # dotted path in the policy
    line: int | None
    message: str
    hint: str

    def format(self, source: str) -> str:
        at = f"{source}:{self.line}" if self.line else source
        return f"{at}: {self.severity}: {self.message} [{self.code}]\n  hint: {self.hint}"


def constant_value(program: Expr, tool: str | None) -> tuple[bool, Any]:
    """(True, value) when the expression gives `value` whatever the call: evaluated with only
    `tool` bound (for a named tool, the name), an expression that reads anything else fails,
    unless CEL's `||`/`&&` absorbed the failure, in which case the other side decided alone."""
    env: dict[str, Any] = {} if tool is None else {"tool": tool}
    try:
        return True, program.interpret(env)
    except Exception:
        return False, None


def normalize(name: str) -> str:
    return _SEPARATORS.sub("", name).casefold()


_GATES = {"rules", "rate_limit", "budget", "arguments_schema"}
Add = Callable[[str, str, tuple[Any, ...], str, str], None]


def _lint_unreachable(add: Add, loc: tuple[Any, ...], label: str, tool: Any) -> None:
    extras = [k for k in ("rules", "rate_limit", "budget", "arguments_schema") if getattr(tool, k)]
    if extras:
        add(
            "warning",
            "unreachable",
            (*loc, extras[0]),
            f"{label} is `allow: false`: its {', '.join(extras)} never apply",
            "remove them, or set allow: true if the tool should be usable",
        )


def _lint_rule(
    add: Add,
    rule_cfg: Any,
    at: tuple[Any, ...],
    program: Expr,
    name: str,
    label: str,
    schema: dict[str, Any] | None,
) -> None:
    deny = rule_cfg.deny_if is not None
    field = "deny_if" if deny else "allow_if"
    rloc = (*at, field)
    source = rule_cfg.deny_if if deny else rule_cfg.allow_if
    for severity, code, message in check_expression(source or "", schema):
        add(
            severity,
            code,
            rloc,
            f"rule {rule_cfg.name!r}: {message}",
            "fix the expression, or the arguments_schema if the field is real"
            if code == "unknown-field" and "`request." not in message
            else "fix the expression",
        )
    const, value = constant_value(program, None if name == "*" else name)
    if const:
        _lint_constant_rule(add, rule_cfg, rloc, field, deny, label, value)
    elif program.native is None:
        why = not_compiled_because(source or "")
        cost = "about 5 µs a call against under 1 µs compiled"
        if "matches(" in (source or ""):
            cost = "tens of µs a call under load: the interpreter compiles the pattern each time"
        add(
            "note",
            "interpreted-rule",
            rloc,
            f"rule {rule_cfg.name!r} runs in the CEL interpreter ({why}): {cost}",
            "fine for a rarely called tool; README (Design choices) lists what is compiled",
        )


def _lint_constant_rule(
    add: Add,
    rule_cfg: Any,
    rloc: tuple[Any, ...],
    field: str,
    deny: bool,
    label: str,
    value: Any,
) -> None:
    """A rule whose value does not depend on the call: it blocks everything, or nothing."""
    if not isinstance(value, bool):
        add(
            "error",
            "constant-rule",
            rloc,
            f"rule {rule_cfg.name!r} always returns {type(value).__name__}, not a bool: "
            "every call errors and is blocked",
            "make it a condition",
        )
    elif value is deny:
        add(
            "error",
            "constant-rule",
            rloc,
            f"rule {rule_cfg.name!r} ({field}) matches every call: {label} is blocked "
            "whatever the call",
            "to deny the tool, write allow: false; "
            "otherwise make the condition read args, principal or request",
        )
    else:
        add(
            "warning",
            "constant-rule",
            rloc,
            f"rule {rule_cfg.name!r} ({field}) never blocks: it is always {str(value).lower()}",
            "remove it, or fix its condition",
        )


def _lint_budget(add: Add, loc: tuple[Any, ...], label: str, tool: Any, tp: Any) -> None:
    bloc = (*loc, "budget", "cost")
    budget = tp.budget
    if budget is None:
        return
    if budget.cost_program is not None:
        for severity, code, message in check_expression(
            str(tool.budget.cost), tool.arguments_schema
        ):
            add(severity, code, bloc, f"cost: {message}", "fix the cost expression")
    if budget.cost_micros is not None and budget.cost_micros > budget.max_micros:
        add(
            "error",
            "unaffordable",
            bloc,
            f"{label} costs {tool.budget.cost} but ledger {budget.ledger!r} allows "
            f"{budget.ledger_config.max_spend} per window: every call is blocked",
            "raise the ledger's max_spend or lower the cost",
        )


def _blocks_every_call(tool: Any) -> bool:
    """An allowed tool whose enforced rate limit admits no call at all."""
    rl = tool.rate_limit
    return bool(tool.allow and rl is not None and rl.max_calls == 0 and rl.mode == "enforce")


def _lint_entry(
    add: Add,
    loc: tuple[Any, ...],
    name: str,
    label: str,
    tool: Any,
    tp: Any,
    rules: list[tuple[Any, tuple[Any, ...], Expr]],
    touched: set[str] | None,
) -> None:
    """One tool entry's findings. `touched`: for an overlay, the fields it writes (findings
    about the others belong to the base entry)."""
    if not tool.allow and (touched is None or touched & (_GATES | {"allow"})):
        _lint_unreachable(add, loc, label, tool)
    for rule_cfg, at, program in rules:
        _lint_rule(add, rule_cfg, at, program, name, label, tool.arguments_schema)
    if tool.budget is not None and (touched is None or "budget" in touched):
        _lint_budget(add, loc, label, tool, tp)
    if _blocks_every_call(tool) and (touched is None or touched & {"rate_limit", "allow"}):
        add(
            "warning",
            "zero-rate-limit",
            (*loc, "rate_limit", "max_calls"),
            f"{label} allows 0 calls per window: every call is blocked",
            "to deny the tool, write allow: false",
        )


def _lint_base(add: Add, policy: Policy, sections: list[tuple[tuple[Any, ...], str, Any]]) -> None:
    for loc, name, tool in sections:
        tp = policy.default if name == "*" else policy.tools[name]
        label = "the default policy" if name == "*" else f"tool {name!r}"
        rules = [
            (rule_cfg, (*loc, "rules", i), rule.program)
            for i, (rule_cfg, rule) in enumerate(zip(tool.rules, tp.rules, strict=False))
        ]
        _lint_entry(add, loc, name, label, tool, tp, rules, None)


def _lint_overlay_entries(add: Add, policy: Policy) -> None:
    overlays = policy.overlays
    if overlays is None:
        return
    for loc, patch in overlay_sections(policy.config):
        # Each overlay is linted merged over the base (as it applies on its own), for what it
        # writes itself: the base's findings are not repeated at every overlay.
        kind, who = loc[0], loc[1]
        key = ((who,), None) if kind == "groups" else ((), who)
        effective = overlays.policies[key]
        name = "*" if loc[2] == "default" else loc[3]
        tp = effective.default if name == "*" else effective.tools[name]
        label = ("the default policy" if name == "*" else f"tool {name!r}") + f" in {kind}.{who}"
        rules = []
        for i, rule_cfg in enumerate(patch.rules or []):
            source = rule_cfg.deny_if if rule_cfg.deny_if is not None else rule_cfg.allow_if
            rules.append((rule_cfg, (*loc, "rules", i), Expr.compile(source or "")))
        _lint_entry(add, loc, name, label, tp.config, tp, rules, patch.model_fields_set)


def _lint_unused_ledgers(
    add: Add, config: Any, sections: list[tuple[tuple[Any, ...], str, Any]]
) -> None:
    charged = {t.budget.ledger for _, _, t in sections if t.budget is not None}
    charged |= {p.budget.ledger for _, p in overlay_sections(config) if p.budget is not None}
    for ledger in config.budgets:
        if ledger not in charged:
            add(
                "warning",
                "unused-ledger",
                ("budgets", ledger),
                f"ledger {ledger!r} is charged by no tool",
                f"remove it, or charge it: budget: {{ledger: {ledger}, cost: ...}}",
            )


def _lint_near_duplicates(add: Add, config: Any) -> None:
    by_form: dict[str, list[str]] = {}
    for name in config.tools:
        by_form.setdefault(normalize(name), []).append(name)
    for names in by_form.values():
        if len(names) > 1:
            shown = ", ".join(repr(n) for n in names)
            add(
                "warning",
                "near-duplicate-name",
                ("tools", names[1]),
                f"tool names {shown} differ only by case or separators; names match exactly, "
                "so each is a separate policy and a model may call either",
                "keep one entry per tool (as the client names it), and set "
                "default: {allow: false} so that other spellings are denied",
            )


def lint(policy: Policy, text: str) -> list[Finding]:
    """Every finding for a policy that loaded (so is valid), with lines from its YAML `text`."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        node = None
    findings: list[Finding] = []

    def add(severity: str, code: str, loc: tuple[Any, ...], message: str, hint: str) -> None:
        where = ".".join(str(p) for p in loc)
        findings.append(Finding(severity, code, where, line_of(node, loc), message, hint))

    config = policy.config
    sections: list[tuple[tuple[Any, ...], str, Any]] = [(("default",), "*", config.default)]
    sections += [(("tools", n), n, t) for n, t in config.tools.items()]
    _lint_base(add, policy, sections)
    _lint_overlay_entries(add, policy)
    _lint_unused_ledgers(add, config, sections)
    _lint_near_duplicates(add, config)
    _lint_overlays(add, config)
    findings.sort(key=lambda f: (f.line or 0, f.severity != "error"))
    return findings


def _lint_overlays(add: Add, config: Any) -> None:
    """Overlays that cannot apply, or that name a tool almost like another entry does.

    An overlay for a tool no base entry names is not flagged: the client's tools are not
    known here, and granting a tool the base default denies is what such an entry is for."""
    enabled = config.auth is not None and config.auth.enabled
    if config.groups and not enabled:
        add(
            "warning",
            "overlay-without-auth",
            ("groups", next(iter(config.groups))),
            "group overlays apply only to authenticated identities, and auth is off: "
            "no request has groups",
            "turn on auth (keys, jwt or trusted_header with groups_header), or remove them",
        )
    if config.principals and not enabled:
        add(
            "warning",
            "overlay-without-auth",
            ("principals", next(iter(config.principals))),
            "without auth the principal is whatever the client says: any client can claim a "
            "principal overlay",
            "turn on auth, or make principal overlays only stricter than the base",
        )
    known = {normalize(n): n for n in config.tools}
    for kind in ("groups", "principals"):
        for who, overlay in getattr(config, kind).items():
            for name in overlay.tools:
                near = known.get(normalize(name))
                if near is not None and near != name:
                    add(
                        "warning",
                        "near-duplicate-name",
                        (kind, who, "tools", name),
                        f"{kind}.{who} names tool {name!r}, the base names {near!r}: names "
                        "match exactly, so the overlay does not change the base entry",
                        f"spell it {near!r}",
                    )


def iter_lines(findings: list[Finding], source: str) -> Iterator[str]:
    for f in findings:
        yield f.format(source)
