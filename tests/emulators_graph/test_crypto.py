"""``emulators/graph_crypto.py``: the module functions the Graph adapter's tests use to make vectors.
Every check decrypts or verifies with ``cryptography``/PyJWT directly, from Graph's documented recipe."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.x509.oid import NameOID

from emulators.graph import encrypt_for_certificate, sign_validation_token
from emulators.graph_crypto import (
    GRAPH_CHANGE_TRACKING_APP_ID,
    SigningKey,
    certificate_base64_der,
    certificate_thumbprint,
    generate_certificate,
    load_certificate,
)
from tests.emulators_graph.conftest import Certificate

PAYLOAD = {"@odata.type": "#Microsoft.Graph.presence", "id": "u1", "availability": "Busy", "activity": "InACall"}


def test_fixed_key_vector(certificate: Certificate) -> None:
    key = bytes(range(32))
    content = encrypt_for_certificate(certificate.pem, PAYLOAD, certificate_id="c1", key=key)
    data = base64.b64decode(content["data"])
    # data: AES-256-CBC, IV = first 16 bytes of the key, PKCS7: recompute it independently
    padder = padding.PKCS7(128).padder()
    plaintext = json.dumps(PAYLOAD, separators=(",", ":")).encode()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    assert data == encryptor.update(padder.update(plaintext) + padder.finalize()) + encryptor.finalize()
    # dataSignature: HMAC-SHA256 of the decoded data under the key
    assert base64.b64decode(content["dataSignature"]) == hmac.new(key, data, hashlib.sha256).digest()
    # dataKey: RSA-OAEP with SHA-1 (and MGF1-SHA-1)
    oaep = asym_padding.OAEP(mgf=asym_padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    assert certificate.key.decrypt(base64.b64decode(content["dataKey"]), oaep) == key
    sha256_oaep = asym_padding.OAEP(mgf=asym_padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    with pytest.raises(ValueError):
        certificate.key.decrypt(base64.b64decode(content["dataKey"]), sha256_oaep)
    assert content["encryptionCertificateId"] == "c1"
    assert content["encryptionCertificateThumbprint"] == certificate.cert.fingerprint(hashes.SHA1()).hex().upper()


def test_random_key_by_default(certificate: Certificate) -> None:
    a = encrypt_for_certificate(certificate.pem, PAYLOAD)
    b = encrypt_for_certificate(certificate.pem, PAYLOAD)
    assert a["dataKey"] != b["dataKey"] and a["data"] != b["data"]


def test_certificate_forms(certificate: Certificate) -> None:
    for form in (
        certificate.pem,
        certificate.pem.decode(),
        certificate.der,
        base64.b64encode(certificate.der),
        certificate_base64_der(certificate.cert),
    ):
        assert load_certificate(form) == certificate.cert
    with pytest.raises(ValueError):
        load_certificate(b"not a certificate at all")
    with pytest.raises(ValueError):
        load_certificate(base64.b64encode(b"not der"))


def test_non_rsa_certificate_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ec")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(ValueError):
        encrypt_for_certificate(cert.public_bytes(serialization.Encoding.PEM), PAYLOAD)


def test_wrong_key_length_is_refused(certificate: Certificate) -> None:
    with pytest.raises(ValueError):
        encrypt_for_certificate(certificate.pem, PAYLOAD, key=b"short")


def test_generate_certificate_round_trip() -> None:
    cert_pem, key_pem = generate_certificate("demo")
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    content = encrypt_for_certificate(cert_pem, PAYLOAD)
    oaep = asym_padding.OAEP(mgf=asym_padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    assert len(key.decrypt(base64.b64decode(content["dataKey"]), oaep)) == 32
    assert certificate_thumbprint(load_certificate(cert_pem)) == content["encryptionCertificateThumbprint"]


def test_validation_token_claims_and_jwks() -> None:
    signer = SigningKey()
    jwk = signer.jwks()["keys"][0]
    assert {"kty", "use", "kid", "x5t", "n", "e", "x5c"} <= set(jwk)
    assert jwk["kid"] == signer.kid
    now = datetime.now(UTC)
    token = sign_validation_token(signer, client_id="app", tenant_id="t1", now=now)
    assert jwt.get_unverified_header(token)["kid"] == signer.kid
    claims = jwt.decode(
        token, jwt.PyJWK.from_dict(jwk).key, algorithms=["RS256"], audience="app", issuer="https://sts.windows.net/t1/"
    )
    assert claims["azp"] == GRAPH_CHANGE_TRACKING_APP_ID
    assert claims["exp"] == int((now + timedelta(hours=1)).timestamp())
    # the x5c certificate carries the same public key
    x5c_key = x509.load_der_x509_certificate(base64.b64decode(jwk["x5c"][0])).public_key()
    assert isinstance(x5c_key, rsa.RSAPublicKey)
    assert x5c_key.public_numbers() == signer.private_key.public_key().public_numbers()


def test_validation_token_overrides() -> None:
    signer = SigningKey()
    key = jwt.PyJWK.from_dict(signer.jwk()).key
    token = sign_validation_token(signer, client_id="app", tenant_id="t1", extra_claims={"azp": "not-graph"})
    assert jwt.decode(token, key, algorithms=["RS256"], audience="app")["azp"] == "not-graph"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    forged = sign_validation_token(pem, client_id="app", tenant_id="t1", kid=signer.kid)
    assert jwt.get_unverified_header(forged)["kid"] == signer.kid
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(forged, key, algorithms=["RS256"], audience="app")
