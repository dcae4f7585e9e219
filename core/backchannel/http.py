"""Minimal HTTP request/response objects for routes served beside the WebSocket."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

__all__ = ["HttpRequest", "HttpResponse", "RouteHandler", "json_response"]


@dataclass(slots=True)
class HttpRequest:
    """An HTTP request line and headers (header names lower-cased, last value wins)."""

    method: str
    target: str
    headers: dict[str, str]
    remote: tuple[str, int] | None = None
    path: str = field(init=False)
    query: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.target)
        self.path = parts.path or "/"
        self.query = {k: v[-1] for k, v in parse_qs(parts.query).items()}


@dataclass(slots=True)
class HttpResponse:
    """A complete HTTP response (no streaming)."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


RouteHandler = Callable[[HttpRequest], "HttpResponse | Awaitable[HttpResponse]"]


def json_response(data: Any, status: int = 200) -> HttpResponse:
    """An ``application/json`` response."""
    return HttpResponse(status, orjson.dumps(data), "application/json")
