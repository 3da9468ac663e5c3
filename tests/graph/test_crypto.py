"""Decrypting rich notifications: vectors from the emulator and from an independent routine written
here from Graph's documentation; every way a content can be wrong is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from emulators.graph import encrypt_for_certificate
from graph_sync.crypto import DecryptionError, Decryptor
from mapping.errors import ConfigError
from tests.graph.conftest import Certificate

PRESENCE = {
    "@odata.type": "#Microsoft.Graph.presence",
    "id": "0a1b2c3d-0000-4000-8000-000000000001",
    "availability": "Busy",
    "activity": "InACall",
}


def independent_encrypt(
    cert: Certificate,
    payload: dict[str, Any],
    cert_id: str,
    *,
    key: bytes | None = None,
    oaep_hash: hashes.HashAlgorithm | None = None,
    pad: bool = True,
) -> dict[str, str]:
    """Graph's recipe, from its documentation, sharing no code with the emulator or the bridge."""
    key = key or os.urandom(32)
    plain = json.dumps(payload).encode()
    if pad:
        padder = padding.PKCS7(128).padder()
        plain = padder.update(plain) + padder.finalize()
    enc = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    data = enc.update(plain) + enc.finalize()
    public = cert.cert.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    algo = oaep_hash or hashes.SHA1()
    wrapped = public.encrypt(key, asym_padding.OAEP(mgf=asym_padding.MGF1(algo), algorithm=algo, label=None))
    return {
        "data": base64.b64encode(data).decode(),
        "dataSignature": base64.b64encode(hmac.new(key, data, hashlib.sha256).digest()).decode(),
        "dataKey": base64.b64encode(wrapped).decode(),
        "encryptionCertificateId": cert_id,
        "encryptionCertificateThumbprint": cert.cert.fingerprint(hashes.SHA1()).hex().upper(),
    }


@pytest.fixture(scope="module")
def decryptor(certificate: Certificate) -> Decryptor:
    return Decryptor(certificate.cert_pem, certificate.key_pem)


def test_certificate_id_is_the_thumbprint(decryptor: Decryptor, certificate: Certificate) -> None:
    assert decryptor.certificate_id == certificate.cert.fingerprint(hashes.SHA1()).hex().upper()
    assert base64.b64decode(decryptor.certificate_b64) == certificate.cert.public_bytes(serialization.Encoding.DER)


def test_decrypts_the_emulators_vector(decryptor: Decryptor, certificate: Certificate) -> None:
    content = encrypt_for_certificate(certificate.cert_pem, PRESENCE, certificate_id=decryptor.certificate_id)
    assert decryptor.decrypt(content) == PRESENCE


def test_decrypts_an_independent_vector(decryptor: Decryptor, certificate: Certificate) -> None:
    content = independent_encrypt(certificate, PRESENCE, decryptor.certificate_id)
    assert decryptor.decrypt(content) == PRESENCE


def test_emulator_and_independent_routine_agree_byte_for_byte(decryptor: Decryptor, certificate: Certificate) -> None:
    key = bytes(range(32))
    ours = independent_encrypt(certificate, PRESENCE, decryptor.certificate_id, key=key)
    theirs = encrypt_for_certificate(certificate.cert_pem, PRESENCE, certificate_id=decryptor.certificate_id, key=key)
    # JSON spacing differs, so compare what each decrypts to and the AES/HMAC construction on one plaintext.
    assert decryptor.decrypt(ours) == decryptor.decrypt(theirs) == PRESENCE
    data = base64.b64decode(theirs["data"])
    assert base64.b64decode(theirs["dataSignature"]) == hmac.new(key, data, hashlib.sha256).digest()
    assert theirs["encryptionCertificateThumbprint"] == ours["encryptionCertificateThumbprint"]


def _flip(b64: str, index: int = 0) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[index] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def test_tampered_signature_is_rejected(decryptor: Decryptor, certificate: Certificate) -> None:
    content = encrypt_for_certificate(certificate.cert_pem, PRESENCE, certificate_id=decryptor.certificate_id)
    content["dataSignature"] = _flip(content["dataSignature"])
    with pytest.raises(DecryptionError, match="dataSignature"):
        decryptor.decrypt(content)


