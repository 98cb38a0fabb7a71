"""Participant tokens: a signed JWT grants one user one session.

A token is minted by the application's server (or locally with
``python -m rejoin.tokens``) and checked on ``$connect``. Claims: ``sub``
(user id), ``name`` (display name), ``sid`` (the one session granted),
``iat``, ``exp``, ``aud`` and optionally ``iss``. Tokens are HS256 with a
shared secret by default; a verifier can instead fetch RS256/ES256 keys from
a JWKS URL (e.g. Cognito, whose tokens then need ``name`` and ``sid`` claims
from a pre-token-generation trigger).

Time is checked against an injectable clock, not PyJWT's wall clock, so it
can be tested and so every check in one request sees the same time. A token
must not live longer than a maximum lifetime (``exp - iat``, 12 hours unless
configured; ``REJOIN_TOKEN_MAX_TTL_SECONDS``), and must not claim to be
issued in the future beyond a small leeway (60 s;
``REJOIN_TOKEN_IAT_LEEWAY_SECONDS``): a leaked signing key or a careless
issuer cannot hand out tokens that stay good for years. Error messages never
contain the token or the secret.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard
from urllib.parse import urlsplit

import jwt
from jwt import PyJWKClient

from .errors import (
    AuthError,
    ConfigError,
    InvalidParticipant,
    InvalidSessionId,
    RejoinError,
    TokenExpired,
    TokenInvalid,
    TokenMissing,
    TokenWrongSession,
)
from .keys import validate_session_id
from .participants import Participant

if TYPE_CHECKING:
    from jwt import PyJWK

__all__ = [
    "DEFAULT_IAT_LEEWAY_SECONDS",
    "DEFAULT_MAX_TTL_SECONDS",
    "Grant",
    "Participant",
    "TokenVerifier",
    "main",
    "mint_token",
]

# RFC 7518 §3.2: an HS256 key must be at least as long as the hash (256 bits).
MIN_SECRET_BYTES = 32

# A JWT longer than this is refused before any parsing or key lookup: real
# tokens are well under 2 KB, and a query string carries at most a few KB.
MAX_TOKEN_CHARS = 8192

# The longest lifetime (exp - iat) a token may have: hours, not years, so a
# stolen token is worth little for long. Deployments change it with
# REJOIN_TOKEN_MAX_TTL_SECONDS (Settings.token_max_ttl_seconds).
DEFAULT_MAX_TTL_SECONDS = 12 * 3600
MAX_TTL_ENV = "REJOIN_TOKEN_MAX_TTL_SECONDS"

# How far in the future of our clock a token's iat may be: the issuer's clock
# may run a little ahead of ours, never minutes or years.
DEFAULT_IAT_LEEWAY_SECONDS = 60

_REQUIRED = ("sub", "name", "sid", "iat", "exp", "aud")
_HMAC_ALGORITHMS = ("HS256",)
_JWKS_ALGORITHMS = ("RS256", "ES256")


class JwksClient(Protocol):
    """What :class:`TokenVerifier` needs from a JWKS client (PyJWT's ``PyJWKClient``)."""

    def get_signing_key_from_jwt(self, token: str) -> PyJWK:
        """Return the public key named by the token's ``kid`` header."""
        ...


@dataclass(frozen=True)
class Grant:
    """What a verified token grants.

    Attributes:
        participant: who the bearer is.
        session_id: the one session the token grants.
        expires_at: the token's ``exp`` (seconds since the epoch).
        issued_at: the token's ``iat`` (seconds since the epoch); revoking
            "every token issued up to now" compares against it.
    """

    participant: Participant
    session_id: str
    expires_at: float
    issued_at: float


def mint_token(
    *,
    secret: str,
    session_id: str,
    user_id: str,
    name: str,
    ttl_seconds: int = 3600,
    now: float | None = None,
    audience: str = "rejoin",
    issuer: str | None = None,
    max_ttl_seconds: int = DEFAULT_MAX_TTL_SECONDS,
) -> str:
    """Mint an HS256 token granting ``user_id`` the session ``session_id``.

    Args:
        secret: the signing secret, at least 32 bytes (UTF-8).
        session_id: the session granted.
        user_id: the participant's user id (``sub``).
        name: the participant's display name (``name``), stripped.
        ttl_seconds: seconds until the token expires; positive, at most
            ``max_ttl_seconds``.
        now: the issue time (seconds since the epoch); defaults to the wall clock.
        audience: the ``aud`` claim.
        issuer: the ``iss`` claim, left out when None.
        max_ttl_seconds: the longest lifetime allowed: the verifier's
            ``max_ttl_seconds`` (a longer token would be refused there).

    Returns:
        The compact JWT.

    Raises:
        ConfigError: the secret is shorter than 32 bytes.
        InvalidSessionId: the session id is malformed.
        InvalidParticipant: the user id or name is malformed.
        ValueError: ``ttl_seconds`` is not a positive integer or exceeds
            ``max_ttl_seconds``, or ``audience`` is empty.
    """
    _check_secret(secret)
    validate_session_id(session_id)
    participant = Participant(user_id, name)
    if not _positive_int(ttl_seconds):
        raise ValueError("ttl_seconds must be a positive integer")
    if not _positive_int(max_ttl_seconds):
        raise ValueError("max_ttl_seconds must be a positive integer")
    if ttl_seconds > max_ttl_seconds:
        raise ValueError(
            f"ttl_seconds must be at most {max_ttl_seconds} (the maximum token lifetime)"
        )
    if not audience:
        raise ValueError("audience must not be empty")
    issued = math.floor(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "sub": participant.user_id,
        "name": participant.name,
        "sid": session_id,
        "iat": issued,
        "exp": issued + ttl_seconds,
        "aud": audience,
    }
    if issuer is not None:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm="HS256")


