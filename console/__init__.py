"""The operations console: ``GET /console``, a self-contained web page (assets in ``console/static``)
over a small JSON API and a server-sent event stream, mounted on the service's own aiohttp app by
``console.routes.add_routes``. Every route needs a signed-in session (``console.access``)."""
