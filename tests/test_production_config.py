"""The production example config (backchannel.production.toml) is valid and requires JWT."""

from __future__ import annotations

import secrets

import anyio
import pytest

from backchannel import App, cli
from backchannel.testing import connect, serve_in_memory
from conftest import ROOT

PRODUCTION = ROOT / "backchannel.production.toml"
ORIGIN = {"Origin": "https://chat.example.com"}  # the origin the file allows


@pytest.fixture
def jwt_secret(monkeypatch: pytest.MonkeyPatch) -> str:
    """A random HS256 secret in the environment variable the file names."""
    secret = secrets.token_urlsafe(32)
    monkeypatch.setenv("CHAT_JWT_SECRET", secret)
    return secret


def test_production_config_passes_check(jwt_secret: str) -> None:
    assert cli.main(["check", str(PRODUCTION)]) == 0


def test_production_config_requires_jwt(jwt_secret: str) -> None:
    app = App(str(PRODUCTION))
    assert app.config["auth"]["allow_anonymous"] is False
    assert app.config["server"]["demo"] is False
    assert "jwt" in app.config["plugins"]["enabled"]


@pytest.mark.anyio
async def test_connection_without_a_token_is_closed_4001(
    jwt_secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no wait for an init {token}: refuse token-less connections at once
    monkeypatch.setenv("BACKCHANNEL_PLUGINS__JWT__INIT_TIMEOUT", "0")
    app = App(str(PRODUCTION))
    async with serve_in_memory(app), connect(app, headers=ORIGIN) as client:
        with pytest.raises(anyio.EndOfStream):  # the server closed the connection
            while True:
                await client.receive(timeout=3)
        assert client.close_code == 4001
    assert app.counters.closes.get(4001) == 1
