"""One scrubber for every text that leaves the process or is stored: log lines and their fields,
outbox errors, messages built from what an upstream answered (which may echo our own request's
Authorization header or a URL with the webhook key back at us).

Two layers: the secrets this instance was configured with (``remember``: exact values, whatever
their shape), and the shapes secrets have whoever owns them (bearer tokens, JWTs, ``key=``/
``code=``/``secret=`` parameters, ``Authorization`` and key headers)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"
_MIN_SECRET = 8
"""Shorter configured values are not masked by value (a 3-letter value would mask ordinary words);
their shapes still are."""

_SHAPES = [
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9\-._~+/]+=*"), rf"\1 {MASK}"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), MASK),  # a JWT
    (
        re.compile(
            r"(?i)\b(authorization|x-presence-sync-key|x-functions-key|api-key|ocp-apim-subscription-key)"
            r"(\"?\s*[:=]\s*\"?)(?!(?i:bearer|basic)\s)[^\s\",;]+"
        ),
        rf"\1\2{MASK}",
    ),
    (
        re.compile(
            r"(?i)([?&;\s\"']|^)(code|key|sig|token|access_token|refresh_token|client_secret|password|clientstate)"
            r"(\"?\s*[=:]\s*\"?)[^&\s\"',;]+"
        ),
        rf"\1\2\3{MASK}",
    ),
]

_known: set[str] = set()


def remember(secrets: Iterable[str]) -> None:
    """Adds configured secrets (the settings' keys, passwords, tokens) to be masked by value."""
    _known.update(s for s in secrets if s and len(s) >= _MIN_SECRET)


def redact(text: str) -> str:
    for secret in sorted(_known, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    for pattern, replacement in _SHAPES:
        text = pattern.sub(replacement, text)
    return text


def redact_value(value: Any) -> Any:
    """``redact`` through the strings of a log field: str, and the str inside lists and mappings."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value


_PAIR_KEY = re.compile(r'"([Kk]ey)"(\s*:)')
_HIDE = "\x00\x01pair\x01"


def redact_bytes(data: bytes) -> bytes:
    """``redact`` over a stored request body that may not be UTF-8: undecodable bytes pass through
    unchanged (``surrogateescape``), so the body stays what was received, less its secrets.

    One exception to the shapes: the ``"key":`` of a JSON ``{"key": NAME, "value": ...}`` pair (every
    DataContract collection of a Dataverse context is a list of them) names a field, it is no secret,
    and masking it would leave a body no one can read."""
    text = _PAIR_KEY.sub(lambda m: f'"{_HIDE}{m[1]}"{m[2]}', data.decode("utf-8", "surrogateescape"))
    return redact(text).replace(_HIDE, "").encode("utf-8", "surrogateescape")
