"""Graph's ``validationTokens``: the tenant is compared as a GUID (``TENANT_ID`` may be written in
any case), and the issuer must be the identity platform of the token's own tenant; a verified token
is remembered by its exact text until it expires, and any other token is checked in full."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from emulators.graph_crypto import SigningKey, sign_validation_token
from graph_sync.notifications import TokenValidator

CLIENT_ID = "11112222-3333-4444-5555-666677778888"
TENANT = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
KEY = SigningKey()


class Keys:
    """A ``JwksCache`` with the one emulated key."""

    async def key(self, kid: str) -> Any:
        return KEY.private_key.public_key() if kid == KEY.kid else None


def token(**claims: Any) -> str:
    return sign_validation_token(KEY, client_id=CLIENT_ID, tenant_id=TENANT, extra_claims=claims)


def validator(tenant_id: str | None) -> TokenValidator:
    return TokenValidator(Keys(), client_id=CLIENT_ID, tenant_id=tenant_id)  # type: ignore[arg-type]


@pytest.mark.parametrize("configured", [TENANT, TENANT.upper(), f" {TENANT} ", "contoso.onmicrosoft.com", None])
async def test_our_tenant_is_accepted_however_tenant_id_is_written(configured):
    await validator(configured).check(token())


async def test_a_v2_issuer_of_the_same_tenant_is_accepted():
    await validator(TENANT).check(token(iss=f"https://login.microsoftonline.com/{TENANT}/v2.0"))


async def test_another_tenant_is_refused():
    other = "99999999-8888-7777-6666-555555555555"
    with pytest.raises(ValueError, match="another tenant"):
        await validator(TENANT.upper()).check(token(tid=other, iss=f"https://sts.windows.net/{other}/"))


@pytest.mark.parametrize(
    "iss", ["https://evil.example/", "https://sts.windows.net/99999999-8888-7777-6666-555555555555/"]
)
async def test_an_issuer_that_is_not_the_tokens_own_tenant_is_refused(iss):
    with pytest.raises(ValueError, match="issuer"):
        await validator("contoso.onmicrosoft.com").check(token(iss=iss))


# ------------------------------------------------------------------ the memory of verified tokens


class CountingKeys:
    """A ``JwksCache`` whose keys can be taken away, counting how often a key was asked for (once per
    full check: what the memory of verified tokens spares)."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {KEY.kid: KEY.private_key.public_key()}
        self.asked = 0

    async def key(self, kid: str) -> Any:
        self.asked += 1
        return self.keys.get(kid)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def remembering() -> tuple[TokenValidator, CountingKeys, Clock]:
    keys, clock = CountingKeys(), Clock()
    return TokenValidator(keys, client_id=CLIENT_ID, tenant_id=TENANT, now=clock), keys, clock  # type: ignore[arg-type]


async def test_a_verified_token_is_taken_from_memory_until_exp_plus_leeway_and_checked_in_full_after() -> None:
    validator, keys, clock = remembering()
    good = token()
    exp = jwt.decode(good, options={"verify_signature": False})["exp"]
    await validator.check(good)
    await validator.check(good)
    assert keys.asked == 1  # the second batch with the same token: no second verification
    keys.keys.clear()  # the signing key rotates away: a token verified before stays good until it expires
    clock.now = exp + validator.leeway - 1
    await validator.check(good)
    assert keys.asked == 1
    clock.now = exp + validator.leeway  # expired by the check's own rule (exp <= now - leeway)
    with pytest.raises(ValueError, match="unknown key"):
        await validator.check(good)  # checked in full again, not vouched for by the memory
    assert keys.asked == 2


def _forged(good: str, **change: Any) -> str:
    """``good``'s claims signed again with a change: another key, ``kid`` or claim."""
    claims = jwt.decode(good, options={"verify_signature": False})
    signer: Any = change.pop("signer", KEY.private_key)
    kid = change.pop("kid", KEY.kid)
    return jwt.encode({**claims, **change}, signer, algorithm="RS256", headers={"kid": kid, "x5t": kid})


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"signer": rsa.generate_private_key(public_exponent=65537, key_size=2048)}, "bad signature"),
        ({"kid": "another-key"}, "unknown key"),
        ({"aud": "99999999-0000-0000-0000-000000000000"}, "wrong audience"),
        ({"azp": "99999999-0000-0000-0000-000000000000", "appid": None}, "change tracking"),
    ],
    ids=["other-signer", "other-kid", "other-audience", "other-app"],
)
async def test_a_token_other_than_the_one_remembered_is_checked_in_full(change: dict[str, Any], says: str) -> None:
    validator, keys, _ = remembering()
    good = token()
    await validator.check(good)
    forged = _forged(good, **change)
    assert forged != good
    with pytest.raises(ValueError, match=says):
        await validator.check(forged)
    with pytest.raises(ValueError, match=says):  # and refused again: a refusal is not remembered as a pass
        await validator.check(forged)
    await validator.check(good)
    assert keys.asked == 3  # the good token once, the forged one twice
