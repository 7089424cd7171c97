"""The Responses stash entry (proxy.responses_stash.StashEntry): its stored JSON is the one
older callgates wrote, so entries outlive an upgrade, and a damaged or foreign value reads as
None or a cleaned entry, never an exception."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from proxy import stash
from proxy.responses import output_key
from proxy.responses_stash import StashEntry
from tests.responses_streams import FakeResponses, fc, msg, response, rs

TOOLS = [
    {"type": "function", "name": n, "parameters": {"type": "object", "properties": {}}}
    for n in ("ok", "bad")
]
BAD = {"tools": {"bad": {"allow": False}}}
ERROR = (
    '{\\"error\\":\\"tool_call_blocked\\",\\"gate\\":\\"rules\\",\\"reason\\":'
    '\\"tool_not_allowed\\",\\"message\\":\\"Policy violation: tool \'bad\' is not allowed\\"}'
)
BAD_OUTPUT = '{"type":"function_call_output","call_id":"c_bad","output":"' + ERROR + '"}'
REASONING = (
    '{"type":"reasoning","id":"rs_0001","summary":[{"type":"summary_text","text":"thinking"}]}'
)
BAD_CALL = (
    '{"type":"function_call","id":"fc_0002","call_id":"c_bad","name":"bad","arguments":"{}",'
    '"status":"completed"}'
)
NOTICE = (
    '{"id":"msg_callgate_bdf65d5e63914b8fa4b8f9137a26cb03","type":"message","status":'
    '"completed","role":"assistant","content":[{"type":"output_text","text":"\\n\\n[callgate]'
    ' blocked tool call: bad (Policy violation: tool \'bad\' is not allowed)","annotations":[],'
    '"logprobs":[]}]}'
)
# Stash values as callgate wrote them before StashEntry (captured from its runs): a partial
# block (drop+stash), a reprompt's round two, `strip` with its notice, a reprompted stream, a
# conversation's outputs.
OLD = {
    "drop": (
        '{"outputs":[' + BAD_OUTPUT + '],"groups":[{"items":[' + REASONING + "," + BAD_CALL + "]"
        ',"after":null,"before":"call:c_ok"}],"calls":["c_ok"],"hide":["id:rs_0001",'
        '"call:c_bad"]}'
    ).encode(),
    "reprompt": b'{"previous_response_id":"","input_of":"resp_rp1"}',
    "strip": (
        '{"outputs":[' + BAD_OUTPUT + '],"groups":[{"items":[' + BAD_CALL + "],"
        '"after":"id:msg_0008","before":null}],"hide":["call:c_bad"],"extra":[' + NOTICE + "]}"
    ).encode(),
    "stream": b'{"target":"resp_s2"}',
    "conversation": ('{"outputs":[' + BAD_OUTPUT + "]}").encode(),
}


@pytest.mark.parametrize("name", sorted(OLD))
def test_an_older_callgates_entry_reads_and_writes_back_byte_for_byte(name: str) -> None:
    raw = OLD[name]
    entry = StashEntry.from_json(orjson.loads(raw))
    assert entry is not None
    assert orjson.dumps(entry.to_json()) == raw


def test_an_older_entry_reads_as_typed_fields() -> None:
    drop = StashEntry.from_json(orjson.loads(OLD["drop"]))
    assert drop is not None
    assert drop.calls == ["c_ok"] and drop.hide == ["id:rs_0001", "call:c_bad"]
    assert [output_key(o) for o in drop.outputs] == ["call:c_bad"]
    assert [(g["after"], g["before"], len(g["items"])) for g in drop.groups] == [
        (None, "call:c_ok", 2)
    ]
    assert drop.target is None and drop.previous_response_id is None and drop.input_of is None
    again = StashEntry.from_json(orjson.loads(OLD["reprompt"]))
    assert again is not None
    assert again.previous_response_id == "" and again.input_of == "resp_rp1"  # "" means null
    assert again.outputs == [] and again.groups == []


def test_the_empty_entry_is_not_stored() -> None:
    assert StashEntry().to_json() == {}
    assert StashEntry().empty() and not StashEntry(previous_response_id="").empty()
    assert StashEntry.from_json({}) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ([1, 2], None),
        ("outputs", None),
        ({"outputs": "x", "groups": 7, "calls": "c", "target": 5}, None),
        ({"outputs": [{"type": "function_call_output"}, 3, {"call_id": "c"}]}, None),
        ({"target": "", "input_of": "", "previous_response_id": None}, None),
        (
            {"calls": [1, "a", None], "hide": [{"x": 1}, "call:b"]},
            {"calls": ["a"], "hide": ["call:b"]},
        ),
        ({"previous_response_id": "", "unknown": [1]}, {"previous_response_id": ""}),
        (
            {"groups": [5, {"items": "x"}, {"items": [1]}, {"items": [1, {"a": 1}], "after": 3}]},
            {"groups": [{"items": [{"a": 1}], "after": None, "before": None}]},
        ),
        ({"prefix": [1, {"id": "m"}], "extra": ["x"]}, {"prefix": [{"id": "m"}]}),
    ],
)
def test_a_damaged_or_foreign_value_reads_cleaned_or_as_none(value: Any, expected: Any) -> None:
    entry = StashEntry.from_json(value)
    assert (entry.to_json() if entry is not None else None) == expected


def _legacy_clean_entry(value: Any) -> dict[str, Any] | None:
    """The reader callgate had before StashEntry (responses.clean_entry), as the oracle."""
    if not isinstance(value, dict):
        return None
    out: dict[str, Any] = {}
    outputs = value.get("outputs")
    if isinstance(outputs, list):
        out["outputs"] = [o for o in outputs if output_key(o)]
    groups = value.get("groups")
    if isinstance(groups, list):
        out["groups"] = [
            {
                "items": [i for i in g["items"] if isinstance(i, dict)],
                "after": g.get("after") if isinstance(g.get("after"), str) else None,
                "before": g.get("before") if isinstance(g.get("before"), str) else None,
            }
            for g in groups
            if isinstance(g, dict)
            and isinstance(g.get("items"), list)
            and any(isinstance(i, dict) for i in g["items"])
        ]
    for name in ("calls", "hide"):
        items = value.get(name)
        if isinstance(items, list):
            out[name] = [i for i in items if isinstance(i, str)]
    for name in ("prefix", "extra"):
        if isinstance(value.get(name), list):
            out[name] = [i for i in value[name] if isinstance(i, dict)]
    for name in ("target", "input_of"):
        if isinstance(value.get(name), str) and value[name]:
            out[name] = value[name]
    if isinstance(value.get("previous_response_id"), str):
        out["previous_response_id"] = value["previous_response_id"]
    out = {k: v for k, v in out.items() if v != []}
    return out or None


def _junk(rnd: random.Random, depth: int = 0) -> Any:
    """A random JSON-like value biased towards the entry's own field names and shapes."""
    names = [
        "outputs",
        "groups",
        "calls",
        "hide",
        "target",
        "prefix",
        "extra",
        "items",
        "after",
        "before",
        "previous_response_id",
        "input_of",
        "type",
        "call_id",
        "x",
    ]
    leaves = [None, True, 0, 7, "", "call:a", "id:b", "function_call_output", "resp_1"]
    kind = rnd.randrange(4 if depth < 4 else 1)
    if kind == 0:
        return rnd.choice(leaves)
    if kind == 1:
        return [_junk(rnd, depth + 1) for _ in range(rnd.randrange(4))]
    value = {rnd.choice(names): _junk(rnd, depth + 1) for _ in range(rnd.randrange(6))}
    if rnd.random() < 0.3:
        value["type"] = "function_call_output"
        value["call_id"] = rnd.choice(["c1", 5, None])
    return value


