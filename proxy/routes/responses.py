"""`/v1/responses`: gated like Chat Completions.

- `POST /v1/responses`: request-side tool filtering (server-side tools a policy denies) and
  completion of the conversation (error outputs of earlier blocked calls), forward, gate every
  call the client runs (`function_call`, `custom_tool_call`, `shell_call`, `local_shell_call`,
  `apply_patch_call` items), rewrite (streaming: proxy.responses_gate, run by proxy.stream_loop).
- `GET /v1/responses/{id}` and `GET /v1/responses/{id}/input_items`: the client's view of a
  stored response, without the calls callgate blocked or the items it added.
- Everything else under /v1/responses/* is forwarded verbatim by the catch-all pass-through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from aiohttp import web

from proxy import reprompt, responses, stash
from proxy.delivery import deliver
from proxy.errors import bad_gateway, bad_request, error_response
from proxy.forward import fetch, json_reply, parse_reply, raw_reply, serve_stream
from proxy.gates import decide, decide_many, release
from proxy.gates.decision import Block, Decision
from proxy.policy import Policy
from proxy.request_shape import responses_problem
from proxy.responses_gate import ResponsesGate
from proxy.responses_items import MAX_APPROVAL_ROUNDS, approval_calls
from proxy.responses_stash import StashEntry, add_outputs, entry_puts, reinsert
from proxy.rounds import Plan, asked_again, plan_round, record_round, refuse
from proxy.routes.incoming import BadRequest, call_context, read_json
from proxy.routes.passthrough import forward
from proxy.state import STATE, AppState
from proxy.stream_loop import StreamLoop
from proxy.toolcalls import CallContext
from proxy.transport import upstream_failure, upstream_path
from proxy.upstream import UpstreamError, UpstreamReply
from proxy.usage import add_usage

log = structlog.get_logger("callgate.responses")


async def decide_approvals(
    state: AppState, policy: Policy, ctx: CallContext, items: list[dict[str, Any]]
) -> list[Decision]:
    """Run the gates on the calls MCP approval requests ask for, in order
    (proxy.responses_items.approval_calls)."""
    decisions = []
    for call in approval_calls(policy, items):
        decisions.append(await decide(call, policy, state.store, ctx))
    return decisions


async def save_entry(
    state: AppState,
    policy: Policy,
    principal: str,
    response_id: str,
    entry: StashEntry,
    body: dict[str, Any],
) -> None:
    """Stash a response's entry (proxy.responses_stash.entry_puts)."""
    ttl = policy.config.server.stash_ttl
    for keys, value in entry_puts(principal, response_id, entry, body):
        await stash.put(state.store, keys, value, ttl)


ROUTE = "responses"


def add_routes(router: web.UrlDispatcher) -> None:
    """Register the Responses API routes; called before the catch-all pass-through."""
    router.add_post("/v1/responses", create_response)
    router.add_get("/v1/responses/{id}", get_response, allow_head=False)
    router.add_get("/v1/responses/{id}/input_items", get_input_items, allow_head=False)


# -- request side -------------------------------------------------------------------------


