"""The ``jwt`` plugin, tested like an attacker would, over real sockets, on asyncio and Trio.

Each attack of issue 4's catalogue is a test with the close code or error code
it must get. Keys are generated here with ``cryptography``; JWKS endpoints are a
``http.server`` on 127.0.0.1 in a thread that counts fetches.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import jwt
import pytest
from backchannel_jwt import Plugin as JwtPlugin
from backchannel_jwt.redact import redact
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from backchannel import App, StartupError
from backchannel.cli import main as cli_main
from backchannel.testing import serve_in_memory

# The kernel's real-socket helpers (tests/conftest.py); importable when this file runs alone.
_TESTS = Path(__file__).resolve().parents[3] / "tests"
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))
from conftest import WsClient, make_app, serving, ws_connect  # noqa: E402

pytestmark = pytest.mark.anyio

PLUGINS = ["jwt", "init", "text", "ping", "system", "validation", "rooms"]
SECRET = b"s" * 24 + os.urandom(16).hex().encode()  # 56 bytes: enough for HS256/384
ISS = "https://issuer-a.test/"
ISS_B = "https://issuer-b.test/"
AUD = "chat"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def caplog_bc(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="backchannel")
    return caplog


# ----------------------------------------------------------------------- keys


def _pem(public: Any) -> bytes:
    return bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC384_KEY = ec.generate_private_key(ec.SECP384R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
RSA_PEM = _pem(RSA_KEY.public_key())


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """PEM public keys and the HMAC secret as files (as an operator would ship them)."""
    root = tmp_path_factory.mktemp("keys")
    files = {
        "rsa": _pem(RSA_KEY.public_key()),
        "ec": _pem(EC_KEY.public_key()),
        "ec384": _pem(EC384_KEY.public_key()),
        "ed": _pem(ED_KEY.public_key()),
        "secret": SECRET + b"\n",
    }
    paths = {}
    for name, data in files.items():
        path = root / f"{name}.key"
        path.write_bytes(data)
        paths[name] = str(path)
    return paths


def jwt_config(key_files: dict[str, str], **extra: Any) -> dict[str, Any]:
    """Issuer A with one key per family (secret from a file), audience `chat`."""
    keys = [
        {"kid": "hs", "algorithms": ["HS256", "HS384"], "secret_file": key_files["secret"]},
        {"kid": "rs", "algorithms": ["RS256", "PS256"], "public_key_file": key_files["rsa"]},
        {"kid": "es", "algorithms": ["ES256"], "public_key_file": key_files["ec"]},
        {"kid": "es384", "algorithms": ["ES384"], "public_key_file": key_files["ec384"]},
        {"kid": "ed", "algorithms": ["EdDSA"], "public_key_file": key_files["ed"]},
    ]
    cfg: dict[str, Any] = {
        "issuers": [{"issuer": ISS, "keys": keys}],
        "audience": AUD,
        "leeway": 0,
        "default_permissions": ["rooms:*"],
    }
    cfg.update(extra)
    return cfg


SIGNING: dict[str, tuple[str, Any]] = {
    "HS256": ("hs", SECRET),
    "HS384": ("hs", SECRET),
    "RS256": ("rs", RSA_KEY),
    "PS256": ("rs", RSA_KEY),
    "ES256": ("es", EC_KEY),
    "ES384": ("es384", EC384_KEY),
    "EdDSA": ("ed", ED_KEY),
}


def token(
    sub: str = "alice",
    *,
    alg: str = "HS256",
    ttl: float = 300,
    key: Any = None,
    kid: str | None = "",
    perms: list[str] | str | None = None,
    **claims: Any,
) -> str:
    """A token for issuer A and audience `chat` unless claims say otherwise."""
    default_kid, default_key = SIGNING[alg]
    now = int(time.time())
    body: dict[str, Any] = {"sub": sub, "iss": ISS, "aud": AUD, "iat": now, "exp": now + ttl}
    if perms is not None:
        body["permissions"] = perms
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    headers = {"kid": default_kid if kid == "" else kid} if kid is not None else {}
    return jwt.encode(body, default_key if key is None else key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], claims: dict[str, Any], sign: Any = None) -> str:
    """A token built by hand (what PyJWT refuses to make): ``sign(signing_input)``."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = sign(signing_input.encode()) if sign is not None else b""
    return f"{signing_input}.{b64(signature)}"


def claims_now(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "mallory", "iss": ISS, "aud": AUD, "iat": now, "exp": now + 300, **extra}


def app_with(cfg: dict[str, Any], **kernel: Any) -> App:
    config: dict[str, Any] = {"plugins": {"jwt": cfg}, "auth": {"allow_anonymous": False}}
    for section, values in kernel.items():
        config.setdefault(section, {}).update(values)
    return make_app(config, PLUGINS)


