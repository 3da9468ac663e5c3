"""The one settings object (``docs/DESIGN.md``, "Settings"): environment with prefix ``PRESENCE_SYNC_``, or ``.env``.

Every check that can be made before touching a network is made here, so that a bad value stops the
process with one line naming the variable, instead of failing later inside an adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from edge.upstream import is_loopback_url
from mapping.errors import ConfigError
from mapping.redact import remember

PREFIX = "PRESENCE_SYNC_"
MICROSOFT_JWKS_URL = "https://login.microsoftonline.com/common/discovery/v2.0/keys"
PREFERRED_REFUSED = (
    "preferred is not supported: Graph shows a preferred presence only while the user has a presence "
    "session (else Offline), and a session the bridge kept for that would show Available or Away "
    "whenever the bridge steps back; use session (the default)"
)
"""Why ``GRAPH_PRESENCE_MODE=preferred`` stops the process (docs/adapters.md, "Presence mode")."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    host: str = "127.0.0.1"
    port: int = 3978
    public_url: str = ""
    database_url: str = "sqlite+aiosqlite:///presence-sync.db"

    tenant_id: str = ""
    client_id: str = ""
    client_cert_path: str = ""
    client_secret: str = ""
    auth_mode: Literal["entra", "static"] = "entra"
    static_token: str = ""
    static_subscriber_tokens: str = ""

    graph_url: str = "https://graph.microsoft.com/v1.0"
    graph_client_state: str = ""
    graph_encryption_cert_path: str = ""
    graph_encryption_key_path: str = ""
    graph_jwks_url: str = ""
    graph_presence_mode: Literal["session", "preferred"] = "session"
    graph_session_expiration_minutes: int = 60

    dataverse_url: str = ""
    dataverse_webhook_key: str = ""

    bot_app_id: str = ""
    bot_app_password: str = ""
    bot_app_type: Literal["MultiTenant", "SingleTenant", "UserAssignedMSI"] = "SingleTenant"
    """New Azure Bot resources cannot be multi-tenant (since July 2025); a bot configured as
    MultiTenant against a single-tenant registration asks the wrong authority and every reply fails."""
    bot_tenant_id: str = ""

    mapping_file: str = ""
    reconcile_interval_seconds: float = 300.0
    secret_key: str = ""
    """Fernet key (urlsafe base64, 32 bytes) for secrets at rest; without it token caches are refused."""
    outbox_max_attempts: int = 8
    """Tries of an upstream read before it fails; a delivery makes at least this many and dies only
    once ``dead_letter_after_hours`` have passed since its first failure as well."""
    dead_letter_after_hours: float = 24.0
    """How long a command keeps being retried after its first failed attempt before it becomes a dead
    letter (permanent errors die at once); time while its upstream is down does not kill it."""
    heartbeat_seconds: float = 2.0
    """How often this instance records that it is alive; rows leased by an instance silent for three
    of these are taken over."""
    teams_write_hold_seconds: float = 0.5
    """Quiet time before a Dynamics 365 change is written to Teams: a burst folds into one Graph
    call (Graph allows 1,500 presence writes per 30 s for the whole tenant); a steady stream is
    still written every 10 holds."""
    log_level: str = "INFO"

    quarantine_max_items: int = 10_000
    """Webhook bodies the bridge could not use, kept for an admin (oldest dropped first beyond it)."""
    spool_dir: str = ""
    """Where each instance keeps its webhook spool file; default: a ``spool`` folder next to the
    SQLite file, or ``./spool`` with PostgreSQL."""
    spool_max_bytes: int = 64 * 1024 * 1024
    store_commit_timeout_seconds: float = 1.0
    """How long a webhook waits for the store before its change goes to the spool."""

    console_allowed_group_id: str = ""
    """Entra group (object id) whose members may sign in to ``/console`` (the id token's ``groups``
    claim; the app registration must emit group claims)."""
    console_allowed_role: str = ""
    """App role (its value) whose holders may sign in to ``/console`` (the id token's ``roles`` claim).
    With neither set, only the one-time link of ``presence-sync console link`` (on loopback) signs in."""

    @field_validator("port")
    @classmethod
    def _port(cls, v: int) -> int:
        if not 0 <= v <= 65535:
            raise ValueError("expected a port number from 0 to 65535")
        return v

    @field_validator("graph_session_expiration_minutes")
    @classmethod
    def _expiration(cls, v: int) -> int:
        if not 5 <= v <= 240:
            raise ValueError("Graph accepts a session expiration from 5 to 240 minutes")
        return v

    @field_validator("graph_presence_mode")
    @classmethod
    def _presence_mode(cls, v: str) -> str:
        if v == "preferred":
            raise ValueError(PREFERRED_REFUSED)
        return v

    @field_validator("reconcile_interval_seconds")
    @classmethod
    def _interval(cls, v: float) -> float:
        if v < 0:
            raise ValueError("expected seconds >= 0 (0 turns the periodic sweep off)")
        return v

    @field_validator("teams_write_hold_seconds")
    @classmethod
    def _hold(cls, v: float) -> float:
        if not 0 <= v <= 30:
            raise ValueError("expected seconds from 0 to 30 (0 writes every change at once)")
        return v

    @field_validator("outbox_max_attempts")
    @classmethod
    def _attempts(cls, v: int) -> int:
        if not 1 <= v <= 100:
            raise ValueError("expected a number of tries from 1 to 100")
        return v

    @field_validator("dead_letter_after_hours")
    @classmethod
    def _dead_letter(cls, v: float) -> float:
        if not 0 <= v <= 24 * 30:
            raise ValueError("expected hours from 0 to 720 (0: die after the tries alone)")
        return v

    @field_validator("heartbeat_seconds")
    @classmethod
    def _heartbeat(cls, v: float) -> float:
        if not 0.1 <= v <= 60:
            raise ValueError("expected seconds from 0.1 to 60")
        return v

    @field_validator("quarantine_max_items")
    @classmethod
    def _quarantine_max(cls, v: int) -> int:
        if not 1 <= v <= 1_000_000:
            raise ValueError("expected a number of items from 1 to 1000000")
        return v

    @field_validator("spool_max_bytes")
    @classmethod
    def _spool_max(cls, v: int) -> int:
        if v < 2 * 1024 * 1024:
            raise ValueError("expected at least 2097152 bytes (2 MiB: one webhook body may be 1 MiB)")
        return v

    @field_validator("store_commit_timeout_seconds")
    @classmethod
    def _commit_timeout(cls, v: float) -> float:
        if not 0.05 <= v <= 10:
            raise ValueError("expected seconds from 0.05 to 10 (Dataverse waits for the answer)")
        return v

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, v: str) -> str:
        v = v.strip()
        for plain in ("postgresql://", "postgres://"):
            if v.startswith(plain):
                v = "postgresql+asyncpg://" + v[len(plain) :]
        if v.startswith("sqlite://") and not v.startswith("sqlite+aiosqlite://"):
            v = "sqlite+aiosqlite://" + v[len("sqlite://") :]
        if not (v.startswith("sqlite+aiosqlite:///") or v.startswith("postgresql+asyncpg://")):
            raise ValueError("expected sqlite+aiosqlite:///FILE.db or postgresql+asyncpg://USER@HOST:PORT/DB")
        return v

    @field_validator("public_url", "graph_url", "dataverse_url", "graph_jwks_url")
    @classmethod
    def _url(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        if v and (urlsplit(v).scheme not in ("http", "https") or not urlsplit(v).hostname):
            raise ValueError("expected an http(s) URL such as https://host/path")
        return v

    @model_validator(mode="after")
    def _modes(self) -> Settings:
        upstreams = {
            "GRAPH_URL": self.graph_url,
            "DATAVERSE_URL": self.dataverse_url,
            "GRAPH_JWKS_URL": self.graph_jwks_url,
        }
        if self.auth_mode == "static":
            for name, url in upstreams.items():
                if url and not is_loopback_url(url):
                    raise ValueError(
                        f"{PREFIX}{name}={url} is not a loopback address; AUTH_MODE=static (a fixed "
                        "token for the emulators) only talks to 127.0.0.1/localhost. Use AUTH_MODE=entra "
                        "for a real tenant"
                    )
            if not self.static_token:
                raise ValueError(f"{PREFIX}AUTH_MODE=static needs {PREFIX}STATIC_TOKEN")
        else:
            for name, url in upstreams.items():
                if url and urlsplit(url).scheme != "https" and not is_loopback_url(url):
                    raise ValueError(f"{PREFIX}{name}={url} must use https")
        if (self.graph_encryption_cert_path == "") != (self.graph_encryption_key_path == ""):
            raise ValueError(f"{PREFIX}GRAPH_ENCRYPTION_CERT_PATH and {PREFIX}GRAPH_ENCRYPTION_KEY_PATH go together")
        for name in ("client_cert_path", "graph_encryption_cert_path", "graph_encryption_key_path", "mapping_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"{PREFIX}{name.upper()}={path}: no such file")
        # Valid settings, however they were built (environment, CLI, a test's own values): their
        # secrets are masked by value in every log line and stored error from now on.
        remember(self.secrets())
        return self

    # Derived values: one place, so adapters and doctor agree.
    @property
    def jwks_url(self) -> str:
        """Keys for Graph ``validationTokens``: Microsoft's, or in static mode the emulator's beside Graph."""
        if self.graph_jwks_url:
            return self.graph_jwks_url
        if self.auth_mode == "static":
            parts = urlsplit(self.graph_url)
            return f"{parts.scheme}://{parts.netloc}/common/discovery/v2.0/keys"
        return MICROSOFT_JWKS_URL

    def secrets(self) -> list[str]:
        """The configured values no log line, metric, listing or message may show."""
        return [
            self.client_secret,
            self.static_token,
            *self.subscriber_tokens,
            self.graph_client_state,
            self.dataverse_webhook_key,
            self.bot_app_password,
            self.secret_key,
        ]

    @property
    def bot_tenant(self) -> str:
        """``BOT_TENANT_ID``, else ``TENANT_ID``: the bot is usually registered in the same tenant."""
        return self.bot_tenant_id.strip() or self.tenant_id.strip()

    @property
    def subscriber_tokens(self) -> list[str]:
        tokens = [t.strip() for t in self.static_subscriber_tokens.split(",") if t.strip()]
        return tokens or ([self.static_token] if self.static_token else [])

    @property
    def dataverse_enabled(self) -> bool:
        return bool(self.dataverse_url)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def public(self, path: str) -> str:
        base = self.public_url or f"http://{self.host}:{self.port}"
        return base.rstrip("/") + path


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment (and ``.env``), with ``overrides`` on top; ConfigError on bad input."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e)) from None


def describe_validation_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "__root__"]
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if loc:
            got = err.get("input")
            shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
            if any(s in loc[0] for s in ("password", "secret", "token", "key")) and "path" not in loc[0]:
                shown = ""
            lines.append(f"{PREFIX}{loc[0].upper()}: {msg}{shown}")
        else:
            lines.append(msg)
    return "; ".join(lines)