def filter_tools(policy: Policy, body: dict[str, Any]) -> bool:
    """Remove tools the policy denies: server-side ones always (they run at the upstream, where
    callgate cannot stop a call), function/custom ones when `server.hide_denied_tools` is set."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return False
    hide_client = policy.config.server.hide_denied_tools
    removed = []
    for tool in tools:
        keys = responses.tool_keys(tool)
        if not keys:
            continue
        if tool.get("type", "function") in responses.CLIENT_TOOL_TYPES:
            if hide_client and not policy.for_tool(keys[0]).allow:
                removed.append(tool)
            continue
        known = next((policy.tools[k] for k in keys if k in policy.tools), policy.default)
        if not known.allow:
            removed.append(tool)
    if removed:
        log.info("tools_removed", tools=[responses.tool_keys(t)[0] for t in removed])
        responses.remove_tools(body, removed)
    return bool(removed)


async def prepare_request(
    state: AppState, body: dict[str, Any], principal: str
) -> tuple[bool, list[str]]:
    """Complete the conversation the client sends, in place: error outputs for the blocked calls
    of the response it continues, blocked calls put back into a full input. Returns (changed,
    keys of the input items callgate added: the client must not see them read back)."""
    prev = body.get("previous_response_id")
    prev = prev if isinstance(prev, str) else None
    conversation = responses.conversation_id(body)
    raw_input = body.get("input")
    call_ids = responses.input_call_ids(raw_input) if isinstance(raw_input, list) else []
    # The conversation's entry, then the previous response's: the outputs the turn must carry.
    heads = [responses.conversation_key(conversation)] if conversation else []
    heads += [stash.responses_key(prev)] if prev is not None else []
    keys = heads + [responses.call_key(principal, c) for c in call_ids]
    found = [StashEntry.from_json(e) for e in await stash.get_many(state.store, keys)]
    carried, by_call = found[: len(heads)], found[len(heads) :]
    items = responses.as_input_list(raw_input)
    inserted: list[str] = []
    for entry in carried:
        if entry is not None:
            inserted += add_outputs(items, entry.outputs)
    changed = False
    target = carried[-1].target if prev is not None and carried[-1] is not None else None
    if target:
        # The client saw a reprompted stream under the first round's id; continue the last.
        body["previous_response_id"] = target
        changed = True
    # The same entry is stored under each surviving call of its response: use it once.
    unique = {orjson.dumps(e.to_json()): e for e in by_call if e and e.groups}
    inserted += reinsert(items, list(unique.values()))
    if responses.strip_notice_ids(items) or inserted:
        body["input"] = items
        changed = True
    return changed, inserted


async def create_response(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    policy = state.policy  # this request keeps the policy it started with
    try:
        raw, body = await read_json(request, responses_problem)
    except BadRequest as exc:
        return exc.response
    ctx = call_context(request, body, policy, ROUTE)
    policy = policy.effective(ctx)  # its identity's group and principal overlays, if any
    changed = filter_tools(policy, body)
    gated = responses.gated_mcp_servers(policy, body)
    if body.get("background") is True and (gated or responses.has_client_tools(body)):
        # The calls of a background response are read later (GET, or a resumed stream) with no
        # chance to rewrite or answer them first: refuse rather than let them through ungated.
        return bad_request(
            "callgate cannot gate the tool calls of a background response; send this request "
            "without `background` (or without client-run tools - function, custom, shell, "
            "local_shell, apply_patch - and gated MCP servers).",
            "background",
        )
    prev = body.get("previous_response_id")
    client_prev = prev if isinstance(prev, str) else None
    completed, inserted = await prepare_request(state, body, ctx.principal)
    if changed or gated or completed:
        raw = orjson.dumps(body)
    if body.get("stream") is True:
        return await _gate_stream(request, state, policy, body, raw, ctx, inserted, gated)
    answer = await _gate_response(
        request, state, policy, body, raw, ctx, inserted, client_prev, gated
    )
    return await deliver(state, ctx, answer)


# -- non-streaming ------------------------------------------------------------------------


@dataclass(slots=True)
class _Round:
    """One round's answer and its decisions, as far as its settling needs them."""

    reply: UpstreamReply
    data: dict[str, Any]
    body: dict[str, Any]  # the request it answers
    decisions: list[Decision]
    approvals: list[Decision]
    number: int  # 0 for the client's own request


async def _gate_response(
    request: web.Request,
    state: AppState,
    policy: Policy,
    body: dict[str, Any],
    payload: bytes,
    ctx: CallContext,
    inserted: list[str],
    client_prev: str | None,
    gated: set[str],
) -> web.StreamResponse:
    path = upstream_path(request)
    rounds = reprompts = approval_rounds = 0
    usage: dict[str, Any] | None = None
    first_id: str | None = None
    # The round a pending reprompt was asked about, and its blocked calls: what `strip`
    # answers if the next round fails upstream.
    last: tuple[_Round, list[Decision]] | None = None

    async def settle(r: _Round, p: Plan) -> web.StreamResponse:
        return await _settle(state, policy, ctx, r, p, inserted, client_prev, usage, first_id)

    try:
        while True:
            try:
                reply, data = await _fetch_round(state, request, path, payload, policy)
            except _RoundFailed as failed:
                if last is None:
                    return failed.answer
                prev, blocked = last
                last = None
                reprompt.failed(state, ctx, ROUTE, blocked, failed.label)
                return await settle(prev, Plan("strip", [], blocked))
            if last is not None:
                reprompt.asked(state, ctx, last[1])
                last = None
            if rounds:
                usage = add_usage(usage, data.get("usage"))
            output: list[Any] = data.get("output") or []
            # Together, in order: parallel calls to one tool take slots first-come, and the
            # response's reservations cost one store round trip.
            calls = responses.calls_of(output)
            decisions = await decide_many(calls, policy, state.store, ctx)
            approvals = await decide_approvals(
                state, policy, ctx, responses.approvals_of(output, gated)
            )
            this = _Round(reply, data, body, decisions, approvals, rounds)
            audited = False
            try:
                p = plan_round(decisions, reprompts < policy.config.max_reprompts, approvals)
                if not _asks_again(this, p, approval_rounds):
                    return await settle(this, p)
                answers = [responses.approval_response(d) for d in approvals]
                if not rounds:
                    usage = add_usage(None, data.get("usage"))
                    first_id = data.get("id") if isinstance(data.get("id"), str) else None
                body = _next_body(policy, body, data, p, answers)
                payload = orjson.dumps(body)
                audited = True
                # A reprompt's blocked calls are recorded once the next round answers, or fails.
                record_round(state, ctx, p, decisions, approvals)
                if p.action == "reprompt":
                    last = (this, p.blocked)
                    reprompts += 1
                    asked_again(state, ROUTE, rounds + 1, len(p.blocked), approvals=len(answers))
                else:
                    approval_rounds += 1
                    log.info("approval_round", round=rounds + 1, approvals=len(answers))
                rounds += 1
            except Exception as exc:
                if audited or any(d.recorded for d in [*decisions, *approvals]):
                    raise  # settled and on record: not a round to fail closed
                return await _fail_round(state, ctx, [*decisions, *approvals], exc)
    finally:
        if last is not None:  # asked, and the request ended (cancelled) before the answer
            reprompt.asked(state, ctx, last[1])


