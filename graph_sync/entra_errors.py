"""The Entra errors an admin meets while setting the bridge up, and what to change for each.

Entra puts its code at the start of ``error_description`` (``AADSTS7000218: ...``); whoever meets one
(``graph login``, a token refresh, the web sign-in, ``doctor``) words it the same way from here.
Source: Microsoft's AADSTS error code reference and the app registration docs.
"""

from __future__ import annotations

ENTRA_ADVICE = {
    "AADSTS7000218": (
        "the app registration does not allow public client flows, which the device-code sign-in "
        "(`presence-sync graph login`) needs: set Entra admin center > App registrations > the app "
        '(PRESENCE_SYNC_CLIENT_ID) > Authentication > Advanced settings > "Allow public client flows" to Yes, '
        "or sign in with `presence-sync graph login --web` instead (no public client flow needed); where "
        "the app itself asked for a token, its credential (PRESENCE_SYNC_CLIENT_CERT_PATH or "
        "PRESENCE_SYNC_CLIENT_SECRET) was not sent"
    ),
    "AADSTS700016": (
        "Entra does not know this application in this tenant: check that PRESENCE_SYNC_CLIENT_ID is the "
        "app registration's Application (client) ID and PRESENCE_SYNC_TENANT_ID the tenant it is registered "
        "in (Entra admin center > App registrations > Overview), or, for an app registered in another "
        "tenant, have an administrator of this tenant consent to it"
    ),
}
"""What to change for the Entra errors an admin meets while setting up (Microsoft's AADSTS error
reference), keyed by the code Entra puts at the start of ``error_description``."""


def explain_entra_error(text: str) -> str | None:
    """The advice for the first known AADSTS code in ``text`` (any Entra error message), else None."""
    found = [(text.find(code), code) for code in ENTRA_ADVICE if _has_code(text, code)]
    return ENTRA_ADVICE[min(found)[1]] if found else None


def _has_code(text: str, code: str) -> bool:
    """``AADSTS70001`` must not match inside ``AADSTS700016``: the code ends where the digits do."""
    start = text.find(code)
    while start != -1:
        end = start + len(code)
        if end >= len(text) or not text[end].isdigit():
            return True
        start = text.find(code, end)
    return False
