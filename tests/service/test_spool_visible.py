"""The spool and the quarantine as an operator sees them: ``/readyz`` shows the spool (ready while
it works, 503 when it cannot be written), ``/metrics`` has the spool and quarantine gauges and the
quarantine counter, and ``doctor`` prints one spool line (empty / records waiting / unwritable)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from aiohttp import web

from edge.spool import Spool, SpoolRecord, spool_path
from emulators.graph import GraphEmulator
from service.app import create_app
from service.doctor import _Doctor
from service.runtime import Runtime, serve_owner
from tests.service.test_app_graph_e2e import free_port, service_settings


async def serve(tmp_path: Path, monkeypatch, **extra: object):  # type: ignore[no-untyped-def]
    graph = GraphEmulator(token="graph-token")
    await graph.start()
    port = free_port()
    settings = service_settings(tmp_path, monkeypatch, graph, port, **extra)
    rt = await Runtime.open(settings)
    runner = web.AppRunner(create_app(settings, runtime=rt, background=False))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return graph, rt, runner, f"http://127.0.0.1:{port}"


async def test_readyz_and_metrics_show_the_spool_and_the_quarantine(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    graph, rt, runner, base = await serve(tmp_path, monkeypatch)
    try:
        async with aiohttp.ClientSession(base_url=base) as http:
            r = await http.post("/api/dataverse/webhook", data=b"junk", headers={"Content-Type": "application/json"})
            assert r.status == 202 and (await r.json())["status"] == "quarantined"
            r = await http.get("/readyz")
            body = await r.json()
            assert r.status == 200, body
            assert body["spool"] == {"path": str(tmp_path / "spool" / rt.spool.path.name), "records": 0, "bytes": 0}
            text = await (await http.get("/metrics")).text()
        assert 'presence_sync_quarantined_total{reason="invalid_json",route="dataverse_webhook"} 1.0' in text
        assert "presence_sync_quarantine_items 1.0" in text
        assert "presence_sync_spool_records 0.0" in text and "presence_sync_spool_bytes 0.0" in text
    finally:
        await runner.cleanup()
        await rt.close()
        await graph.stop()


async def test_readyz_is_503_when_the_spool_cannot_be_written(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "file").write_text("not a folder")
    graph, rt, runner, base = await serve(tmp_path, monkeypatch, spool_dir=str(tmp_path / "file" / "spool"))
    try:
        async with aiohttp.ClientSession(base_url=base) as http:
            r = await http.get("/readyz")
            body = await r.json()
        assert r.status == 503, body
        assert any(p.startswith("webhook spool unwritable: cannot open") for p in body["problems"]), body
        assert body["spool"]["problem"].startswith("cannot open")
    finally:
        await runner.cleanup()
        await rt.close()
        await graph.stop()


async def test_doctor_prints_one_spool_line(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    graph = GraphEmulator(token="graph-token")
    await graph.start()  # only for its URL in the settings: the spool check calls no upstream
    try:
        await _doctor_lines(tmp_path, monkeypatch, graph)
    finally:
        await graph.stop()


async def _doctor_lines(tmp_path: Path, monkeypatch, graph: GraphEmulator) -> None:  # type: ignore[no-untyped-def]
    settings = service_settings(tmp_path, monkeypatch, graph, 3978, spool_dir=str(tmp_path / "spool"))
    doctor = _Doctor(settings, lambda line: None, 5.0)
    check = await doctor.spool()
    assert (check.status, check.name) == ("PASS", "webhook spool")
    assert check.detail.startswith(f"empty ({tmp_path / 'spool'}")

    spool = Spool(spool_path(tmp_path / "spool", serve_owner(settings)))
    spool.open()
    for _ in range(2):
        await spool.append(SpoolRecord("dataverse_webhook", datetime.now(UTC), "application/json", b"{}"))
    await spool.close()
    check = await doctor.spool()
    assert check.status == "WARN" and check.detail.startswith("2 record(s) waiting"), check
    assert "replays" in check.advice

    (tmp_path / "file").write_text("not a folder")
    bad = service_settings(tmp_path, monkeypatch, graph, 3978, spool_dir=str(tmp_path / "file" / "spool"))
    check = await _Doctor(bad, lambda line: None, 5.0).spool()
    assert check.status == "FAIL" and "not a writable folder" in check.detail
    assert "PRESENCE_SYNC_SPOOL_DIR" in check.advice
