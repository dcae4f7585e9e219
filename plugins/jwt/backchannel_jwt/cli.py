"""``backchannel token create`` and ``backchannel token check``: for development.

``create`` signs with the first HS key of the configured issuers (``--issuer``
picks one), so a developer can connect to a server using the same config;
``check`` verifies a token exactly as the server would and says why it fails.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .verify import Verifier

__all__ = ["add_commands", "parse_ttl"]

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``1h``, ``2d`` → seconds."""
    match = re.fullmatch(r"(\d+)([smhd]?)", text.strip())
    if match is None or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a positive duration such as 90s, 15m, 1h, 2d")
    return int(match.group(1)) * _UNITS[match.group(2)]


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``token create`` and ``token check`` to the ``backchannel`` CLI."""
    token = subparsers.add_parser("token", help="create or check JWTs (jwt plugin)")
    commands = token.add_subparsers(dest="token_command", required=True)

    create = commands.add_parser("create", help="sign a token with the configured HS key")
    create.add_argument("--sub", required=True, help="subject: the principal id")
    create.add_argument("--ttl", type=parse_ttl, default=3600, help="lifetime (default 1h)")
    create.add_argument(
        "--perm", action="append", default=[], help="a permission (repeat for several)"
    )
    create.add_argument("--issuer", help="the issuer entry to sign for (its `issuer` value)")
    create.add_argument("--config", "-c", help="TOML config with [plugins.jwt]")
    create.set_defaults(func=cmd_create)

    check = commands.add_parser("check", help="verify a token as the server would")
    check.add_argument("token", help="the token (- reads it from standard input)")
    check.add_argument("--config", "-c", help="TOML config with [plugins.jwt]")
    check.set_defaults(func=cmd_check)


def _verifier(path: str | None) -> Verifier | None:
    """The verifier of the config's ``[plugins.jwt]`` table; None (said on stderr) if invalid."""
    from backchannel import StartupError, config
    from backchannel.contracts import load_schema

    from .verify import Verifier

    try:
        data = config.load(path)
        schema = load_schema("backchannel_jwt", "jwt.config.schema.json")
        return Verifier.from_config(config.check_plugin(data, "jwt", schema))
    except StartupError as exc:
        hint = "" if path else " (pass --config FILE with a [plugins.jwt] table)"
        print(f"backchannel token: {exc}{hint}", file=sys.stderr)
        return None


def cmd_create(args: argparse.Namespace) -> int:
    import jwt

    verifier = _verifier(args.config)
    if verifier is None:
        return 2
    for issuer in verifier.by_iss.values():
        if args.issuer is not None and issuer.issuer != args.issuer:
            continue
        for key in issuer.keys.static:
            hmac = sorted(a for a in key.algorithms if a.startswith("HS"))
            if not hmac:
                continue
            now = int(time.time())
            claims: dict[str, Any] = {"sub": args.sub, "iat": now, "exp": now + args.ttl}
            if issuer.issuer:
                claims["iss"] = issuer.issuer
            if issuer.audience:
                claims["aud"] = issuer.audience[0]
            if args.perm:
                claims[verifier.permissions_claim] = args.perm
            headers = {"kid": key.kid} if key.kid else None
            print(jwt.encode(claims, key.key, algorithm=hmac[0], headers=headers))
            return 0
    which = f"issuer {args.issuer!r}" if args.issuer else "any issuer"
    print(f"backchannel token: no HS key configured for {which}", file=sys.stderr)
    return 2


def cmd_check(args: argparse.Namespace) -> int:
    import anyio
    import jwt

    from .model import Rejected

    token = sys.stdin.read().strip() if args.token == "-" else args.token
    verifier = _verifier(args.config)
    if verifier is None:
        return 2
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        print("invalid: token malformed (not a JWT)")
        return 1
    print(json.dumps({"header": header, "claims": claims}, indent=2, sort_keys=True))
    try:
        verified = anyio.run(verifier.verify, token)
    except Rejected as exc:
        print(f"invalid: {exc.message} ({exc.reason})")
        return 1
    exp = verified.expires_at
    expiry = "never" if exp is None else f"in {exp - time.time():.0f} s"
    perms = " ".join(sorted(verified.principal.permissions)) or "(none)"
    print(f"valid: principal {verified.principal.id}, permissions {perms}, expires {expiry}")
    return 0
