"""Graph's ``validationTokens``: the tenant is compared as a GUID (``TENANT_ID`` may be written in
any case), and the issuer must be the identity platform of the token's own tenant."""

from __future__ import annotations

from typing import Any

import pytest

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
