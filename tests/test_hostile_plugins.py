"""A hostile plugin cannot break the promise (DESIGN §1.6), whatever its hooks do.

One plugin implements every hook a running server calls. For the connections a test
marks hostile (a header), each call misbehaves the way hypothesis drew for it: raises,
returns the wrong type, returns an awaitable that raises, or hangs past its timeout
(a sync-only hook "hangs" by returning an awaitable). Random client traffic runs over a
real socket, on asyncio and Trio. Properties:

* every request with an id that reached an admitted connection gets exactly one
  terminal answer;
* every connection ends with a close code;
* the server keeps answering a well-behaved client;
* nothing escapes to the event loop ("Task exception was never retrieved", or an
  exception out of ``App.run`` on Trio).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backchannel import App, BackchannelError, ErrorCode, Message, Principal, hookimpl
from backchannel.testing import websocket

pytestmark = pytest.mark.server_fault

HOW = ["ok", "raises", "wrong", "awaitable-raises", "hangs"]
#: hooks a serving App calls per connection or per message, and what "wrong" returns
HOOKS = {
    "authenticate": {"not": "a principal"},
    "connect": None,  # (connect's result is ignored)
    "connection_added": 42,
    "message_received": 42,
    "validate": "not None",
    "handle": {"set"},  # not JSON: an invalid reply
    "on_error": "not an error",
    "message_sent": 42,
    "error": 42,
    "disconnect": 42,
    "connection_removed": 42,
}
TIMEOUTS = {"hooks": {"timeout": 0.2}, "message": {"timeout": 0.3}}
TERMINAL = ("chunk",)


class Hostile:
    """Misbehaves, per call, as ``script`` says, on connections with ``x-hostile``."""

    name = "hostile"

    def __init__(self, script: list[str]) -> None:
        self.script = script
        self.calls = 0

    def _how(self, connection: Any) -> str:
        if connection is None or "x-hostile" not in connection.request.headers:
            return "ok"
        how = self.script[self.calls % len(self.script)]
        self.calls += 1
        return how

    def _act(self, hook: str, connection: Any, ok: Any = None) -> Any:
        how = self._how(connection)
        if how == "ok":
            return ok
        if how == "raises":
            raise RuntimeError(f"hostile {hook}")
        if how == "wrong":
            return HOOKS[hook]

        async def later() -> Any:
            if how == "awaitable-raises":
                raise RuntimeError(f"hostile async {hook}")
            await anyio.sleep(30)

        return later()

    @hookimpl
    def message_types(self, register: Any) -> None:
        register("hostile")

    @hookimpl
    def authenticate(self, connection: Any) -> Any:
        return self._act("authenticate", connection, Principal("someone"))

    @hookimpl
    def connect(self, connection: Any) -> Any:
        return self._act("connect", connection)

    @hookimpl
    def connection_added(self, connection: Any) -> Any:
        return self._act("connection_added", connection)

    @hookimpl
    def message_received(self, message: Message, connection: Any) -> Any:
        return self._act("message_received", connection)

    @hookimpl
    def validate(self, message: Message, connection: Any) -> Any:
        return self._act("validate", connection)

    @hookimpl
    def handle(self, message: Message, connection: Any) -> Any:
        return self._act("handle", connection, {"fine": True})

    @hookimpl
    def on_error(self, message: Any, connection: Any, error: BaseException) -> Any:
        return self._act("on_error", connection)

    @hookimpl
    def message_sent(self, connection: Any, frame: dict[str, Any]) -> Any:
        return self._act("message_sent", connection)

    @hookimpl
    def error(self, connection: Any, message_id: Any, error: BackchannelError) -> Any:
        return self._act("error", connection)

    @hookimpl
    def disconnect(self, connection: Any, code: int) -> Any:
        return self._act("disconnect", connection)

    @hookimpl
    def connection_removed(self, connection: Any, code: int) -> Any:
        return self._act("connection_removed", connection)


REQUESTS = st.sampled_from(
    [
        {"type": "hostile"},
        {"type": "text", "content": {"text": "hi"}},
        {"type": "ping"},
        {"type": "no-such-type"},
        {"type": "text", "content": {"bogus": 1}},
        "not json",
        {"id": 7, "type": "text"},
        {"type": "cancel", "content": {"target": "r0"}},
    ]
)


async def _conversation(port: int, requests: list[Any], hostile: bool) -> dict[str, Any]:
    """Send ``requests``, read until every id is answered or the server closes."""
    headers = {"x-hostile": "1"} if hostile else {}
    sent: list[str] = []
    answers: Counter[str] = Counter()
    code = None
    async with websocket(port, additional_headers=headers) as ws:
        for n, request in enumerate(requests):
            if isinstance(request, dict) and "id" not in request:
                request = {"id": f"r{n}", **request}
                sent.append(request["id"])
            await ws.send(request if isinstance(request, str) else json.dumps(request))
        try:
            with anyio.fail_after(5):
                while not set(sent) <= set(answers):
                    frame = json.loads(await ws.recv())
                    reply_to = frame.get("replyTo")
                    if reply_to is not None and frame["type"] not in TERMINAL:
                        answers[reply_to] += 1
        except Exception as exc:  # closed by the server, or a hang (reported below)
            if isinstance(exc, TimeoutError):
                raise AssertionError(f"unanswered: {set(sent) - set(answers)}") from exc
        await ws.close()
        rcvd = ws.protocol.close_rcvd
        code = rcvd.code if rcvd is not None else None
    return {"sent": sent, "answers": answers, "code": code}


def _run(backend: str, script: list[str], conversations: list[list[Any]]) -> list[str]:
    """Serve one App with a hostile plugin, hold the conversations; return loop errors."""
    errors: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "never retrieved" in record.getMessage():
                errors.append(record.getMessage())

    catcher = Catch()
    logging.getLogger("asyncio").addHandler(catcher)

    async def main() -> None:
        app = App(
            {"server": {"port": 0}, "log": {"level": "WARNING"}, **TIMEOUTS},
            plugins=["init", "text", "ping", Hostile(script)],
        )
        async with app.run(host="127.0.0.1", port=0):
            assert app.port is not None
            for requests in conversations:
                outcome = await _conversation(app.port, requests, hostile=True)
                if outcome["answers"]:  # admitted: each request got exactly one answer
                    assert set(outcome["answers"]) == set(outcome["sent"]), outcome
                    assert max(outcome["answers"].values()) == 1, outcome
                else:  # refused while admitted: a close code says so
                    assert outcome["code"] is not None, outcome
                assert outcome["code"] is not None, outcome  # every connection is closed
                well = await _conversation(app.port, [{"type": "ping"}], hostile=False)
                assert well["answers"] == Counter({"r0": 1}), well

    try:
        anyio.run(main, backend=backend)
    finally:
        logging.getLogger("asyncio").removeHandler(catcher)
    return errors


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    script=st.lists(st.sampled_from(HOW), min_size=1, max_size=12),
    conversations=st.lists(st.lists(REQUESTS, min_size=1, max_size=6), min_size=1, max_size=3),
)
def test_a_hostile_plugin_never_breaks_the_promise(
    backend: str, script: list[str], conversations: list[list[Any]]
) -> None:
    assert _run(backend, script, conversations) == []


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("how", HOW[1:])
def test_each_misbehaviour_everywhere_at_once(backend: str, how: str) -> None:
    """Every hook misbehaving the same way (the deterministic corners of the property)."""
    requests: list[Any] = [{"type": "hostile"}, {"type": "text", "content": {"text": "x"}}]
    assert _run(backend, [how], [requests, requests]) == []


def test_the_hostile_plugin_covers_every_hook_a_serving_app_calls() -> None:
    """The suite is not vacuous: each per-connection and per-message hook is exercised."""
    from backchannel.hookspecs import SPECS, Kind

    served = {n for n, s in SPECS.items() if s.kind is not Kind.SETUP}
    not_here = {"alert", "control_message", "session_resumed", "session_expired", "shutdown"}
    assert served - not_here == set(HOOKS)
    assert ErrorCode.HANDLER_ERROR  # (the codes the properties rely on exist)
