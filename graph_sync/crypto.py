"""Decrypting the ``encryptedContent`` of Graph rich notifications (presence with resource data).

Graph's documented recipe, checked against the emulator and an independent routine in the tests:

1. ``dataKey``: base64 of the per-notification 32-byte symmetric key, encrypted with the public key
   of the certificate we gave the subscription, RSA with OAEP padding. The OAEP digest is **SHA-1**
   (Graph names the suite ``RSA/ECB/OAEPWithSHA1AndMGF1Padding``; .NET samples use
   ``RSAEncryptionPadding.OaepSHA1``); a SHA-256 OAEP decrypt fails on real notifications.
2. ``dataSignature``: base64 HMAC-SHA256 of the base64-decoded ``data`` under that key. Checked with a
   constant-time comparison *before* decrypting, so forged ciphertext never reaches the AES decoder.
3. ``data``: AES-256-CBC with PKCS7 padding, IV = the first 16 bytes of the key. The plaintext is the
   resource JSON.

Every failure is a ``DecryptionError`` with a reason that is safe to log (no key material).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from mapping.errors import ConfigError

OAEP_SHA1 = asym_padding.OAEP(mgf=asym_padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


class DecryptionError(Exception):
    """The content cannot be trusted or read: wrong certificate, wrong key, bad signature, bad bytes."""


def _b64(content: Mapping[str, Any], name: str) -> bytes:
    value = content.get(name)
    if not isinstance(value, str) or not value:
        raise DecryptionError(f"encryptedContent.{name} is missing")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise DecryptionError(f"encryptedContent.{name} is not base64") from e


class Decryptor:
    """Holds the notification certificate and its private key (PEM). ``certificate_id`` is what the
    subscription sends as ``encryptionCertificateId`` and what every notification must carry back:
    the certificate's SHA-1 thumbprint, so a rotated certificate gets a new id by itself and a
    notification encrypted for the old one is recognised as such instead of failing obscurely."""

    def __init__(self, cert_pem: bytes, key_pem: bytes, *, password: bytes | None = None) -> None:
        try:
            self.certificate = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as e:
            raise ConfigError(f"Graph encryption certificate is not a PEM certificate: {e}") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=password)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"Graph encryption key is not a readable PEM private key: {e}") from None
        public = self.certificate.public_key()
        if not isinstance(key, rsa.RSAPrivateKey) or not isinstance(public, rsa.RSAPublicKey):
            raise ConfigError("Graph encryption certificate and key must be RSA (Graph encrypts dataKey with RSA-OAEP)")
        if key.public_key().public_numbers() != public.public_numbers():
            raise ConfigError("Graph encryption key does not belong to the encryption certificate")
        self._key = key
        self.thumbprint = self.certificate.fingerprint(hashes.SHA1()).hex().upper()
        self.certificate_id = self.thumbprint

    @property
    def certificate_b64(self) -> str:
        """Base64 DER: the ``encryptionCertificate`` of a subscription."""
        return base64.b64encode(self.certificate.public_bytes(serialization.Encoding.DER)).decode()

    def decrypt(self, content: Mapping[str, Any]) -> dict[str, Any]:
        """The resource JSON of one ``encryptedContent``; ``DecryptionError`` if anything is off."""
        if not isinstance(content, Mapping):
            raise DecryptionError("encryptedContent is not an object")
        cert_id = content.get("encryptionCertificateId")
        if cert_id != self.certificate_id:
            raise DecryptionError(
                f"encrypted for certificate id {cert_id!r}, this bridge holds {self.certificate_id!r}"
            )
        thumbprint = content.get("encryptionCertificateThumbprint")
        if thumbprint is not None and str(thumbprint).replace(":", "").upper() != self.thumbprint:
            raise DecryptionError("encryptionCertificateThumbprint does not match the bridge's certificate")
        data = _b64(content, "data")
        wrapped = _b64(content, "dataKey")
        signature = _b64(content, "dataSignature")
        try:
            key = self._key.decrypt(wrapped, OAEP_SHA1)
        except (ValueError, InvalidKey) as e:
            raise DecryptionError("dataKey does not decrypt with the bridge's private key (wrong key?)") from e
        if len(key) != 32:
            raise DecryptionError(f"dataKey is {len(key)} bytes, expected 32 (AES-256)")
        expected = hmac.new(key, data, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, signature):
            raise DecryptionError("dataSignature does not match the data (tampered or corrupted)")
        if not data or len(data) % 16:
            raise DecryptionError("data is not whole AES blocks")
        decryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).decryptor()
        padded = decryptor.update(data) + decryptor.finalize()
        unpadder = padding.PKCS7(128).unpadder()
        try:
            plain = unpadder.update(padded) + unpadder.finalize()
        except ValueError as e:
            raise DecryptionError("data has bad PKCS7 padding") from e
        try:
            value = json.loads(plain)
        except (UnicodeDecodeError, ValueError) as e:
            raise DecryptionError("decrypted data is not JSON") from e
        if not isinstance(value, dict):
            raise DecryptionError("decrypted data is not a JSON object")
        return value
