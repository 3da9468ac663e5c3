"""The one scrubber (``mapping.redact``): no secret in a log line, a stored error or a message built
from what an upstream answered, whatever the upstream echoes."""

from __future__ import annotations

import json
import logging

from mapping.errors import PermanentError, RetryableError
from mapping.redact import MASK, redact, redact_value, remember
from service.logs import JsonFormatter, ReadableFormatter

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL2dyYXBoIn0.c2lnbmF0dXJlLXBhcnQ"


def test_shapes_of_secrets_are_masked_whoever_owns_them():
    echoed = (
        f'403 Forbidden: {{"request": {{"headers": {{"Authorization": "Bearer {JWT}"}}}}}} '
        "https://bridge.example/api/dataverse/webhook?code=s3cr3t-webhook-key&x=1 "
        "x-presence-sync-key: another-key client_secret=abc123def456"
    )
    out = redact(echoed)
    for secret in (JWT, "s3cr3t-webhook-key", "another-key", "abc123def456"):
        assert secret not in out
    assert "403 Forbidden" in out and "x=1" in out and MASK in out


def test_configured_secrets_are_masked_by_value_whatever_their_shape():
    remember(["plain-looking-but-secret", "short"])
    assert redact("clientState was plain-looking-but-secret here") == f"clientState was {MASK} here"
    assert redact("a short word") == "a short word"  # too short to mask by value


def test_errors_built_from_upstream_text_are_scrubbed_at_construction():
    for error in (PermanentError(f"Graph said: Authorization: Bearer {JWT}"), RetryableError(f"echo {JWT}")):
        assert JWT not in error.message and JWT not in str(error)


def test_log_lines_and_every_field_are_scrubbed():
    record = logging.LogRecord("presence_sync.graph", logging.WARNING, __file__, 1, f"failed with {JWT}", None, None)
    record.fields = {"error": f"Bearer {JWT}", "nested": {"list": [f"token={JWT}"]}, "n": 3}  # type: ignore[attr-defined]
    line = JsonFormatter().format(record)
    assert JWT not in line and json.loads(line)["n"] == 3
    assert JWT not in ReadableFormatter().format(record)
    assert redact_value({"a": [1, "Bearer abc.def"]}) == {"a": [1, f"Bearer {MASK}"]}


def test_settings_built_any_way_have_their_secrets_masked():
    from service.settings import Settings

    Settings(_env_file=None, dataverse_webhook_key="wk-0123456789-abcdef")  # type: ignore[call-arg]
    assert redact("posted with wk-0123456789-abcdef") == f"posted with {MASK}"
