"""Request targets in one canonical form, so that routing, gating and forwarding see one path.

An upstream, or a proxy in front of it, may serve `/v1/x/../chat/completions`, `/v1//responses`,
`/v1/chat%2Fcompletions`, `/v1/chat/completions;a=b` or `/v1/Chat/Completions` as the endpoints
callgate gates, while callgate's own router would have sent them to the verbatim pass-through.
Rather than guess how every upstream resolves a path, callgate routes and forwards canonical
paths only and refuses everything else (before routing, so no handler sees such a request):

- ambiguous forms, which servers resolve differently, are refused: dot segments (`.`, `..`, also
  as `%2e`, or `...`, which some servers trim to `..`), encoded delimiters (`%2F`, `%5C`, `%3F`,
  `%23`, `%3B`), an encoded `%` (`%252e` is `%2e` to a server that decodes twice), backslashes,
  `;` parameters, control characters, a fragment, malformed or non-UTF-8 escapes, and non-ASCII
  characters that Unicode compatibility folds to ASCII (a full-width solidus, U+FF0F, or letter);
- forms with one unambiguous canonical equivalent (repeated or trailing slashes, escaped
  unreserved characters like `%63`, lower-case hex digits) are refused with the canonical path
  in the message, so a client sees its mistake instead of callgate guessing its intent;
- canonical paths that a lenient upstream (case-insensitive, trimming `.json` suffixes or
  trailing dots and spaces, or serving the API under another prefix, as Azure does) could
  resolve to a gated endpoint are refused as unknown (404), unless they are spelt exactly
  `/v1/chat/completions...` or `/v1/responses...`, the forms callgate routes itself.

Pure functions, no I/O; the common case (a plain path) costs a set lookup or one precompiled
regex match.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Container
from dataclasses import dataclass
from urllib.parse import unquote, unquote_plus

# RFC 3986 unreserved characters: escaping them changes nothing, so canonical paths never do.
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
# Characters a canonical path segment may hold literally: RFC 3986 `pchar` without `;` (matrix
# parameters, which servers like Tomcat or Jetty strip before routing).
_PCHAR = _UNRESERVED | frozenset("!$&'()*+,=:@")
# What an escape must never decode to: a delimiter a lenient or twice-decoding server acts on.
_ESCAPED_NAMES = {
    "/": "an encoded slash (%2F)",
    "\\": "an encoded backslash (%5C)",
    "?": "an encoded question mark (%3F)",
    "#": "an encoded hash (%23)",
    ";": "an encoded semicolon (%3B)",
    "%": "an encoded percent sign (%25, double encoding)",
}
_HEX = frozenset(string.hexdigits)
# A plain path: segments of unreserved characters, none empty, none starting with a dot (so no
# dot segment), no trailing slash. Such a path is canonical as it is.
_PLAIN = re.compile(r"(?:/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)+")
# Exactly the paths callgate routes to its gates: nothing to check (the hot path).
_GATED = frozenset(("/v1/chat/completions", "/v1/responses"))
# The gated endpoints as a lenient upstream might find them in a path's segments.
_CHAT = ("chat", "completions")
_RESPONSES = "responses"


# Headers and query keys with which some frameworks and gateways change the method or the path
# they route on: a GET the pass-through forwards could become a POST to chat/completions there.
OVERRIDE_HEADERS = (
    "X-HTTP-Method-Override",
    "X-HTTP-Method",
    "X-Method-Override",
    "X-Original-Method",
    "X-Original-URL",
    "X-Rewrite-URL",
)
_OVERRIDE_KEYS = frozenset(("_method", *(h.lower() for h in OVERRIDE_HEADERS)))


class PathRefused(Exception):
    """A request target callgate will not route: `status` and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Target:
    path: str  # canonical, and exactly as the client sent it
    query: str  # the raw query string with its leading "?", or ""

    def upstream(self, prefix: str = "/v1") -> str:
        """The path and query relative to `prefix` (callgate's /v1 is the upstream's base)."""
        path = self.path
        if path == prefix or path.startswith(prefix + "/"):
            path = path[len(prefix) :]
        return path + self.query


def check_target(target: str) -> Target:
    """The request target (as in the request line) if callgate may route it; else PathRefused."""
    path, query = split_target(target)
    if path in _GATED:
        return Target(path, query)
    if _PLAIN.fullmatch(path) is None:
        canon = canonical_path(path)
        if canon != path:
            raise PathRefused(
                400,
                f"The request path {_show(path)} is not in canonical form (repeated or trailing "
                f"slashes, or escaped characters that need none); callgate accepts only "
                f"canonical paths: use {_show(canon)}.",
            )
    if gated_alias(path):
        raise PathRefused(
            404,
            f"Invalid URL {_show(path)}: callgate gates chat completions at "
            "/v1/chat/completions and responses at /v1/responses, and refuses other spellings "
            "of them.",
        )
    return Target(path, query)


def override_problem(headers: Container[str], query: str) -> str | None:
    """Why a request that asks to be routed by another method or path is refused, or None.
    `headers`: case-insensitive (aiohttp's); `query`: raw, as in Target.query."""
    for name in OVERRIDE_HEADERS:
        if name in headers:
            return f"callgate refuses requests with a {name} header."
    low = query.lower()
    if "method" in low or "-url" in low:
        for pair in query[1:].replace(";", "&").split("&"):
            key = unquote_plus(pair.partition("=")[0]).strip().lower()
            if key in _OVERRIDE_KEYS:
                return f"callgate refuses requests with a {key!r} query parameter."
    return None


