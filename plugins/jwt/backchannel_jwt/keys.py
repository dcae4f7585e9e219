"""Verification keys: loaded from files or environment variables, or fetched as JWKS.

Every key carries its own algorithm allow-list, all of one family that matches
the key's type, so a key of one family never verifies a token of another (no
HS/RS confusion: an RSA public key is never used as an HMAC secret). JWKS keys
are cached per (issuer, kid), never per kid alone, and fetched off the event
loop, at most once per ``jwks.min_refresh`` per issuer, bounded by
``jwks.timeout``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt import PyJWK, PyJWKClient, PyJWKSet
from jwt.exceptions import PyJWTError

from backchannel import StartupError

__all__ = ["FAMILIES", "IssuerKeys", "Key", "family_of", "load_key"]

log = logging.getLogger("backchannel.jwt")

#: algorithm -> family; a key verifies only algorithms of its own family.
FAMILIES: dict[str, str] = {
    "HS256": "HMAC",
    "HS384": "HMAC",
    "HS512": "HMAC",
    "RS256": "RSA",
    "RS384": "RSA",
    "RS512": "RSA",
    "PS256": "RSA",
    "ES256": "EC",
    "ES384": "EC",
    "EdDSA": "OKP",
}
_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1"}
_HMAC_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_RSA_MIN_BITS = 2048


def family_of(key: Any) -> str:
    """The family of a loaded key object (``bytes`` are HMAC secrets)."""
    if isinstance(key, bytes):
        return "HMAC"
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "EC"
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return "OKP"
    return "unknown"


@dataclass(frozen=True, slots=True)
class Key:
    """One verification key and the algorithms it may verify."""

    kid: str | None
    key: Any
    algorithms: frozenset[str]
    #: where it came from, for logs and start-up errors (never the key itself)
    origin: str


def _compatible(key: Any, algorithms: frozenset[str]) -> str | None:
    """Why ``key`` may not verify ``algorithms``, or None when it may."""
    family = family_of(key)
    wrong = sorted(a for a in algorithms if FAMILIES.get(a) != family)
    if wrong:
        return f"a {family} key cannot verify {', '.join(wrong)}"
    if family == "HMAC":
        need = max(_HMAC_BYTES[a] for a in algorithms)
        if len(key) < need:
            return f"the secret has {len(key)} bytes; {', '.join(sorted(algorithms))} needs {need}"
    elif family == "RSA" and key.key_size < _RSA_MIN_BITS:
        return f"RSA keys need at least {_RSA_MIN_BITS} bits (this one has {key.key_size})"
    elif family == "EC":
        for alg in algorithms:
            if key.curve.name != _CURVES[alg]:
                return f"{alg} needs curve {_CURVES[alg]}, the key is on {key.curve.name}"
    elif family == "OKP" and not isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return "EdDSA needs an Ed25519 or Ed448 key"
    return None


def load_key(spec: Mapping[str, Any], where: str, environ: Mapping[str, str] | None = None) -> Key:
    """Load one ``[[plugins.jwt.issuers.keys]]`` entry; :class:`StartupError` names ``where``."""
    env = os.environ if environ is None else environ
    algorithms = frozenset(spec["algorithms"])
    raw: bytes
    if "secret_file" in spec or "public_key_file" in spec:
        path = spec.get("secret_file") or spec["public_key_file"]
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise StartupError(f"{where}: cannot read key file {path!r}: {exc.strerror}") from exc
        origin = f"file {path}"
    else:
        name = spec.get("secret_env") or spec["public_key_env"]
        value = env.get(name)
        if not value:
            raise StartupError(f"{where}: environment variable {name} is not set")
        raw = value.encode()
        origin = f"env {name}"
    key: Any
    if "secret_file" in spec or "secret_env" in spec:
        key = raw.strip() if "secret_file" in spec else raw
        if key.startswith(b"-----BEGIN"):
            raise StartupError(f"{where}: a PEM key is not an HMAC secret ({origin})")
    else:
        try:
            key = load_pem_public_key(raw)
        except (ValueError, TypeError) as exc:
            raise StartupError(f"{where}: not a PEM public key ({origin})") from exc
    why = _compatible(key, algorithms)
    if why is not None:
        raise StartupError(f"{where}: {why} ({origin})")
    return Key(spec.get("kid"), key, algorithms, origin)


def _jwks_key(jwk: PyJWK, allowed: frozenset[str]) -> Key | None:
    """A JWKS key limited to ``allowed``, its family and its own ``alg``; None if unusable."""
    key = jwk.key
    family = family_of(key)
    if family in ("HMAC", "unknown"):
        return None  # a published symmetric key is nobody's secret
    algorithms = frozenset(a for a in allowed if FAMILIES[a] == family)
    declared = jwk._jwk_data.get("alg")
    if declared is not None:
        algorithms &= {declared}
    if jwk.public_key_use not in (None, "sig"):
        return None
    algorithms = frozenset(a for a in algorithms if _compatible(key, frozenset({a})) is None)
    if not algorithms:
        return None
    return Key(jwk.key_id, key, algorithms, "jwks")


@dataclass(slots=True)
class IssuerKeys:
    """The keys of one issuer: configured ones, plus its JWKS cached per kid.

    The JWKS cache lives here, inside the issuer, so a kid is only ever looked
    up among its own issuer's keys.
    """

    name: str
    static: list[Key]
    jwks_url: str | None = None
    jwks_algorithms: frozenset[str] = frozenset()
    min_refresh: float = 60.0
    timeout: float = 5.0
    max_age: float = 3600.0
    cached: dict[str | None, list[Key]] = field(default_factory=dict)
    fetched_at: float | None = None
    last_attempt: float | None = None
    fetches: int = 0
    failures: int = 0
    _inflight: anyio.Event | None = None

    def candidates(self, kid: str | None) -> list[Key]:
        """Keys that may verify a token with header ``kid`` (cached JWKS included)."""
        if kid is None:  # every key of this issuer (each still limited to its algorithms)
            found = list(self.static)
            for keys in self.cached.values():
                found.extend(keys)
            return found
        found = [k for k in self.static if k.kid is None or k.kid == kid]
        found.extend(self.cached.get(kid, ()))
        return found

    @property
    def stale(self) -> bool:
        """Whether the cached JWKS is older than ``max_age`` (or was never fetched)."""
        return self.fetched_at is None or time.monotonic() - self.fetched_at > self.max_age

    def may_fetch(self) -> bool:
        """A fetch is allowed now: none in the last ``min_refresh`` seconds."""
        if self.jwks_url is None:
            return False
        last = self.last_attempt
        return last is None or time.monotonic() - last >= self.min_refresh

    async def refresh(self) -> None:
        """Fetch the JWKS once (rate-limited; concurrent callers share one fetch)."""
        inflight = self._inflight
        if inflight is not None:
            await inflight.wait()
            return
        if not self.may_fetch():
            return
        self._inflight = done = anyio.Event()
        self.last_attempt = time.monotonic()
        try:
            await self._fetch()
        finally:
            self._inflight = None
            done.set()

    async def _fetch(self) -> None:
        assert self.jwks_url is not None
        client = PyJWKClient(self.jwks_url, cache_jwk_set=False, timeout=self.timeout)
        self.fetches += 1
        data: Any = None
        with anyio.move_on_after(self.timeout + 0.5):  # urllib's timeout is per socket call
            try:
                data = await anyio.to_thread.run_sync(client.fetch_data, abandon_on_cancel=True)
            except PyJWTError as exc:
                self._failed(f"{type(exc).__name__}")
                return
        if data is None:
            self._failed("timed out")
            return
        try:
            jwks = PyJWKSet.from_dict(data)
        except PyJWTError as exc:
            self._failed(f"unusable JWKS ({type(exc).__name__})")
            return
        cached: dict[str | None, list[Key]] = {}
        for jwk in jwks.keys:
            key = _jwks_key(jwk, self.jwks_algorithms)
            if key is not None:
                cached.setdefault(key.kid, []).append(key)
        self.cached = cached
        self.fetched_at = time.monotonic()
        log.info(
            "jwks fetched issuer=%s keys=%d",
            self.name,
            sum(map(len, cached.values())),
            extra={"issuer": self.name},
        )

    def _failed(self, why: str) -> None:
        self.failures += 1
        log.warning(
            "jwks fetch failed issuer=%s url=%s: %s (keeping %d cached kids)",
            self.name,
            self.jwks_url,
            why,
            len(self.cached),
            extra={"issuer": self.name},
        )
