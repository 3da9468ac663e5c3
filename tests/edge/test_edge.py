"""The shared HTTP edge: every intake route reads bodies and answers refusals and failures the one way
(``edge.body``, ``edge.intake``)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from edge.body import MAX_DEPTH, JsonError, parse_json, read_json
from edge.intake import Rejected, answer
from edge.upstream import is_loopback, retry_after_seconds, upstream_base_url
from mapping.errors import ConfigError
from tests.support import RecordingTelemetry


@pytest.fixture
async def client():
    telemetry = RecordingTelemetry()

    async def echo(request: web.Request) -> web.StreamResponse:
        async def handle() -> web.StreamResponse:
            body: Any = await read_json(request, max_body=1024, what="a JSON object")
            if body == {"boom": True}:
                raise RuntimeError("a bug")
            return web.json_response({"got": body})

        return await answer("test_route", telemetry, handle, unavailable="try again later")

    app = web.Application()
    app.router.add_post("/r", echo)
    async with TestClient(TestServer(app)) as c:
        c.telemetry = telemetry  # type: ignore[attr-defined]
        yield c


@pytest.mark.parametrize(
    ("body", "ctype", "status", "reason"),
    [
        (b'{"a": 1}', "application/json", 200, None),
        (b'{"a": 1}', "application/vnd.x+json", 200, None),
        (b'{"a": 1}', "text/plain", 415, "unsupported_media_type"),
        (b"", "application/json", 400, "malformed"),
        (b"{not json", "application/json", 400, "malformed"),
        (b"\xff\xfe", "application/json", 400, "malformed"),
        (b'{"a": "\\ud800"}', "application/json", 400, "malformed"),  # a lone surrogate: not text
        (b'{"\\udc00": 1}', "application/json", 400, "malformed"),
        (b"[" * 100_000 + b"]" * 100_000, "application/json", 413, "too_large"),
        (b"x" * 2000, "application/json", 413, "too_large"),
    ],
)
async def test_bodies_are_read_or_refused_with_a_reason(client, body, ctype, status, reason):
    r = await client.post("/r", data=body, headers={"Content-Type": ctype})
    assert r.status == status
    answer_ = await r.json()
    if reason is None:
        assert answer_ == {"got": {"a": 1}}
    else:
        assert answer_["error"]
        assert ("test_route", reason) in client.telemetry.rejections


async def test_json_nested_too_deeply_for_the_parser_is_refused_not_a_failure():
    telemetry = RecordingTelemetry()

    async def deep(request: web.Request) -> web.StreamResponse:
        async def handle() -> web.StreamResponse:
            return web.json_response({"got": await read_json(request, max_body=1 << 20, what="x")})

        return await answer("deep", telemetry, handle, unavailable="later")

    app = web.Application(client_max_size=2 << 20)
    app.router.add_post("/d", deep)
    async with TestClient(TestServer(app)) as c:
        r = await c.post("/d", data=b"[" * 200_000 + b"]" * 200_000, headers={"Content-Type": "application/json"})
        assert r.status == 400
        assert ("deep", "malformed") in telemetry.rejections


@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
async def test_nesting_deeper_than_any_real_document_is_refused_before_the_parser_recurses(opener):
    """Refused by a flat scan, not by catching the parser's RecursionError: the parser recursing to the
    interpreter's limit runs whatever finalizer the garbage collector picks at that depth, where it fails
    in turn (seen in the fuzz test as a RecursionError inside pytest's unraisable-exception hook)."""
    telemetry = RecordingTelemetry()

    async def deep(request: web.Request) -> web.StreamResponse:
        async def handle() -> web.StreamResponse:
            return web.json_response({"got": await read_json(request, max_body=1 << 20, what="x")})

        return await answer("deep", telemetry, handle, unavailable="later")

    closer = b"]" if opener == b"[" else b"}"
    inner = b"[]" if opener == b"[" else b"1"
    app = web.Application(client_max_size=2 << 20)
    app.router.add_post("/d", deep)
    async with TestClient(TestServer(app)) as c:
        depth = MAX_DEPTH + 1  # far below the parser's own limit, so the parser alone would accept it
        deep_body = opener * depth + inner + closer * depth
        r = await c.post("/d", data=deep_body, headers={"Content-Type": "application/json"})
        assert r.status == 400 and "nested" in (await r.json())["error"]
        assert ("deep", "malformed") in telemetry.rejections
        # Brackets inside strings are text, not nesting; nesting up to the limit is read.
        ok = b'{"s": "' + b"[{" * 5000 + b'\\\\", "t": ' + b"[" * (MAX_DEPTH - 2) + b"]" * (MAX_DEPTH - 2) + b"}"
        r = await c.post("/d", data=ok, headers={"Content-Type": "application/json"})
        assert r.status == 200, await r.text()


async def test_an_unexpected_failure_is_a_503_with_the_senders_next_step(client):
    r = await client.post("/r", json={"boom": True})
    assert r.status == 503 and await r.json() == {"error": "try again later"}
    assert ("test_route", "internal") in client.telemetry.rejections


async def test_escaped_non_ascii_text_is_still_read(client):
    body = b'{"a": "caf\\u00e9 \\ud83d\\ude00"}'  # escaped, and a surrogate pair: fine
    r = await client.post("/r", data=body, headers={"Content-Type": "application/json"})
    assert r.status == 200 and await r.json() == {"got": {"a": "caf\u00e9 \U0001f600"}}


def test_rejected_carries_status_reason_and_a_safe_message():
    r = Rejected(401, "unauthenticated", "wrong webhook key")
    assert (r.status, r.reason, r.message) == (401, "unauthenticated", "wrong webhook key")


def test_upstream_policy():
    assert is_loopback("127.0.0.5") and is_loopback("::ffff:127.0.0.1") and is_loopback("localhost")
    assert not is_loopback("10.0.0.1") and not is_loopback(None)
    assert upstream_base_url("http://127.0.0.1:8080/", name="X") == "http://127.0.0.1:8080"
    with pytest.raises(ConfigError, match=re.escape("X 'http://example.com' must be https")):
        upstream_base_url("http://example.com", name="X")
    assert retry_after_seconds({"retry-after": "7"}) == 7.0
    assert retry_after_seconds({"Retry-After": "never"}) is None


async def test_the_services_poison_hook_logs_counts_and_keeps_the_item_in_the_quarantine(caplog):
    from edge.poison import hand_off, quarantine_poison
    from tests.support import make_bridge

    telemetry = RecordingTelemetry()
    bridge = make_bridge(telemetry=telemetry)
    hook = quarantine_poison(bridge)
    await hand_off(hook, "graph_pending_reads", "bad_id", b'{"key": "\\ud800"}', "an id the store cannot hold")
    (item,) = await bridge.quarantine.list_quarantined()
    assert (item.route, item.reason, item.body) == ("graph_pending_reads", "bad_id", b'{"key": "\\ud800"}')
    assert ("graph_pending_reads", "poison_item") in telemetry.rejections
    assert ("graph_pending_reads", "bad_id") in telemetry.quarantines
    assert "poison item taken out of its queue" in caplog.text


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": 1, "a": 2}',
        b"[123456789012345678901234567890, -98765432109876543210]",
        b"[NaN, Infinity, 1e400]",
        b'{"Depth": 18446744073709551616}',
        b'["\\u00e9", "caf\\u00e9"]',
        b"[0.1, -0.0, 1.7976931348623157e308]",
        b"\xef\xbb\xbf[1]",  # a UTF-8 byte order mark: json skips it, orjson refuses it
    ],
)
def test_bodies_read_exactly_as_the_standard_library_reads_them(raw):
    """``parse_json`` reads most bodies with orjson; whatever it takes in must be what ``json`` makes
    of the same bytes (exact big integers, NaN, the last of two equal keys)."""
    got = parse_json(raw, what="a test document")
    assert repr(got) == repr(json.loads(raw))


@pytest.mark.parametrize(
    ("raw", "kind"),
    [(b'{"a": "\\ud800"}', "bad_unicode"), (b"{'a': 1}", "invalid"), (b"  ", "empty")],
)
def test_refusals_keep_their_reasons(raw, kind):
    with pytest.raises(JsonError) as refused:
        parse_json(raw, what="a test document")
    assert refused.value.kind == kind
