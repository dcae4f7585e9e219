"""Server CPU an authenticated connect adds over an anonymous one (targets: HS256 at most
100 µs, RS256/ES256 at most 250 µs).

One ``backchannel serve`` process with the jwt plugin and anonymous connections
allowed; this process connects N times per scenario (no token, then a bearer
token of each algorithm), each connect answering one ``ping`` so admission is
complete, and reads the server's CPU time (utime + stime from
``/proc/<pid>/stat``) around each batch. Scenarios alternate over several rounds;
the median per-connect CPU of each is compared with the anonymous one.

    uv run python plugins/jwt/benchmarks/connect_cpu.py [N] [ROUNDS]
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from websockets.sync.client import connect

__all__ = ["main"]

TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> float:
    """Seconds of CPU (user + system) process ``pid`` used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _pem(private: Any) -> bytes:
    data: bytes = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _connect_once(url: str, headers: dict[str, str] | None) -> None:
    with connect(url, additional_headers=headers, subprotocols=None) as ws:
        ws.send('{"id": "p", "type": "ping"}')
        answer = json.loads(ws.recv(timeout=5))
        if answer.get("type") != "pong":
            raise SystemExit(f"unexpected answer {answer}")


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 1000
    rounds = int(argv[1]) if len(argv) > 1 else 5
    secret = os.urandom(32).hex().encode()
    keys: dict[str, Any] = {
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
    }
    tmp = Path(tempfile.mkdtemp(prefix="bc-jwt-bench-"))
    (tmp / "secret").write_bytes(secret)
    lines = [
        "[server]",
        'host = "127.0.0.1"',
        "[auth]",
        "allow_anonymous = true",
        "[plugins]",
        'enabled = ["jwt", "init", "text", "ping", "system", "validation"]',
        "[plugins.jwt]",
        "[[plugins.jwt.issuers]]",
        'issuer = "bench"',
        "[[plugins.jwt.issuers.keys]]",
        'kid = "hs"',
        'algorithms = ["HS256"]',
        f'secret_file = "{tmp / "secret"}"',
    ]
    for alg, private in keys.items():
        (tmp / f"{alg}.pem").write_bytes(_pem(private))
        lines += [
            "[[plugins.jwt.issuers.keys]]",
            f'kid = "{alg}"',
            f'algorithms = ["{alg}"]',
            f'public_key_file = "{tmp / f"{alg}.pem"}"',
        ]
    (tmp / "bench.toml").write_text("\n".join(lines) + "\n")
    now = int(time.time())
    claims = {"sub": "bench", "iss": "bench", "iat": now, "exp": now + 3600}
    tokens = {"HS256": jwt.encode(claims, secret, algorithm="HS256", headers={"kid": "hs"})}
    for alg, private in keys.items():
        tokens[alg] = jwt.encode(claims, private, algorithm=alg, headers={"kid": alg})
    scenarios: dict[str, dict[str, str] | None] = {"anonymous": None}
    scenarios.update({alg: {"Authorization": f"Bearer {tok}"} for alg, tok in tokens.items()})

    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backchannel.cli",
            "serve",
            "--config",
            str(tmp / "bench.toml"),
            "--port",
            str(port),
            "--log-level",
            "WARNING",
        ],
    )
    url = f"ws://127.0.0.1:{port}/ws"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                _connect_once(url, None)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        for headers in scenarios.values():  # warm up every path
            for _ in range(50):
                _connect_once(url, headers)
        per_connect: dict[str, list[float]] = {name: [] for name in scenarios}
        for _ in range(rounds):
            for name, headers in scenarios.items():
                before = _cpu(server.pid)
                for _ in range(n):
                    _connect_once(url, headers)
                per_connect[name].append((_cpu(server.pid) - before) / n * 1e6)
    finally:
        server.terminate()
        server.wait(10)
    base = statistics.median(per_connect["anonymous"])
    result = {
        "connects_per_batch": n,
        "rounds": rounds,
        "server_cpu_us_per_connect": {
            name: round(statistics.median(v), 1) for name, v in per_connect.items()
        },
        "added_us_over_anonymous": {
            name: round(statistics.median(v) - base, 1)
            for name, v in per_connect.items()
            if name != "anonymous"
        },
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