def _positive_int(value: object) -> bool:
    # bool is an int subclass: True is not "one second".
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_secret(secret: object) -> None:
    if not isinstance(secret, str) or len(secret.encode("utf-8")) < MIN_SECRET_BYTES:
        raise ConfigError(f"the token secret must be at least {MIN_SECRET_BYTES} bytes")


class TokenVerifier:
    """Checks tokens against a shared secret (HS256) or a JWKS URL (RS256/ES256).

    Args:
        secret: the HS256 secret (at least 32 bytes).
        jwks_url: the URL of a JSON Web Key Set; a ``PyJWKClient`` for it is
            built on first use and caches the keys.
        jwks_client: a ready JWKS client, instead of ``jwks_url`` (for tests,
            or to share one client's cache).
        audience: the required ``aud``.
        issuer: the required ``iss``; not checked when None.
        clock: returns the current time in seconds since the epoch.
        leeway: seconds of clock skew tolerated when checking ``exp`` and ``nbf``.
        max_ttl_seconds: the longest lifetime (``exp - iat``) accepted.
        iat_leeway: how many seconds in the future of ``clock`` a token's
            ``iat`` may be.

    Raises:
        ConfigError: not exactly one of ``secret``, ``jwks_url`` and
            ``jwks_client`` is given, the secret is too short, the JWKS URL is
            not ``https://``, the audience is empty, the maximum lifetime is not
            positive, or a leeway is negative.
    """

    def __init__(
        self,
        *,
        secret: str | None = None,
        jwks_url: str | None = None,
        jwks_client: JwksClient | None = None,
        audience: str = "rejoin",
        issuer: str | None = None,
        clock: Callable[[], float] = time.time,
        leeway: float = 0,
        max_ttl_seconds: float = DEFAULT_MAX_TTL_SECONDS,
        iat_leeway: float = DEFAULT_IAT_LEEWAY_SECONDS,
    ) -> None:
        given = [x is not None for x in (secret, jwks_url, jwks_client)]
        if sum(given) != 1:
            raise ConfigError("give exactly one of secret, jwks_url and jwks_client")
        if secret is not None:
            _check_secret(secret)
        if jwks_url is not None:
            _check_jwks_url(jwks_url)
        if not audience:
            raise ConfigError("audience must not be empty")
        if not _finite_number(leeway) or leeway < 0:
            raise ConfigError("leeway must be a number of seconds, not negative")
        if not _finite_number(max_ttl_seconds) or max_ttl_seconds <= 0:
            raise ConfigError("max_ttl_seconds must be a positive number of seconds")
        if not _finite_number(iat_leeway) or iat_leeway < 0:
            raise ConfigError("iat_leeway must be a number of seconds, not negative")
        self._secret = secret
        self._jwks_url = jwks_url
        self._jwks_client = jwks_client
        self._audience = audience
        self._issuer = issuer
        self._clock = clock
        self._leeway = float(leeway)
        self._max_ttl = float(max_ttl_seconds)
        self._iat_leeway = float(iat_leeway)
        self._algorithms = list(_HMAC_ALGORITHMS if secret is not None else _JWKS_ALGORITHMS)
        self._require = [*_REQUIRED, "iss"] if issuer is not None else list(_REQUIRED)

    def __repr__(self) -> str:
        # Never show the secret.
        source = "secret" if self._secret is not None else "jwks"
        return (
            f"TokenVerifier({source}, audience={self._audience!r}, issuer={self._issuer!r}, "
            f"max_ttl_seconds={self._max_ttl:g})"
        )

    def verify(self, token: str | None, *, session_id: str) -> Grant:
        """Check ``token`` and that it grants ``session_id``.

        Args:
            token: the JWT from the connect request; None when absent.
            session_id: the session the connection asks for.

        Returns:
            The grant: who the bearer is and until when.

        Raises:
            InvalidSessionId: ``session_id`` is malformed (checked first, so a
                bad request is told apart from a bad token).
            TokenMissing: no token.
            TokenInvalid: malformed, forged, of a refused algorithm, for another
                audience or issuer, lacking a claim, with a bad claim, living
                longer than the maximum lifetime (``exp - iat``), or issued in
                the future (``iat`` beyond the clock plus ``iat_leeway``).
            TokenExpired: authentic but past its ``exp`` (by the clock).
            TokenWrongSession: authentic and current, but for another session.
            AuthError: the JWKS keys could not be fetched.
        """
        validate_session_id(session_id)
        if token is None or token == "":
            raise TokenMissing("no token given")
        if not isinstance(token, str):
            raise TokenInvalid("token must be a string")
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenInvalid("token is too long")
        claims = self._decode(token)
        grant, nbf = _read_claims(claims)
        exp, iat = grant.expires_at, grant.issued_at
        # The token's shape first: a token that could never be valid is
        # invalid, whatever the clock says.
        if exp <= iat:
            raise TokenInvalid("token expires before it was issued ('exp' <= 'iat')")
        if exp - iat > self._max_ttl:
            raise TokenInvalid(
                f"token lives longer than the maximum of {self._max_ttl:g} seconds ('exp' - 'iat')"
            )
        now = self._clock()
        if iat > now + self._iat_leeway:
            raise TokenInvalid("token is issued in the future ('iat' is ahead of the clock)")
        if exp <= now - self._leeway:
            raise TokenExpired("token has expired")
        if nbf is not None and nbf > now + self._leeway:
            raise TokenInvalid("token is not valid yet")
        if grant.session_id != session_id:
            raise TokenWrongSession("token grants another session")
        return grant

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            key: Any = self._secret if self._secret is not None else self._signing_key(token)
            # Time claims are checked by verify() against the injected clock.
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                options={
                    "require": self._require,
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.MissingRequiredClaimError as exc:
            raise TokenInvalid(f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise TokenInvalid("token signature is invalid") from None
        except jwt.InvalidAlgorithmError:
            raise TokenInvalid("token algorithm is not allowed") from None
        except jwt.InvalidAudienceError:
            raise TokenInvalid("token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise TokenInvalid("token is from another issuer") from None
        except jwt.DecodeError:
            raise TokenInvalid("token is malformed") from None
        except jwt.InvalidTokenError:
            raise TokenInvalid("token is invalid") from None
        except jwt.PyJWKClientConnectionError:
            raise AuthError("could not fetch the token signing keys") from None
        except jwt.PyJWKClientError:
            raise TokenInvalid("no signing key matches the token") from None
        except (jwt.PyJWKError, jwt.PyJWKSetError, jwt.InvalidKeyError):
            raise TokenInvalid("token cannot be checked with the configured keys") from None
        return claims

    def _signing_key(self, token: str) -> PyJWK:
        if self._jwks_client is None:
            # Built on first use: constructing it is cheap, but a verifier
            # made for HS256-only paths should not need the URL to be valid.
            assert self._jwks_url is not None
            self._jwks_client = PyJWKClient(self._jwks_url, timeout=5)
        return self._jwks_client.get_signing_key_from_jwt(token)


def _check_jwks_url(url: object) -> None:
    # Keys fetched over plain HTTP can be swapped by anyone on the path, and
    # then any token they sign is accepted.
    if not isinstance(url, str):
        raise ConfigError("jwks_url must be a string")
    parts = urlsplit(url)
    if parts.scheme.lower() != "https" or not parts.hostname:
        raise ConfigError("jwks_url must be an https:// URL (keys over plain http can be forged)")


def _finite_number(value: object) -> TypeGuard[int | float]:
    # bool is an int subclass; a NumericDate or a duration is never true/false.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _read_claims(claims: dict[str, Any]) -> tuple[Grant, float | None]:
    """Check the claims' types and values; return the grant and ``nbf``."""
    sid = claims["sid"]
    try:
        validate_session_id(sid)
    except InvalidSessionId:
        raise TokenInvalid("token's 'sid' claim is not a valid session id") from None
    try:
        participant = Participant(claims["sub"], claims["name"])
    except InvalidParticipant as exc:
        raise TokenInvalid(f"token's 'sub' or 'name' claim is invalid: {exc}") from None
    exp = _number(claims, "exp")
    iat = _number(claims, "iat")
    nbf = _number(claims, "nbf") if "nbf" in claims else None
    grant = Grant(participant=participant, session_id=sid, expires_at=exp, issued_at=iat)
    return grant, nbf


def _number(claims: dict[str, Any], name: str) -> float:
    value = claims[name]
    if not _finite_number(value):
        raise TokenInvalid(f"token's {name!r} claim must be a number")
    return float(value)


def main(argv: list[str] | None = None) -> int:
    """Mint a token from the command line and print it.

    Usage: ``python -m rejoin.tokens --session S --user U --name N [--ttl 3600]
    [--secret-env REJOIN_TOKEN_SECRET]``. The secret is read from the named
    environment variable, never from the command line (it would show in
    ``ps`` and shell history). ``--ttl`` may not exceed the maximum lifetime,
    ``REJOIN_TOKEN_MAX_TTL_SECONDS`` when set (as the deployment reads it),
    else 12 hours.

    Returns:
        0 on success, 2 on a usage or configuration error.
    """
    parser = argparse.ArgumentParser(
        prog="python -m rejoin.tokens", description="Mint a rejoin participant token."
    )
    parser.add_argument("--session", required=True, help="the session id granted")
    parser.add_argument("--user", required=True, help="the user id (sub)")
    parser.add_argument("--name", required=True, help="the display name")
    parser.add_argument(
        "--ttl",
        type=int,
        default=3600,
        help="seconds until expiry (at most REJOIN_TOKEN_MAX_TTL_SECONDS, default 12 h)",
    )
    parser.add_argument("--audience", default="rejoin", help="the aud claim")
    parser.add_argument("--issuer", default=None, help="the iss claim (optional)")
    parser.add_argument(
        "--secret-env",
        default="REJOIN_TOKEN_SECRET",
        help="environment variable holding the signing secret",
    )
    args = parser.parse_args(argv)
    secret = os.environ.get(args.secret_env)
    if not secret:
        print(
            f"error: environment variable {args.secret_env} is not set; "
            f"export the signing secret (at least {MIN_SECRET_BYTES} bytes) there",
            file=sys.stderr,
        )
        return 2
    raw_max = os.environ.get(MAX_TTL_ENV) or str(DEFAULT_MAX_TTL_SECONDS)
    try:
        max_ttl = int(raw_max)
    except ValueError:
        print(f"error: {MAX_TTL_ENV} must be an integer, not {raw_max!r}", file=sys.stderr)
        return 2
    try:
        token = mint_token(
            secret=secret,
            session_id=args.session,
            user_id=args.user,
            name=args.name,
            ttl_seconds=args.ttl,
            audience=args.audience,
            issuer=args.issuer,
            max_ttl_seconds=max_ttl,
        )
    except (RejoinError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
