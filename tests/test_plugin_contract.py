"""The plugin contract: mistakes fail start-up in one line, gatekeepers fail closed.

Start-up: a table of plugin mistakes, each failing with one line that names the plugin
and the hook. Run time: gatekeepers (``authenticate``, ``connect``, ``validate``) that
raise, return the wrong thing, return an awaitable that fails or hangs, over a real
socket: the client always gets its answer or a close code, and the log one line naming
the plugin and the hook.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from backchannel import (
    DEFERRED,
    App,
    BackchannelError,
    Connection,
    ErrorCode,
    Message,
    Principal,
    StartupError,
    State,
    hookimpl,
)
from backchannel.hookspecs import SPECS, Kind
from backchannel.testing import connect, serve_in_memory
from conftest import make_app, serving, ws_connect

pytestmark = pytest.mark.anyio


# ------------------------------------------------------------- start-up mistakes


class Misspelled:
    @hookimpl
    def valdiate(self, message: Message, connection: Connection) -> None:
        return None


class Singular:
    @hookimpl
    def message_type(self, register: Callable[..., None]) -> None:
        return None


class Wrapper:
    @hookimpl(wrapper=True)
    def authenticate(self, connection: Connection) -> Any:
        return (yield)


class OldWrapper:
    @hookimpl(hookwrapper=True)
    def validate(self, message: Message, connection: Connection) -> Any:
        yield


class WrongArgument:
    @hookimpl
    def validate(self, message: Message, conn: Connection) -> None:
        return None


class RaisingSchema:
    @hookimpl
    def config_schema(self) -> dict[str, Any]:
        return {"type": "object"}["missing"]  # type: ignore[no-any-return]


class ListSchema:
    @hookimpl
    def config_schema(self) -> Any:
        return ["not", "a", "schema"]


def registers(name: Any, **options: Any) -> object:
    options.setdefault("handler", lambda message: {})

    class Registers:
        @hookimpl
        def message_types(self, register: Callable[..., None]) -> None:
            register(name, **options)

    return Registers()


class NotABroker:
    @hookimpl
    def broker(self, app: App) -> Any:
        return {"name": "redis"}


class BadWrapper:
    @hookimpl
    def wrap_handler(self, type: str, handler: Any) -> Any:
        return "not callable"


class PostRoute:
    @hookimpl
    def http_routes(self, register: Callable[..., None]) -> None:
        register("POST", "/hook", lambda request: None)


class AsyncObserver:
    @hookimpl
    async def message_types(self, register: Callable[..., None]) -> None:
        register("late")


AT_REGISTRATION = [
    (
        Misspelled(),
        "plugin 'faulty' implements 'valdiate', which is not a backchannel hook; "
        "did you mean 'validate'?",
    ),
    (Singular(), "plugin 'faulty' implements 'message_type', which is not a backchannel hook; "),
    (Wrapper(), "plugin 'faulty': hook 'authenticate' is a pluggy wrapper"),
    (OldWrapper(), "plugin 'faulty': hook 'validate' is a pluggy wrapper"),
    (WrongArgument(), "plugin 'faulty' is invalid: "),
    (RaisingSchema(), "plugin 'faulty' failed in hook 'config_schema': KeyError: 'missing'"),
    (ListSchema(), "plugin 'faulty' failed in hook 'config_schema': returned list, expected dict"),
]
AT_STARTUP = [
    (registers("Bad Type"), "plugin 'faulty' registers type 'Bad Type', which no request can"),
    (registers(""), "plugin 'faulty' registers type '', which no request can carry"),
    (registers("x" * 65), "which no request can carry"),
    (registers(7), "plugin 'faulty' registers type 7, which no request can carry"),
    (registers("cancel"), "plugin 'faulty' registers type 'cancel': 'cancel' is a kernel"),
    (registers("ok", timeout=0), "plugin 'faulty' registers type 'ok' with timeout 0"),
    (registers("ok", handler=3), "plugin 'faulty' registers type 'ok' with a handler that is not"),
    (registers("ok", schema={"type": 3}), "registers type 'ok': its schema is invalid: "),
    (registers("ok", reply="pong"), "registers type 'ok' with reply 'pong': the reply content's"),
    (registers("ok", reply={"type": 3}), "registers type 'ok': its reply schema is invalid: "),
    (registers("ok", reply_type="pong"), "with a reply_type but no reply (its content's schema)"),
    (registers("ok", reply={}, reply_type="ack"), "with reply_type 'ack': a message type name"),
    (registers("ok", reply={}, reply_type="No"), "with reply_type 'No': a message type name"),
    (registers("ok", reply="ack", reply_type="x"), "with reply 'ack' and a reply_type"),
    (registers("ok", chunks=[]), "registers type 'ok' with chunks that are not a JSON Schema"),
    (registers("ok", chunks={"type": 3}), "registers type 'ok': its chunks schema is invalid"),
    (registers("ok", chunks={}, reply={}), "with chunks and a reply: a streaming handler is"),
    (registers("ok", errors="forbidden"), "registers type 'ok' with errors 'forbidden': a list"),
    (registers("ok", errors=["nope"]), "with error code 'nope', which is not one of: bad_json, "),
    (NotABroker(), "plugin 'faulty' failed in hook 'broker': returned dict, expected a Broker"),
    (BadWrapper(), "plugin 'faulty' failed in hook 'wrap_handler' for type 'text': returned str"),
    (PostRoute(), "plugin 'faulty': route POST /hook: only GET routes are served"),
    (AsyncObserver(), "plugin 'faulty' failed in hook 'message_types': returned an awaitable"),
]


@pytest.mark.parametrize(("plugin", "expected"), AT_REGISTRATION, ids=lambda v: type(v).__name__)
def test_a_mistake_found_at_registration_fails_in_one_line(plugin: object, expected: str) -> None:
    """Misspelled hooks (with a suggestion), wrappers, bad arguments, a config schema that
    raises or is no dict: start-up stops with one line naming the plugin and the hook."""
    with pytest.raises(StartupError) as excinfo:
        App({}, plugins=["text"]).use(plugin, name="faulty")
    text = str(excinfo.value)
    assert text.startswith(expected), text
    assert "\n" not in text


@pytest.mark.parametrize(("plugin", "expected"), AT_STARTUP, ids=lambda v: type(v).__name__)
async def test_a_mistake_found_at_startup_fails_in_one_line(plugin: object, expected: str) -> None:
    """Bad type names, reserved names, bad options, a broker that is none, a wrapper that
    returns no callable, a POST route, an async set-up hook: one line, plugin named."""
    app = App({}, plugins=["text"])
    app.use(plugin, name="faulty")
    with pytest.raises(StartupError) as excinfo:
        async with serve_in_memory(app):
            pass
    text = str(excinfo.value)
    assert expected in text and text.startswith("plugin 'faulty'"), text
    assert "\n" not in text


def test_every_hookspec_declares_its_kind() -> None:
    """Each hook's policy is in code: the kinds DESIGN §3 names, and the sync-only hot path."""
    assert SPECS["authenticate"].kind is Kind.GATEKEEPER and SPECS["authenticate"].first_result
    assert {n for n, s in SPECS.items() if s.kind is Kind.GATEKEEPER} == {
        "authenticate",
        "connect",
        "validate",
    }
    assert SPECS["handle"].kind is Kind.DISPATCH
    assert SPECS["broker"].kind is Kind.SETUP and SPECS["broker"].first_result
    sync_only = {n for n, s in SPECS.items() if not s.awaitable}
    assert {"message_received", "message_sent", "error", "on_error", "connection_added"} <= (
        sync_only
    )


