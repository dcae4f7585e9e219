"""Property tests (hypothesis): any frame a client sends gets exactly one well-formed answer.

Examples run one after another against a single App per test, driven from this
(synchronous) test through an anyio blocking portal, on asyncio and on Trio. Each
example opens a fresh connection, sends the generated payload, then a sentinel
``ping``: messages of one connection are answered in order, so every frame before
the sentinel's ``pong`` belongs to the payload — no sleeping, no guessing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import jsonschema_rs
import orjson
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as sync_connect

from backchannel import App
from backchannel.contracts import compile_schema, decode, load_schema, rule, violations
from backchannel.testing import connect, serve_in_memory
from conftest import check_frame, make_app, serving

SENTINEL = "sentinel-\u2603-probe"
#: no error text may contain this many consecutive characters of the input (client-chosen
#: property names and type names, at most 64 characters, are the only echoes allowed).
LONG = 65
MAX_SIZE = 1024  # server.max_message_size of the real-socket test
ENVELOPE = compile_schema(load_schema("backchannel", "envelope.schema.json"))
ENVELOPE_KEYS = {"id", "type", "content", "sessionId", "timestamp"}
TYPE_RE = re.compile(r"[a-z][a-z0-9_.-]*")
ANSWER_ERRORS = {"unknown_type", "type_not_allowed", "validation_failed", "forbidden"}
SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ------------------------------------------------------------------ strategies

LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.text(min_size=LONG, max_size=150)
)
JSON = st.recursive(
    LEAVES,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=70), kids, max_size=4)
    ),
    max_leaves=12,
)


def dumps(value: Any, ascii: bool) -> str:
    return json.dumps(value, ensure_ascii=ascii)


JSON_TEXT = st.builds(dumps, JSON, st.booleans())
IDS = st.one_of(
    st.text(min_size=1, max_size=128),
    st.just(""),
    st.text(min_size=129, max_size=160),
    JSON,
)
TYPES = st.one_of(
    st.sampled_from(
        ["text", "ping", "init", "system", "cancel", "no.such.type", "Text", "1x", "text\n", ""]
    ),
    st.from_regex(r"[a-z][a-z0-9_.-]{0,70}", fullmatch=True),
    st.text(max_size=70),
    JSON,
)
CONTENTS = st.one_of(
    JSON,
    st.fixed_dictionaries({"text": st.text(max_size=40) | st.text(min_size=LONG, max_size=150)}),
    st.fixed_dictionaries(
        {},
        optional={
            "text": st.text(max_size=20) | JSON,
            "clientTime": st.text(max_size=20) | st.floats(allow_nan=False) | JSON,
            "target": st.text(max_size=130) | JSON,
            "sessionId": st.text(max_size=130) | JSON,
            "lastSeq": st.integers() | JSON,
            "event": st.sampled_from(["notice", "maintenance", "going_away"]) | JSON,
            "message": st.text(max_size=40) | st.text(min_size=LONG, max_size=150),
            "room": st.text(max_size=130),
            "client": st.fixed_dictionaries({}, optional={"name": JSON, "version": JSON}),
        },
    ),
)
ENVELOPES = st.builds(
    lambda base, extra, ascii: dumps({**extra, **base}, ascii),
    st.fixed_dictionaries(
        {},
        optional={
            "id": IDS,
            "type": TYPES,
            "content": CONTENTS,
            "sessionId": st.text(max_size=130) | JSON,
            "timestamp": st.text(max_size=70) | JSON,
        },
    ),
    st.dictionaries(st.text(max_size=70), JSON, max_size=2),
    st.booleans(),
)
TEXTS = st.one_of(
    st.text(max_size=300),
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
    st.builds(lambda s, n: s[:n], JSON_TEXT | ENVELOPES, st.integers(0, 200)),
)
PAYLOADS: dict[str, st.SearchStrategy[str | bytes]] = {
    "text": TEXTS,
    "bytes": st.binary(max_size=300),
    "json": JSON_TEXT,
    "envelope": ENVELOPES,
}

# -------------------------------------------------------------------- oracle


def is_envelope(data: Any) -> bool:
    """protocol v1's envelope, written out by hand (independent of the schema file)."""
    if (
        type(data) is not dict
        or not ENVELOPE_KEYS.issuperset(data)
        or not {"id", "type"} <= set(data)
    ):
        return False
    ident, kind = data["id"], data["type"]
    session, stamp = data.get("sessionId", "x"), data.get("timestamp", "")
    return (
        type(ident) is str
        and 1 <= len(ident) <= 128
        and type(kind) is str
        and len(kind) <= 64
        and TYPE_RE.fullmatch(kind) is not None
        and type(data.get("content", {})) is dict
        and type(session) is str
        and 1 <= len(session) <= 128
        and type(stamp) is str
        and len(stamp) <= 64
    )