def _asks_again(r: _Round, p: Plan, approval_rounds: int) -> bool:
    """Another round follows: a reprompt, or one that only answers MCP approval requests."""
    if p.action == "error":
        return False
    if p.action == "reprompt":
        return True
    return bool(r.approvals) and not r.decisions and approval_rounds < MAX_APPROVAL_ROUNDS


def _next_body(
    policy: Policy, body: dict[str, Any], data: dict[str, Any], p: Plan, answers: list[Any]
) -> dict[str, Any]:
    """The next round's request: this round's output, each blocked call's error output and
    the approval answers; a reprompt relaxes `tool_choice` off the blocked tools."""
    outputs = [responses.error_output(d) for d in p.blocked] + answers
    body = responses.next_round_body(body, data, outputs)
    if p.action == "reprompt":
        names = {d.call.name for d in p.blocked}
        body.update(responses.relaxed_tool_choice(body, names, reprompt.denied(policy)))
    return body


class _RoundFailed(Exception):
    """A round the upstream did not answer with a response callgate can gate."""

    def __init__(self, answer: web.Response, label: str) -> None:
        super().__init__(label)
        self.answer = answer  # the client's answer, when no earlier round can stand in
        self.label = label  # how it failed, for a pending reprompt's record


async def _fetch_round(
    state: AppState, request: web.Request, path: str, payload: bytes, policy: Policy
) -> tuple[UpstreamReply, dict[str, Any]]:
    """A round's answer and its JSON; raises _RoundFailed."""
    try:
        reply = await fetch(state, request, "POST", path, payload, policy.config.upstream)
    except UpstreamError as exc:  # callgate's own 504 (timeout) or 502
        label = "timeout" if exc.status == 504 else "unreachable"
        raise _RoundFailed(upstream_failure(exc), label) from None
    if reply.status != 200:
        # Upstream errors reach the client unchanged.
        raise _RoundFailed(raw_reply(reply), str(reply.status))
    data = parse_reply(reply)
    if isinstance(data, web.Response):
        raise _RoundFailed(data, "malformed")
    problem = responses.malformed_output(data.get("output"))
    if problem is not None:
        log.error("upstream_malformed_output", error=problem)
        answer = bad_gateway(
            f"The upstream returned a response callgate cannot gate: {problem}",
            "upstream_malformed",
        )
        raise _RoundFailed(answer, "malformed")
    return reply, data


async def _settle(
    state: AppState,
    policy: Policy,
    ctx: CallContext,
    r: _Round,
    p: Plan,
    inserted: list[str],
    client_prev: str | None,
    usage: dict[str, Any] | None,
    first_id: str | None,
) -> web.StreamResponse:
    """The client's answer from round `r`, whose calls were decided as `p` says."""
    reply, data, body, decisions, approvals = r.reply, r.data, r.body, r.decisions, r.approvals
    output: list[Any] = data.get("output") or []
    if p.action == "error":
        record_round(state, ctx, p, decisions, approvals)
        refusal = await refuse(state, p, approvals)
        return error_response(refusal.status, refusal.message, refusal.type, refusal.code)
    answers = [responses.approval_response(d) for d in approvals]
    hide = list(inserted)
    extra: dict[str, Any] = {}
    changed = bool(r.number)
    if p.blocked or approvals:
        changed = True
        kept, groups, removed = responses.split_output(
            output,
            responses.positions_of(output, p.blocked),
            {d.call.id for d in approvals},
        )
        if p.action == "strip":
            text = responses.notice_text(p.blocked, responses.has_text(kept))
            note = responses.notice_item(text)
            kept.append(note)
            extra["extra"] = [note]
        data["output"] = kept
        if "output_text" in data:
            data["output_text"] = responses.output_text(kept)
        hide += removed
        extra.update(
            outputs=[responses.error_output(d) for d in p.blocked] + answers,
            groups=groups,
            calls=[d.call.id for d in p.allowed],
        )
    if r.number:
        data["usage"] = usage
        if "previous_response_id" in data:
            data["previous_response_id"] = client_prev
        if responses.stored(body, data):
            extra["previous_response_id"] = client_prev or ""  # "" stands for null
        if first_id and responses.stored(body, data) and body.get("conversation") is None:
            extra["input_of"] = first_id  # the client's own input went with round one
    out = raw_reply(reply) if not changed else json_reply(reply, data)  # unchanged: as sent
    record_round(state, ctx, p, decisions, approvals)
    rid = data.get("id")
    if isinstance(rid, str):
        await save_entry(state, policy, ctx.principal, rid, StashEntry(hide=hide, **extra), body)
    return out


