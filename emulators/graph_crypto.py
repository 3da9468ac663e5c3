"""The cryptography of Microsoft Graph change notifications, made the way Graph makes it.

Split from ``emulators/graph.py`` so that tests of the bridge's Graph adapter can build vectors with
exactly the code the emulator sends, without starting an emulator:

- ``encrypt_for_certificate``: the ``encryptedContent`` of a rich notification. Graph draws a random
  32-byte AES key per notification; ``data`` is AES-256-CBC with PKCS7 padding of the resource JSON with
  the first 16 bytes of the key as IV; ``dataKey`` is the key encrypted with the subscription's
  certificate public key using RSA/ECB/OAEPWithSHA1AndMGF1Padding (OAEP, SHA-1 digest, MGF1 with SHA-1:
  the cipher suite Graph's documentation names for ``dataKey``); ``dataSignature`` is
  base64(HMAC-SHA256(key, base64-decoded ``data``)); ``encryptionCertificateThumbprint`` is the
  upper-case hexadecimal SHA-1 of the certificate's DER (as Windows prints thumbprints).
- ``sign_validation_token``: the JWTs Graph puts in ``validationTokens``: RS256, header ``kid`` (= ``x5t``,
  the base64url SHA-1 of the signing certificate, as Entra does), claims ``aud`` = the subscribing app's
  client id, ``azp``/``appid`` = the Graph change-tracking app, ``iss`` = ``https://sts.windows.net/<tenant>/``.
- ``SigningKey``: an RSA key with a self-signed certificate, published as a JWKS document shaped like
  Entra's ``/discovery/v2.0/keys`` (``kty``, ``use``, ``kid``, ``x5t``, ``n``, ``e``, ``x5c``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.x509.oid import NameOID

GRAPH_CHANGE_TRACKING_APP_ID = "0bf30f3b-4a52-48df-9a82-234910c4a086"
"""``azp`` of every Graph validation token: the Microsoft Graph change-tracking application."""

OAEP_PADDING = asym_padding.OAEP(mgf=asym_padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
"""RSA/ECB/OAEPWithSHA1AndMGF1Padding, the ``dataKey`` cipher suite Graph documents."""


def load_certificate(data: bytes | str) -> x509.Certificate:
    """A certificate from PEM, DER, or base64 DER (what ``encryptionCertificate`` carries).

    Raises ``ValueError`` with a readable reason when none of the three parses."""
    raw = data.encode() if isinstance(data, str) else data
    if b"-----BEGIN CERTIFICATE-----" in raw:
        return x509.load_pem_x509_certificate(raw)
    try:
        return x509.load_der_x509_certificate(raw)
    except ValueError:
        pass
    try:
        der = base64.b64decode(b"".join(raw.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError("not a PEM, DER or base64 DER certificate") from e
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as e:
        raise ValueError(f"base64 decodes but is not a DER certificate: {e}") from e


def certificate_thumbprint(cert: x509.Certificate) -> str:
    """Upper-case hex SHA-1 of the DER certificate: Graph's ``encryptionCertificateThumbprint``."""
    return cert.fingerprint(hashes.SHA1()).hex().upper()


def certificate_base64_der(cert: x509.Certificate) -> str:
    """What a subscriber sends as ``encryptionCertificate``."""
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