def strings(data: Any) -> list[str]:
    """Every key and string value in decoded JSON (iteratively: it may be deep)."""
    found: list[str] = []
    stack = [data]
    while stack:
        node = stack.pop()
        if type(node) is str:
            found.append(node)
        elif type(node) is dict:
            found.extend(node)
            stack.extend(node.values())
        elif type(node) is list:
            stack.extend(node)
    return found


def assert_no_echo(frame: dict[str, Any], sources: list[str]) -> None:
    """The error's text never repeats ``LONG`` consecutive characters of the input."""
    content = frame["content"]
    texts = [content["message"]]
    texts += [d.get("rule", "") for d in content.get("details", [])]
    for text in texts:
        for i in range(len(text) - LONG + 1):
            window = text[i : i + LONG]
            assert not any(window in source for source in sources), (text, window)


def assert_one_answer(payload: str | bytes, frames: list[dict[str, Any]]) -> None:
    """``frames`` (everything the payload caused) is exactly one well-formed answer."""
    for frame in frames:
        check_frame(frame)
    sources = [payload.decode(errors="replace") if type(payload) is bytes else str(payload)]
    parsed, data = False, None
    if type(payload) is str:
        try:
            data = decode(payload)
        except orjson.JSONDecodeError:
            pass
        else:
            parsed = True
            sources += strings(data)
    if not parsed:
        code, reply_to = "bad_json", None
    elif not is_envelope(data):
        assert not ENVELOPE.is_valid(data), data  # the schema agrees with the protocol text
        ident = data.get("id") if type(data) is dict else None
        code = "invalid_envelope"
        reply_to = ident if type(ident) is str and 1 <= len(ident) <= 128 else None
    else:
        assert ENVELOPE.is_valid(data), data
        answers = [f for f in frames if "replyTo" in f]
        notices = [f for f in frames if "replyTo" not in f]
        assert len(answers) == 1, frames
        assert answers[0]["replyTo"] == data["id"] and answers[0]["type"] != "chunk"
        assert all(f["type"] == "system" for f in notices), frames  # own admin broadcast
        if answers[0]["type"] == "error":
            assert answers[0]["content"]["code"] in ANSWER_ERRORS, answers[0]
            assert_no_echo(answers[0], sources)
        return
    assert len(frames) == 1, frames
    (frame,) = frames
    assert frame["type"] == "error" and frame["replyTo"] == reply_to, frame
    assert frame["content"]["code"] == code, frame
    assert_no_echo(frame, sources)


# ------------------------------------------------------------------- in memory


async def exchange(app: App, payload: str | bytes) -> list[dict[str, Any]]:
    """Send ``payload`` then the sentinel on a fresh connection; frames before the pong."""
    async with connect(app) as client:
        client.send_raw(payload)
        client.send("ping", id=SENTINEL)
        pong = await client.answer(SENTINEL)
    assert pong["type"] == "pong" and client.frames[-1] is pong
    return client.frames[:-1]


