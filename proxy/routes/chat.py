"""`POST /v1/chat/completions`: re-insert stashed calls, forward, gate the answer, rewrite."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from aiohttp import web

from proxy import chat, reprompt, stash
from proxy.chat_gate import ChatGate
from proxy.delivery import deliver
from proxy.errors import error_response
from proxy.forward import fetch, json_reply, parse_reply, raw_reply, serve_stream
from proxy.gates import decide_many
from proxy.gates.decision import Decision
from proxy.policy import Policy
from proxy.request_shape import chat_problem
from proxy.rounds import Plan, asked_again, refuse, settle
from proxy.routes.incoming import BadRequest, call_context, read_json
from proxy.state import STATE, AppState
from proxy.stream_loop import StreamLoop
from proxy.toolcalls import CallContext
from proxy.transport import upstream_failure, upstream_path
from proxy.upstream import UpstreamError, UpstreamReply
from proxy.usage import add_usage

log = structlog.get_logger("callgate.chat")
ROUTE = "chat.completions"


async def prepare_request(
    state: AppState, policy: Policy, body: dict[str, Any], principal: str
) -> bool:
    """Request-side changes; True when the body must be re-serialized."""
    changed = False
    if policy.config.server.hide_denied_tools and isinstance(body.get("tools"), list):
        names = {chat.tool_name(t) for t in body["tools"]}
        hidden = {n for n in names if n and chat.never_allowed(policy.for_tool(n))}
        changed |= chat.hide_tools(body, hidden)
    messages = body.get("messages")
    if isinstance(messages, list):
        ids = chat.visible_call_ids(messages)
        if ids:
            keys = [stash.chat_key(principal, i) for i in ids]
            found = await stash.get_many(state.store, keys)
            stashes = {i: s for i, s in zip(ids, found, strict=True) if s is not None}
            if stashes:
                changed |= chat.reinsert_stashed(messages, stashes)
    return changed


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    policy = state.policy  # this request keeps the policy it started with
    try:
        raw, body = await read_json(request, chat_problem)
    except BadRequest as exc:
        return exc.response
    ctx = call_context(request, body, policy, ROUTE)
    policy = policy.effective(ctx)  # its identity's group and principal overlays, if any
    if await prepare_request(state, policy, body, ctx.principal):
        raw = orjson.dumps(body)
    if body.get("stream") is True:
        return await _gate_stream(request, state, policy, body, raw, ctx)
    return await deliver(
        state, ctx, await _gate_completion(request, state, policy, body, raw, ctx)
    )


async def _gate_stream(
    request: web.Request,
    state: AppState,
    policy: Policy,
    body: dict[str, Any],
    payload: bytes,
    ctx: CallContext,
) -> web.StreamResponse:
    return await serve_stream(
        request,
        state,
        ctx,
        payload,
        policy.config.upstream,
        lambda out: StreamLoop(request, out, state, policy, ctx, ChatGate(policy, body, ctx)),
    )


@dataclass(slots=True)
class _Reprompted:
    """A round callgate asked the upstream again about: what `strip` answers for it when the
    next round fails upstream."""

    reply: UpstreamReply
    data: dict[str, Any]
    choice: dict[str, Any]
    blocked: list[Decision]
    round: int


def _strip_answer(
    state: AppState, ctx: CallContext, last: _Reprompted, usage: Any, status: str
) -> web.Response:
    """The reprompt round failed upstream (`status`): the answer `strip` would have given for
    the round before it, with that round's status (200) and headers."""
    reprompt.failed(state, ctx, ROUTE, last.blocked, status)
    chat.strip_calls(last.choice, last.blocked, with_notice=True)
    if last.round:
        last.data["usage"] = usage
    return json_reply(last.reply, last.data)


async def _gate_completion(
    request: web.Request,
    state: AppState,
    policy: Policy,
    body: dict[str, Any],
    payload: bytes,
    ctx: CallContext,
) -> web.StreamResponse:
    path = upstream_path(request)
    rounds = 0
    usage: dict[str, Any] | None = None
    last: _Reprompted | None = None  # the round a pending reprompt was asked about
    try:
        while True:
            try:
                reply = await fetch(state, request, "POST", path, payload, policy.config.upstream)
            except UpstreamError as exc:
                if last is not None:  # callgate's own 504 (timeout) or 502 (unreachable)
                    status = "timeout" if exc.status == 504 else "unreachable"
                    return _strip_answer(state, ctx, last, usage, status)
                return upstream_failure(exc)  # not reached: an error in OpenAI's shape
            if reply.status != 200:
                if last is not None:
                    return _strip_answer(state, ctx, last, usage, str(reply.status))
                return raw_reply(reply)  # upstream errors reach the client unchanged
            data = parse_reply(reply)
            if last is not None and (
                isinstance(data, web.Response) or not isinstance(data.get("choices"), list)
            ):
                return _strip_answer(state, ctx, last, usage, "malformed")
            if isinstance(data, web.Response):
                return data
            if last is not None:
                reprompt.asked(state, ctx, last.blocked)
                last = None
            if rounds:
                usage = add_usage(usage, data.get("usage"))
            answer = await _gate_round(
                request, state, policy, body, reply, data, ctx, rounds, usage
            )
            if isinstance(answer, web.StreamResponse):
                return answer
            if not rounds:
                usage = add_usage(None, data.get("usage"))
            last, body = answer
            payload = orjson.dumps(body)
            rounds += 1
            asked_again(state, ROUTE, rounds, len(last.blocked))
    finally:
        if last is not None:  # asked, and the request ended (cancelled) before the answer
            reprompt.asked(state, ctx, last.blocked)


