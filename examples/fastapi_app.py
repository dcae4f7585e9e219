"""backchannel inside a FastAPI app: the seed's Express example, in Python.

    uv run uvicorn examples.fastapi_app:api --port 8000

What it serves, on one port:

* ``ws://127.0.0.1:8000/ws``: the chat WebSocket (protocol v1, subprotocol ``backchannel.v1``);
* ``GET /api/websocket/health`` and ``GET /api/websocket/metrics``: ``chat.health()`` and
  ``chat.metrics()``, as the seed's ``getHealth()`` and ``getMetrics()``;
* ``POST /api/websocket/notice`` ``{"message": "..."}``: an HTTP route pushing a ``system``
  notice to every connected client;
* ``GET /ws/healthz``, ``/ws/readyz``, ``/ws/static/backchannel.js``: backchannel's own routes.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from backchannel import App
from backchannel.asgi import asgi_app

__all__ = ["api", "chat"]

chat = App(plugins=["init", "text", "ping", "system", "validation", "rooms"])
backchannel = asgi_app(chat)

# FastAPI keeps lifespan events to itself, so it runs backchannel's start-up and shutdown.
api = FastAPI(title="chat", lifespan=backchannel.lifespan)
api.router.add_websocket_route("/ws", backchannel)  # the WebSocket at exactly /ws
api.mount("/ws", backchannel)  # its HTTP routes under /ws/


@api.get("/api/websocket/health")
def websocket_health() -> dict[str, Any]:
    """Liveness and readiness of the chat server (the seed's ``getHealth()``)."""
    return chat.health()


@api.get("/api/websocket/metrics")
def websocket_metrics() -> dict[str, Any]:
    """Connection, message and error counters (the seed's ``getMetrics()``)."""
    return chat.metrics()


class Notice(BaseModel):
    message: str


@api.post("/api/websocket/notice")
def notice(body: Notice) -> dict[str, int]:
    """Push a ``system`` notice to every connected client; says how many got it."""
    reached = chat.broadcast("system", {"event": "notice", "message": body.message})
    return {"reached": reached}
