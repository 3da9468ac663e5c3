"""Upstream URL and address policy, and what an upstream's answer says about waiting.

Loopback guards secrets: plain ``http`` upstreams, static tokens and unauthenticated webhooks are
allowed on loopback only, so the same notion of "loopback" must hold everywhere (``::1``, the whole
of 127.0.0.0/8, IPv4-mapped ``::ffff:127.0.0.1`` and ``localhost``)."""

from __future__ import annotations

import email.utils
import ipaddress
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

from mapping.errors import ConfigError


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 (and their IPv4-mapped form) and ``localhost``."""
    if not host:
        return False
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def is_loopback_url(url: str) -> bool:
    return is_loopback(urlsplit(url).hostname)


def upstream_base_url(url: str, *, name: str, expected: str = "https") -> str:
    """An upstream's base URL without a trailing slash: ``https`` anywhere, ``http`` only on loopback
    (a bearer token must never cross a network in clear text). ``name`` and ``expected`` word the
    error: which setting, and what it should look like."""
    parts = urlsplit(url)
    if (parts.scheme == "https" and parts.hostname) or (parts.scheme == "http" and is_loopback(parts.hostname)):
        return url.rstrip("/")
    raise ConfigError(f"{name} {url!r} must be {expected} (http is accepted for loopback emulators only)")


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; None when absent or unreadable. Any
    header mapping (case-insensitive lookup), so every adapter reads it the same way."""
    if not headers:
        return None
    raw = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if raw is None:
        return None
    raw = raw.strip()
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