def test_an_instance_of_an_installed_plugin_gets_its_name_and_settings() -> None:
    """``App(plugins=[Plugin()])`` registers the object under its entry point's name, so its
    ``[plugins.<name>]`` table and defaults apply (not ``inline-1``)."""
    from backchannel_validation import Plugin as Validation

    app = App({"plugins": {"validation": {"max_depth": 3}}}, plugins=[Validation()])
    assert list(app.plugins()) == ["validation"]
    assert app.plugin_config("validation")["max_depth"] == 3
    assert app.plugin_config("validation")["max_string_length"] == 8000  # a default


def test_app_from_a_dict_reads_the_environment_like_a_file() -> None:
    """``App(dict)``, a TOML file and no config at all take ``BACKCHANNEL_*`` the same way."""
    environ = {"BACKCHANNEL_SESSION__TTL": "7", "BACKCHANNEL_SERVER__PORT": "9001"}
    from_dict = App({"server": {"port": 1}}, plugins=[], environ=environ)
    from_nothing = App(None, plugins=[], environ=environ)
    assert from_dict.settings.session.ttl == from_nothing.settings.session.ttl == 7
    assert from_dict.settings.server.port == from_nothing.settings.server.port == 9001


# --------------------------------------------------- gatekeepers over a real socket


class Hostile:
    """A gatekeeper misbehaving in one way, chosen per test."""

    def __init__(self, hook: str, how: str) -> None:
        self.hook, self.how = hook, how

    def _do(self) -> Any:
        how = self.how
        if how == "raises":
            raise RuntimeError("plugin bug")
        if how == "wrong":
            return {"id": "alice"}  # a dict, not a Principal (nor None)

        async def later() -> Any:
            if how == "awaitable-raises":
                raise RuntimeError("async plugin bug")
            await anyio.sleep(60)  # "hangs": past hooks.timeout / message.timeout

        return later()

    @hookimpl
    def authenticate(self, connection: Connection) -> Any:
        return self._do() if self.hook == "authenticate" else None

    @hookimpl
    def connect(self, connection: Connection) -> Any:
        return self._do() if self.hook == "connect" else None

    @hookimpl
    def validate(self, message: Message, connection: Connection) -> Any:
        return self._do() if self.hook == "validate" else None


HOWS = ["raises", "wrong", "awaitable-raises", "hangs"]
FAST = {"hooks": {"timeout": 0.3}, "message": {"timeout": 0.5}}


