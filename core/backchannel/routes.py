"""The HTTP routes served beside the WebSocket: the kernel's own and the plugins'.

``/healthz`` (alive), ``/readyz`` (ready: 503 while the broker cannot serve or the App is
shutting down), ``/asyncapi.json`` (the contract of what this App serves), the JS client
at ``/static/backchannel.js``, the demo page at ``/`` (``server.demo``), then whatever
``http_routes`` hooks register (GET only; a path taken twice stops start-up).
"""

from __future__ import annotations

from importlib.resources import files
from typing import TYPE_CHECKING, Any

from .errors import StartupError
from .http import HttpRequest, HttpResponse, RouteHandler, json_response

if TYPE_CHECKING:
    from .app import App
    from .hooks import Gateway

__all__ = ["route_table"]


def route_table(app: App, gateway: Gateway) -> dict[str, RouteHandler]:
    """The route table of ``app`` (built at start-up, after the types are registered)."""
    contract: list[dict[str, Any]] = []  # the AsyncAPI document, built on first use

    def healthz(request: HttpRequest) -> HttpResponse:
        return json_response(app.health())

    def readyz(request: HttpRequest) -> HttpResponse:
        health = app.health()
        return json_response(health, 200 if health["ready"] else 503)

    def asyncapi(request: HttpRequest) -> HttpResponse:
        """The document, with the host the client asked for."""
        from . import __version__
        from .asyncapi import document, registered_types

        server = app.settings.server
        if not contract:
            types = registered_types(app)
            contract.append(document(types, host="", path=server.path, version=__version__))
        doc = dict(contract[0])
        host = request.headers.get("host") or f"{server.host}:{app.port or server.port}"
        doc["servers"] = {"backchannel": {**doc["servers"]["backchannel"], "host": host}}
        return json_response(doc)

    routes: dict[str, RouteHandler] = {
        "/healthz": healthz,
        "/readyz": readyz,
        "/asyncapi.json": asyncapi,
        "/static/backchannel.js": _static("backchannel.js", "application/javascript"),
    }
    if app.settings.server.demo:
        routes["/"] = _static("demo.html", "text/html; charset=utf-8")

    def registrar(plugin: str) -> dict[str, Any]:
        def register(method: str, path: str, handler: RouteHandler) -> None:
            if method.upper() != "GET":
                raise StartupError(
                    f"plugin {plugin!r}: route {method} {path}: only GET routes are served"
                )
            if path in routes or path == app.settings.server.path:
                raise StartupError(f"plugin {plugin!r}: route {path} is already taken")
            routes[path] = handler

        return {"register": register}

    gateway.setup("http_routes", registrar)
    return routes


def _static(name: str, content_type: str) -> RouteHandler:
    """A GET route serving ``backchannel/static/<name>``, read once at start-up."""
    body = files("backchannel").joinpath("static", name).read_bytes()
    response = HttpResponse(200, body, content_type, {"Cache-Control": "no-cache"})
    return lambda request: response
