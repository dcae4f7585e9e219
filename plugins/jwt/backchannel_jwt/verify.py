"""Token verification: from a compact JWT to a :class:`~backchannel.Principal`, or a reason.

The order matters: the header's ``alg`` must be on an allow-list (``none`` never
is), the unverified ``iss`` picks the issuer, only that issuer's keys are tried
(its JWKS refreshed once, rate-limited, on an unknown kid), and PyJWT then
verifies the signature with the key object itself and the one algorithm the
header names, plus the registered claims.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
import orjson
from jwt import exceptions as jwt_errors

from backchannel import Principal, StartupError
from backchannel.config import apply_defaults
from backchannel.contracts import load_schema

from .keys import FAMILIES, IssuerKeys, Key, load_key
from .model import Rejected, Verified

__all__ = ["Issuer", "Verifier"]

_JWT = jwt.PyJWT()

_REASONS: list[tuple[type[Exception], str, str]] = [
    (jwt_errors.ExpiredSignatureError, "expired", "token expired"),
    (jwt_errors.ImmatureSignatureError, "not_yet_valid", "token not yet valid"),
    (jwt_errors.InvalidAudienceError, "wrong_audience", "token audience not accepted"),
    (jwt_errors.InvalidIssuerError, "wrong_issuer", "token issuer not accepted"),
    (jwt_errors.MissingRequiredClaimError, "missing_claim", "token lacks a required claim"),
    (jwt_errors.InvalidSignatureError, "bad_signature", "token signature invalid"),
    (jwt_errors.InvalidAlgorithmError, "bad_algorithm", "token algorithm not allowed"),
    (jwt_errors.InvalidKeyError, "bad_key", "token key not usable"),
    (jwt_errors.InvalidIssuedAtError, "malformed", "token iat invalid"),
    (jwt_errors.DecodeError, "malformed", "token malformed"),
]


@dataclass(slots=True)
class Issuer:
    """One ``[[plugins.jwt.issuers]]`` entry, resolved."""

    issuer: str | None
    audience: Sequence[str] | None
    prefix: str
    keys: IssuerKeys


class Verifier:
    """Checks tokens against the configured issuers (one per App)."""

    def __init__(self, issuers: list[Issuer], cfg: Mapping[str, Any]) -> None:
        self.by_iss: dict[str | None, Issuer] = {i.issuer: i for i in issuers}
        self.leeway: float = cfg["leeway"]
        self.required = sorted({*cfg["required_claims"], "sub"})
        self.permissions_claim: str = cfg["permissions_claim"]
        self.default_permissions = frozenset(cfg["default_permissions"])
        self.max_bytes: int = cfg["max_token_bytes"]
        self.allowed = frozenset(FAMILIES)

    @classmethod
    def from_config(
        cls, cfg: Mapping[str, Any], environ: Mapping[str, str] | None = None
    ) -> Verifier:
        """Build from the checked ``[plugins.jwt]`` table; load every key now.

        Raises :class:`StartupError` naming the entry (``plugins.jwt.issuers[1].keys[0]``).
        """
        schema = load_schema("backchannel_jwt", "jwt.config.schema.json")
        jwks = apply_defaults(schema["properties"]["jwks"], dict(cfg.get("jwks", {})))
        issuers: list[Issuer] = []
        seen: dict[str | None, int] = {}
        for i, raw in enumerate(cfg["issuers"]):
            where = f"plugins.jwt.issuers[{i}]"
            entry = apply_defaults(schema["$defs"]["issuer"], dict(raw))
            name = entry.get("issuer")
            if name in seen:
                what = f"issuer {name!r}" if name else "an entry without issuer"
                raise StartupError(f"{where}: {what} is already issuers[{seen[name]}]")
            seen[name] = i
            keys = [
                load_key(spec, f"{where}.keys[{j}]", environ)
                for j, spec in enumerate(entry["keys"])
            ]
            audience = entry.get("audience", cfg.get("audience"))
            issuers.append(
                Issuer(
                    name,
                    [audience] if isinstance(audience, str) else audience,
                    entry["prefix"],
                    IssuerKeys(
                        name or "(no iss)",
                        keys,
                        entry.get("jwks_url"),
                        frozenset(entry["jwks_algorithms"]),
                        jwks["min_refresh"],
                        jwks["timeout"],
                        jwks["max_age"],
                    ),
                )
            )
        return cls(issuers, cfg)

    def _parse(self, token: str) -> tuple[dict[str, Any], Issuer]:
        """The header and the issuer, from the unverified token."""
        if len(token) > self.max_bytes:
            raise Rejected("malformed", "token too long")
        # Only to route the token (alg, kid, iss): PyJWT parses it again, strictly, and
        # is the judge of everything. PyJWS's own unverified parse costs ~35 µs here.
        try:
            head, body, _ = token.split(".")
            header = orjson.loads(_unb64(head))
            payload = orjson.loads(_unb64(body))
        except (ValueError, binascii.Error) as exc:  # JSONDecodeError is a ValueError
            raise Rejected("malformed", "token malformed") from exc
        if type(header) is not dict:
            raise Rejected("malformed", "token header is not a JSON object")
        if type(payload) is not dict:
            raise Rejected("malformed", "token claims are not a JSON object")
        alg = header.get("alg")
        if type(alg) is not str or alg not in self.allowed:  # "none", and all not listed
            raise Rejected("bad_algorithm", "token algorithm not allowed")
        kid = header.get("kid")
        if kid is not None and type(kid) is not str:
            raise Rejected("malformed", "token kid is not a string")
        iss = payload.get("iss")
        if iss is not None and type(iss) is not str:
            raise Rejected("malformed", "token iss is not a string")
        issuer = self.by_iss.get(iss)
        if issuer is None:
            raise Rejected("wrong_issuer", "token issuer not accepted")
        return header, issuer

    async def verify(self, token: str) -> Verified:
        """Verify ``token`` completely; raise :class:`Rejected` saying why not."""
        header, issuer = self._parse(token)
        alg: str = header["alg"]
        kid: str | None = header.get("kid")
        keys = issuer.keys
        candidates = keys.candidates(kid)
        if keys.jwks_url is not None and (not candidates or keys.stale):
            await keys.refresh()  # unknown kid (or old JWKS): at most once per min_refresh
            candidates = keys.candidates(kid)
        if not candidates:
            raise Rejected("unknown_kid", "token key id unknown")
        usable = [k for k in candidates if alg in k.algorithms]
        if not usable:
            raise Rejected("bad_algorithm", "token algorithm not allowed for its key")
        error: Exception | None = None
        for key in usable:
            try:
                claims = self._decode(token, key, alg, issuer)
            except jwt_errors.InvalidSignatureError as exc:
                error = exc  # maybe another key of this kid (rotation)
                continue
            except jwt_errors.PyJWTError as exc:
                raise _rejected(exc) from exc
            return self._verified(claims, issuer)
        assert error is not None
        raise _rejected(error) from error

    def _decode(self, token: str, key: Key, alg: str, issuer: Issuer) -> dict[str, Any]:
        audience = issuer.audience
        options: dict[str, Any] = {
            "require": self.required,
            "verify_aud": audience is not None,
            "verify_iss": issuer.issuer is not None,
            "enforce_minimum_key_length": True,
        }
        claims: dict[str, Any] = _JWT.decode(
            token,
            key.key,
            algorithms=[alg],
            options=options,  # type: ignore[arg-type]
            audience=audience,
            issuer=issuer.issuer,
            leeway=self.leeway,
        )
        return claims

    def _verified(self, claims: dict[str, Any], issuer: Issuer) -> Verified:
        sub = claims.get("sub")
        if type(sub) is not str or not sub:
            raise Rejected("missing_claim", "token sub must be a non-empty string")
        raw = claims.get(self.permissions_claim)
        if raw is None:
            granted = []
        elif isinstance(raw, str):
            granted = raw.split()
        elif isinstance(raw, list) and all(type(p) is str for p in raw):
            granted = raw
        else:
            raise Rejected("malformed", f"token claim {self.permissions_claim!r} is invalid")
        exp = claims.get("exp")
        principal = Principal(
            issuer.prefix + sub,
            frozenset(granted) | self.default_permissions,
            claims=claims,
        )
        return Verified(
            principal,
            claims,
            None if exp is None else float(exp),
            issuer.issuer or "",
        )


def _unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _rejected(exc: Exception) -> Rejected:
    for kind, reason, message in _REASONS:
        if isinstance(exc, kind):
            return Rejected(reason, message)
    return Rejected("invalid", "token invalid")
