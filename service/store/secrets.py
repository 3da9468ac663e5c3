"""Secrets at rest (the delegated token cache): Fernet, keyed by ``PRESENCE_SYNC_SECRET_KEY``.

A stolen database file alone must not give away a refresh token. Without a key the store refuses
to keep secrets at all rather than writing them in clear.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken

from mapping.errors import ConfigError

_MAKE_ONE = "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"
KEY_MISSING = f"PRESENCE_SYNC_SECRET_KEY is not set: it encrypts token caches at rest; make one with: {_MAKE_ONE}"


class SecretBox:
    """Encrypts and decrypts with one Fernet key; every failure is a ``ConfigError`` naming the setting."""

    def __init__(self, key: str) -> None:
        self._fernet: Fernet | None = None
        key = key.strip()
        if key:
            try:
                self._fernet = Fernet(key)
            except ValueError:
                raise ConfigError(
                    "PRESENCE_SYNC_SECRET_KEY is not a valid key (expected 32 url-safe base64-encoded bytes); "
                    f"make one with: {_MAKE_ONE}"
                ) from None

    def require_key(self) -> None:
        self._key()

    def _key(self) -> Fernet:
        if self._fernet is None:
            raise ConfigError(KEY_MISSING)
        return self._fernet

    def seal(self, plaintext: bytes) -> bytes:
        return self._key().encrypt(plaintext)

    def open(self, name: str, ciphertext: bytes) -> bytes:
        try:
            return self._key().decrypt(ciphertext)
        except InvalidToken:
            raise ConfigError(
                f"PRESENCE_SYNC_SECRET_KEY does not match the stored secrets (secret {name!r} cannot be "
                "decrypted): set the key they were written with, or remove the secret and sign in again"
            ) from None
