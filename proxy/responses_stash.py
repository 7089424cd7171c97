"""What the stash keeps for a Responses API response the client saw, and how the client's next
turn gets it back.

A `StashEntry` is stored as a JSON object under the response's id (and, the same object, under
each of its surviving calls' ids, for turns that send their full input instead of
`previous_response_id`); a conversation's key holds an entry with only `outputs`. Its fields:
- `outputs`: the error outputs of its blocked calls (what the next turn must carry, so that the
  upstream, which stored every call, finds an output for each);
- `groups`: the removed items with the keys of their neighbours, to put them back in place when
  the client sends its full input instead of `previous_response_id`;
- `calls`: the ids of the calls the client saw (the keys the entry is also stored under);
- `hide`: keys of items the client must never see (blocked calls and their reasoning, error
  outputs callgate added) when it reads the stored response or its input items back;
- `target` / `input_of` / `previous_response_id` / `prefix` / `extra`: how to show the client's
  view of a stored response after a reprompt (the upstream's ids differ from the client's).

The stored form is the one older callgates wrote (empty lists and None left out), so entries
outlive an upgrade; what is read back is cleaned field by field (`StashEntry.from_json`): the
stash is a shared store, and a damaged or foreign value must not break the request reading it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from proxy import responses, stash
from proxy.responses import key_of, output_key

# A group of removed items: {"items": [item, ...], "after": key | None, "before": key | None},
# the keys of the kept items around it (see responses.split_output).
Group = dict[str, Any]


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [i for i in value if isinstance(i, dict)] if isinstance(value, list) else []


def _strings(value: Any) -> list[str]:
    return [i for i in value if isinstance(i, str)] if isinstance(value, list) else []


def _clean_group(group: Any) -> Group | None:
    if not isinstance(group, dict):
        return None
    items = _dicts(group.get("items"))
    if not items:
        return None
    after, before = group.get("after"), group.get("before")
    return {
        "items": items,
        "after": after if isinstance(after, str) else None,
        "before": before if isinstance(before, str) else None,
    }


@dataclass(slots=True)
class StashEntry:
    outputs: list[dict[str, Any]] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    hide: list[str] = field(default_factory=list)
    target: str | None = None  # the last round's response id, when it is not the client's
    prefix: list[dict[str, Any]] = field(default_factory=list)  # earlier rounds' items shown
    extra: list[dict[str, Any]] = field(default_factory=list)  # callgate's notice, shown
    # Present ("" standing for null) when the client's view must name its own previous
    # response instead of the upstream's.
    previous_response_id: str | None = None
    input_of: str | None = None  # the response whose input items are the client's

    def to_json(self) -> dict[str, Any]:
        """The stored form: every field but empty lists and None."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and value != []:
                out[f.name] = value
        return out

    def empty(self) -> bool:
        return not self.to_json()

    @classmethod
    def from_json(cls, value: Any) -> StashEntry | None:
        """An entry read back, keeping only what has the shape `to_json` writes; None when
        nothing usable is left. Never raises."""
        if not isinstance(value, dict):
            return None
        target, input_of = value.get("target"), value.get("input_of")
        previous = value.get("previous_response_id")
        entry = cls(
            outputs=[o for o in _dicts(value.get("outputs")) if output_key(o)],
            groups=[g for g in map(_clean_group, _as_list(value.get("groups"))) if g],
            calls=_strings(value.get("calls")),
            hide=_strings(value.get("hide")),
            target=target if isinstance(target, str) and target else None,
            prefix=_dicts(value.get("prefix")),
            extra=_dicts(value.get("extra")),
            previous_response_id=previous if isinstance(previous, str) else None,
            input_of=input_of if isinstance(input_of, str) and input_of else None,
        )
        return None if entry.empty() else entry


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def entry_puts(
    principal: str, response_id: str, entry: StashEntry, body: dict[str, Any]
) -> list[tuple[list[str], dict[str, Any]]]:
    """What saving a response's entry writes, as (keys, value) pairs: the entry under the
    response's id and its surviving calls' ids; the outputs its conversation's next turn
    needs, under the conversation's id."""
    value = entry.to_json()
    if not value:
        return []
    keys = [stash.responses_key(response_id)]
    keys += [responses.call_key(principal, c) for c in entry.calls]
    puts = [(keys, value)]
    conversation = responses.conversation_id(body)
    if conversation:
        # The new outputs, or none: those this request carried are in the conversation now.
        key = responses.conversation_key(conversation)
        puts.append(([key], StashEntry(outputs=entry.outputs).to_json()))
    return puts


# -- the client's next turn ---------------------------------------------------------------


def add_outputs(items: list[Any], outputs: list[dict[str, Any]]) -> list[str]:
    """Prepend the error outputs the input lacks (after `previous_response_id`). Returns keys."""
    present = {k for k in (output_key(i) for i in items) if k}
    missing = [o for o in outputs if output_key(o) not in present]
    items[0:0] = missing
    return [k for k in (output_key(o) for o in missing) if k]


def reinsert(items: list[Any], entries: list[StashEntry]) -> list[str]:
    """Put stashed blocked calls (and their outputs) back into a client's full input, in place.

    Each group goes before the kept item that followed it, else after the one before it, else
    before the first surviving call of its response. Items already present are not repeated.
    Returns the keys of everything inserted (the client must not see them read back).
    """
    inserted: list[str] = []
    for e in entries:
        present = {k for k in (key_of(i) for i in items) if k}
        answered = {k for k in (output_key(i) for i in items) if k}
        outputs = {output_key(o): o for o in e.outputs}
        for g in e.groups:
            add = _missing(g, outputs, present, answered)
            if not add:
                continue
            pos = _anchor(items, g, e.calls)
            if pos is None:
                continue  # the client dropped this part of the conversation: nothing to complete
            items[pos:pos] = add
            for i in add:
                key = key_of(i)
                if key:
                    present.add(key)
                    inserted.append(key)
                answer = output_key(i)
                if answer:
                    answered.add(answer)
    return inserted


def _missing(
    group: Group, outputs: dict[str | None, dict[str, Any]], present: set[str], answered: set[str]
) -> list[Any]:
    """A group's items the input lacks, then the stashed outputs of its calls it lacks."""
    keys = [key_of(i) for i in group["items"]]
    add = [i for i, k in zip(group["items"], keys, strict=True) if k not in present]
    return add + [outputs[k] for k in keys if k in outputs and k not in answered]


def _anchor(items: list[Any], group: Group, calls: list[str]) -> int | None:
    index = {}
    for pos, item in enumerate(items):
        key = key_of(item)
        if key and key not in index and output_key(item) is None:
            index[key] = pos
    if group.get("before") in index:
        return index[group["before"]]
    if group.get("after") in index:
        return index[group["after"]] + 1
    for call_id in calls:
        if "call:" + call_id in index:
            return index["call:" + call_id]
    return None
