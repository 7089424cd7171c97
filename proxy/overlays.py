"""Per-group and per-principal policy overlays: the merge of `groups.NAME` / `principals.NAME`
over the base `tools` and `default`, on the config models (compiling is proxy.policy's).

The merge, precisely (the README's "Policy overlays" says the same for users):

- Layers apply in a fixed order: the base policy, then each group overlay the identity has,
  in the order the policy's `groups:` mapping lists them (the order of the identity's groups,
  from a JWT claim or a key, does not matter), then the principal's overlay. A later layer wins.
- An overlay's `tools.NAME` merges over the tool's entry so far: the base entry (after earlier
  layers), or, for a tool with no entry yet, the `default` so far. An overlay's `default`
  merges over the default so far; it governs only tools that no layer names, so a base tool
  entry is never touched by an overlay's `default`.
- Field by field: only the fields an overlay writes replace the tool's (pydantic's
  model_fields_set tells written from defaulted). `rate_limit` and `budget` merge one level
  deeper, field by field; writing `null` removes the gate. `arguments_schema` is replaced whole.
- `rules` merge by name: an overlay rule named like one of the tool's replaces it in place (so
  an overlay can relax a rule), other overlay rules append in order. `replace_rules: true`
  makes the overlay's list replace the tool's whole list (`rules: []` with it removes them all).
- A merged entry is validated like a written one (a rate limit with nothing to limit, a budget
  without a ledger are errors), at load for each overlay on its own; a combination of several
  overlays is merged when an identity first needs it (proxy.policy.Overlays).

Rate-limit and budget buckets do not change with overlays: the key stays
`rl:namespace:tool@principal` (or `@*` for a global scope) and `budget:ledger@principal`; an
overlay changes the limit a call is judged against, not the count it is judged on. (Writing
another `namespace` or `ledger` in an overlay does select another bucket: that is explicit.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from proxy.config import (
    BudgetUse,
    Config,
    OverlayConfig,
    RateLimitConfig,
    RuleConfig,
    ToolConfig,
    ToolOverlay,
)

Loc = tuple[Any, ...]
Errors = list[tuple[Loc, str]]
_PLAIN = ("allow", "namespace", "on_block", "rules_mode", "arguments_schema")


@dataclass(frozen=True, slots=True)
class Entry:
    """A tool's merged entry, with where its parts were written (for error lines)."""

    config: ToolConfig
    rule_locs: tuple[Loc, ...]  # the location of each of config.rules
    section: Loc  # the last section that changed it: where its other fields' errors point


def base_entries(config: Config) -> tuple[dict[str, Entry], Entry]:
    tools = {
        name: Entry(tool, _locs(("tools", name), len(tool.rules)), ("tools", name))
        for name, tool in config.tools.items()
    }
    default = Entry(config.default, _locs(("default",), len(config.default.rules)), ("default",))
    return tools, default


def _locs(section: Loc, count: int) -> tuple[Loc, ...]:
    return tuple((*section, "rules", i) for i in range(count))


def layers_of(config: Config, groups: tuple[str, ...], principal: str | None) -> list[Loc]:
    """The overlay sections a key applies, in order (groups already in policy order)."""
    return [("groups", g) for g in groups] + ([("principals", principal)] if principal else [])


def apply(
    config: Config,
    tools: dict[str, Entry],
    default: Entry,
    section: Loc,
    errors: Errors,
    broken: set[str],
) -> tuple[dict[str, Entry], Entry]:
    """One overlay layer over (tools, default). Names whose merge failed go into `broken`
    ("*" for the default)."""
    kind, name = section
    overlay: OverlayConfig = getattr(config, kind)[name]
    merged = dict(tools)
    for tool, patch in overlay.tools.items():
        before = len(errors)
        merged[tool] = merge(tools.get(tool, default), patch, (*section, "tools", tool), errors)
        if len(errors) > before:
            broken.add(tool)
    if overlay.default is not None:
        before = len(errors)
        default = merge(default, overlay.default, (*section, "default"), errors)
        if len(errors) > before:
            broken.add("*")
    return merged, default


def merge(entry: Entry, patch: ToolOverlay, section: Loc, errors: Errors) -> Entry:
    written = patch.model_fields_set
    update: dict[str, Any] = {f: getattr(patch, f) for f in _PLAIN if f in written}
    rule_locs = entry.rule_locs
    if "rules" in written or patch.replace_rules:
        rules, rule_locs = merge_rules(
            entry.config.rules, entry.rule_locs, patch.rules or [], section, patch.replace_rules
        )
        update["rules"] = rules
    if "rate_limit" in written:
        update["rate_limit"] = _merge_model(
            RateLimitConfig,
            entry.config.rate_limit,
            patch.rate_limit,
            (*section, "rate_limit"),
            errors,
        )
    if "budget" in written:
        update["budget"] = _merge_model(
            BudgetUse, entry.config.budget, patch.budget, (*section, "budget"), errors
        )
    if not update:
        return entry
    # ToolConfig has no cross-field validation; its nested models were validated above.
    return Entry(entry.config.model_copy(update=update), rule_locs, section)


def merge_rules(
    rules: list[RuleConfig],
    locs: tuple[Loc, ...],
    patch: list[RuleConfig],
    section: Loc,
    replace: bool,
) -> tuple[list[RuleConfig], tuple[Loc, ...]]:
    new_locs = _locs(section, len(patch))
    if replace:
        return list(patch), new_locs
    out, out_locs = list(rules), list(locs)
    for rule, loc in zip(patch, new_locs, strict=True):
        same = [i for i, r in enumerate(out) if r.name == rule.name]
        if not same:
            out.append(rule)
            out_locs.append(loc)
            continue
        out[same[0]], out_locs[same[0]] = rule, loc
        for i in reversed(same[1:]):  # a name the tool repeated: the overlay's rule is the one
            del out[i], out_locs[i]
    return out, tuple(out_locs)


def _merge_model(
    model: type[BaseModel],
    base: BaseModel | None,
    patch: BaseModel | None,
    loc: Loc,
    errors: Errors,
) -> Any:
    if patch is None:
        return None  # written as null: the gate is removed
    data = base.model_dump() if base is not None else {}
    data.update({f: getattr(patch, f) for f in patch.model_fields_set})
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            where = tuple(p for p in err["loc"] if not str(p).startswith("function-"))
            msg = err["msg"].removeprefix("Value error, ")
            if base is None and err["type"] == "missing":
                msg += " (the tool has none of this gate to merge over)"
            errors.append(((*loc, *where), msg))
        return base