def test_tampered_data_is_rejected_before_decrypting(decryptor: Decryptor, certificate: Certificate) -> None:
    content = encrypt_for_certificate(certificate.cert_pem, PRESENCE, certificate_id=decryptor.certificate_id)
    content["data"] = _flip(content["data"], 5)
    with pytest.raises(DecryptionError, match="dataSignature"):
        decryptor.decrypt(content)


def test_key_wrapped_for_another_key_is_rejected(
    decryptor: Decryptor, certificate: Certificate, other_certificate: Certificate
) -> None:
    # Labelled as ours (id and thumbprint), but the data key was encrypted with someone else's public key.
    content = independent_encrypt(other_certificate, PRESENCE, decryptor.certificate_id)
    content["encryptionCertificateThumbprint"] = decryptor.thumbprint
    with pytest.raises(DecryptionError, match="wrong key"):
        decryptor.decrypt(content)


def test_bridge_holding_the_wrong_key_refuses(certificate: Certificate, other_certificate: Certificate) -> None:
    ours = Decryptor(certificate.cert_pem, certificate.key_pem)
    theirs = Decryptor(other_certificate.cert_pem, other_certificate.key_pem)
    content = encrypt_for_certificate(certificate.cert_pem, PRESENCE, certificate_id=ours.certificate_id)
    with pytest.raises(DecryptionError, match="certificate id"):
        theirs.decrypt(content)


def test_wrong_certificate_id_is_rejected(decryptor: Decryptor, certificate: Certificate) -> None:
    content = encrypt_for_certificate(certificate.cert_pem, PRESENCE, certificate_id="rotated-away-2025")
    with pytest.raises(DecryptionError, match="rotated-away-2025"):
        decryptor.decrypt(content)


def test_wrong_thumbprint_is_rejected(decryptor: Decryptor, certificate: Certificate) -> None:
    content = encrypt_for_certificate(certificate.cert_pem, PRESENCE, certificate_id=decryptor.certificate_id)
    content["encryptionCertificateThumbprint"] = "00" * 20
    with pytest.raises(DecryptionError, match="Thumbprint"):
        decryptor.decrypt(content)


def test_oaep_with_sha256_is_not_what_graph_sends(decryptor: Decryptor, certificate: Certificate) -> None:
    """Graph wraps the key with OAEP-SHA1; a decryptor accepting SHA-256 would be checking the wrong thing."""
    content = independent_encrypt(certificate, PRESENCE, decryptor.certificate_id, oaep_hash=hashes.SHA256())
    with pytest.raises(DecryptionError, match="wrong key"):
        decryptor.decrypt(content)


def test_bad_padding_is_rejected(decryptor: Decryptor, certificate: Certificate) -> None:
    payload = {"id": "x" * 15}
    payload["id"] += "y" * (-len(json.dumps(payload).encode()) % 16)  # whole blocks without padding
    content = independent_encrypt(certificate, payload, decryptor.certificate_id, pad=False)
    with pytest.raises(DecryptionError, match="padding"):
        decryptor.decrypt(content)


@pytest.mark.parametrize("field", ["data", "dataKey", "dataSignature"])
def test_missing_or_garbled_fields_are_rejected(decryptor: Decryptor, certificate: Certificate, field: str) -> None:
    content = encrypt_for_certificate(certificate.cert_pem, PRESENCE, certificate_id=decryptor.certificate_id)
    garbled = dict(content, **{field: "%%% not base64 %%%"})
    with pytest.raises(DecryptionError, match=field):
        decryptor.decrypt(garbled)
    missing = {k: v for k, v in content.items() if k != field}
    with pytest.raises(DecryptionError, match="missing"):
        decryptor.decrypt(missing)


def test_plaintext_that_is_not_a_json_object_is_rejected(decryptor: Decryptor, certificate: Certificate) -> None:
    array = independent_encrypt(certificate, [1, 2], decryptor.certificate_id)  # type: ignore[arg-type]
    with pytest.raises(DecryptionError, match="not a JSON object"):
        decryptor.decrypt(array)


def test_key_must_belong_to_the_certificate(certificate: Certificate, other_certificate: Certificate) -> None:
    with pytest.raises(ConfigError, match="does not belong"):
        Decryptor(certificate.cert_pem, other_certificate.key_pem)
    with pytest.raises(ConfigError, match="PEM certificate"):
        Decryptor(b"not a cert", certificate.key_pem)
    with pytest.raises(ConfigError, match="private key"):
        Decryptor(certificate.cert_pem, b"not a key")