async def _fail_round(
    state: AppState, ctx: CallContext, decided: list[Decision], exc: Exception
) -> web.Response:
    """A round callgate could not finish: nothing reaches the client, every call is recorded
    as blocked and its slot given back (fail closed), and the client gets a 502."""
    log.error("responses_gate_error", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
    message = f"callgate could not process the upstream's response ({type(exc).__name__})"
    await release(state.store, [d for d in decided if d.allowed])
    for d in decided:
        if d.allowed:
            d.block = Block("callgate", "internal_error", message)
        state.auditor.record(d, ctx, "blocked", "fail_closed")
    return bad_gateway(message + "; see its log", "internal_error")


# -- streaming ----------------------------------------------------------------------------


async def _gate_stream(
    request: web.Request,
    state: AppState,
    policy: Policy,
    body: dict[str, Any],
    payload: bytes,
    ctx: CallContext,
    inserted: list[str],
    gated: set[str],
) -> web.StreamResponse:
    return await serve_stream(
        request,
        state,
        ctx,
        payload,
        policy.config.upstream,
        lambda out: StreamLoop(
            request, out, state, policy, ctx, ResponsesGate(policy, body, ctx, inserted, gated)
        ),
    )


# -- reading stored responses back --------------------------------------------------------


async def _lookup(state: AppState, response_id: str) -> StashEntry | None:
    found = await stash.get_many(state.store, [stash.responses_key(response_id)])
    return StashEntry.from_json(found[0]) if found else None


async def _get(
    state: AppState, request: web.Request, path_qs: str
) -> tuple[UpstreamReply, dict[str, Any]] | web.StreamResponse:
    """A stored response (or its input items) and its JSON, or the client's answer when the
    upstream has none to give."""
    try:
        reply = await fetch(state, request, "GET", path_qs, None, state.policy.config.upstream)
    except UpstreamError as exc:
        return upstream_failure(exc)
    if reply.status != 200:
        return raw_reply(reply)
    data = parse_reply(reply)
    return data if isinstance(data, web.Response) else (reply, data)


def _with_query(request: web.Request, path: str) -> str:
    qs = request.rel_url.raw_query_string
    return f"{path}?{qs}" if qs else path


async def get_response(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    rid = request.match_info["id"]
    e = await _lookup(state, rid)
    if not e or request.query.get("stream") == "true":
        return await forward(request)  # nothing of ours in it: verbatim
    target = e.target or rid
    got = await _get(state, request, _with_query(request, "/responses/" + target))
    if isinstance(got, web.StreamResponse):
        return got
    reply, data = got
    found = data.get("output")
    output: list[Any] = found if isinstance(found, list) else []
    output = [*e.prefix, *responses.visible(output, set(e.hide)), *e.extra]
    data["output"] = output
    if "output_text" in data:
        data["output_text"] = responses.output_text(output)
    data["id"] = rid
    if e.previous_response_id is not None:
        data["previous_response_id"] = e.previous_response_id or None
    return json_reply(reply, data)


async def get_input_items(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    rid = request.match_info["id"]
    e = await _lookup(state, rid)
    if not e:
        return await forward(request)
    source = e.input_of or rid
    got = await _get(state, request, _with_query(request, f"/responses/{source}/input_items"))
    if isinstance(got, web.StreamResponse):
        return got
    reply, data = got
    items = data.get("data")
    if isinstance(items, list):
        shown = responses.visible(items, set(e.hide))
        data["data"] = shown
        if "first_id" in data:
            data["first_id"] = _item_id(shown[0]) if shown else None
        if "last_id" in data:
            data["last_id"] = _item_id(shown[-1]) if shown else None
    return json_reply(reply, data)


def _item_id(item: Any) -> Any:
    return item.get("id") if isinstance(item, dict) else None