@pytest.mark.server_fault
@pytest.mark.parametrize(
    ("hook", "how"),
    # (connect's result is ignored: returning something is no mistake there)
    [(h, w) for h in ("authenticate", "connect") for w in HOWS if (h, w) != ("connect", "wrong")],
)
async def test_a_failing_connection_gatekeeper_closes_1011_naming_plugin_and_hook(
    hook: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever ``authenticate``/``connect`` does wrong, the client is closed 1011 (never
    left waiting), the log has one line naming plugin and hook, the server goes on."""
    caplog.set_level(logging.INFO, logger="backchannel")
    app = make_app(FAST, plugins=["text", Hostile(hook, how)])
    async with serving(app):
        async with ws_connect(app.port) as client:
            assert await client.closed(timeout=5) == 1011
        lines = [
            r.getMessage()
            for r in caplog.records
            if r.name == "backchannel.hooks" and r.levelno == logging.ERROR
        ]
        assert len(lines) == 1 and lines[0].startswith(f"plugin 'inline-1' failed in hook {hook!r}")
        assert app.hook_failures() == {(hook, "inline-1"): 1}
        assert app.counters.closes.get(1011) == 1


@pytest.mark.server_fault
@pytest.mark.parametrize("how", HOWS)
async def test_a_failing_validate_hook_answers_the_request_and_names_plugin(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``validate`` that raises, returns something, fails or hangs: that request gets
    ``handler_error`` (``timeout`` when it hangs), the next one is served."""
    caplog.set_level(logging.INFO, logger="backchannel")
    app = make_app(FAST, plugins=["text", Hostile("validate", how)])
    async with serving(app), ws_connect(app.port) as client:
        answer = await client.request("text", {"text": "hi"})
        assert answer["type"] == "error"
        expected = "timeout" if how == "hangs" else "handler_error"
        assert answer["content"]["code"] == expected
        if how != "hangs":
            assert "plugin 'inline-1' failed in validate" in answer["content"]["message"]
            line = next(r.getMessage() for r in caplog.records if "ref=" in r.getMessage())
            assert line.startswith("plugin 'inline-1' failed in validate ref=")
            assert app.hook_failures() == {("validate", "inline-1"): 1}


class Deferring:
    """Admits without a principal; ``init {token: "letmein"}`` authenticates."""

    @hookimpl
    def authenticate(self, connection: Connection) -> Any:
        return DEFERRED

    @hookimpl(tryfirst=True)
    def wrap_handler(self, type: str, handler: Any) -> Any:
        if type != "init":
            return None

        def init(message: Message, connection: Connection) -> Any:
            if message.content.get("token") != "letmein":
                raise BackchannelError(ErrorCode.UNAUTHORIZED, "bad token")
            connection.authenticate(Principal("alice"))
            return handler(message, connection)

        return init


async def test_a_deferred_connection_learns_nothing_before_it_authenticates() -> None:
    """Without a principal every request but ``init`` is ``unauthorized`` — unknown types,
    invalid content and deep nesting alike — and nothing it was sent is kept."""
    app = make_app(plugins=["init", "text", Deferring()])
    deep: Any = {}
    for _ in range(300):
        deep = {"a": deep}
    async with serving(app), ws_connect(app.port) as client:
        for type_, content in [
            ("text", {"text": "hi"}),
            ("no-such-type", {}),
            ("text", {"bogus": 1}),
            ("text", {"text": "x", "room": deep}),
        ]:
            answer = await client.request(type_, content)
            assert answer["content"]["code"] == "unauthorized", (type_, answer)
        (conn,) = app.connections()
        assert conn.principal is None and app.session(conn.session.id) is None
        assert (await client.request("init", {"token": "nope"}))["content"]["code"] == (
            "unauthorized"
        )
        welcome = await client.request("init", {"token": "letmein"})
        assert welcome["content"]["principal"] == "alice"
        assert (await client.request("text", {"text": "hi"}))["content"]["from"] == "alice"
        assert app.session(conn.session.id) is conn.session  # kept from now on


async def test_the_test_kit_runs_the_production_lifecycle() -> None:
    """``serve_in_memory`` runs what ``app.run`` runs: session expiry, then at shutdown the
    drain (a ``going_away`` notice, close 1001) and the ``shutdown`` hooks."""
    seen: list[str] = []

    class Watch:
        @hookimpl
        def session_expired(self, session: Any) -> None:
            seen.append(f"expired {session.id}")

        @hookimpl
        def shutdown(self, app: App) -> None:
            seen.append("shutdown")

    app = App({"session": {"ttl": 0}}, plugins=["text", Watch()])
    async with connect(app) as staying:  # (opened first: it outlives the serving below)
        async with serve_in_memory(app):
            async with connect(app) as client:
                await client.request("text", {"text": "hi"})
                sid = client.connection.session.id
            with anyio.fail_after(5):
                while f"expired {sid}" not in seen:
                    await anyio.sleep(0.02)
        assert seen[-1] == "shutdown"
        notice = await staying.receive()
        assert notice["type"] == "system" and notice["content"]["event"] == "going_away"
        assert staying.close_code == 1001 and staying.connection.state is State.GONE
