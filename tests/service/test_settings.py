from __future__ import annotations

import pytest

from mapping.errors import ConfigError
from mapping.model import BasePresence
from mapping.translation import load_rules
from service.settings import load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    import os

    for k in list(os.environ):
        if k.startswith("PRESENCE_SYNC_"):
            monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_defaults_match_the_contract():
    s = load_settings()
    assert (s.host, s.port) == ("127.0.0.1", 3978)
    assert s.database_url == "sqlite+aiosqlite:///presence-sync.db"
    assert s.auth_mode == "entra" and s.graph_url == "https://graph.microsoft.com/v1.0"
    assert s.reconcile_interval_seconds == 300
    assert not s.dataverse_enabled


def test_environment_prefix(monkeypatch):
    monkeypatch.setenv("PRESENCE_SYNC_PORT", "8080")
    monkeypatch.setenv("PRESENCE_SYNC_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    s = load_settings()
    assert s.port == 8080 and s.database_url.startswith("postgresql+asyncpg://")


@pytest.mark.parametrize(
    "name,value,needle",
    [
        ("PORT", "abc", "PRESENCE_SYNC_PORT"),
        ("PORT", "70000", "PRESENCE_SYNC_PORT"),
        ("DATABASE_URL", "mysql://x/y", "PRESENCE_SYNC_DATABASE_URL"),
        ("AUTH_MODE", "magic", "PRESENCE_SYNC_AUTH_MODE"),
        ("GRAPH_URL", "not a url", "PRESENCE_SYNC_GRAPH_URL"),
        ("MAPPING_FILE", "/nope/rules.toml", "MAPPING_FILE"),
        ("GRAPH_SESSION_EXPIRATION_MINUTES", "1", "PRESENCE_SYNC_GRAPH_SESSION_EXPIRATION_MINUTES"),
    ],
)
def test_bad_values_name_the_variable(monkeypatch, name, value, needle):
    monkeypatch.setenv(f"PRESENCE_SYNC_{name}", value)
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_static_mode_refuses_non_loopback_upstreams(monkeypatch):
    monkeypatch.setenv("PRESENCE_SYNC_AUTH_MODE", "static")
    monkeypatch.setenv("PRESENCE_SYNC_STATIC_TOKEN", "t")
    monkeypatch.setenv("PRESENCE_SYNC_GRAPH_URL", "http://127.0.0.1:9999/v1.0")
    monkeypatch.setenv("PRESENCE_SYNC_DATAVERSE_URL", "https://contoso.crm.dynamics.com")
    with pytest.raises(ConfigError, match=r"PRESENCE_SYNC_DATAVERSE_URL.*not a loopback"):
        load_settings()
    monkeypatch.setenv("PRESENCE_SYNC_DATAVERSE_URL", "http://localhost:9998")
    s = load_settings()
    assert s.jwks_url == "http://127.0.0.1:9999/common/discovery/v2.0/keys"


def test_static_mode_needs_a_token(monkeypatch):
    monkeypatch.setenv("PRESENCE_SYNC_AUTH_MODE", "static")
    monkeypatch.setenv("PRESENCE_SYNC_GRAPH_URL", "http://127.0.0.1:9999/v1.0")
    with pytest.raises(ConfigError, match="STATIC_TOKEN"):
        load_settings()


def test_entra_mode_wants_https(monkeypatch):
    monkeypatch.setenv("PRESENCE_SYNC_DATAVERSE_URL", "http://contoso.crm.dynamics.com")
    with pytest.raises(ConfigError, match="must use https"):
        load_settings()


def test_secrets_are_not_echoed_in_errors(monkeypatch):
    monkeypatch.setenv("PRESENCE_SYNC_AUTH_MODE", "static")
    monkeypatch.setenv("PRESENCE_SYNC_STATIC_TOKEN", "s3cr3t-value")
    monkeypatch.setenv("PRESENCE_SYNC_PORT", "nope")
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert "s3cr3t-value" not in str(e.value)


# Mapping TOML
def test_toml_overrides_and_validates(tmp_path):
    f = tmp_path / "rules.toml"
    f.write_text(
        '[dynamics_to_teams]\nAway = "Busy/InAConferenceCall"\n[teams_to_dynamics]\n'
        '"Busy/Busy" = "Busy"\n"Away/*" = "none"\n'
    )
    r = load_rules(f)
    assert r.teams_for(BasePresence.AWAY) == "Busy/InAConferenceCall"
    assert r.teams_for(BasePresence.AVAILABLE) == "clear"  # defaults kept: no Available session
    assert r.asked_by("Busy/Busy") is BasePresence.BUSY
    assert r.asked_by("Away/Away") is None
    assert r.asked_by("Busy/InAMeeting") is BasePresence.BUSY  # defaults kept


@pytest.mark.parametrize(
    "body,needle",
    [
        ('[teams_to_dynamics]\n"Busy/InACall" = "Lunch"\n', "'Lunch' is not a presence"),
        ('[teams_to_dynamics]\n"Busy/InACall" = "restore"\n', "'restore' was removed in sync rules version 2"),
        ('[dynamics_to_teams]\nBusy = "Busy/Busy"\n', "Graph accepts only"),
        ('[dynamics_to_teams]\nLunch = "Away/Away"\n', "'Lunch' is not a base presence"),
        ('[teams_to_dynamics]\n"Bussy/InACall" = "Busy"\n', "'Bussy/InACall'"),
        ('[conflict]\nwinner = "dynamics"\n', "the [conflict] section was removed in sync rules version 2"),
        ('[dynamics_targets]\nBusy = "nope"\n', "not a presence id"),
        ("[extras]\na = 1\n", "unknown section"),
        ("this is = = not toml", "not valid TOML"),
    ],
)
def test_toml_errors_name_the_file_and_key(tmp_path, body, needle):
    f = tmp_path / "rules.toml"
    f.write_text(body)
    with pytest.raises(ConfigError) as e:
        load_rules(f)
    assert str(f) in str(e.value) and needle in str(e.value)


def test_catalogue_check_flags_unknown_and_wrong_base_targets():
    from mapping.translation import Rules
    from tests.support import PRESENCES, TRAINING

    rules = Rules(dynamics_targets={**Rules().dynamics_targets, BasePresence.BUSY: TRAINING})
    problems = rules.check_catalogue(PRESENCES)
    assert len(problems) == 1 and "base is Busy DND" in problems[0]
    assert Rules().check_catalogue(PRESENCES[:4])[0].startswith("target for Offline")
