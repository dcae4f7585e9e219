"""The AsyncAPI 3.0 document of an App: every request type it accepts, with its answer.

Built from the kernel's contracts (``envelope``, ``frame``, ``error``, ``cancel``) and
the registered types (:class:`~backchannel.MessageType`: the request's content schema,
its reply or ``ack``, its chunks, the error codes it may get). An App serves it at
``/asyncapi.json``; ``backchannel asyncapi`` prints it; the JS client's TypeScript
declarations are generated from the committed copy (``docs/asyncapi.json``).

Shape: one server (the WebSocket endpoint), one channel (a connection), one ``receive``
operation per request type whose ``reply`` lists the frames that may answer it (the
reply or ``ack``, its ``chunk`` frames, an ``error`` whose ``code`` is one of the
type's codes), correlated by ``replyTo`` = the request's ``id``; one ``send`` operation
for what the server sends unasked. Each JSON Schema is embedded under
``components/schemas`` with its ``$id`` removed and its ``$ref`` pointers rewritten to
point there, so the document stands alone (AsyncAPI schema objects are JSON Schema
draft-07 with extensions; ours use nothing newer that a draft-07 reader would misread).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .contracts import load_schema
from .errors import ErrorCode
from .model import COMMON_ERRORS, MessageType

if TYPE_CHECKING:
    from .app import App

__all__ = ["SPEC_VERSION", "document", "dumps", "registered_types"]

#: the AsyncAPI version the document follows
SPEC_VERSION = "3.0.0"
_CHANNEL = "#/channels/connection"
_SCHEMAS = "#/components/schemas/"
#: kernel contracts embedded under components/schemas, by file
_KERNEL = {
    "envelope.schema.json": "envelope",
    "frame.schema.json": "frame",
    "error.schema.json": "error",
    "cancel.schema.json": "request.cancel",
}
_DESCRIPTION = """\
Real-time chat over WebSocket (subprotocol `backchannel.v1`), one JSON object per text \
frame. Every request (`{id, type, content}`) gets exactly one terminal answer whose \
`replyTo` is its `id`: the reply, an `ack`, or an `error` whose `content.code` is one of \
the codes its operation lists; a streaming handler sends `chunk` frames before its `ack`. \
Every server frame carries a per-session `seq`; `init {sessionId, lastSeq, epoch}` \
resumes a session. Any request may be answered with these codes, whatever its type: \
{common}. The wire protocol: docs/protocol.md."""


def registered_types(app: App) -> dict[str, MessageType]:
    """The message types ``app`` serves: after start-up its own, else what its plugins'
    ``message_types`` hooks register now (``startup`` hooks do not run for this)."""
    return dict(sorted(app.message_types().items()))


def document(
    types: Mapping[str, MessageType], *, host: str, path: str, version: str
) -> dict[str, Any]:
    """The AsyncAPI 3.0 document for ``types`` served at ``ws://{host}{path}``."""
    common = ", ".join(f"`{code.value}`" for code in ErrorCode if code in COMMON_ERRORS)
    doc = _Builder()
    for file, key in _KERNEL.items():
        doc.schemas[key] = _embed(load_schema("backchannel", file), key)
    doc.shared_messages()
    cancel = MessageType(
        "cancel",
        "kernel",
        doc.schemas["request.cancel"],
        None,
        0.0,
        reply={
            "type": "object",
            "required": ["target", "cancelled"],
            "properties": {"target": {"type": "string"}, "cancelled": {"type": "boolean"}},
        },
        reply_type="ack",
    )
    for entry in sorted([*types.values(), cancel], key=lambda t: t.name):
        doc.operation(entry)
    doc.operations["push"] = {
        "action": "send",
        "channel": {"$ref": _CHANNEL},
        "title": "Frames the server sends unasked",
        "messages": [{"$ref": f"{_CHANNEL}/messages/push"}, {"$ref": f"{_CHANNEL}/messages/error"}],
    }
    messages = {name: {"$ref": f"#/components/messages/{name}"} for name in doc.messages}
    return {
        "asyncapi": SPEC_VERSION,
        "info": {
            "title": "backchannel",
            "version": version,
            "description": _DESCRIPTION.replace("{common}", common),
            "license": {"name": "MIT"},
        },
        "defaultContentType": "application/json",
        "servers": {
            "backchannel": {
                "host": host,
                "protocol": "ws",
                "description": "The WebSocket endpoint (wss behind a TLS-terminating proxy); "
                "offer the subprotocol backchannel.v1.",
            }
        },
        "channels": {
            "connection": {
                "address": path,
                "title": "One WebSocket connection",
                "servers": [{"$ref": "#/servers/backchannel"}],
                "messages": messages,
            }
        },
        "operations": doc.operations,
        "components": {"schemas": doc.schemas, "messages": doc.messages},
        "x-backchannel": {
            "protocol": "backchannel.v1",
            "commonErrors": [code.value for code in ErrorCode if code in COMMON_ERRORS],
        },
    }


