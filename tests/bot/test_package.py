"""The Teams app package: the manifest validated against Microsoft's schema (stored in
``tests/bot/data``, no network), the icons Teams requires, a flat zip, and clear configuration errors."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from PIL import Image

from bot.package import (
    DEFAULT_WEBSITE_URL,
    MANIFEST_VERSION,
    PACKAGE_FILES,
    build_teams_package,
    package_data_dir,
)
from bot.parsing import Kind, parse_text
from mapping.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
APP_PACKAGE = ROOT / "appPackage"
SCHEMA = Path(__file__).with_name("data") / f"MicrosoftTeams.v{MANIFEST_VERSION}.schema.json"
APP_ID = "0B6F8E2A-1111-4222-8333-444455556666"


def _validator() -> jsonschema.Draft4Validator:
    schema = json.loads(SCHEMA.read_text())
    # The schema is checked as a schema, except the "regex" format: Microsoft's patterns use
    # JavaScript's \p{L}, which Python's re lacks (only in parts this manifest does not use).
    jsonschema.Draft4Validator.check_schema(schema, format_checker=None)
    return jsonschema.Draft4Validator(schema)


def _zip(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


@pytest.fixture
def package(tmp_path: Path) -> dict[str, bytes]:
    return _zip(build_teams_package(app_id=APP_ID, output=tmp_path / "app.zip", valid_domains=["bot.contoso.com"]))


def test_the_built_manifest_is_valid_against_the_teams_schema(package: dict[str, bytes]) -> None:
    manifest = json.loads(package["manifest.json"])
    errors = sorted(e.message for e in _validator().iter_errors(manifest))
    assert errors == []
    assert manifest["manifestVersion"] == MANIFEST_VERSION
    assert manifest["$schema"].endswith(f"/v{MANIFEST_VERSION}/MicrosoftTeams.schema.json")


def test_the_schema_does_catch_a_bad_manifest(package: dict[str, bytes]) -> None:
    """The stored schema is the real one, strict enough to matter (so the test above can fail)."""
    manifest = json.loads(package["manifest.json"])
    manifest["bots"][0]["botId"] = "not-a-guid"
    manifest["bots"][0]["scopes"] = ["personal", "everywhere"]
    manifest["name"]["short"] = "x" * 31
    assert len(list(_validator().iter_errors(manifest))) == 3


def test_the_manifest_carries_the_bot_id_personal_scope_and_the_commands(package: dict[str, bytes]) -> None:
    manifest = json.loads(package["manifest.json"])
    app_id = APP_ID.lower()
    assert manifest["id"] == app_id
    [bot] = manifest["bots"]
    assert bot["botId"] == app_id
    assert bot["scopes"] == ["personal"]
    [commands] = bot["commandLists"]
    assert commands["scopes"] == ["personal"]
    titles = [c["title"] for c in commands["commands"]]
    assert titles == ["available", "busy", "dnd", "away", "offline", "set", "presences", "status", "help"]
    assert all(c["description"].strip() for c in commands["commands"])
    assert manifest["validDomains"] == ["bot.contoso.com"]
    assert manifest["developer"]["websiteUrl"] == "https://bot.contoso.com"
    assert "{{" not in package["manifest.json"].decode()


@pytest.mark.parametrize("title", ["available", "busy", "dnd", "away", "offline", "set", "presences", "status", "help"])
def test_every_listed_command_is_one_the_bot_understands(title: str) -> None:
    assert parse_text(title).kind not in (Kind.UNKNOWN, Kind.EMPTY, Kind.UNCLEAR)


def test_the_zip_is_flat_with_exactly_the_three_files(tmp_path: Path) -> None:
    path = build_teams_package(app_id=APP_ID, output=tmp_path / "out" / "app.zip")
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        names = zf.namelist()
    assert sorted(names) == sorted(PACKAGE_FILES)
    assert all("/" not in n and "\\" not in n for n in names)


def _rgba(img: Image.Image, x: int, y: int) -> tuple[int, int, int, int]:
    p = img.getpixel((x, y))
    assert isinstance(p, tuple) and len(p) == 4
    return (int(p[0]), int(p[1]), int(p[2]), int(p[3]))


def test_icons_have_the_sizes_teams_requires_and_the_outline_is_white_on_transparent(
    package: dict[str, bytes],
) -> None:
    color = Image.open(io.BytesIO(package["color.png"]))
    outline = Image.open(io.BytesIO(package["outline.png"])).convert("RGBA")
    assert color.format == "PNG" and color.size == (192, 192)
    assert outline.size == (32, 32)
    pixels = [_rgba(outline, x, y) for y in range(32) for x in range(32)]
    visible = [p for p in pixels if p[3] > 0]
    assert visible, "the outline icon shows nothing"
    assert {p[:3] for p in visible} == {(255, 255, 255)}
    transparent = sum(1 for p in pixels if p[3] == 0)
    assert transparent > len(pixels) // 3, "the outline icon needs a transparent background"
    assert all(_rgba(outline, x, y)[3] == 0 for x, y in [(0, 0), (31, 0), (0, 31)])  # corners are background
    assert _rgba(color.convert("RGBA"), 0, 0)[3] == 255  # full-colour icon: solid background


def test_the_installed_copy_matches_apppackage(tmp_path: Path) -> None:
    """``bot/package_data`` is what the code reads; ``appPackage`` is what people edit. Run
    ``python appPackage/make_icons.py`` after editing either."""
    for name in PACKAGE_FILES:
        assert (package_data_dir() / name).read_bytes() == (APP_PACKAGE / name).read_bytes(), name


def test_building_from_apppackage_gives_the_same_zip(tmp_path: Path) -> None:
    a = build_teams_package(app_id=APP_ID, output=tmp_path / "a.zip")
    b = build_teams_package(app_id=APP_ID, output=tmp_path / "b.zip", base_dir=APP_PACKAGE)
    assert a.read_bytes() == b.read_bytes()  # and builds are reproducible, byte for byte


def test_output_may_be_a_folder(tmp_path: Path) -> None:
    path = build_teams_package(app_id=APP_ID, output=tmp_path)
    assert path.parent == tmp_path and path.suffix == ".zip"


def test_default_website_url_without_domains(tmp_path: Path) -> None:
    manifest = json.loads(_zip(build_teams_package(app_id=APP_ID, output=tmp_path / "x.zip"))["manifest.json"])
    assert manifest["developer"]["websiteUrl"] == DEFAULT_WEBSITE_URL
    assert manifest["validDomains"] == []


@pytest.mark.parametrize("app_id", ["", "   ", "not-a-guid", "0b6f8e2a11114222833344445555666"])
def test_an_empty_or_malformed_app_id_is_a_config_error_naming_the_setting(tmp_path: Path, app_id: str) -> None:
    with pytest.raises(ConfigError, match="PRESENCE_SYNC_BOT_APP_ID"):
        build_teams_package(app_id=app_id, output=tmp_path / "x.zip")
    assert not (tmp_path / "x.zip").exists()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"name": "x" * 31}, "1 to 30 characters"),
        ({"name": "  "}, "1 to 30 characters"),
        ({"valid_domains": ["https://bot.contoso.com/api"]}, "host name"),
        ({"website_url": "http://contoso.com"}, "https://"),
    ],
)
def test_other_bad_inputs_are_config_errors(tmp_path: Path, kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_teams_package(app_id=APP_ID, output=tmp_path / "x.zip", **kw)


def test_missing_sources_and_unfilled_placeholders_are_config_errors(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(ConfigError, match="missing"):
        build_teams_package(app_id=APP_ID, output=tmp_path / "x.zip", base_dir=src)
    for name in PACKAGE_FILES:
        (src / name).write_bytes((APP_PACKAGE / name).read_bytes())
    template = json.loads((src / "manifest.json").read_text())
    template["description"]["short"] = "{{UNKNOWN_THING}}"
    (src / "manifest.json").write_text(json.dumps(template))
    with pytest.raises(ConfigError, match="UNKNOWN_THING"):
        build_teams_package(app_id=APP_ID, output=tmp_path / "x.zip", base_dir=src)


def test_a_name_with_quotes_cannot_break_the_json(tmp_path: Path) -> None:
    manifest = json.loads(
        _zip(build_teams_package(app_id=APP_ID, output=tmp_path / "x.zip", name='Say "hi"'))["manifest.json"]
    )
    assert manifest["name"]["short"] == 'Say "hi"'
    assert list(_validator().iter_errors(manifest)) == []