async def _gate_round(
    request: web.Request,
    state: AppState,
    policy: Policy,
    body: dict[str, Any],
    reply: UpstreamReply,
    data: dict[str, Any],
    ctx: CallContext,
    rounds: int,
    usage: dict[str, Any] | None,
) -> web.StreamResponse | tuple[_Reprompted, dict[str, Any]]:
    """Gate one round's answer: the client's answer, or (the round, the body of the next
    round) when the model is asked again."""
    choices = data.get("choices")
    if not isinstance(choices, list):
        choices = []
    per_choice = await _decide_choices(state, policy, ctx, choices)
    decisions = [d for _, ds in per_choice for d in ds]
    if not decisions:
        return _unchanged(reply, data, rounds, usage)

    p = settle(state, ctx, decisions, rounds < policy.config.max_reprompts and len(choices) == 1)
    if p.action == "pass":
        return _unchanged(reply, data, rounds, usage)
    if p.action == "error":
        refusal = await refuse(state, p)
        return error_response(refusal.status, refusal.message, refusal.type, refusal.code)
    if p.action == "reprompt":
        # Recorded once the next round is answered (reprompt.asked / reprompt.failed).
        choice = per_choice[0][0]
        last = _Reprompted(reply, data, choice, p.blocked, rounds)
        return last, _reprompt_body(policy, body, choice["message"], p)
    for choice, ds in per_choice:
        await _strip_choice(state, policy, ctx, choice, ds, with_notice=p.action == "strip")
    if rounds:
        data["usage"] = usage
    return json_reply(reply, data)


async def _decide_choices(
    state: AppState, policy: Policy, ctx: CallContext, choices: list[Any]
) -> list[tuple[dict[str, Any], list[Decision]]]:
    """Each choice with a message, and the decisions on its calls."""
    per_choice: list[tuple[dict[str, Any], list[Decision]]] = []
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        # Together, in order: parallel calls to one tool take slots first-come, and the
        # response's reservations cost one store round trip.
        ds = await decide_many(chat.calls_of(message), policy, state.store, ctx)
        per_choice.append((choice, ds))
    return per_choice


def _unchanged(
    reply: UpstreamReply, data: dict[str, Any], rounds: int, usage: dict[str, Any] | None
) -> web.Response:
    """A round with nothing to rewrite: byte for byte what the upstream sent, unless earlier
    rounds' usage is summed in."""
    if not rounds:
        return raw_reply(reply)
    data["usage"] = usage
    return json_reply(reply, data)


def _reprompt_body(
    policy: Policy, body: dict[str, Any], message: dict[str, Any], p: Plan
) -> dict[str, Any]:
    """The next round's body: the model's turn, then each blocked call's result."""
    messages = list(body.get("messages") or [])
    messages.append(
        chat.assistant_turn(
            message.get("content"), message.get("tool_calls"), message.get("function_call")
        )
    )
    messages.extend(chat.tool_result_messages(p.blocked))
    names = {d.call.name for d in p.blocked}
    relaxed = chat.relaxed_tool_choice(body, names, reprompt.denied(policy))
    return {**body, "messages": messages, **relaxed}


async def _strip_choice(
    state: AppState,
    policy: Policy,
    ctx: CallContext,
    choice: dict[str, Any],
    ds: list[Decision],
    with_notice: bool,
) -> None:
    """Remove a choice's blocked calls; stash them under its surviving calls."""
    blocked = [d for d in ds if not d.allowed]
    if not blocked:
        return
    removed = chat.strip_calls(choice, blocked, with_notice=with_notice)
    kept = [d.call.id for d in ds if d.allowed and d.call.id not in ("", chat.LEGACY_ID)]
    if kept and removed:
        await stash.put(
            state.store,
            [stash.chat_key(ctx.principal, i) for i in kept],
            {
                "calls": [chat.wire_call(raw) for raw, _ in removed],
                "results": chat.tool_result_messages([d for _, d in removed]),
            },
            policy.config.server.stash_ttl,
        )
