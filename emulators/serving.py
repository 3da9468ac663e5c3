"""Serving an aiohttp app on a loopback port: what every emulator, bench and test server does."""

from __future__ import annotations

from aiohttp import web


async def serve_app(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, str]:
    """Runs ``app`` on ``host:port`` (0: a free port the OS picks) and returns its runner (call
    ``cleanup()`` to stop it) and base URL ``http://HOST:PORT``, IPv6 hosts in brackets."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound_host, bound_port = runner.addresses[0][:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return runner, f"http://{shown}:{bound_port}"