@contextmanager
def in_memory(
    backend: str, config: dict[str, Any] | None = None
) -> Iterator[tuple[BlockingPortal, App]]:
    """One App served in memory on an event loop of ``backend`` in a portal thread."""
    app = make_app({"log": {"level": "WARNING"}, **(config or {})})
    with (
        start_blocking_portal(backend) as portal,
        portal.wrap_async_context_manager(serve_in_memory(app)),
    ):
        yield portal, app


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_any_payload_gets_exactly_one_well_formed_answer(anyio_backend: str, kind: str) -> None:
    """Any text, bytes, JSON or near-envelope yields one answer: reply or error with replyTo."""
    with in_memory(anyio_backend) as (portal, app):

        @SETTINGS
        @given(payload=PAYLOADS[kind])
        def check(payload: str | bytes) -> None:
            assert_one_answer(payload, portal.call(exchange, app, payload))

        check()
        assert app.counters.errors.get("handler_error", 0) == 0


# ----------------------------------------------------------------- real socket


def talk(port: int, payload: str | bytes, as_text: bool) -> tuple[list[dict[str, Any]], int | None]:
    """Send one WebSocket message (``as_text`` forces a text frame) and the sentinel.

    Returns the frames before the sentinel's pong, or the frames and the close code.
    """
    frames: list[dict[str, Any]] = []
    url = f"ws://127.0.0.1:{port}/ws"
    with sync_connect(url, subprotocols=["backchannel.v1"], max_size=None, open_timeout=5) as ws:
        try:
            ws.send(payload, text=True if as_text else None)
            ws.send(json.dumps({"id": SENTINEL, "type": "ping"}))
            while True:
                frame = check_frame(json.loads(ws.recv(timeout=5)))
                if frame.get("replyTo") == SENTINEL:
                    return frames, None
                frames.append(frame)
        except ConnectionClosed as exc:
            assert exc.rcvd is not None, "server dropped the connection without a close frame"
            return frames, exc.rcvd.code


def big_text(n: int) -> str:
    """A valid text request of about ``n`` bytes (around and above ``MAX_SIZE``)."""
    return json.dumps({"id": "big", "type": "text", "content": {"text": "x" * n}})


WIRE = st.one_of(
    st.tuples(TEXTS | JSON_TEXT | ENVELOPES, st.just(True)),
    st.tuples(st.binary(max_size=300), st.booleans()),  # binary, or raw bytes in a text frame
    st.tuples(st.integers(MAX_SIZE - 48, 3 * MAX_SIZE).map(big_text), st.just(True)),
    st.tuples(st.binary(min_size=MAX_SIZE - 8, max_size=MAX_SIZE + 8), st.booleans()),
)


@pytest.mark.slow
def test_real_socket_frames_get_one_answer_or_documented_close_and_server_stays_up() -> None:
    """Over TCP: one answer per frame, or close 1009 (oversized) / 1007 (bad UTF-8); still up."""
    app = make_app({"server": {"max_message_size": MAX_SIZE}, "log": {"level": "WARNING"}})
    with (
        start_blocking_portal("asyncio") as portal,
        portal.wrap_async_context_manager(serving(app)),
    ):
        seen: set[int | None] = set()

        @settings(SETTINGS, max_examples=100)
        @given(message=WIRE)
        def check(message: tuple[str | bytes, bool]) -> None:
            payload, as_text = message
            raw = payload.encode() if type(payload) is str else payload
            frames, code = talk(app.port, payload, as_text)
            seen.add(code)
            if len(raw) > MAX_SIZE:
                assert (frames, code) == ([], 1009)
                return
            if as_text and type(payload) is bytes:
                try:
                    payload = payload.decode()
                except UnicodeDecodeError:
                    assert (frames, code) == ([], 1007)
                    return
            assert code is None, (frames, code)
            assert_one_answer(payload, frames)

        check()
        assert {None, 1009} <= seen  # both outcomes were exercised
        frames, code = talk(app.port, json.dumps({"id": "after", "type": "text"}), True)
        assert code is None and frames[0]["replyTo"] == "after"  # the server still answers
        assert app.counters.errors.get("handler_error", 0) == 0


# ------------------------------------------------------------------- contracts

