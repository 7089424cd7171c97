"""No spelling of a request path reaches the upstream's gated endpoints ungated (issue 19, 1).

The fake upstream here is as lenient as real servers and front proxies get: it decodes escapes
(three times over), treats backslashes as slashes, strips `;params`, `.json` suffixes and
trailing dots and spaces, folds case and Unicode compatibility forms, resolves dot segments,
honours method-override headers and `_method`, and routes on X-Original-URL. Whatever it
resolves to POST .../chat/completions or .../responses it answers with a tool call the policy
denies, carrying a marker. Every request is sent over a raw socket (aiohttp's client would
normalize some request lines), and for each the test asserts one of:

- gated: callgate's 403 `tool_call_blocked`, and the upstream got the canonical gated path;
- refused: an OpenAI-shaped 400/404 (`invalid_path`), and the upstream got nothing;
- forwarded: a canonical path, relayed as sent;

and always that the marker never reached the client and that every path the upstream received
is canonical. proxy.paths is also tested directly, including a bounded random search.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, unquote_plus

import pytest
from aiohttp import web

from proxy.paths import (
    PathRefused,
    Target,
    canonical_path,
    check_target,
    gated_alias,
    override_problem,
    split_target,
)
from tests.conftest import completion
from tests.responses_streams import fc, response

MARKER = "MARKER-7f3a9c"
POLICY = {"on_block": "error", "tools": {"delete_file": {"allow": False}}}
BODY = json.dumps(
    {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "input": "hi"}
).encode()
OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")


# -- a lenient upstream ---------------------------------------------------------------------


def lenient_route(method: str, target: str, headers: dict[str, str]) -> tuple[str, str]:
    """(method, path) as the most lenient server we can think of would route the request."""
    low = {k.lower(): v for k, v in headers.items()}
    if "x-original-url" in low or "x-rewrite-url" in low:
        target = low.get("x-original-url") or low["x-rewrite-url"]
    for name in (*OVERRIDE_HEADERS, "x-original-method"):
        if name in low:
            method = low[name]
    if "://" in target.split("?", 1)[0]:
        rest = target.split("://", 1)[1]
        target = rest[rest.find("/") :] if "/" in rest else "/"
    raw_query = target.partition("?")[2]
    for pair in raw_query.split("&"):
        key, _, value = pair.partition("=")
        if unquote_plus(key).lower() == "_method":
            method = unquote_plus(value)
    for _ in range(3):  # servers (or chains of them) that decode more than once
        target = unquote(target, errors="strict")
    target = target.split("#", 1)[0].split("?", 1)[0]
    target = unicodedata.normalize("NFKC", target).replace("\\", "/")
    stack: list[str] = []
    for seg in target.split("/"):
        seg = seg.split(";", 1)[0].strip()
        if seg and set(seg) == {"."}:
            seg = "." if seg == "." else ".."  # "..." trimmed to ".." as some servers do
        else:
            seg = seg.rstrip(". ").lower().split(".", 1)[0]
        if seg in ("", "."):
            continue
        if seg == "..":
            if stack:
                stack.pop()
            continue
        stack.append(seg)
    return method.upper(), "/" + "/".join(stack)


def upstream_gated(method: str, path: str) -> str | None:
    if method != "POST":
        return None
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/responses"):
        return "responses"
    return None


@dataclass
class Got:
    method: str
    target: str
    headers: dict[str, str]


@dataclass
class LenientUpstream:
    url: str = ""
    got: list[Got] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.got.append(Got(request.method, request.raw_path, dict(request.headers)))
        try:
            method, path = lenient_route(request.method, request.raw_path, dict(request.headers))
        except UnicodeDecodeError:
            return web.json_response({"object": "list", "data": []})
        kind = upstream_gated(method, path)
        args = {"path": "/", "why": MARKER}
        if kind == "chat":
            return web.json_response(completion(("delete_file", args), ids=[f"call_{MARKER}"]))
        if kind == "responses":
            return web.json_response(response(fc("delete_file", args, f"call_{MARKER}")))
        return web.json_response({"object": "list", "data": []})


@pytest.fixture
async def lenient(aiohttp_server: Any) -> LenientUpstream:
    upstream = LenientUpstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    upstream.url = str(server.make_url("/v1"))
    return upstream


# -- raw HTTP/1.1 over a socket -------------------------------------------------------------


async def raw_request(
    port: int, method: str, target: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """Send the request line exactly as given; (status, decoded body)."""
    head = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    head += ["Content-Type: application/json", "Authorization: Bearer sk-test-key"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    head.append(f"Content-Length: {len(BODY)}")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("ascii") + BODY)
        data = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
    top, _, body = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    if any(line.lower() == "transfer-encoding: chunked" for line in lines[1:]):
        body = dechunk(body)
    return status, body


def dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


# A path the upstream may receive: RFC 3986 pchars without ";", escapes in upper-case hex and
# none of a delimiter or "%", no empty segment, no dot segment, no trailing slash.
_CANONICAL = re.compile(r"(?:/(?:[A-Za-z0-9._~!$&'()*+,=:@-]|%[0-9A-F]{2})+)+|/")
_DELIMS = ("%2F", "%5C", "%3F", "%23", "%3B", "%25")


def assert_canonical(target: str) -> None:
    path = target.partition("?")[0]
    assert _CANONICAL.fullmatch(path), target
    assert not any(d in path for d in _DELIMS), target
    assert path == "/" or all(seg.strip(". ") for seg in unquote(path).split("/")[1:]), target


# -- the table --------------------------------------------------------------------------------

GATED, REFUSED, FORWARDED = "gated", "refused", "forwarded"
ABS = "http://127.0.0.1"


@dataclass(frozen=True)
class Case:
    method: str
    target: str
    expect: str
    upstream_sees: str | None = None  # for GATED: the target the upstream must get
    headers: tuple[tuple[str, str], ...] = ()


def gated(target: str, sees: str, method: str = "POST") -> Case:
    return Case(method, target, GATED, sees)


def refused(target: str, method: str = "POST", **headers: str) -> Case:
    return Case(method, target, REFUSED, None, tuple(headers.items()))


def forwarded(target: str, method: str = "GET") -> Case:
    return Case(method, target, FORWARDED)


CHAT, RESP = "/v1/chat/completions", "/v1/responses"
CASES = [
    # the gated endpoints, spelt exactly: gated whatever the query or request-line form
    gated(CHAT, CHAT),
    gated(RESP, RESP),
    gated(CHAT + "?x=1", CHAT + "?x=1"),
    gated(CHAT + "?", CHAT + "?"),
    gated(CHAT + "?x=/../responses", CHAT + "?x=/../responses"),
    gated(CHAT + "?/../../models", CHAT + "?/../../models"),
    gated(RESP + "?a=%2F..%2F", RESP + "?a=%2F..%2F"),
    gated(ABS + CHAT, CHAT),
    gated("HTTP://example.com:8080" + CHAT + "?a=b", CHAT + "?a=b"),
    gated("https://127.0.0.1" + RESP, RESP),
    gated(ABS + RESP + "?x=../chat/completions", RESP + "?x=../chat/completions"),
    # the list
    refused("/v1/x/../chat/completions"),
    refused("/v1//chat/completions"),
    refused("/v1/chat/completions/"),
    refused("/v1/chat%2Fcompletions"),
    refused("/v1/./chat/completions"),
    refused("/v1/responses/"),
    refused("/v1//responses"),
    refused("/v1/x/../responses"),
    refused("/v1/../admin", "GET"),
    # repeated and trailing slashes
    refused("//v1/chat/completions"),
    refused("/v1/chat//completions"),
    refused("/v1/chat/completions//"),
    refused("/v1/responses//"),
    # dot segments, plain and encoded
    refused("/v1/%2e/chat/completions"),
    refused("/v1/%2E/responses"),
    refused("/v1/x/%2e%2e/chat/completions"),
    refused("/v1/x/.%2e/responses"),
    refused("/v1/x/%2E%2E/chat/completions"),
    refused("/v1/x/.../chat/completions"),
    refused("/v1/models/../chat/completions"),
    refused("/v1/chat/completions/../../v1/chat/completions"),
    refused("/v1/%2e%2e/admin", "GET"),
    refused("/v1/models/../../admin", "GET"),
    # encoded delimiters and double encoding
    refused("/v1/chat%2fcompletions"),
    refused("/v1/chat%5Ccompletions"),
    refused("/v1/chat\\completions"),
    refused("/v1/x%2F..%2Fresponses"),
    refused("/v1/x/%252e%252e/chat/completions"),
    refused("/v1/chat%252Fcompletions"),
    refused("/v1/x/%25%32%65%25%32%65/responses"),
    refused("/v1/chat/completions%3F"),
    refused("/v1/chat/completions%3Fa=1"),
    refused("/v1/chat/completions%23"),
    refused("/v1/chat/completions#frag"),
    # ;params
    refused("/v1/chat/completions;a=b"),
    refused("/v1/chat;x/completions"),
    refused("/v1/responses;jsessionid=1"),
    refused("/v1/chat/completions%3Bx"),
    # case, suffixes, trailing dots and spaces, escaped letters
    refused("/v1/Chat/Completions"),
    refused("/v1/CHAT/COMPLETIONS"),
    refused("/v1/Responses"),
    refused("/v1/chat/completions.json"),
    refused("/v1/responses.json"),
    refused("/v1/chat/completions."),
    refused("/v1/chat/completions%20"),
    refused("/v1/responses%09"),
    refused("/v1/%63hat/completions"),
    refused("/v1/chat/complet%69ons"),
    refused("/v1/%72esponses"),
    refused("/%761/chat/completions"),
    # the endpoints under another prefix (Azure-style deployments) or repeated
    refused("/v1/openai/deployments/gpt/chat/completions"),
    refused("/v1/openai/responses"),
    refused("/v1/chat/completions/chat/completions"),
    # Unicode that folds to ASCII, and overlong UTF-8
    refused("/v1/chat%EF%BC%8Fcompletions"),
    refused("/v1/%EF%BD%83hat/completions"),
    refused("/v1/%C0%AE%C0%AE/chat/completions"),
    # absolute-form request lines with any of the above
    refused(ABS + "/v1/x/../chat/completions"),
    refused(ABS + "//v1/chat/completions"),
    refused(ABS + "/v1/chat/completions/"),
    refused(ABS + "/v1/chat%2Fcompletions"),
    refused("ftp://127.0.0.1/v1/chat/completions"),
    # method and URL overrides
    refused(CHAT, "GET", **{"X-HTTP-Method-Override": "POST"}),
    refused(CHAT, "PUT", **{"X-HTTP-Method": "POST"}),
    refused(CHAT, "GET", **{"X-Method-Override": "POST"}),
    refused("/v1/models", "GET", **{"X-Original-URL": CHAT, "X-Original-Method": "POST"}),
    refused("/v1/models", "POST", **{"X-Rewrite-URL": RESP}),
    refused(CHAT + "?_method=POST", "GET"),
    refused(CHAT + "?%5Fmethod=POST", "GET"),
    # canonical pass-through paths, forwarded as sent (the gated ones' sub-resources included)
    forwarded("/v1/models"),
    forwarded("/v1/models?limit=2&after=a%20b"),
    forwarded("/v1/models?/../../chat/completions"),
    forwarded("/v1/files/file-abc/content"),
    forwarded("/v1/files/a%20b"),
    forwarded(CHAT),  # GET lists stored chat completions
    forwarded(CHAT + "/chatcmpl-1"),
    forwarded(CHAT + "/chatcmpl-1/messages"),
    forwarded(CHAT + "/chatcmpl-1", "DELETE"),
    forwarded(RESP + "/resp_1"),
    forwarded(RESP + "/resp_1/input_items"),
    forwarded(RESP + "/resp_1", "DELETE"),
    forwarded(RESP + "/resp_1/cancel", "POST"),
    forwarded("/v1/embeddings", "POST"),
    refused(RESP + "/resp_1/", "GET"),
    refused(RESP + "//resp_1", "GET"),
]


def _case_id(c: Case) -> str:
    return " ".join([c.method, c.target, *(f"{k}:{v}" for k, v in c.headers)])


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
async def test_no_path_reaches_the_gated_endpoints_ungated(make_proxy, lenient, case):
    proxy = await make_proxy(POLICY, upstream_url=lenient.url)
    port = proxy.server.port
    assert port is not None
    status, body = await raw_request(port, case.method, case.target, dict(case.headers))
    assert MARKER.encode() not in body  # the denied call never reached the client
    for got in lenient.got:
        assert_canonical(got.target)
        method, path = lenient_route(got.method, got.target, got.headers)
        # Whatever the upstream took for a gated endpoint came through callgate's gate.
        if upstream_gated(method, path):
            assert (got.method, got.target.partition("?")[0]) in {("POST", CHAT), ("POST", RESP)}
    error = json.loads(body)["error"] if status >= 400 else None
    if case.expect == GATED:
        assert status == 403, body
        assert error is not None and error["type"] == "tool_call_blocked"
        assert [(g.method, g.target) for g in lenient.got] == [("POST", case.upstream_sees)]
    elif case.expect == REFUSED:
        assert status in (400, 404), body
        assert error is not None and set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_path"
        assert lenient.got == []
    else:
        assert status == 200, body
        assert [(g.method, g.target) for g in lenient.got] == [(case.method, case.target)]


async def test_the_lenient_upstream_would_serve_the_variants_as_gated_endpoints():
    # The refusals matter: without callgate's guard, each variant below reaches a gated
    # endpoint of this upstream (so the fake is as lenient as the table assumes).
    for case in CASES:
        if case.expect != REFUSED or case.method != "POST" or case.headers:
            continue
        if case.target.startswith("ftp:") or "#" in case.target:
            continue
        try:
            method, path = lenient_route(case.method, case.target, {})
        except UnicodeDecodeError:
            continue  # the overlong escape: a server decoding it leniently would see ".."
        assert upstream_gated(method, path), case.target


async def test_canonical_path_is_what_a_gated_request_sends_upstream(make_proxy, lenient):
    # The gated routes and the pass-through build the upstream's path from the checked target,
    # not from aiohttp's re-parsed URL: an absolute-form line keeps its query, drops its host.
    proxy = await make_proxy(POLICY, upstream_url=lenient.url)
    assert proxy.server.port is not None
    status, _ = await raw_request(
        proxy.server.port, "GET", "http://attacker.example/v1/models?a=%2F&b=c"
    )
    assert status == 200
    assert [g.target for g in lenient.got] == ["/v1/models?a=%2F&b=c"]


# -- proxy.paths, directly ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("/", "/"),
        ("/v1/models", "/v1/models"),
        ("/v1//models/", "/v1/models"),
        ("//v1///chat//completions///", "/v1/chat/completions"),
        ("/v1/%63hat/%43ompletions", "/v1/chat/Completions"),
        ("/v1/files/a%2a%7e", "/v1/files/a%2A~"),
        ("/v1/files/a b", "/v1/files/a%20b"),
        ("/v1/files/a%20b", "/v1/files/a%20b"),
        ("/v1/files/caf%c3%a9", "/v1/files/caf%C3%A9"),
        ("/v1/x:y@z!$&'()*+,=", "/v1/x:y@z!$&'()*+,="),
        ("/v1/a.b/.c/d.", "/v1/a.b/.c/d."),
    ],
)
def test_canonical_path(raw, canonical):
    assert canonical_path(raw) == canonical
    assert canonical_path(canonical) == canonical  # idempotent


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("/v1/./x", "dot segment"),
        ("/v1/../x", "dot segment"),
        ("/v1/.../x", "dot segment"),
        ("/v1/%2e%2E", "dot segment"),
        ("/v1/.%20", "dot segment"),
        ("/v1/a%2Fb", "encoded slash"),
        ("/v1/a%5cb", "encoded backslash"),
        ("/v1/a%3Fb", "encoded question mark"),
        ("/v1/a%23b", "encoded hash"),
        ("/v1/a%3bb", "encoded semicolon"),
        ("/v1/a%252e", "encoded percent"),
        ("/v1/a\\b", "backslash"),
        ("/v1/a;b", "';' parameters"),
        ("/v1/a%zz", "malformed"),
        ("/v1/a%2", "malformed"),
        ("/v1/a%00", "control"),
        ("/v1/a%7F", "control"),
        ("/v1/%C0%AE", "not UTF-8"),
        ("/v1/%FF", "not UTF-8"),
        ("/v1/%EF%BC%8F", "U+FF0F"),
        ("/v1/%E2%84%AA", "U+212A"),  # KELVIN SIGN, NFKC "K"
        ("v1/models", "start with '/'"),
    ],
)
def test_canonical_path_refuses_ambiguous_forms(raw, why):
    with pytest.raises(PathRefused) as err:
        canonical_path(raw)
    assert err.value.status == 400
    assert why in err.value.message


def test_split_target_forms():
    assert split_target("/v1/models?a=1?b") == ("/v1/models", "?a=1?b")
    assert split_target("/v1/models") == ("/v1/models", "")
    assert split_target("http://h:1/v1/models?x") == ("/v1/models", "?x")
    assert split_target("HTTPS://h") == ("/", "")
    assert split_target("http://h?x=/v1") == ("/", "?x=/v1")
    for bad in ("*", "h:80", "ftp://h/v1", "/v1/a#b", "/v1/a b", "/v1/\x7f", "/v1/é"):
        with pytest.raises(PathRefused):
            split_target(bad)


def test_check_target_statuses_and_upstream_path():
    assert check_target(CHAT) == Target(CHAT, "")
    assert check_target(CHAT + "?stream=1").upstream() == "/chat/completions?stream=1"
    assert check_target("/v1").upstream() == ""
    assert check_target("/healthz").upstream() == "/healthz"
    assert check_target("http://h" + RESP + "/r_1?q").upstream() == "/responses/r_1?q"
    with pytest.raises(PathRefused) as err:
        check_target(CHAT + "/")
    assert err.value.status == 400 and "use '/v1/chat/completions'" in err.value.message
    with pytest.raises(PathRefused) as err:
        check_target("/v1/Chat/completions")
    assert err.value.status == 404
    long = "/v1/" + "a/" * 300
    with pytest.raises(PathRefused) as err:
        check_target(long)
    assert len(err.value.message) < 600  # the echo of the client's path is bounded


@pytest.mark.parametrize(
    ("path", "alias"),
    [
        (CHAT, False),
        (RESP, False),
        (CHAT + "/chatcmpl-1/messages", False),
        (RESP + "/resp_1/input_items", False),
        ("/v1/models", False),
        ("/v1/completions", False),  # the legacy endpoint: no tools
        ("/v1/chat", False),
        ("/v1/chatcompletions", False),
        ("/v1/Chat/completions", True),
        ("/v1/chat/Completions", True),
        ("/v1/chat/completions.json", True),
        ("/v1/chat/completions%20", True),
        ("/v1/chat%20/completions", True),
        ("/v1/responses.", True),
        ("/v1/RESPONSES/resp_1", True),
        ("/v1/a/responses", True),
        ("/v2/responses", True),
        ("/v1/responses/responses", True),
        ("/openai/deployments/x/chat/completions", True),
    ],
)
def test_gated_alias(path, alias):
    assert gated_alias(path) is alias


def test_override_problem():
    headers = {"x-http-method-override": "POST"}  # aiohttp's are case-insensitive already
    assert override_problem({}, "") is None
    assert override_problem({}, "?method=x&url=y") is None
    assert "X-HTTP-Method-Override" in (override_problem({"X-HTTP-Method-Override": "1"}, "") or "")
    assert override_problem(headers, "") is None  # a plain dict is case-sensitive
    assert override_problem({}, "?a=1&_method=POST") is not None
    assert override_problem({}, "?_METHOD") is not None
    assert override_problem({}, "?x=1;%5Fmethod=POST") is not None
    assert override_problem({}, "?x-original-url=/v1/responses") is not None


_TOKENS = [
    "v1", "chat", "completions", "responses", "models", "Chat", "RESPONSES", "x", "", ".",
    "..", "...", "%2e", "%2E%2e", "%2F", "%2f", "%5C", "\\", ";a=b", "%3B", "%252e", "%25",
    "%63hat", "complet%69ons", ".json", " ", "%20", "%09", "%00", "%C0%AE", "%EF%BC%8F",
    "?", "?x=/../", "%3F", "#", "resp_1", "input_items", "/", "//",
]  # fmt: skip


def test_random_paths_never_alias_a_gated_endpoint():
    """Bounded random search: whatever check_target accepts, the lenient upstream routes to a
    gated endpoint only when it is spelt exactly as callgate routes it."""
    rng = random.Random(19)
    accepted = 0
    for _ in range(4000):
        target = "/" + "/".join(rng.choice(_TOKENS) for _ in range(rng.randint(1, 6)))
        try:
            checked = check_target(target)
        except PathRefused as exc:
            assert exc.status in (400, 404) and exc.message
            continue
        accepted += 1
        assert_canonical(checked.path)
        try:
            _, path = lenient_route("POST", checked.path + checked.query, {})
        except UnicodeDecodeError:
            continue
        if upstream_gated("POST", path):
            assert checked.path in (CHAT, RESP), target
    assert accepted > 200  # the search did reach the accepting side
