"""The log line format: the per-request fast path writes what structlog would have written."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import orjson
import pytest
import structlog

from proxy import logs
from proxy.timestamps import utc_iso


@pytest.fixture
def json_logging(capfd: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    logs.configure_logging("info")
    try:
        yield capfd
    finally:
        logs.flush_logs()
        logs._writer = None
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()


def _lines(capfd: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    logs.flush_logs()
    return [orjson.loads(line) for line in capfd.readouterr().out.splitlines() if line]


@pytest.mark.parametrize(
    "now", [0.0, 1_764_067_290.123456, 1_764_067_290.999999, 1_764_067_291.000001, 951_782_400.5]
)
def test_utc_iso_matches_datetime(now: float) -> None:
    expected = datetime.fromtimestamp(now, UTC).isoformat(timespec="microseconds")
    got = utc_iso(now)
    assert got[:20] == expected[:20]  # date, time, seconds
    assert got.endswith("+00:00") and len(got) == len(expected)
    assert abs(int(got[20:26]) - int(expected[20:26])) <= 1  # truncated, not rounded


def test_utc_iso_now_is_current() -> None:
    before = datetime.now(UTC)
    stamp = datetime.fromisoformat(utc_iso())
    after = datetime.now(UTC)
    assert before.replace(microsecond=0) <= stamp <= after


def test_request_line_has_structlogs_shape(json_logging: pytest.CaptureFixture[str]) -> None:
    log = structlog.get_logger("callgate.http")
    fields = {"method": "POST", "path": "/v1/chat/completions", "status": 200, "ms": 1.5}
    structlog.contextvars.bind_contextvars(request_id="cg-1", principal="alice")
    log.info("request", **fields)
    logs.log_request(log, "cg-1", "alice", fields)
    slow, fast = _lines(json_logging)
    assert set(fast) == set(slow)  # (structlog's order of context keys follows a hash)
    assert {k: v for k, v in fast.items() if k != "timestamp"} == {
        k: v for k, v in slow.items() if k != "timestamp"
    }
    assert fast["event"] == "request" and fast["level"] == "info"
    datetime.fromisoformat(str(fast["timestamp"]))


def test_request_line_without_principal(json_logging: pytest.CaptureFixture[str]) -> None:
    log = structlog.get_logger("callgate.http")
    logs.log_request(log, "cg-2", None, {"method": "GET", "path": "/v1/models", "status": 200})
    (line,) = _lines(json_logging)
    assert "principal" not in line
    assert line["request_id"] == "cg-2" and line["path"] == "/v1/models"


def test_request_line_respects_the_level(capfd: pytest.CaptureFixture[str]) -> None:
    logs.configure_logging("warning")
    try:
        log = structlog.get_logger("callgate.http")
        logs.log_request(log, "cg-3", "bob", {"status": 200})
        assert _lines(capfd) == []
    finally:
        logs._writer = None
        structlog.reset_defaults()


def test_captured_logs_still_see_the_request_line(
    json_logging: pytest.CaptureFixture[str],
) -> None:
    log = structlog.get_logger("callgate.http")
    with structlog.testing.capture_logs() as entries:
        logs.log_request(log, "cg-4", "carol", {"status": 204})
    assert entries == [{"event": "request", "log_level": "info", "status": 204}]