SECRET = st.text(min_size=8, max_size=80)
KEYWORDS = st.one_of(
    st.builds(lambda t: {"type": t}, st.sampled_from(["integer", "number", "null", "array"])),
    st.builds(lambda n: {"maxLength": n}, st.integers(0, 7)),
    st.builds(lambda n: {"minLength": n}, st.integers(81, 200)),
    st.builds(lambda p: {"pattern": p}, st.sampled_from(["^$", "^a{3}$", "^[^\\s\\S]"])),
    st.builds(lambda o: {"enum": o}, st.lists(st.text(max_size=5), min_size=1, max_size=3)),
    st.builds(lambda c: {"const": c}, st.text(max_size=5) | st.integers()),
    st.just({"not": {"type": "string"}}),
    st.just({"anyOf": [{"type": "integer"}, {"maxLength": 1}]}),
    st.just({"oneOf": [{"type": "string"}, {"minLength": 1}]}),
    st.just({"allOf": [False]}),
)


def containers(sub: dict[str, Any], secret: str, key: str) -> st.SearchStrategy[Any]:
    """Schemas and instances that put ``secret`` where ``sub`` rejects it."""
    return st.sampled_from(
        [
            (sub, secret),
            ({"properties": {key: sub}}, {key: secret}),
            ({"items": sub}, [0, secret]),
            ({"additionalProperties": False}, {key: secret}),
            ({"additionalProperties": sub}, {key: secret}),
            ({"uniqueItems": True}, [secret, secret]),
            ({"contains": {"type": "integer"}}, [secret]),
            ({"prefixItems": [{}], "items": False}, [0, secret]),
            ({"propertyNames": {"maxLength": 2}}, {secret: secret}),
            ({"unevaluatedProperties": False}, {key: secret}),
            ({"required": [key + "!"]}, {key: secret}),
            ({"maxProperties": 0}, {key: secret}),
            ({"dependentRequired": {key: [key + "!"]}}, {key: secret}),
        ]
    )


@st.composite
def schema_and_instance(draw: st.DrawFn) -> tuple[dict[str, Any], Any, str, str]:
    secret = draw(SECRET)
    key = draw(st.text(max_size=10))
    schema, instance = draw(containers(draw(KEYWORDS), secret, key))
    return schema, instance, secret, key


@SETTINGS
@given(case=schema_and_instance())
def test_violation_rules_never_contain_the_instance_value(
    case: tuple[dict[str, Any], Any, str, str],
) -> None:
    """``violations``/``rule`` describe the failure without the offending string value."""
    schema, instance, secret, key = case
    echoable = json.dumps(schema, ensure_ascii=False) + key  # schema text, and property names
    validator = compile_schema(schema)
    errors = list(validator.iter_errors(instance))
    assert errors, (schema, instance)  # every case above is a failing one
    for error in errors:
        text = rule(error)
        assert secret not in text or secret in echoable, (schema, text)
        assert len(text) <= 400
    found = violations(validator, instance, "content")
    assert found and all(set(v) == {"path", "rule"} for v in found)
    for v in found:
        assert secret not in v["rule"] or secret in echoable


@SETTINGS
@given(names=st.lists(st.text(min_size=1, max_size=200), min_size=1, max_size=8, unique=True))
def test_unexpected_property_names_are_listed_clipped_and_escaped(names: list[str]) -> None:
    """additionalProperties names the first five extra keys, each cut to 64 chars, one line."""
    schema = {"type": "object", "properties": {"": {}}, "additionalProperties": False}
    validator = compile_schema(schema)
    (error,) = validator.iter_errors(dict.fromkeys(names, 0))
    assert isinstance(error, jsonschema_rs.ValidationError)
    text = rule(error)
    assert text.startswith("unexpected properties: ") and text.isprintable(), text
    assert len(text) <= len("unexpected properties: ") + 5 * (64 * 10 + 4)
    if len(names) <= 5:  # plain short names appear exactly as sent
        assert all(name in text for name in names if len(name) <= 64 and name.isprintable())
    for name in names:
        assert name[:65] not in text or len(name) <= 64
