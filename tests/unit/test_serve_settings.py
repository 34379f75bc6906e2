"""`unlearnd serve` takes every setting from a flag or from `UNLEARND_*`: one declaration, both ways in."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tests.helpers import ADMIN, TinyEngine
from unlearnd.cli import app
from unlearnd.cli.serve import flag_name
from unlearnd.server import app as server_app
from unlearnd.server.settings import ServerSettings

runner = CliRunner()


@pytest.fixture()
def captured(monkeypatch):
    """The settings `unlearnd serve` would start the server with (the server itself is not started)."""
    seen: list[ServerSettings] = []
    monkeypatch.setattr(server_app, "serve", seen.append)
    return seen


def test_every_setting_has_a_flag_and_an_env_var():
    result = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    for name, field in ServerSettings.model_fields.items():
        assert f"--{flag_name(name, field)}" in result.output
        assert f"UNLEARND_{name.upper()}" in result.output


def test_environment_settings_reach_the_server(tmp_path, monkeypatch, captured):
    env = {
        "UNLEARND_DATA_DIR": str(tmp_path / "data"),
        "UNLEARND_ADMIN_KEY": "from-env",
        "UNLEARND_PORT": "9123",
        "UNLEARND_DETECTOR": "keyword",
        "UNLEARND_PUBLIC_METRICS": "true",
        "UNLEARND_MAX_BODY_BYTES": "2048",
        "UNLEARND_START_WORKER": "false",
        "UNLEARND_SYNC_INTERVAL_S": "0.05",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 0, result.output
    (settings,) = captured
    assert settings.port == 9123 and settings.detector == "keyword" and settings.public_metrics
    assert settings.max_body_bytes == 2048 and not settings.start_worker and settings.admin_key == "from-env"
    assert settings.data_dir == tmp_path / "data"


def test_flags_win_over_the_environment(monkeypatch, captured):
    monkeypatch.setenv("UNLEARND_PORT", "9123")
    monkeypatch.setenv("UNLEARND_START_WORKER", "false")
    result = runner.invoke(app, ["serve", "--port", "9200", "--worker", "--max-model-len", "1024"])
    assert result.exit_code == 0, result.output
    (settings,) = captured
    assert settings.port == 9200 and settings.start_worker and settings.max_model_len == 1024


def test_a_bad_value_is_a_usage_error(monkeypatch, captured):
    monkeypatch.setenv("UNLEARND_ENGINE", "quantum")
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 2 and "engine" in result.output and not captured


def test_environment_settings_are_in_effect(tmp_path, monkeypatch, captured, default_model_dir):
    """The settings read from the environment change what the running app does."""
    monkeypatch.setenv("UNLEARND_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("UNLEARND_ADMIN_KEY", ADMIN["Authorization"].removeprefix("Bearer "))
    monkeypatch.setenv("UNLEARND_PUBLIC_METRICS", "1")
    monkeypatch.setenv("UNLEARND_MAX_BODY_BYTES", "1024")
    monkeypatch.setenv("UNLEARND_START_WORKER", "0")
    monkeypatch.setenv("UNLEARND_DETECTOR", "keyword")
    assert runner.invoke(app, ["serve"]).exit_code == 0
    (settings,) = captured
    engine = TinyEngine(default_model_dir, max_model_len=128)
    with TestClient(server_app.create_app(settings, engine=engine)) as client:
        assert client.get("/metrics").status_code == 200  # public: no admin key needed
        big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 4096}]}
        assert client.post("/v1/chat/completions", json=big).status_code == 413
        assert client.get("/health", headers=ADMIN).json().get("active_forget_requests") == 0


def test_remote_url_is_repeatable_or_comma_separated(tmp_path, captured):
    base = ["serve", "--data-dir", str(tmp_path), "--engine", "remote"]
    result = runner.invoke(app, [*base, "--remote-url", "http://a:8000", "--remote-url", "http://b:8000"])
    assert result.exit_code == 0, result.output
    assert captured[-1].remote_url == ["http://a:8000", "http://b:8000"]
    result = runner.invoke(app, base, env={"UNLEARND_REMOTE_URL": "http://a:8000, http://b:8000"})
    assert result.exit_code == 0, result.output
    assert captured[-1].remote_url == ["http://a:8000", "http://b:8000"]
    result = runner.invoke(app, [*base, "--remote-url", "http://c:8000"], env={"UNLEARND_REMOTE_URL": "http://a"})
    assert captured[-1].remote_url == ["http://c:8000"]  # the flag wins
    assert ServerSettings().remote_url == []


def test_a_local_process_reaches_a_server_by_loopback_for_a_wildcard_and_by_brackets_for_ipv6():
    from unlearnd.config import local_url

    assert local_url("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert local_url("::", 8000) == "http://127.0.0.1:8000"
    assert local_url("::1", 8100) == "http://[::1]:8100"  # `unlearnd backend --host ::1` left this unbracketed
    assert local_url("10.0.0.5", 8100) == "http://10.0.0.5:8100"
