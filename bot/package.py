"""The Teams app package: ``manifest.json`` filled from the template, plus the two icons, zipped flat.

The sources live in ``appPackage/`` at the repository root (where people edit them); the code reads
the copy in ``bot/package_data/`` (written by ``appPackage/make_icons.py``, shipped with the Python
package, and checked against ``appPackage/`` by the tests), so ``presence-sync teams-package`` works the
same from a checkout and from an installed wheel. ``base_dir`` points at another folder with the same
three files (an organisation's own icons or wording).

The template is JSON whose string values carry ``{{PLACEHOLDERS}}``; they are filled value by value
after parsing, so a name with quotes cannot break the JSON. Teams takes the zip only when the three
files sit at its root (no folder), which is why ``writestr`` names are bare.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from mapping.errors import ConfigError

MANIFEST_VERSION = "1.29"
PACKAGE_FILES = ("manifest.json", "color.png", "outline.png")
DEFAULT_OUTPUT_NAME = "presence-sync-teams-app.zip"
DEFAULT_WEBSITE_URL = "https://example.com"
"""Teams requires https developer URLs; pass ``website_url`` (the service's PUBLIC_URL) for real use."""
APP_ID_SETTING = "PRESENCE_SYNC_BOT_APP_ID"
_GUID = re.compile(r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
_SEMVER = re.compile(r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)$")
_DOMAIN = re.compile(
    r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*(:\d+)?$"
)
_ZIP_DATE = (2024, 1, 1, 0, 0, 0)  # fixed timestamps: the same inputs give the same zip, byte for byte


def package_data_dir() -> Path:
    """Where the installed package keeps the template and icons."""
    return Path(__file__).resolve().parent / "package_data"


def app_version() -> str:
    """The project's version when installed and semver (Teams wants a higher version for every
    update of an uploaded app), else 1.0.0."""
    try:
        version = metadata.version("teams-presence-sync")
    except metadata.PackageNotFoundError:
        return "1.0.0"
    return version if _SEMVER.match(version) else "1.0.0"


def _fill(node: Any, values: dict[str, str]) -> Any:
    if isinstance(node, str):
        for key, value in values.items():
            node = node.replace("{{" + key + "}}", value)
        return node
    if isinstance(node, list):
        return [_fill(v, values) for v in node]
    if isinstance(node, dict):
        return {k: _fill(v, values) for k, v in node.items()}
    return node


def render_manifest(
    template: dict[str, Any],
    *,
    app_id: str,
    name: str,
    version: str,
    website_url: str,
    valid_domains: Sequence[str],
) -> dict[str, Any]:
    """The manifest: placeholders filled, ``validDomains`` set. Checks nothing (``build`` does)."""
    manifest = _fill(template, {"BOT_APP_ID": app_id, "APP_NAME": name, "VERSION": version, "WEBSITE_URL": website_url})
    manifest["validDomains"] = list(valid_domains)
    left = re.findall(r"\{\{[A-Z_]+\}\}", json.dumps(manifest))
    if left:
        raise ConfigError(
            f"manifest template has placeholders this build does not fill: {', '.join(sorted(set(left)))}"
        )
    return dict(manifest)


def check_app_id(app_id: str) -> str:
    app_id = (app_id or "").strip()
    if not app_id:
        raise ConfigError(
            f"{APP_ID_SETTING} is empty: set it to the bot's Microsoft app id (a GUID, from its Azure Bot or "
            "Entra app registration) before building the Teams package"
        )
    if not _GUID.match(app_id):
        raise ConfigError(f"{APP_ID_SETTING} must be a GUID (the bot's Microsoft app id), not {app_id!r}")
    return app_id.lower()


def build_teams_package(
    *,
    app_id: str,
    output: Path,
    base_dir: Path | None = None,
    name: str = "Presence Sync",
    valid_domains: Sequence[str] = (),
    website_url: str | None = None,
) -> Path:
    """Writes the Teams app zip and returns its path (``output``, or a file in it when it is a folder).

    ``app_id``: the bot's Microsoft app id (``PRESENCE_SYNC_BOT_APP_ID``), used as bot id and Teams app
    id. ``website_url``: the developer links Teams shows (default: the first valid domain, else
    ``DEFAULT_WEBSITE_URL``). Raises ``ConfigError`` naming what to fix."""
    app_id = check_app_id(app_id)
    name = " ".join(name.split())
    if not name or len(name) > 30:
        raise ConfigError(f"the Teams app name must be 1 to 30 characters (Teams' limit), not {name!r}")
    domains = [d.strip() for d in valid_domains if d.strip()]
    for d in domains:
        if not _DOMAIN.match(d):
            raise ConfigError(f"valid domain {d!r} must be a host name such as bot.contoso.com (no scheme or path)")
    if website_url is None:
        website_url = f"https://{domains[0].removeprefix('*.')}" if domains else DEFAULT_WEBSITE_URL
    if not website_url.lower().startswith("https://"):
        raise ConfigError(
            f"the developer website URL must start with https:// (Teams requires it), not {website_url!r}"
        )

    base = base_dir if base_dir is not None else package_data_dir()
    missing = [f for f in PACKAGE_FILES if not (base / f).is_file()]
    if missing:
        raise ConfigError(f"Teams package sources missing in {base}: {', '.join(missing)}")
    try:
        template = json.loads((base / "manifest.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError(f"{base / 'manifest.json'} is not valid JSON: {e}") from None
    if not isinstance(template, dict):
        raise ConfigError(f"{base / 'manifest.json'} must hold a JSON object")
    manifest = render_manifest(
        template, app_id=app_id, name=name, version=app_version(), website_url=website_url, valid_domains=domains
    )

    target = output / DEFAULT_OUTPUT_NAME if output.is_dir() else output
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".teams-package-", suffix=".zip", dir=target.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            files: dict[str, bytes] = {"manifest.json": (json.dumps(manifest, indent=2) + "\n").encode()}
            for f in PACKAGE_FILES[1:]:
                files[f] = (base / f).read_bytes()
            for arcname, data in files.items():
                info = zipfile.ZipInfo(arcname, date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, data)
        os.replace(tmp, target)  # never a half-written zip at the destination
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