def plugin(app: App) -> JwtPlugin:
    found = app.plugin("jwt")
    assert isinstance(found, JwtPlugin)
    return found


def bearer(tok: str) -> dict[str, Any]:
    return {"additional_headers": {"Authorization": f"Bearer {tok}"}}


async def refused(port: int, **kwargs: Any) -> int | None:
    """Connect; return the close code the server ends the connection with."""
    async with ws_connect(port, **kwargs) as c:
        return await c.closed()


async def init(c: WsClient, **content: Any) -> dict[str, Any]:
    answer = await c.request("init", content)
    assert answer["type"] == "init", answer
    result: dict[str, Any] = answer["content"]
    return result


async def pushed(c: WsClient, event: str, timeout: float = 5.0) -> dict[str, Any]:
    """The ``system`` notice ``event`` (maybe already read while waiting for an answer)."""
    with anyio.fail_after(timeout):
        for frame in [*c.frames]:
            if frame["type"] == "system" and frame["content"].get("event") == event:
                assert "replyTo" not in frame
                return frame
        while True:
            frame = await c.recv(timeout)
            if frame["type"] == "system" and frame["content"].get("event") == event:
                assert "replyTo" not in frame
                return frame


async def eventually(condition: Any, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


# ------------------------------------------------------------------- accepted


@pytest.mark.parametrize("alg", sorted(SIGNING))
async def test_a_valid_bearer_token_of_each_family_authenticates(
    alg: str, key_files: dict[str, str]
) -> None:
    app = app_with(jwt_config(key_files))
    tok = token("alice", alg=alg, perms=["chat:send"])
    async with serving(app), ws_connect(app.port, **bearer(tok)) as c:
        assert (await init(c))["principal"] == "alice"
        principal = app.connections()[0].principal
        assert principal is not None and not principal.anonymous
        assert principal.permissions == {"chat:send", "rooms:*"}
        assert principal.claims["iss"] == ISS
        assert (await c.request("text", {"text": "hi"}))["content"]["from"] == "alice"
    assert plugin(app).accepted == {"header": 1}


async def test_a_query_token_authenticates_and_a_scope_string_gives_permissions(
    key_files: dict[str, str],
) -> None:
    app = app_with(jwt_config(key_files, permissions_claim="scope", default_permissions=[]))
    tok = token("bob", scope="rooms:join:lobby rooms:publish:lobby")
    async with serving(app), ws_connect(app.port, path=f"/ws?token={tok}") as c:
        assert (await init(c))["principal"] == "bob"
        assert (await c.request("join", {"room": "lobby"}))["type"] == "join"
        assert (await c.request("join", {"room": "other"}))["content"]["code"] == "forbidden"
    assert plugin(app).accepted == {"query": 1}


async def test_keys_from_environment_variables(
    key_files: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BC_TEST_SECRET", SECRET.decode())
    monkeypatch.setenv("BC_TEST_RSA", RSA_PEM.decode())
    keys = [
        {"algorithms": ["HS256"], "secret_env": "BC_TEST_SECRET"},
        {"algorithms": ["RS256"], "public_key_env": "BC_TEST_RSA"},
    ]
    app = app_with(jwt_config(key_files, issuers=[{"issuer": ISS, "keys": keys}]))
    async with serving(app):
        for alg in ("HS256", "RS256"):
            async with ws_connect(app.port, **bearer(token(alg=alg, kid=None))) as c:
                assert (await init(c))["principal"] == "alice"


# -------------------------------------------------------- attacks: handshake


def _hs256_with_rsa_public_key(signing_input: bytes) -> bytes:
    return hmac.new(RSA_PEM, signing_input, hashlib.sha256).digest()


ATTACKS: dict[str, tuple[Any, str]] = {
    "malformed: not a JWT": (lambda: "not-a-jwt", "malformed"),
    "malformed: three garbage segments": (lambda: "a.b.c", "malformed"),
    "malformed: claims not an object": (
        lambda: forged({"alg": "HS256", "kid": "hs"}, [1, 2], lambda m: b"x"),  # type: ignore[arg-type]
        "malformed",
    ),
    "wrong signature (other secret)": (
        lambda: token(key=b"x" * 64),
        "bad_signature",
    ),
    "wrong signature (other RSA key)": (
        lambda: token(alg="RS256", key=RSA_OTHER),
        "bad_signature",
    ),
    "tampered claims": (
        lambda: ".".join(
            [
                token().split(".")[0],
                b64(json.dumps(claims_now(sub="root")).encode()),
                token().split(".")[2],
            ]
        ),
        "bad_signature",
    ),
    "expired": (lambda: token(ttl=-120), "expired"),
    "not yet valid (nbf)": (lambda: token(nbf=int(time.time()) + 120), "not_yet_valid"),
    "issued in the future (iat)": (lambda: token(iat=int(time.time()) + 120), "not_yet_valid"),
    "wrong audience": (lambda: token(aud="billing"), "wrong_audience"),
    "no audience": (lambda: token(aud=None), "missing_claim"),
    "wrong issuer": (lambda: token(iss="https://evil.test/"), "wrong_issuer"),
    "no exp": (lambda: token(exp=None), "missing_claim"),
    "no sub": (lambda: token(sub=None), "missing_claim"),  # type: ignore[arg-type]
    "alg none": (
        lambda: forged({"alg": "none", "typ": "JWT"}, claims_now()),
        "bad_algorithm",
    ),
    "alg None (capitalised)": (
        lambda: forged({"alg": "None", "typ": "JWT"}, claims_now()),
        "bad_algorithm",
    ),
    "HS256 signed with the RS public key as secret (kid of the RS key)": (
        lambda: forged(
            {"alg": "HS256", "typ": "JWT", "kid": "rs"}, claims_now(), _hs256_with_rsa_public_key
        ),
        "bad_algorithm",
    ),
    "HS256 signed with the RS public key as secret (no kid)": (
        lambda: forged({"alg": "HS256", "typ": "JWT"}, claims_now(), _hs256_with_rsa_public_key),
        "bad_signature",
    ),
    "RS256 header on the HS key": (
        lambda: token(alg="RS256", kid="hs"),
        "bad_algorithm",
    ),
    "alg of the wrong type": (
        lambda: forged({"alg": ["HS256"], "typ": "JWT"}, claims_now(), lambda m: b"x"),
        "bad_algorithm",
    ),
    "kid of the wrong type": (
        lambda: forged({"alg": "HS256", "kid": 7}, claims_now(), lambda m: b"x"),
        "malformed",
    ),
    "iss of the wrong type": (
        lambda: forged({"alg": "HS256", "kid": "hs"}, claims_now(iss=["x"]), lambda m: b"x"),
        "malformed",
    ),
    "unknown kid (no JWKS)": (lambda: token(kid="nope"), "unknown_kid"),
    "permissions claim of the wrong type": (lambda: token(perms={"a": 1}), "malformed"),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("source", ["header", "query"])
async def test_attack_at_the_handshake_closes_4001_logs_and_counts(
    attack: str,
    source: str,
    key_files: dict[str, str],
    caplog_bc: pytest.LogCaptureFixture,
) -> None:
    make, reason = ATTACKS[attack]
    tok = make()
    app = app_with(jwt_config(key_files))
    kwargs = bearer(tok) if source == "header" else {"path": f"/ws?token={tok}"}
    async with serving(app):
        assert await refused(app.port, **kwargs) == 4001
        assert plugin(app).rejected == {reason: 1}
        assert plugin(app).accepted == {}
        assert app.counters.closes.get(4001) == 1
        # the server still serves a good token afterwards
        async with ws_connect(app.port, **bearer(token())) as c:
            assert (await init(c))["principal"] == "alice"
    lines = [r.getMessage() for r in caplog_bc.records if r.name == "backchannel.jwt"]
    assert any(f"reason={reason}" in line for line in lines), lines


async def test_no_token_when_required_closes_4001(key_files: dict[str, str]) -> None:
    app = app_with(jwt_config(key_files, init_timeout=0))
    async with serving(app):
        assert await refused(app.port) == 4001
        assert await refused(app.port, additional_headers={"Authorization": "Basic eDp5"}) == 4001
        assert plugin(app).rejected == {"no_token": 2}
        assert await refused(app.port, additional_headers={"Authorization": "Bearer "}) == 4001
        assert plugin(app).rejected["malformed"] == 1


async def test_a_disabled_source_is_refused(key_files: dict[str, str]) -> None:
    app = app_with(jwt_config(key_files, sources=["header", "init"]))
    async with serving(app):
        assert await refused(app.port, path=f"/ws?token={token()}") == 4001
        assert plugin(app).rejected == {"source_disabled": 1}


async def test_anonymous_allowed_gives_anonymous_permissions_and_bad_tokens_still_fail(
    key_files: dict[str, str],
) -> None:
    app = app_with(
        jwt_config(key_files),
        auth={"allow_anonymous": True, "anonymous_permissions": ["rooms:join:lobby"]},
    )
    async with serving(app):
        async with ws_connect(app.port) as c:
            content = await init(c)
            assert content["principal"].startswith("anonymous:")
            assert (await c.request("join", {"room": "lobby"}))["type"] == "join"
            assert (await c.request("join", {"room": "vip"}))["content"]["code"] == "forbidden"
            assert (await c.request("auth.refresh", {"token": token()}))["content"][
                "code"
            ] == "unauthorized"
        assert await refused(app.port, **bearer(token(ttl=-60))) == 4001


# --------------------------------------------------------------------- JWKS


class JwksServer:
    """JWKS documents on 127.0.0.1, one per path; counts the fetches of each."""

    def __init__(self) -> None:
        self.documents: dict[str, list[dict[str, Any]]] = {}
        self.fetches: Counter[str] = Counter()
        #: paths that answer only after this many seconds (a hanging identity provider)
        self.delays: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with owner.lock:
                    owner.fetches[self.path] += 1
                    keys = owner.documents.get(self.path)
                if owner.stop.wait(owner.delays.get(self.path, 0)):
                    return
                if keys is None:
                    self.send_error(404)
                    return
                body = json.dumps({"keys": keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def publish(self, path: str, *keys: tuple[str, Any, str]) -> None:
        """Serve ``(kid, private key, alg)`` public halves at ``path``."""
        jwks = []
        for kid, private, alg in keys:
            public = private.public_key()
            maker = {"RS": RSAAlgorithm, "PS": RSAAlgorithm, "ES": ECAlgorithm}.get(
                alg[:2], OKPAlgorithm
            )
            jwk = maker.to_jwk(public, as_dict=True)
            jwk.update(kid=kid, alg=alg, use="sig")
            jwks.append(jwk)
        with self.lock:
            self.documents[path] = jwks


@pytest.fixture
def jwks(monkeypatch: pytest.MonkeyPatch) -> Iterator[JwksServer]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = JwksServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        server.server.shutdown()
        server.server.server_close()


def jwks_config(server: JwksServer, min_refresh: float = 60, **extra: Any) -> dict[str, Any]:
    return {
        "issuers": [
            {
                "issuer": ISS,
                "jwks_url": server.url("/a"),
                "jwks_algorithms": ["RS256", "ES256"],
            },
            {"issuer": ISS_B, "jwks_url": server.url("/b"), "jwks_algorithms": ["RS256"]},
        ],
        "audience": AUD,
        "leeway": 0,
        "jwks": {"min_refresh": min_refresh, "timeout": 2},
        **extra,
    }


async def test_jwks_keys_verify_and_are_fetched_once(jwks: JwksServer) -> None:
    jwks.publish("/a", ("a1", RSA_KEY, "RS256"), ("a2", EC_KEY, "ES256"))
    app = app_with(jwks_config(jwks))
    async with serving(app):
        for alg, kid, key in (("RS256", "a1", RSA_KEY), ("ES256", "a2", EC_KEY)):
            async with ws_connect(app.port, **bearer(token(alg=alg, kid=kid, key=key))) as c:
                assert (await init(c))["principal"] == "alice"
        # a2 is an EC key: an RS256 token naming it is refused, whatever its signature
        assert await refused(app.port, **bearer(token(alg="RS256", kid="a2", key=RSA_KEY))) == 4001
    assert jwks.fetches == {"/a": 1}
    assert plugin(app).rejected == {"bad_algorithm": 1}


async def test_unknown_kid_refreshes_once_then_4001_and_a_flood_is_rate_limited(
    jwks: JwksServer,
) -> None:
    jwks.publish("/a", ("a1", RSA_KEY, "RS256"))
    app = app_with(jwks_config(jwks, min_refresh=60))
    async with serving(app):
        assert await refused(app.port, **bearer(token(alg="RS256", kid="ghost", key=RSA_KEY))) == (
            4001
        )
        assert jwks.fetches["/a"] == 1  # the unknown kid made one fetch, then was refused
        codes: list[int | None] = []

        async def attempt() -> None:
            tok = token(alg="RS256", kid=uuid.uuid4().hex, key=RSA_KEY)
            codes.append(await refused(app.port, **bearer(tok)))

        async with anyio.create_task_group() as tg:
            for _ in range(40):
                tg.start_soon(attempt)
        assert codes == [4001] * 40
        assert jwks.fetches["/a"] == 1  # within min_refresh: no more fetches
        assert plugin(app).rejected == {"unknown_kid": 41}
        # the known kid still works from the cache
        async with ws_connect(app.port, **bearer(token(alg="RS256", kid="a1", key=RSA_KEY))) as c:
            assert (await init(c))["principal"] == "alice"
        assert jwks.fetches["/a"] == 1


async def test_a_rotated_key_is_fetched_after_min_refresh(jwks: JwksServer) -> None:
    jwks.publish("/a", ("a1", RSA_KEY, "RS256"))
    app = app_with(jwks_config(jwks, min_refresh=0.5))
    async with serving(app):
        async with ws_connect(app.port, **bearer(token(alg="RS256", kid="a1", key=RSA_KEY))) as c:
            await init(c)
        jwks.publish("/a", ("a1", RSA_KEY, "RS256"), ("a3", RSA_OTHER, "RS256"))
        rotated = token(alg="RS256", kid="a3", key=RSA_OTHER)
        started = time.monotonic()
        while True:  # refused until min_refresh has passed since the last fetch, then accepted
            async with ws_connect(app.port, **bearer(rotated)) as c:
                try:
                    if (await init(c))["principal"] == "alice":
                        break
                except Exception:
                    assert c.ws.protocol.close_rcvd.code == 4001
            assert time.monotonic() - started < 5
            await anyio.sleep(0.1)
        assert 2 <= jwks.fetches["/a"] <= 3


async def test_a_token_of_issuer_a_with_a_kid_only_issuer_b_has_is_refused(
    jwks: JwksServer,
) -> None:
    jwks.publish("/a", ("a1", RSA_KEY, "RS256"))
    jwks.publish("/b", ("b1", RSA_OTHER, "RS256"))
    app = app_with(jwks_config(jwks))
    async with serving(app):
        # B's key and kid are fine for B's tokens
        b_token = token(alg="RS256", kid="b1", key=RSA_OTHER, iss=ISS_B)
        async with ws_connect(app.port, **bearer(b_token)) as c:
            assert (await init(c))["principal"] == "alice"
        # ... but a token claiming issuer A, signed with B's key and naming B's kid, is not
        forged_a = token(alg="RS256", kid="b1", key=RSA_OTHER, iss=ISS)
        assert await refused(app.port, **bearer(forged_a)) == 4001
    assert plugin(app).rejected == {"unknown_kid": 1}
    assert jwks.fetches == {"/b": 1, "/a": 1}


async def healthz(port: int) -> bytes:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    async with stream:
        await stream.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        return bytes(await stream.receive())


@pytest.mark.parametrize("path", ["/missing", "/hanging"])
async def test_a_failing_jwks_fetch_is_bounded_and_off_the_event_loop(
    path: str, jwks: JwksServer
) -> None:
    jwks.publish("/hanging", ("a1", RSA_KEY, "RS256"))
    jwks.delays["/hanging"] = 30
    cfg = jwks_config(jwks)
    cfg["issuers"][0]["jwks_url"] = jwks.url(path)
    cfg["jwks"]["timeout"] = 0.5
    app = app_with(cfg)
    codes: list[int | None] = []

    async def attempt() -> None:
        codes.append(await refused(app.port, **bearer(token(alg="RS256", kid="a1", key=RSA_KEY))))

    async with serving(app):
        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(attempt)
            await eventually(lambda: jwks.fetches[path] == 1)
            with anyio.fail_after(0.4):  # answered while the fetch is still pending
                assert (await healthz(app.port)).startswith(b"HTTP/1.1 200")
        assert codes == [4001]
        assert time.monotonic() - started < 2.5  # bounded by the 0.5 s timeout, not 30 s
    assert plugin(app).metrics()["jwks"][ISS] == {"fetches": 1, "failures": 1}
    assert plugin(app).rejected == {"unknown_kid": 1}


# ------------------------------------------------------------ token in init


async def test_token_in_init_authenticates_a_pending_connection(key_files: dict[str, str]) -> None:
    app = app_with(jwt_config(key_files, init_timeout=5))
    async with serving(app), ws_connect(app.port) as c:
        for kind, content in (
            ("text", {"text": "x"}),
            ("system", {"event": "notice", "message": "m"}),
        ):
            answer = await c.request(kind, content)
            assert answer["content"]["code"] == "unauthorized", answer
        assert (await c.request("init", {}))["content"]["code"] == "unauthorized"
        content = await init(c, token=token("alice", perms=["chat"]))
        assert content["principal"] == "alice"
        conn = app.connections()[0]
        assert conn.principal is not None and conn.principal.id == "alice"
        assert conn.session.principal_id == "alice"
        assert (await c.request("text", {"text": "hi"}))["content"]["from"] == "alice"
    assert app.counters.errors["unauthorized"] == 3
    assert plugin(app).accepted == {"init": 1}


async def test_without_a_token_in_init_a_pending_connection_is_closed_4001(
    key_files: dict[str, str],
) -> None:
    app = app_with(jwt_config(key_files, init_timeout=0.5))
    async with serving(app):
        started = time.monotonic()
        async with ws_connect(app.port) as c:
            assert (await c.request("ping"))["content"]["code"] == "unauthorized"
            assert await c.closed(timeout=3) == 4001
        assert 0.4 <= time.monotonic() - started < 3
        assert plugin(app).timed_out == 1
        await eventually(lambda: app.counters.closes.get(4001) == 1)


async def test_a_bad_token_in_init_answers_unauthorized_then_closes_4001(
    key_files: dict[str, str],
) -> None:
    app = app_with(jwt_config(key_files, init_timeout=5))
    async with serving(app), ws_connect(app.port) as c:
        answer = await c.request("init", {"token": token(ttl=-30)})
        assert answer["content"] == {"code": "unauthorized", "message": "token expired"}
        assert await c.closed() == 4001
    assert plugin(app).rejected == {"expired": 1}


async def test_init_token_resumes_its_own_session_and_not_another(
    key_files: dict[str, str],
) -> None:
    app = app_with(jwt_config(key_files))
    async with serving(app):
        async with ws_connect(app.port) as c:
            first = await init(c, token=token("alice"))
            await c.request("text", {"text": "one"})
        session, last = first["sessionId"], 2
        async with ws_connect(app.port) as c:
            again = await init(c, token=token("alice"), sessionId=session, lastSeq=last)
            assert again["resumed"] is True and again["sessionId"] == session
        async with ws_connect(app.port) as c:
            answer = await c.request("init", {"token": token("bob"), "sessionId": session})
            assert answer["content"]["code"] == "forbidden"


async def test_a_bearer_connection_cannot_resume_another_principals_session(
    key_files: dict[str, str],
) -> None:
    app = app_with(jwt_config(key_files))
    async with serving(app), ws_connect(app.port, **bearer(token("alice"))) as alice:
        session = (await init(alice))["sessionId"]
        async with ws_connect(app.port, **bearer(token("bob"))) as bob:
            answer = await bob.request("init", {"sessionId": session, "lastSeq": 0})
            assert answer["content"]["code"] == "forbidden"
            assert (await bob.request("ping"))["type"] == "pong"  # bob stays, in his session
        async with ws_connect(app.port, **bearer(token("alice"))) as again:
            resumed = await init(again, sessionId=session, lastSeq=1)
            assert resumed["resumed"] is True
        assert await alice.closed() == 4009  # taken over by alice's new connection


async def test_init_token_on_a_bearer_connection_must_name_the_same_principal(
    key_files: dict[str, str],
) -> None:
    app = app_with(jwt_config(key_files))
    async with serving(app), ws_connect(app.port, **bearer(token("alice"))) as c:
        answer = await c.request("init", {"token": token("bob")})
        assert answer["content"]["code"] == "forbidden"
        assert (await init(c, token=token("alice")))["principal"] == "alice"


# -------------------------------------------------------- expiry and refresh


async def test_token_expiring_notice_then_4008_after_the_grace(key_files: dict[str, str]) -> None:
    cfg = jwt_config(key_files, refresh_before=1.5, expiry_grace=0.5)
    app = app_with(cfg)
    tok = token("alice", exp=int(time.time()) + 2)
    async with serving(app), ws_connect(app.port, **bearer(tok)) as c:
        await init(c)
        notice = await pushed(c, "token_expiring")
        assert (
            notice["content"]["expiresAt"]
            == jwt.decode(tok, options={"verify_signature": False})["exp"]
        )
        assert await c.closed(timeout=5) == 4008
        assert time.time() >= notice["content"]["expiresAt"] + 0.5
        assert plugin(app).expired == 1
        await eventually(lambda: app.counters.closes.get(4008) == 1)


async def test_after_exp_only_refresh_is_served_until_the_close(key_files: dict[str, str]) -> None:
    app = app_with(jwt_config(key_files, refresh_before=0, expiry_grace=30))
    tok = token("alice", exp=int(time.time()) + 1)
    async with serving(app), ws_connect(app.port, **bearer(tok)) as c:
        await init(c)
        await pushed(c, "token_expiring")  # sent at exp (refresh_before = 0)
        answer = await c.request("text", {"text": "late"})
        assert answer["content"]["code"] == "unauthorized"
        assert (await c.request("init", {}))["content"]["code"] == "unauthorized"
        fresh = await c.request("auth.refresh", {"token": token("alice")})
        assert fresh["type"] == "auth.refresh" and fresh["content"]["principal"] == "alice"
        assert (await c.request("text", {"text": "again"}))["type"] == "text"


async def test_refresh_keeps_the_connection_past_the_old_exp(key_files: dict[str, str]) -> None:
    app = app_with(jwt_config(key_files, refresh_before=1.5, expiry_grace=0.2))
    old = token("alice", exp=int(time.time()) + 2, perms=["a"])
    async with serving(app), ws_connect(app.port, **bearer(old)) as c:
        await init(c)
        await pushed(c, "token_expiring")
        new = token("alice", ttl=600, perms=["b"])
        reply = await c.request("auth.refresh", {"token": new})
        assert reply["content"]["expiresAt"] > time.time() + 500
        assert app.connections()[0].principal.permissions == {"b", "rooms:*"}  # type: ignore[union-attr]
        deadline = jwt.decode(old, options={"verify_signature": False})["exp"] + 0.5
        while time.time() < deadline:  # past the old token's exp + grace: still open
            assert (await c.request("ping"))["type"] == "pong"
            await anyio.sleep(0.1)
    assert plugin(app).refreshed == 1 and plugin(app).expired == 0


async def test_refresh_with_a_different_sub_is_forbidden(key_files: dict[str, str]) -> None:
    app = app_with(jwt_config(key_files))
    async with serving(app), ws_connect(app.port, **bearer(token("alice"))) as c:
        await init(c)
        answer = await c.request("auth.refresh", {"token": token("mallory", perms=["*"])})
        assert answer["content"]["code"] == "forbidden"
        assert app.connections()[0].principal.id == "alice"  # type: ignore[union-attr]
        bad = await c.request("auth.refresh", {"token": token("alice", key=b"k" * 64)})
        assert bad["content"] == {"code": "unauthorized", "message": "token signature invalid"}
        assert (await c.request("ping"))["type"] == "pong"  # still connected, still alice
    assert plugin(app).rejected == {"other_subject": 1, "bad_signature": 1}


# --------------------------------------------------------------- permissions


async def test_room_and_type_permissions_come_from_the_token(key_files: dict[str, str]) -> None:
    app = app_with(jwt_config(key_files, default_permissions=[]))
    perms = ["rooms:join:support-*", "rooms:publish:support-*"]
    async with serving(app):
        async with ws_connect(app.port, **bearer(token("alice", perms=perms))) as c:
            await init(c)
            assert (await c.request("join", {"room": "support-7"}))["type"] == "join"
            denied = await c.request("join", {"room": "sales"})
            assert denied["content"]["code"] == "forbidden"
            broadcast = {"event": "notice", "message": "hi"}
            assert (await c.request("system", broadcast))["content"]["code"] == "forbidden"
        admin = token("root", perms=["system:broadcast"])
        async with ws_connect(app.port, **bearer(admin)) as c:
            await init(c)
            reply = await c.request("system", {"event": "notice", "message": "hi"})
            assert reply["type"] == "system", reply


# --------------------------------------------------------------- redaction


async def test_a_query_token_never_reaches_a_log_line_or_a_metric(
    key_files: dict[str, str],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    noisy = [logging.getLogger(n) for n in ("backchannel", "backchannel.websocket", "websockets")]
    levels = [lg.level for lg in noisy]
    root = logging.getLogger()
    root.addHandler(stream)
    for lg in noisy:
        lg.setLevel(logging.DEBUG)  # websockets logs the request line at DEBUG
    good, bad = token("alice"), token("alice", ttl=-60)
    secrets = [t.split(".")[2] for t in (good, bad)]
    try:
        app = app_with(jwt_config(key_files))
        async with serving(app):
            async with ws_connect(app.port, path=f"/ws?token={good}&x=1") as c:
                await init(c)
            assert await refused(app.port, path=f"/ws?token={bad}") == 4001
            # a line that does contain one, as a careless plugin would write it
            logging.getLogger("backchannel.server").info("GET /ws?token=%s", good)
            figures = app.metrics()
            assert figures["jwt"]["rejected"] == {"expired": 1}
            metrics = json.dumps(figures)
    finally:
        root.removeHandler(stream)
        for lg, level in zip(noisy, levels, strict=True):
            lg.setLevel(level)
    out, err = capfd.readouterr()
    text = caplog.text + out + err + metrics
    assert "GET /ws?token=[REDACTED]" in text  # the filter ran on that line
    assert any(
        "token=[REDACTED]" in r.getMessage()
        for r in caplog.records
        if r.name.startswith("backchannel.websocket")
    )
    for secret in secrets:
        assert secret not in text


def test_redact_covers_query_bearer_and_bare_tokens() -> None:
    tok = token()
    assert tok not in redact(f"GET /ws?a=1&token={tok}&b=2")
    assert redact(f"GET /ws?token={tok}&b=2") == "GET /ws?token=[REDACTED]&b=2"
    assert redact(f"authorization: Bearer {tok}") == "authorization: Bearer [REDACTED]"
    assert redact(f"saw {tok} here") == "saw [REDACTED] here"
    assert redact("nothing to see") == "nothing to see"


# ------------------------------------------------------------ start-up checks


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ({"algorithms": ["RS256"], "secret_env": "BC_SECRET"}, "HMAC key cannot verify RS256"),
        ({"algorithms": ["HS256", "RS256"], "public_key_env": "BC_RSA"}, "cannot verify HS256"),
        ({"algorithms": ["ES256"], "public_key_env": "BC_RSA"}, "RSA key cannot verify ES256"),
        ({"algorithms": ["HS512"], "secret_env": "BC_SECRET"}, "needs 64"),
        ({"algorithms": ["HS256"], "secret_env": "BC_RSA"}, "PEM key is not an HMAC secret"),
        ({"algorithms": ["HS256"], "secret_env": "BC_UNSET"}, "BC_UNSET is not set"),
        ({"algorithms": ["HS256"], "secret_file": "/nonexistent/k"}, "cannot read key file"),
    ],
)
async def test_a_key_that_could_confuse_families_fails_start_up(
    key: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BC_SECRET", "x" * 40)
    monkeypatch.setenv("BC_RSA", RSA_PEM.decode())
    monkeypatch.delenv("BC_UNSET", raising=False)
    cfg = {"issuers": [{"issuer": ISS, "keys": [key]}]}
    app = App({"plugins": {"jwt": cfg}}, plugins=["jwt", "init"])
    with pytest.raises(StartupError, match=r"plugins\.jwt\.issuers\[0\]\.keys\[0\]") as info:
        async with serve_in_memory(app):
            pass
    assert message in str(info.value)


def test_config_rejects_none_and_needs_an_issuer() -> None:
    bad = {"issuers": [{"keys": [{"algorithms": ["none"], "secret_env": "X"}]}]}
    with pytest.raises(StartupError, match=r"plugins\.jwt\.issuers\[0\]\.keys\[0\]\.algorithms"):
        App({"plugins": {"jwt": bad}}, plugins=["jwt"])
    with pytest.raises(StartupError, match="issuers"):
        App({"plugins": {"jwt": {}}}, plugins=["jwt"])


# ---------------------------------------------------------------------- CLI


@pytest.fixture
def cli_config(tmp_path: Path, key_files: dict[str, str]) -> str:
    path = tmp_path / "bc.toml"
    path.write_text(
        "[plugins]\n"
        'enabled = ["jwt", "init"]\n'
        "[plugins.jwt]\n"
        f'audience = "{AUD}"\n'
        "[[plugins.jwt.issuers]]\n"
        f'issuer = "{ISS}"\n'
        "[[plugins.jwt.issuers.keys]]\n"
        'kid = "hs"\n'
        'algorithms = ["HS256"]\n'
        f'secret_file = "{key_files["secret"]}"\n'
    )
    return str(path)


def test_cli_token_create_then_check(cli_config: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(
        [
            "token",
            "create",
            "--sub",
            "alice",
            "--ttl",
            "1h",
            "--perm",
            "rooms:*",
            "--perm",
            "chat",
            "--config",
            cli_config,
        ]
    )
    out = capsys.readouterr().out.strip()
    assert code == 0
    claims = jwt.decode(out, SECRET, algorithms=["HS256"], audience=AUD, issuer=ISS)
    assert claims["sub"] == "alice" and claims["permissions"] == ["rooms:*", "chat"]
    assert 3590 <= claims["exp"] - claims["iat"] <= 3600
    assert jwt.get_unverified_header(out)["kid"] == "hs"
    assert cli_main(["token", "check", out, "--config", cli_config]) == 0
    printed = capsys.readouterr().out
    assert "valid: principal alice" in printed and '"sub": "alice"' in printed


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda: token(ttl=-60), "invalid: token expired (expired)"),
        (lambda: token(aud="other"), "invalid: token audience not accepted"),
        (lambda: token(key=b"z" * 64), "invalid: token signature invalid"),
        (lambda: "garbage", "invalid: token malformed"),
    ],
)
def test_cli_token_check_says_why_not(
    make: Any, why: str, cli_config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["token", "check", make(), "--config", cli_config]) == 1
    assert why in capsys.readouterr().out


def test_cli_token_create_needs_an_hs_key(tmp_path: Path, key_files: dict[str, str]) -> None:
    path = tmp_path / "rs.toml"
    path.write_text(
        "[plugins.jwt]\n[[plugins.jwt.issuers]]\n[[plugins.jwt.issuers.keys]]\n"
        f'algorithms = ["RS256"]\npublic_key_file = "{key_files["rsa"]}"\n'
    )
    assert cli_main(["token", "create", "--sub", "a", "--config", str(path)]) == 2
