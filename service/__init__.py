"""Composition root: settings, store, the aiohttp application, background workers and the CLI."""
