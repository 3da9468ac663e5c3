"""Token providers (``mapping.ports.TokenProvider``): azure-identity for a real tenant, a fixed token
for the emulators. Built here once, handed to every adapter."""

from __future__ import annotations

import time
from typing import Any

from mapping.errors import ConfigError, PermanentError, RetryableError
from service.settings import PREFIX, Settings


class StaticTokens:
    """``AUTH_MODE=static``: the emulators accept one fixed bearer token (settings forbid non-loopback
    upstreams in this mode, so the token never leaves the machine)."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def token(self, scope: str) -> str:
        return self._token


class EntraTokens:
    """Client credentials (certificate, or secret) through azure-identity, cached until near expiry."""

    def __init__(self, settings: Settings) -> None:
        from azure.identity.aio import CertificateCredential, ClientSecretCredential

        if not settings.tenant_id or not settings.client_id:
            raise ConfigError(f"{PREFIX}TENANT_ID and {PREFIX}CLIENT_ID are needed with AUTH_MODE=entra")
        self._credential: Any
        if settings.client_cert_path:
            self._credential = CertificateCredential(
                settings.tenant_id, settings.client_id, certificate_path=settings.client_cert_path
            )
        elif settings.client_secret:
            self._credential = ClientSecretCredential(settings.tenant_id, settings.client_id, settings.client_secret)
        else:
            raise ConfigError(
                f"{PREFIX}CLIENT_CERT_PATH (PEM with key; recommended) or {PREFIX}CLIENT_SECRET is needed "
                "with AUTH_MODE=entra"
            )
        self._cache: dict[str, tuple[str, float]] = {}

    async def token(self, scope: str) -> str:
        cached = self._cache.get(scope)
        if cached and cached[1] - time.time() > 120:
            return cached[0]
        from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError

        try:
            tok = await self._credential.get_token(scope)
        except ClientAuthenticationError as e:
            raise PermanentError(
                f"Entra refused the app's credentials for {scope}: {str(e).splitlines()[0]} — check "
                f"{PREFIX}TENANT_ID, {PREFIX}CLIENT_ID and the certificate/secret"
            ) from None
        except ServiceRequestError as e:
            raise RetryableError(f"cannot reach Entra for a token ({scope}): {e}") from None
        self._cache[scope] = (tok.token, float(tok.expires_on))
        return str(tok.token)

    async def close(self) -> None:
        await self._credential.close()


class UnconfiguredTokens:
    """No Entra app configured yet: the service still starts (health, readiness, intake, outbox),
    and every upstream call fails with what to set, so nothing is lost while an admin finishes set-up."""

    problem = (
        f"no Entra app configured: set {PREFIX}TENANT_ID, {PREFIX}CLIENT_ID and {PREFIX}CLIENT_CERT_PATH "
        f"(or {PREFIX}CLIENT_SECRET), or {PREFIX}AUTH_MODE=static for the emulators"
    )

    async def token(self, scope: str) -> str:
        raise PermanentError(self.problem)


def token_provider(settings: Settings) -> StaticTokens | EntraTokens | UnconfiguredTokens:
    if settings.auth_mode == "static":
        return StaticTokens(settings.static_token)
    if not settings.tenant_id and not settings.client_id:
        return UnconfiguredTokens()
    return EntraTokens(settings)
