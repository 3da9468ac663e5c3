"""Logging set-up: one JSON object per line for ``serve`` (machines read it), readable lines for the
CLI and ``demo`` (people read it). Structured fields travel in ``extra={"fields": {...}}``."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from mapping.redact import redact, redact_value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update({k: redact_value(v) for k, v in fields.items() if k not in doc})
        if record.exc_info:
            doc["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(doc, default=lambda o: redact(str(o)))


class ReadableFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        fields = getattr(record, "fields", None)
        tail = ""
        if isinstance(fields, dict) and fields:
            tail = " " + " ".join(f"{k}={v}" for k, v in fields.items() if v not in (None, "", []))
        line = f"{ts} {record.levelname:<7} {record.name.removeprefix('presence_sync.')}: {record.getMessage()}{tail}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


def configure(*, json_lines: bool, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else ReadableFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("presence_sync").setLevel(level.upper())
    for noisy in ("aiohttp.access", "azure", "msal", "httpx", "botbuilder"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
