"""Reading an intake request's body: bounded in size, of a JSON content type, valid JSON, nested no
deeper than any real document. Every route refuses junk the same way."""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from typing import Any

from aiohttp import web

from edge.intake import Rejected

JSON_TYPES = frozenset({"application/json", "text/json"})
MAX_DEPTH = 128
"""Deepest nesting read. The deepest real documents (a Dataverse context with its ParentContext chain)
nest a few dozen levels. Deeper bodies are refused before ``json.loads`` sees them: the parser recurses
per level, and near the interpreter's recursion limit any finalizer the garbage collector runs there
fails too, so catching its RecursionError afterwards is not enough."""

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
    has_type = "Content-Type" in request.headers
    ctype = request.content_type
    if (has_type or type_required) and not (has_type and (ctype in types or ctype.endswith("+json"))):
        shown = ctype if has_type else "none"
        raise Rejected(415, "unsupported_media_type", f"content type {shown!r}; expected application/json")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):  # chunked uploads carry no length
        size += len(chunk)
        if size > max_body:
            raise Rejected(413, "too_large", f"body exceeds {max_body} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise Rejected(400, "malformed", f"empty body; expected {what}")
    if nested_deeper_than(raw, MAX_DEPTH):
        raise Rejected(400, "malformed", "body is not a usable JSON document: nested too deeply")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise Rejected(400, "malformed", f"body is not JSON: {e}") from None
    except RecursionError:  # [[[[...: junk, not a failure of ours, so not a 503 that invites a resend
        raise Rejected(400, "malformed", "body is not a usable JSON document: nested too deeply") from None
    if b"\\u" in raw:
        # JSON may escape a lone surrogate (\ud800): valid JSON, but not text. Let in, it fails later
        # wherever the string is encoded (a log line, the store), far from the request: refused here.
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise Rejected(400, "malformed", "body holds invalid Unicode (an unpaired surrogate escape)") from None
    return body
