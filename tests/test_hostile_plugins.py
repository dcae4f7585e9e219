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
from websockets.exceptions import ConnectionClosed

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
    """Misbehaves as ``script`` says (per hook, each call taking the next entry, cyclically)
    on connections with an ``x-hostile`` header; behaves on the others."""

    name = "hostile"

    def __init__(self, script: dict[str, list[str]]) -> None:
        self.script = script
        self.calls: Counter[str] = Counter()
        #: hooks that misbehaved at least once
        self.misbehaved: set[str] = set()

    def _how(self, hook: str, connection: Any) -> str:
        if connection is None or "x-hostile" not in connection.request.headers:
            return "ok"
        plan = self.script.get(hook) or ["ok"]
        how = plan[self.calls[hook] % len(plan)]
        self.calls[hook] += 1
        if how != "ok":
            self.misbehaved.add(hook)
        return how

    def _act(self, hook: str, connection: Any, ok: Any = None) -> Any:
        how = self._how(hook, connection)
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
        register("crash", handler=self.crash)

    def crash(self, message: Message) -> None:
        """A handler bug on every connection (so ``on_error`` is asked)."""
        raise RuntimeError("handler bug")

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
        {"type": "crash"},
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
    async with websocket(port, additional_headers=headers) as ws:
        try:
            for n, request in enumerate(requests):
                if isinstance(request, dict) and "id" not in request:
                    request = {"id": f"r{n}", **request}
                    sent.append(request["id"])
                await ws.send(request if isinstance(request, str) else json.dumps(request))
            with anyio.fail_after(5):
                while not set(sent) <= set(answers):
                    frame = json.loads(await ws.recv())
                    reply_to = frame.get("replyTo")
                    if reply_to is not None and frame["type"] not in TERMINAL:
                        answers[reply_to] += 1
        except ConnectionClosed:  # the server closed it: its close code says why
            pass
        except TimeoutError as exc:
            raise AssertionError(f"unanswered: {set(sent) - set(answers)}") from exc
    rcvd = ws.protocol.close_rcvd  # (leaving the block closed it, if the server had not)
    return {"sent": sent, "answers": answers, "code": rcvd.code if rcvd is not None else None}


def _run(backend: str, script: dict[str, list[str]], conversations: list[list[Any]]) -> Hostile:
    """Serve one App with a hostile plugin and hold the conversations, checking the
    properties after each; returns the plugin (what it did)."""
    errors: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "never retrieved" in record.getMessage():
                errors.append(record.getMessage())

    catcher = Catch()
    logging.getLogger("asyncio").addHandler(catcher)
    hostile = Hostile(script)

    async def main() -> None:
        app = App(
            {"server": {"port": 0}, "log": {"level": "WARNING"}, **TIMEOUTS},
            plugins=["init", "text", "ping", hostile],
        )
        async with app.run(host="127.0.0.1", port=0):
            assert app.port is not None
            for requests in conversations:
                outcome = await _conversation(app.port, requests, hostile=True)
                if outcome["answers"]:  # admitted: each request got exactly one answer
                    assert set(outcome["answers"]) == set(outcome["sent"]), outcome
                    assert max(outcome["answers"].values()) == 1, outcome
                assert outcome["code"] is not None, outcome  # every connection is closed
                well = await _conversation(app.port, [{"type": "ping"}], hostile=False)
                assert well["answers"] == Counter({"r0": 1}), well

    try:
        anyio.run(main, backend=backend)  # on Trio, anything escaping a task raises here
    finally:
        logging.getLogger("asyncio").removeHandler(catcher)
    assert errors == []
    return hostile


SCRIPTS = st.dictionaries(
    st.sampled_from(sorted(HOOKS)), st.lists(st.sampled_from(HOW), min_size=1, max_size=4)
)
CONVERSATIONS = st.lists(st.lists(REQUESTS, min_size=1, max_size=6), min_size=1, max_size=3)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(script=SCRIPTS, conversations=CONVERSATIONS)
def test_a_hostile_plugin_never_breaks_the_promise(
    backend: str, script: dict[str, list[str]], conversations: list[list[Any]]
) -> None:
    _run(backend, script, conversations)


EVERY_KIND: list[Any] = [
    {"type": "hostile"},
    {"type": "crash"},
    {"type": "text", "content": {"text": "x"}},
    {"type": "text", "content": {"bogus": 1}},
]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("how", HOW[1:])
@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_each_hook_misbehaving_each_way(backend: str, hook: str, how: str) -> None:
    """The deterministic corners of the property: one hook misbehaves one way on every
    call, over two conversations (requests answered, failed, refused)."""
    hostile = _run(backend, {hook: [how]}, [EVERY_KIND, EVERY_KIND])
    assert hook in hostile.misbehaved  # the hook was really reached


def test_the_hostile_plugin_covers_every_hook_a_serving_app_calls() -> None:
    """The suite is not vacuous: each per-connection and per-message hook is exercised."""
    from backchannel.hookspecs import SPECS, Kind

    served = {n for n, s in SPECS.items() if s.kind is not Kind.SETUP}
    not_here = {"alert", "control_message", "session_resumed", "session_expired", "shutdown"}
    assert served - not_here == set(HOOKS)
    assert ErrorCode.HANDLER_ERROR  # (the codes the properties rely on exist)