def dumps(doc: dict[str, Any]) -> str:
    """The document as committed and printed: indented JSON, one trailing newline."""
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


class _Builder:
    """Collects components and operations, one registered type at a time."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}
        self.messages: dict[str, Any] = {}
        self.operations: dict[str, Any] = {}

    def shared_messages(self) -> None:
        self.messages["ack"] = {
            "name": "ack",
            "title": "ack: the request was handled and returned nothing (or finished streaming)",
            "payload": _answer("ack", {"type": "object"}),
            "correlationId": {"location": "$message.payload#/replyTo"},
        }
        self.messages["chunk"] = {
            "name": "chunk",
            "title": "chunk: one item of a streaming answer (content not declared)",
            "payload": _answer("chunk", {"type": "object"}),
            "correlationId": {"location": "$message.payload#/replyTo"},
        }
        self.messages["error"] = {
            "name": "error",
            "title": "error: a frame that is no request of a registered type, or a refusal",
            "description": "replyTo is null when the frame had no usable id (bad_json, "
            "invalid_envelope); an unknown type is answered unknown_type; a full queue "
            "overloaded; a server shutting down shutting_down.",
            "payload": {"$ref": f"{_SCHEMAS}error"},
        }
        self.messages["push"] = {
            "name": "push",
            "title": "A frame without replyTo: system notices (going_away at shutdown), "
            "room messages and presence events (rooms), app.send and app.broadcast",
            "payload": {
                "allOf": [
                    {"$ref": f"{_SCHEMAS}frame"},
                    {"not": {"required": ["replyTo"]}},
                ]
            },
        }

    def operation(self, entry: MessageType) -> None:
        name = entry.name
        request = f"request.{name}"
        if entry.schema is not None and request not in self.schemas:
            self.schemas[request] = _embed(entry.schema, request)
        content = {"$ref": f"{_SCHEMAS}{request}"} if entry.schema is not None else {}
        self.messages[request] = {
            "name": name,
            "title": f"{name} request",
            "summary": _title(entry.schema) or f"{name} request",
            "payload": {
                "allOf": [
                    {"$ref": f"{_SCHEMAS}envelope"},
                    {"properties": {"type": {"const": name}, "content": content}},
                ]
            },
            "correlationId": {"location": "$message.payload#/id"},
        }
        answers = [self._reply(entry)]
        if entry.chunks is not None:
            key = f"chunk.{name}"
            self.schemas[key] = _embed(entry.chunks, key)
            self.messages[key] = {
                "name": "chunk",
                "title": f"chunk of a {name} stream",
                "payload": _answer("chunk", {"$ref": f"{_SCHEMAS}{key}"}),
                "correlationId": {"location": "$message.payload#/replyTo"},
            }
            answers.append(key)
        elif entry.reply_type is None:  # not declared: it may stream
            answers += ["chunk", "ack"]
        codes = [code.value for code in entry.error_codes()]
        self.messages[f"error.{name}"] = {
            "name": "error",
            "title": f"error answering {name}",
            "payload": _answer(
                "error",
                {
                    "allOf": [
                        {"$ref": f"{_SCHEMAS}error/$defs/content"},
                        {"properties": {"code": {"enum": codes}}},
                    ]
                },
            ),
            "correlationId": {"location": "$message.payload#/replyTo"},
        }
        answers.append(f"error.{name}")
        self.operations[name] = {
            "action": "receive",
            "channel": {"$ref": _CHANNEL},
            "title": name,
            "summary": _title(entry.schema) or f"{name} (plugin {entry.plugin})",
            "description": _describe(entry, codes),
            "messages": [{"$ref": f"{_CHANNEL}/messages/{request}"}],
            "reply": {
                "channel": {"$ref": _CHANNEL},
                "messages": [{"$ref": f"{_CHANNEL}/messages/{key}"} for key in answers],
            },
            "x-backchannel": {
                "plugin": entry.plugin,
                "permission": entry.permission,
                "timeout": entry.timeout,
                "replyType": entry.reply_type,
                "streams": entry.chunks is not None,
                "errors": codes,
            },
        }

    def _reply(self, entry: MessageType) -> str:
        """The message key of the success answer (``ack``, or ``reply.<name>``)."""
        if entry.reply_type == "ack" and not isinstance(entry.reply, dict):
            return "ack"
        key = f"reply.{entry.name}"
        if isinstance(entry.reply, dict):
            self.schemas[key] = _embed(entry.reply, key)
            frame_type: dict[str, Any] = {"const": entry.reply_type}
            content: dict[str, Any] = {"$ref": f"{_SCHEMAS}{key}"}
            title = f"{entry.reply_type} answering {entry.name}"
        else:  # not declared: a frame of any type but the kernel's own, any content
            frame_type = {"type": "string", "not": {"enum": ["ack", "chunk", "error"]}}
            content = {"type": "object"}
            title = f"answer to {entry.name} (not declared by plugin {entry.plugin})"
        self.messages[key] = {
            "name": entry.reply_type or "reply",
            "title": title,
            "payload": _answer(frame_type, content),
            "correlationId": {"location": "$message.payload#/replyTo"},
        }
        return key


def _answer(frame_type: str | dict[str, Any], content: dict[str, Any]) -> dict[str, Any]:
    """Payload of a frame answering a request: ``replyTo`` its id."""
    kind = {"const": frame_type} if isinstance(frame_type, str) else frame_type
    return {
        "allOf": [
            {"$ref": f"{_SCHEMAS}frame"},
            {
                "required": ["replyTo"],
                "properties": {"type": kind, "replyTo": {"type": "string"}, "content": content},
            },
        ]
    }


def _describe(entry: MessageType, codes: list[str]) -> str:
    answer = {
        None: "Its answer is not declared.",
        "ack": "Answered `ack`.",
    }.get(entry.reply_type, f"Answered `{entry.reply_type}`.")
    if entry.chunks is not None:
        answer = "Streams `chunk` frames, then `ack`."
    needs = f" Needs permission `{entry.permission}`." if entry.permission else ""
    return (
        f"Registered by plugin `{entry.plugin}`. {answer}{needs} Handler timeout "
        f"{entry.timeout:g} s. Error codes: {', '.join(codes)}."
    )


def _title(schema: dict[str, Any] | None) -> str | None:
    title = (schema or {}).get("title")
    return title if isinstance(title, str) else None


def _embed(schema: dict[str, Any], key: str) -> dict[str, Any]:
    """A copy of ``schema`` to live at ``components/schemas/<key>``: no ``$schema`` or
    ``$id``, and ``$ref`` pointers rewritten from the file to the document."""
    copied = copy.deepcopy(schema)
    copied.pop("$schema", None)
    copied.pop("$id", None)
    _rewrite(copied, f"{_SCHEMAS}{key}")
    return copied


def _rewrite(node: Any, base: str) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            file, _, pointer = ref.partition("#")
            if not file:
                node["$ref"] = base + pointer
            elif file.rsplit("/", 1)[-1] in _KERNEL:
                node["$ref"] = _SCHEMAS + _KERNEL[file.rsplit("/", 1)[-1]] + pointer
        for value in node.values():
            _rewrite(value, base)
    elif isinstance(node, list):
        for value in node:
            _rewrite(value, base)
