"""Reading an intake request's body: bounded in size, of a JSON content type, valid JSON, nested no
deeper than any real document. Every route refuses junk the same way.

The steps are also offered one by one (``read_body``, ``is_json_type``, ``parse_json``) for a route
that must keep what it cannot use instead of refusing it (the Dataverse webhook's quarantine)."""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from typing import Any, Literal

import orjson
from aiohttp import web

from edge.intake import Rejected

JSON_TYPES = frozenset({"application/json", "text/json"})
MAX_DEPTH = 128
"""Deepest nesting read. The deepest real documents (a Dataverse context with its ParentContext chain)
nest a few dozen levels. Deeper bodies are refused before ``json.loads`` sees them: the parser recurses
per level, and near the interpreter's recursion limit any finalizer the garbage collector runs there
fails too, so catching its RecursionError afterwards is not enough."""

_DIGITS = bytes(ord("0") if chr(b).isdigit() and b < 128 else ord(" ") for b in range(256))
_LONG_RUN = b"0" * 19
"""A run of 19 digits: the shortest integer that may not fit 64 bits (``parse_json``)."""
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def nested_deeper_than(raw: bytes, limit: int) -> bool:
    """True when the JSON text ``raw`` opens more than ``limit`` arrays/objects inside each other.
    A flat scan: strings (where brackets are text) are cut out, then the brackets are counted."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    depth = 0
    for byte in _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS):
        if byte in b"[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


JsonProblem = Literal["empty", "invalid", "too_deep", "bad_unicode"]


class JsonError(ValueError):
    """The body is not a usable JSON document; ``kind`` is one of a fixed set (a metric label),
    ``message`` is safe to send back."""

    def __init__(self, kind: JsonProblem, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


async def read_body(request: web.Request, *, max_body: int) -> bytes:
    """The raw body, refused with 413 over ``max_body`` (by ``Content-Length`` and while reading:
    chunked uploads carry no length)."""
    if request.content_length is not None and request.content_length > max_body:
        raise Rejected(413, "too_large", f"body of {request.content_length} bytes exceeds {max_body}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > max_body:
            raise Rejected(413, "too_large", f"body exceeds {max_body} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def is_json_type(request: web.Request, *, types: Collection[str] = JSON_TYPES, type_required: bool = True) -> bool:
    has_type = "Content-Type" in request.headers
    ctype = request.content_type
    return not (has_type or type_required) or (has_type and (ctype in types or ctype.endswith("+json")))


def shown_type(request: web.Request) -> str:
    return request.content_type if "Content-Type" in request.headers else "none"


def parse_json(raw: bytes, *, what: str) -> Any:
    """``raw`` as JSON, or ``JsonError`` saying why not (``what`` names the expected document)."""
    if not raw.strip():
        raise JsonError("empty", f"empty body; expected {what}")
    if nested_deeper_than(raw, MAX_DEPTH):
        raise JsonError("too_deep", "body is not a usable JSON document: nested too deeply")
    if _LONG_RUN not in raw.translate(_DIGITS):
        try:
            # orjson reads in a third of json's time (a Dataverse context: 9 µs, json 22 µs). What it
            # refuses (NaN, a lone surrogate escape, junk) is read by json, so what is accepted and
            # every refusal's reason stay json's. It reads an integer past 64 bits as a float, where
            # json keeps it exact: a body with such a run of digits goes to json (3 µs to find out).
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise JsonError("invalid", f"body is not JSON: {e}") from None
    except RecursionError:  # [[[[...: junk, not a failure of ours, so not a 503 that invites a resend
        raise JsonError("too_deep", "body is not a usable JSON document: nested too deeply") from None
    if b"\\u" in raw:
        # JSON may escape a lone surrogate (\ud800): valid JSON, but not text. Let in, it fails later
        # wherever the string is encoded (a log line, the store), far from the request: refused here.
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise JsonError("bad_unicode", "body holds invalid Unicode (an unpaired surrogate escape)") from None
    return body


async def read_json(
    request: web.Request,
    *,
    max_body: int,
    what: str,
    types: Collection[str] = JSON_TYPES,
    type_required: bool = True,
) -> Any:
    """The body as JSON. ``what`` names the expected document in refusals ("a RemoteExecutionContext
    JSON object"). ``type_required``: False accepts a request without a Content-Type header (Graph
    sends one, but its validation POST may not); a wrong one is always refused."""
    if request.content_length is not None and request.content_length > max_body:
        raise Rejected(413, "too_large", f"body of {request.content_length} bytes exceeds {max_body}")
    if not is_json_type(request, types=types, type_required=type_required):
        raise Rejected(
            415, "unsupported_media_type", f"content type {shown_type(request)!r}; expected application/json"
        )
    raw = await read_body(request, max_body=max_body)
    try:
        return parse_json(raw, what=what)
    except JsonError as e:
        raise Rejected(400, "malformed", e.message) from None