def split_target(target: str) -> tuple[str, str]:
    """(path, query with its "?") of an origin-form or absolute-form request target."""
    if not (target.isascii() and target.isprintable()) or " " in target:
        raise PathRefused(400, "The request target holds characters outside printable ASCII.")
    if "#" in target:
        raise PathRefused(400, "The request target holds a fragment (#), which HTTP forbids.")
    if not target.startswith("/"):
        # Absolute form (RFC 9112 3.2.2), as sent to a proxy: the path is what follows the host.
        scheme, sep, rest = target.partition("://")
        if not sep or scheme.lower() not in ("http", "https"):
            raise PathRefused(400, "The request target must be a path starting with '/'.")
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        target = rest[cut:]
        if not target.startswith("/"):
            target = "/" + target
    path, sep, query = target.partition("?")
    return path, sep + query


def canonical_path(path: str) -> str:
    """The canonical form of an absolute path, or PathRefused when servers could disagree on
    what it means. Canonical: no empty segment (so no repeated or trailing slash, "/" aside),
    unreserved characters unescaped, other escapes in upper-case hex, characters outside
    `pchar` escaped."""
    if not path.startswith("/"):
        raise PathRefused(400, "The request path must start with '/'.")
    out = [_canonical_segment(seg) for seg in path.split("/")[1:] if seg]
    return "/" + "/".join(out)


def _canonical_segment(seg: str) -> str:
    out: list[str] = []
    raw = bytearray()  # the segment's bytes once decoded, to judge what a server would see
    i, n = 0, len(seg)
    while i < n:
        if seg[i] == "%":
            text, b = _escape(seg[i + 1 : i + 3])
            i += 3
        else:
            text, b = _plain(seg[i])
            i += 1
        out.append(text)
        raw.append(b)
    _judge(raw)
    return "".join(out)


def _escape(hx: str) -> tuple[str, int]:
    """A percent-escape's canonical text and the byte it stands for."""
    if len(hx) != 2 or not _HEX.issuperset(hx):
        raise PathRefused(400, "The request path holds a malformed percent-escape.")
    b = int(hx, 16)
    c = chr(b)
    if c in _ESCAPED_NAMES:
        raise PathRefused(400, f"The request path holds {_ESCAPED_NAMES[c]}.")
    if b < 0x20 or b == 0x7F:
        raise PathRefused(400, "The request path holds an encoded control character.")
    return (c if c in _UNRESERVED else "%" + hx.upper()), b


def _plain(ch: str) -> tuple[str, int]:
    """A literal character's canonical text and its byte."""
    if ch == "\\":
        raise PathRefused(400, "The request path holds a backslash.")
    if ch == ";":
        raise PathRefused(400, "The request path holds ';' parameters.")
    if ord(ch) < 0x20 or ord(ch) >= 0x7F:
        raise PathRefused(400, "The request path holds characters outside printable ASCII.")
    return (ch if ch in _PCHAR else f"%{ord(ch):02X}"), ord(ch)


def _judge(raw: bytearray) -> None:
    """Refuse a segment whose decoded bytes some server would read as something else."""
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        # Overlong forms like %C0%AE were once decoded as "." by some servers.
        raise PathRefused(400, "The request path holds escapes that are not UTF-8.") from None
    if not decoded.strip(" \t."):
        # ".", "..", and "...", ". " that servers trimming trailing dots and spaces make "..".
        raise PathRefused(400, "The request path holds a dot segment ('.' or '..').")
    if decoded.isascii():
        return
    for c in decoded:
        if not c.isascii() and any(x.isascii() for x in unicodedata.normalize("NFKC", c)):
            raise PathRefused(
                400,
                "The request path holds a Unicode character that stands for an ASCII one "
                f"(U+{ord(c):04X}).",
            )


def _loose(seg: str) -> str:
    """A path segment as a lenient server could match it: decoded, case-folded, without a
    `.json`-like suffix or trailing dots and spaces."""
    return unquote(seg).lower().partition(".")[0].strip()


def gated_alias(path: str) -> bool:
    """Whether a canonical path could reach a gated endpoint other than by the exact spelling
    callgate routes: `chat/completions` or `responses` anywhere but right after `/v1`, or spelt
    differently there."""
    low = path.lower()
    if _RESPONSES not in low and _CHAT[1] not in low:
        return False  # the common case: nothing that could be either endpoint
    segs = path.split("/")[1:]
    loose = [_loose(s) for s in segs]
    for i, seg in enumerate(loose):
        if seg == _RESPONSES:
            exact = i == 1 and segs[0] == "v1" and segs[1] == _RESPONSES
        elif seg == _CHAT[0] and tuple(loose[i + 1 : i + 2]) == _CHAT[1:]:
            exact = i == 1 and segs[0] == "v1" and tuple(segs[1:3]) == _CHAT
        else:
            continue
        if not exact:
            return True
    return False


# Where a model's tool calls reach the client without passing callgate's gates: Assistants
# runs (`requires_action` carries the calls), batches (a file of chat or responses requests run
# upstream; their output file holds the calls) and the Realtime API (calls on a websocket).
UNGATED_APIS: dict[str, tuple[str, ...]] = {
    "assistants": ("/v1/threads",),
    "batches": ("/v1/batches",),
    "realtime": ("/v1/realtime",),
}


def ungated_api(path: str) -> str | None:
    """The ungated API a canonical path belongs to, if any."""
    for name, prefixes in UNGATED_APIS.items():
        for prefix in prefixes:
            if path == prefix or path.startswith(prefix + "/"):
                return name
    return None


def _show(path: str) -> str:
    # Echo at most a bounded, printable part of the client's path.
    return repr(path if len(path) <= 200 else path[:200] + "...")