def encrypt_for_certificate(
    cert_pem: bytes | str | x509.Certificate,
    payload: Mapping[str, Any],
    *,
    certificate_id: str = "",
    key: bytes | None = None,
) -> dict[str, str]:
    """``encryptedContent`` for ``payload`` as Graph builds it for a subscription's certificate.

    ``key`` (32 bytes) is drawn at random per call, as Graph does; pass it only to make a fixed vector.
    The payload is serialised as compact UTF-8 JSON."""
    cert = cert_pem if isinstance(cert_pem, x509.Certificate) else load_certificate(cert_pem)
    public_key = cert.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise ValueError("the encryption certificate must carry an RSA public key")
    key = os.urandom(32) if key is None else key
    if len(key) != 32:
        raise ValueError("the symmetric key must be 32 bytes (AES-256)")
    plaintext = json.dumps(dict(payload), separators=(",", ":"), ensure_ascii=False).encode()
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    data = encryptor.update(padded) + encryptor.finalize()
    return {
        "data": base64.b64encode(data).decode(),
        "dataSignature": base64.b64encode(hmac.new(key, data, hashlib.sha256).digest()).decode(),
        "dataKey": base64.b64encode(public_key.encrypt(key, OAEP_PADDING)).decode(),
        "encryptionCertificateId": certificate_id,
        "encryptionCertificateThumbprint": certificate_thumbprint(cert),
    }


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def generate_certificate(
    common_name: str = "presence-sync-test",
    *,
    key: rsa.RSAPrivateKey | None = None,
    not_before: datetime | None = None,
    days: int = 365,
) -> tuple[bytes, bytes]:
    """A self-signed RSA-2048 certificate and its key, both PEM: ``(cert_pem, key_pem)``.

    For tests and the demo (the subscription's encryption certificate); never for production."""
    key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
    start = not_before or (datetime.now(UTC) - timedelta(days=1))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class SigningKey:
    """The emulated identity platform's token-signing key: an RSA key, its certificate, its ``kid``.

    ``kid`` is the base64url SHA-1 thumbprint of the certificate, the same value as ``x5t``, which is
    how Entra names its keys; a verifier finds the key by ``kid`` in ``jwks()``."""

    def __init__(self, private_key: rsa.RSAPrivateKey | None = None) -> None:
        self.private_key = private_key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert_pem, _ = generate_certificate("accounts.emulator.local", key=self.private_key, days=3650)
        self.certificate = x509.load_pem_x509_certificate(cert_pem)
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        self.kid = base64.urlsafe_b64encode(hashlib.sha1(der).digest()).rstrip(b"=").decode()
        self._x5c = base64.b64encode(der).decode()

    def jwk(self) -> dict[str, Any]:
        numbers = self.private_key.public_key().public_numbers()
        return {
            "kty": "RSA",
            "use": "sig",
            "kid": self.kid,
            "x5t": self.kid,
            "n": _b64url_uint(numbers.n),
            "e": _b64url_uint(numbers.e),
            "x5c": [self._x5c],
            "alg": "RS256",
        }

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.jwk()]}

    def sign(self, claims: Mapping[str, Any]) -> str:
        return jwt.encode(
            dict(claims), self.private_key, algorithm="RS256", headers={"kid": self.kid, "x5t": self.kid, "typ": "JWT"}
        )


def validation_token_claims(
    *,
    client_id: str,
    tenant_id: str,
    now: datetime | None = None,
    lifetime: timedelta = timedelta(hours=1),
    azp: str = GRAPH_CHANGE_TRACKING_APP_ID,
) -> dict[str, Any]:
    """The claims of a Graph validation token (v1.0 Entra access token shape).

    ``iat``/``nbf`` sit five minutes before ``now`` as Entra issues them (clock-skew allowance)."""
    now = now or datetime.now(UTC)
    issued = int((now - timedelta(minutes=5)).timestamp())
    return {
        "aud": client_id,
        "iss": f"https://sts.windows.net/{tenant_id}/",
        "iat": issued,
        "nbf": issued,
        "exp": int((now + lifetime).timestamp()),
        "azp": azp,
        "appid": azp,
        "azpacr": "2",
        "tid": tenant_id,
        "sub": azp,
        "oid": azp,
        "ver": "1.0",
    }


def sign_validation_token(
    signing_key: SigningKey | rsa.RSAPrivateKey | bytes,
    *,
    client_id: str,
    tenant_id: str,
    now: datetime | None = None,
    lifetime: timedelta = timedelta(hours=1),
    azp: str = GRAPH_CHANGE_TRACKING_APP_ID,
    kid: str | None = None,
    extra_claims: Mapping[str, Any] | None = None,
) -> str:
    """One ``validationTokens`` entry, signed RS256.

    ``signing_key``: the emulator's ``SigningKey`` (its ``kid`` is used), or any RSA private key (object
    or PEM) with ``kid`` given, to make tokens from a wrong signer in tests. ``extra_claims`` override
    or add claims (an expired ``exp``, a wrong ``aud``...)."""
    claims = validation_token_claims(client_id=client_id, tenant_id=tenant_id, now=now, lifetime=lifetime, azp=azp)
    claims.update(extra_claims or {})
    if isinstance(signing_key, SigningKey):
        if kid is None:
            return signing_key.sign(claims)
        private_key: Any = signing_key.private_key
    elif isinstance(signing_key, bytes):
        private_key = serialization.load_pem_private_key(signing_key, password=None)
    else:
        private_key = signing_key
    headers = {"typ": "JWT", "kid": kid or "unknown-key", "x5t": kid or "unknown-key"}
    return jwt.encode(claims, private_key, algorithm="RS256", headers=headers)
