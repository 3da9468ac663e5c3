"""Hostile input against the real service (``service.stack.LocalStack``: the three emulators and the
service on loopback), 2,000 junk bodies per route from a seeded generator, then the checks that
matter when someone throws garbage at the public routes:

- no 5xx on any route (a 5xx tells the sender to resend: junk must be refused, not retried);
- no stopped queue: afterwards a real change still propagates through every route;
- ``/metrics`` bounded: it grows by a small constant, not per body (nor per unknown path);
- no secret (Graph clientState, Dataverse webhook key, bot password, static token) in any log line
  the service writes, the ``/metrics`` text, the CLI listings or the stored errors.

The corpus: random bytes, truncated and byte-mutated real payloads (``tests/dataverse/data``, a Teams
activity, Graph notifications), deep nesting, huge numbers, lone surrogates, wrong types at every
level of a real payload, and valid shapes carrying poison ids. Seeded, so a failure is reproducible.

On PostgreSQL: it is the store that refuses what SQLite lets through (NUL characters, ids longer
than a column), so a poison id shows there; without a server the test is skipped (failed under CI).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import random
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from emulators.connector import teams_message
from emulators.dataverse import AVAILABLE, BUSY, DND
from service import cli
from service.logs import JsonFormatter
from service.stack import LocalStack, StackAgent, agent_ids

pytestmark = pytest.mark.postgres

BODIES = 2000
JUNK_PATHS = 1000
CONCURRENCY = 8
SEED = 15
BOT_PASSWORD = "fuzz-bot-password-5f0c3b9a7e21"
DATA = Path(__file__).parents[1] / "dataverse" / "data"
METRICS_SLACK = 24 * 1024
"""What ``/metrics`` may grow by over the whole fuzz: new (route, reason) series and their latency
histograms, a fixed set; one series per body would be hundreds of KB."""

AGENTS = [StackAgent(f"Fuzz {i}", *agent_ids(900 + i), AVAILABLE) for i in range(4)]
DV, NOTIFIED, MISSED, CHATTY = AGENTS

POISON_IDS: list[Any] = [
    "\ud800",
    "a\udfffb",
    "x\x00y",
    "0a1b2c3d-" * 40,
    "",
    " ",
    "'); DROP TABLE agents;--",
    "../../etc/passwd",
    "\u202e" + "gnp.exe",
    "%00",
    "00000000-0000-0000-0000-000000000000",
    12345,
    None,
    [],
    {},
    True,
    1e308,
]
JUNK_VALUES: list[Any] = [None, True, False, 0, -1, 1e308, 10**40, "", "x" * 5000, [], {}, [[[]]], {"a": {"b": {}}}]


def _poison_id(rng: random.Random) -> Any:
    return rng.choice(POISON_IDS)


class Corpus:
    """Junk bodies for one route from its real payloads ``seeds`` (JSON documents)."""

    def __init__(self, rng: random.Random, seeds: list[Any], poison: Callable[[Any, random.Random], Any]) -> None:
        self.rng = rng
        self.seeds = seeds
        self.poison = poison

    def body(self) -> tuple[bytes, str | None]:
        """One body and its Content-Type (None: no header)."""
        rng = self.rng
        kind = rng.randrange(8)
        seed = rng.choice(self.seeds)
        raw = json.dumps(seed).encode()
        if kind == 0:
            data = rng.randbytes(rng.randrange(0, 400))
        elif kind == 1:
            data = raw[: rng.randrange(0, len(raw))]
        elif kind == 2:
            buf = bytearray(raw)
            for _ in range(rng.randrange(1, 8)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            data = bytes(buf)
        elif kind == 3:
            depth = rng.choice([100, 1000, 5000, 20000])
            data = (b"[" * depth + b"]" * depth) if rng.random() < 0.5 else (b'{"a":' * depth + b"1" + b"}" * depth)
        elif kind == 4:
            number = rng.choice(["1e999999", "-1e999999", "9" * 5000, "1" + "0" * 400, "-0.0e-99999", "NaN"])
            data = raw.replace(b"1", number.encode(), 1) if rng.random() < 0.5 else number.encode()
        elif kind == 5:
            doc = copy.deepcopy(seed)
            _set_random(rng, doc, rng.choice(["\ud800", "\udc00x", "a\ud83d"]), strings_only=True)
            data = json.dumps(doc).encode()  # ensure_ascii: the lone surrogate is a \\u escape
        elif kind == 6:
            doc = copy.deepcopy(seed)
            for _ in range(rng.randrange(1, 4)):
                doc = _set_random(rng, doc, copy.deepcopy(rng.choice(JUNK_VALUES)))
            data = json.dumps(doc).encode()
        else:
            data = json.dumps(self.poison(copy.deepcopy(seed), rng)).encode()
        ctype: str | None = "application/json"
        if rng.random() < 0.05:
            ctype = rng.choice(
                [None, "text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1"]
            )
        return data, ctype


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(_paths(v, (*prefix, i)))
    return out


def _set_random(rng: random.Random, doc: Any, value: Any, *, strings_only: bool = False) -> Any:
    """Replaces one node of ``doc`` (any level, the root included) by ``value``; returns the document."""
    paths = _paths(doc)
    if strings_only:
        paths = [p for p in paths if p and isinstance(_get(doc, p), str)] or paths
    path = rng.choice(paths)
    if not path:
        return value
    parent = _get(doc, path[:-1])
    parent[path[-1]] = value
    return doc


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


# ------------------------------------------------------------------ the real payloads each route sees


def graph_item(stack: LocalStack, user: str) -> dict[str, Any]:
    return {
        "subscriptionId": stack.subscription_ids()[0],
        "clientState": stack.settings.graph_client_state,
        "changeType": "updated",
        "resource": f"communications/presences('{user}')",
        "tenantId": stack.graph.tenant_id,
        "resourceData": {"@odata.type": "#Microsoft.Graph.presence", "id": user},
    }


def _poison_graph(doc: Any, rng: random.Random) -> Any:
    for item in doc.get("value", []):
        bad = _poison_id(rng)
        if "resourceData" in item:
            item["resourceData"]["id"] = bad
            item["resource"] = f"communications/presences('{bad}')" if isinstance(bad, str) else bad
        else:
            item["subscriptionId"] = bad
    return doc


def _poison_activity(doc: Any, rng: random.Random) -> Any:
    target = rng.choice(["aad", "from", "conversation", "text", "value"])
    if target == "aad":
        doc["from"]["aadObjectId"] = _poison_id(rng)
    elif target == "from":
        doc["from"]["id"] = _poison_id(rng)
    elif target == "conversation":
        doc["conversation"]["id"] = _poison_id(rng)
    elif target == "text":
        doc["text"] = rng.choice(["\ud800", "busy\x00", "set " * 2000, "available " + "\u202e" * 10])
    else:
        doc["value"] = {"presence": _poison_id(rng), "action": _poison_id(rng)}
    return doc


def _poison_context(doc: Any, rng: random.Random) -> Any:
    entity = doc["InputParameters"][0]["value"]
    for attr in entity.get("Attributes", []):
        if isinstance(attr.get("value"), dict) and "Id" in attr["value"]:
            attr["value"]["Id"] = _poison_id(rng)
    doc["PrimaryEntityId"] = _poison_id(rng)
    entity["Id"] = _poison_id(rng)
    return doc


def seeds(stack: LocalStack) -> dict[str, tuple[str, list[Any], Callable[[Any, random.Random], Any]]]:
    """Route name -> (path, real payloads, how to poison the ids of one)."""
    users = [a.entra_id for a in AGENTS]
    notifications = [
        {"value": [graph_item(stack, u) for u in users]},
        {"value": [graph_item(stack, users[0])]},
        {"value": [{**graph_item(stack, users[1]), "encryptedContent": {"data": "eA==", "dataKey": "eA=="}}]},
    ]
    lifecycle = [
        {
            "value": [
                {
                    "subscriptionId": stack.subscription_ids()[0],
                    "clientState": stack.settings.graph_client_state,
                    "lifecycleEvent": event,
                    "resource": f"/communications/presences?$filter=id in ('{users[0]}')",
                }
            ]
        }
        for event in ("missed", "reauthorizationRequired")
    ]
    activities = [
        teams_message(service_url=stack.connector.url, aad_object_id=a.entra_id, text=t, user_name=a.name)
        for a, t in ((CHATTY, "status"), (CHATTY, "help"), (NOTIFIED, "presences"))
    ]
    contexts = [json.loads((DATA / name).read_text()) for name in ("update-presence.json", "create-agent.json")]
    return {
        "messages": ("/api/messages", activities, _poison_activity),
        "notifications": ("/api/graph/notifications", notifications, _poison_graph),
        "handshake": ("/api/graph/notifications", notifications, _poison_graph),
        "lifecycle": ("/api/graph/lifecycle", lifecycle, _poison_graph),
        "dataverse": ("/api/dataverse/webhook", contexts, _poison_context),
    }


def _validation_token(rng: random.Random) -> str:
    raw = rng.choice([rng.randbytes(rng.randrange(0, 64)), "\ud800".encode("utf-8", "surrogatepass"), b"%" * 10])
    return urllib.parse.quote_from_bytes(raw)


# ------------------------------------------------------------------ the service under fire


@pytest.fixture
async def stack(tmp_path: Path, pg_url: str) -> AsyncIterator[LocalStack]:
    s = LocalStack(
        tmp_path, AGENTS, database_url=pg_url, overrides={"bot_app_password": BOT_PASSWORD, "log_level": "INFO"}
    )
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


async def _fire(
    http: aiohttp.ClientSession, jobs: list[tuple[str, str, bytes, dict[str, str]]]
) -> Counter[tuple[str, int]]:
    """Sends every job over one keep-alive session, ``CONCURRENCY`` at a time; (route, status) counts."""
    statuses: Counter[tuple[str, int]] = Counter()
    queue: asyncio.Queue[tuple[str, str, bytes, dict[str, str]]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker() -> None:
        while not queue.empty():
            route, url, data, headers = queue.get_nowait()
            async with http.post(url, data=data, headers=headers) as resp:
                await resp.read()
                statuses[(route, resp.status)] += 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return statuses


def _secrets(stack: LocalStack) -> dict[str, str]:
    s = stack.settings
    return {
        "graph client state": s.graph_client_state,
        "dataverse webhook key": s.dataverse_webhook_key,
        "bot password": BOT_PASSWORD,
        "static token": s.static_token,
    }


async def _metrics(stack: LocalStack) -> str:
    assert stack.http is not None
    async with stack.http.get("/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


async def _cli_output(stack: LocalStack, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert await cli.cmd_outbox_list(stack.settings, argparse.Namespace(status=None, limit=10_000)) == 0
    assert await cli.cmd_agents_list(stack.settings, argparse.Namespace(unknown=True)) == 0
    return capsys.readouterr().out


async def test_junk_on_every_route_no_5xx_no_stuck_queue_bounded_metrics_no_secret(
    stack: LocalStack, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO)
    assert stack.http is not None
    rng = random.Random(SEED)
    metrics_before = await _metrics(stack)
    key = stack.settings.dataverse_webhook_key
    jobs: list[tuple[str, str, bytes, dict[str, str]]] = []
    for route, (path, payloads, poison) in seeds(stack).items():
        corpus = Corpus(rng, payloads, poison)
        for _ in range(BODIES):
            data, ctype = corpus.body()
            headers = {"Content-Type": ctype} if ctype else {}
            url = path
            if route == "handshake":
                url = f"{path}?validationToken={_validation_token(rng)}"
            elif route == "dataverse":
                headers["x-presence-sync-key"] = key
            jobs.append((route, url, data, headers))
    rng.shuffle(jobs)
    statuses = await _fire(stack.http, jobs)
    assert {r: n for r, n in statuses.items() if r[1] >= 500} == {}, statuses
    assert sum(statuses.values()) == len(jobs)
    # With the right key the Dataverse webhook answers every body up to 1 MiB with 2xx (a non-2xx
    # fails the agent's own change in Dynamics): what it cannot use is kept in the quarantine.
    # Every other route: 4xx or 2xx.
    oversized = any(len(d) > 1024 * 1024 for r, _, d, _ in jobs if r == "dataverse")
    assert {s for (r, s) in statuses if r == "dataverse"} <= ({200, 202, 413} if oversized else {200, 202})
    assert {s for (r, s) in statuses if r != "dataverse"} <= {200, 202, 400, 401, 403, 413, 415}
    kept = await stack.runtime.bridge.quarantine.list_quarantined(limit=100_000)
    assert any(item.route == "dataverse_webhook" for item in kept)

    # No stopped queue: a real change still goes through every route.
    await stack.settle(60)
    stack.dataverse.set_presence(DV.dynamics_id, BUSY, "AGENT")  # webhook -> Teams
    stack.graph.set_user_state(NOTIFIED.entra_id, "DoNotDisturb", "Presenting")  # notification -> Dynamics
    assert await stack.until(lambda: "/".join(stack.graph.presence_of(DV.entra_id)).startswith("Busy/"), 30)
    assert await stack.until(lambda: stack.dataverse.presence_of(NOTIFIED.dynamics_id) == DND, 30)
    stack.graph.drop_notifications(1)
    stack.graph.set_user_state(MISSED.entra_id, "Busy", "InACall")  # lost on the way ...
    await stack.graph.wait_idle(10)
    delivery = await stack.graph.send_lifecycle(stack.subscription_ids()[0], "missed")  # ... and recovered
    assert delivery is not None and delivery.status == 202
    assert await stack.until(lambda: stack.dataverse.presence_of(MISSED.dynamics_id) == BUSY, 30)
    reply = await stack.chat(CHATTY, "busy")  # the bot
    assert "Busy" in reply.text
    assert await stack.until(lambda: stack.dataverse.presence_of(CHATTY.dynamics_id) == BUSY, 30)

    metrics_after = await _metrics(stack)
    assert len(metrics_after) - len(metrics_before) < METRICS_SLACK, (len(metrics_before), len(metrics_after))

    # Junk paths, the webhook key among them: no series per path, no key in a label.
    paths = [f"/{rng.randbytes(6).hex()}/{i}" for i in range(JUNK_PATHS - 100)]
    paths += [f"/api/dataverse/webhook/{key}", "/api/graph/notifications/x", "/%ED%A0%80", "/" + "a/" * 200]
    paths += [f"/api/{rng.randbytes(4).hex()}?code={key}" for _ in range(100 - 4)]
    path_jobs = [("path", p, b"{}", {"Content-Type": "application/json"}) for p in paths]
    path_statuses = await _fire(stack.http, path_jobs)
    assert {r: n for r, n in path_statuses.items() if r[1] >= 500} == {}
    metrics_paths = await _metrics(stack)
    assert len(metrics_paths) - len(metrics_after) < 4 * 1024, (len(metrics_after), len(metrics_paths))

    # No secret anywhere it could leak to.
    formatter = JsonFormatter()
    log_text = "\n".join(formatter.format(r) for r in caplog.records)
    stored = "\n".join(r.last_error or "" for r in await stack.runtime.store.list_outbox(None, limit=10_000))
    stored += "\n".join(str(u) for u in await stack.runtime.store.list_unknown())
    places = {
        "logs": log_text,
        "metrics": metrics_paths,
        "cli": await _cli_output(stack, capsys),
        "stored errors": stored,
    }
    leaks = [
        (what, where) for what, secret in _secrets(stack).items() for where, text in places.items() if secret in text
    ]
    assert leaks == []
    assert len(caplog.records) > 100  # the logs were really captured (and looked at)