def test_reads_as_the_older_reader_did_on_random_values() -> None:
    rnd = random.Random(12)
    for _ in range(3000):
        value = _junk(rnd)
        if rnd.random() < 0.5:
            value = {
                "outputs": _junk(rnd),
                "groups": [_junk(rnd), {"items": _junk(rnd)}],
                **(value if isinstance(value, dict) else {}),
            }
        entry = StashEntry.from_json(value)
        assert (entry.to_json() if entry is not None else None) == _legacy_clean_entry(value)


# -- through the proxy: the route writes the stored form, and reads an older one ------------


async def test_the_route_stores_the_older_form(make_proxy, upstream):
    proxy = await make_proxy(BAD)
    api = FakeResponses()
    first = response(rs(), fc("bad", {}, "c_bad"), fc("ok", {}, "c_ok"))
    upstream.push(api.reply(first))
    r1 = await proxy.client().responses.create(model="m", input="hi", tools=TOOLS)
    [raw] = await proxy.state.store.get_stash_many([stash.responses_key(r1.id)])
    reasoning, call = first["output"][0], first["output"][1]
    error = orjson.loads(orjson.loads(OLD["conversation"])["outputs"][0]["output"])
    value = orjson.loads(raw)
    assert list(value) == ["outputs", "groups", "calls", "hide"]
    assert orjson.loads(value["outputs"][0]["output"]) == error
    assert value["groups"] == [{"items": [reasoning, call], "after": None, "before": "call:c_ok"}]
    assert value["calls"] == ["c_ok"]
    assert value["hide"] == [f"id:{reasoning['id']}", "call:c_bad"]


async def test_an_older_entry_in_the_store_completes_the_next_turn(make_proxy, upstream):
    proxy = await make_proxy(BAD)
    api = FakeResponses()
    # The upstream holds a response with both calls; the stash holds what an older callgate
    # stored for it (the client saw only c_ok).
    held = response(
        {**orjson.loads(REASONING)},
        {**orjson.loads(BAD_CALL)},
        fc("ok", {}, "c_ok"),
        rid="resp_old",
    )
    api.stored["resp_old"] = held
    api.inputs["resp_old"] = []
    await proxy.state.store.put_stash(stash.responses_key("resp_old"), OLD["drop"], 60)
    upstream.push(api.get)
    client = proxy.client()
    seen = await client.responses.retrieve("resp_old")
    assert [o.type for o in seen.output] == ["function_call"] and seen.output[0].call_id == "c_ok"
    upstream.push(api.reply(response(msg("done"))))
    r2 = await client.responses.create(
        model="m",
        previous_response_id="resp_old",
        input=[{"type": "function_call_output", "call_id": "c_ok", "output": "1"}],
    )
    assert r2.output_text == "done"
    sent = upstream.bodies("/v1/responses")[-1]["input"]
    assert [i["call_id"] for i in sent] == ["c_bad", "c_ok"]  # the older entry's output first


async def test_an_older_reprompt_entry_shows_the_clients_view(make_proxy, upstream):
    proxy = await make_proxy(BAD)
    api = FakeResponses()
    api.stored["resp_s2"] = response(msg("Sorry."), rid="resp_s2", previous_response_id="resp_s1")
    await proxy.state.store.put_stash(stash.responses_key("resp_s1"), OLD["stream"], 60)
    upstream.push(api.get)
    seen = await proxy.client().responses.retrieve("resp_s1")
    assert seen.id == "resp_s1" and seen.output_text == "Sorry."
    assert upstream.received[-1].path == "/v1/responses/resp_s2"  # the entry's target
