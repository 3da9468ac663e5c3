"""Typed failures: the outbox decides retry, wait or dead-letter from an upstream error's type alone.
(An intake's refusal of a request, ``Rejected``, is HTTP business: ``edge.intake``.)"""

from __future__ import annotations

from mapping.redact import redact


class UpstreamError(Exception):
    """Base of what a port may raise while delivering. ``message`` is safe to log (no secrets)."""

    retryable = True

    def __init__(self, message: str, *, status: int | None = None) -> None:
        message = redact(message)  # built from upstream text, which may echo our credentials
        super().__init__(message)
        self.message = message
        self.status = status


class Throttled(UpstreamError):
    """429 (or 503 with Retry-After): wait at least ``retry_after`` seconds before the next try."""

    def __init__(self, message: str, retry_after: float | None, *, status: int | None = 429) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class RetryableError(UpstreamError):
    """5xx, time-out, connection refused: try again with backoff."""


class PermanentError(UpstreamError):
    """400/403/404/405: retrying cannot help; dead-letter at once with the upstream's own message."""

    retryable = False


class ConfigError(Exception):
    """Bad configuration or input an admin must fix: the message names what and where."""
