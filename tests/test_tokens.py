"""Participant tokens: minting, verifying (HS256 and JWKS), and the CLI."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt import PyJWKClient
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from rejoin import tokens
from rejoin.config import Settings
from rejoin.errors import (
    AuthError,
    ConfigError,
    InvalidParticipant,
    InvalidSessionId,
    TokenExpired,
    TokenInvalid,
    TokenMissing,
    TokenWrongSession,
)
from rejoin.runtime import Runtime
from rejoin.tokens import (
    DEFAULT_IAT_LEEWAY_SECONDS,
    DEFAULT_MAX_TTL_SECONDS,
    MAX_TOKEN_CHARS,
    Grant,
    Participant,
    TokenVerifier,
    main,
    mint_token,
)

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cret-for-tests-0123456789-abcdefghij"
OTHER_SECRET = "another-secret-for-tests-9876543210-zyxw"
T0 = 1_700_000_000.0
HOUR = 3600
YEAR = 365 * 24 * HOUR


def _mint(**overrides: Any) -> str:
    args: dict[str, Any] = {
        "secret": SECRET,
        "session_id": "standup-42",
        "user_id": "u-ada",
        "name": "Ada",
        "ttl_seconds": 600,
        "now": T0,
    }
    args.update(overrides)
    return mint_token(**args)


def _verifier(at: float = T0 + 1, **kwargs: Any) -> TokenVerifier:
    kwargs.setdefault("secret", SECRET)
    return TokenVerifier(clock=lambda: at, **kwargs)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "sub": "u-ada",
        "name": "Ada",
        "sid": "standup-42",
        "iat": int(T0),
        "exp": int(T0) + 600,
        "aud": "rejoin",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


# --- round trip ---------------------------------------------------------------


def test_round_trip_grants_the_participant_and_session() -> None:
    # GIVEN a token minted for Ada in standup-42
    token = _mint(name="  Ada Lovelace  ")
    # WHEN it is verified for that session within its lifetime
    grant = _verifier().verify(token, session_id="standup-42")
    # THEN the grant names her (name stripped), the session, the expiry and the issue time
    assert grant == Grant(
        participant=Participant("u-ada", "Ada Lovelace"),
        session_id="standup-42",
        expires_at=T0 + 600,
        issued_at=T0,
    )


def test_minted_claims_are_the_documented_ones() -> None:
    # GIVEN a token minted with an issuer
    token = _mint(issuer="https://issuer.example")
    # WHEN its payload is read without verification
    claims = jwt.decode(token, options={"verify_signature": False})
    header = jwt.get_unverified_header(token)
    # THEN it is HS256 with exactly the protocol's claims
    assert header["alg"] == "HS256"
    assert claims == {
        "sub": "u-ada",
        "name": "Ada",
        "sid": "standup-42",
        "iat": int(T0),
        "exp": int(T0) + 600,
        "aud": "rejoin",
        "iss": "https://issuer.example",
    }


def test_issuer_is_required_when_configured() -> None:
    # GIVEN a verifier that requires an issuer
    verifier = _verifier(issuer="https://issuer.example")
    # WHEN tokens with the right issuer, another issuer, and none are verified
    ok = verifier.verify(_mint(issuer="https://issuer.example"), session_id="standup-42")
    # THEN only the right issuer passes
    assert ok.participant.user_id == "u-ada"
    with pytest.raises(TokenInvalid, match="issuer"):
        verifier.verify(_mint(issuer="https://evil.example"), session_id="standup-42")
    with pytest.raises(TokenInvalid, match="'iss'"):
        verifier.verify(_mint(), session_id="standup-42")


def test_leeway_and_not_before() -> None:
    # GIVEN a token that expired 5 s ago, and one not valid for another 60 s
    expired = _mint(ttl_seconds=10)
    early = jwt.encode(_claims(nbf=int(T0) + 60), SECRET, algorithm="HS256")
    # WHEN verified with 10 s of leeway, and without
    # THEN leeway forgives the small skew, not the larger one
    at = T0 + 15
    assert _verifier(at, leeway=10).verify(expired, session_id="standup-42")
    with pytest.raises(TokenExpired):
        _verifier(at).verify(expired, session_id="standup-42")
    with pytest.raises(TokenInvalid, match="not valid yet"):
        _verifier(T0).verify(early, session_id="standup-42")
    assert _verifier(T0 + 61).verify(early, session_id="standup-42")


# --- lifetime and issue time (issue 9) -------------------------------------------


def _signed(**overrides: Any) -> str:
    """A token correctly signed with the verifier's secret, with these claims changed."""
    return jwt.encode(_claims(**overrides), SECRET, algorithm="HS256")


def test_a_token_issued_ten_years_in_the_future_is_refused() -> None:
    # GIVEN a correctly signed token whose iat is ten years ahead (with a short life after it)
    future = int(T0) + 10 * YEAR
    token = _signed(iat=future, exp=future + 600)
    # WHEN it is verified now
    with pytest.raises(TokenInvalid) as info:
        _verifier(T0).verify(token, session_id="standup-42")
    # THEN it is refused as issued in the future (401), not accepted for its exp
    assert "issued in the future" in str(info.value)
    assert info.value.status == 401


def test_a_token_valid_for_a_hundred_years_is_refused() -> None:
    # GIVEN a correctly signed token issued now that expires in a hundred years
    token = _signed(iat=int(T0), exp=int(T0) + 100 * YEAR)
    # WHEN it is verified within its claimed lifetime
    with pytest.raises(TokenInvalid) as info:
        _verifier(T0 + 1).verify(token, session_id="standup-42")
    # THEN it is refused: its lifetime is over the maximum (12 h by default)
    assert f"maximum of {DEFAULT_MAX_TTL_SECONDS} seconds" in str(info.value)


def test_the_maximum_lifetime_is_inclusive_and_configurable() -> None:
    # GIVEN tokens living exactly the default maximum, and one second more
    at_max = _signed(exp=int(T0) + DEFAULT_MAX_TTL_SECONDS)
    over = _signed(exp=int(T0) + DEFAULT_MAX_TTL_SECONDS + 1)
    # WHEN verified with the default maximum
    # THEN the first passes and the second is refused
    assert _verifier().verify(at_max, session_id="standup-42").expires_at == (
        T0 + DEFAULT_MAX_TTL_SECONDS
    )
    with pytest.raises(TokenInvalid, match="maximum"):
        _verifier().verify(over, session_id="standup-42")
    # AND a deployment that lowers the maximum to 10 minutes refuses an hour-long token
    hour = _signed(exp=int(T0) + HOUR)
    with pytest.raises(TokenInvalid, match="maximum of 600 seconds"):
        _verifier(max_ttl_seconds=600).verify(hour, session_id="standup-42")
    # AND one that raises it to two days accepts a day-long token
    day = _signed(exp=int(T0) + 24 * HOUR)
    assert _verifier(max_ttl_seconds=48 * HOUR).verify(day, session_id="standup-42")


def test_iat_may_be_ahead_of_the_clock_by_the_leeway_only() -> None:
    # GIVEN tokens issued 60 s and 61 s ahead of the verifier's clock
    soon = _signed(iat=int(T0) + 60, exp=int(T0) + 660)
    later = _signed(iat=int(T0) + 61, exp=int(T0) + 661)
    # WHEN verified at T0 with the default leeway (60 s)
    # THEN the issuer's small clock skew is forgiven, more is not
    assert DEFAULT_IAT_LEEWAY_SECONDS == 60
    assert _verifier(T0).verify(soon, session_id="standup-42").issued_at == T0 + 60
    with pytest.raises(TokenInvalid, match="issued in the future"):
        _verifier(T0).verify(later, session_id="standup-42")
    # AND with no leeway configured, one second ahead is too much
    with pytest.raises(TokenInvalid, match="issued in the future"):
        _verifier(T0, iat_leeway=0).verify(
            _signed(iat=int(T0) + 1, exp=int(T0) + 601), session_id="standup-42"
        )


def test_a_token_that_expires_before_it_was_issued_is_invalid() -> None:
    # GIVEN a token whose exp is not after its iat
    for exp in (int(T0), int(T0) - 1):
        token = _signed(iat=int(T0), exp=exp)
        # WHEN verified (before its exp, with a generous leeway)
        # THEN it is invalid by its shape, not merely expired
        with pytest.raises(TokenInvalid, match="expires before it was issued"):
            _verifier(T0 - 10, leeway=100).verify(token, session_id="standup-42")


def test_lifetime_errors_are_distinct_and_never_contain_the_token() -> None:
    # GIVEN one token for each lifetime refusal
    cases = {
        "future": _signed(iat=int(T0) + 10 * YEAR, exp=int(T0) + 10 * YEAR + 600),
        "too long": _signed(exp=int(T0) + 100 * YEAR),
        "inverted": _signed(exp=int(T0) - 1),
        "expired": _signed(iat=int(T0) - 7200, exp=int(T0) - 3600),
    }
    messages = {}
    for name, token in cases.items():
        # WHEN each is verified
        with pytest.raises(AuthError) as info:
            _verifier(T0).verify(token, session_id="standup-42")
        messages[name] = str(info.value)
        # THEN the message holds nothing of the token or the secret
        text = f"{info.value} {info.value!r}"
        assert token not in text and token.split(".")[-1] not in text
        assert SECRET not in text
    # AND every refusal says something different
    assert len(set(messages.values())) == len(cases), messages
    assert isinstance(_raised(cases["expired"]), TokenExpired)


def _raised(token: str) -> Exception:
    try:
        _verifier(T0).verify(token, session_id="standup-42")
    except AuthError as exc:
        return exc
    raise AssertionError("the token was accepted")


def test_a_signed_token_over_the_size_limit_is_refused_before_parsing() -> None:
    # GIVEN a correctly signed, current token padded past the size limit with an extra claim
    token = _signed(pad="x" * MAX_TOKEN_CHARS)
    assert len(token) > MAX_TOKEN_CHARS
    # WHEN verified / THEN refused as too long (a cheap check before any decoding)
    with pytest.raises(TokenInvalid, match="too long"):
        _verifier().verify(token, session_id="standup-42")
    # AND the same token without the padding passes: the size is the only reason
    assert _verifier().verify(_signed(), session_id="standup-42")


def test_mint_refuses_a_lifetime_over_the_maximum() -> None:
    # GIVEN the default maximum lifetime (12 h)
    # WHEN minting at the maximum, one second over, and a hundred years
    assert _mint(ttl_seconds=DEFAULT_MAX_TTL_SECONDS)
    for ttl in (DEFAULT_MAX_TTL_SECONDS + 1, 100 * YEAR):
        # THEN the longer ones are refused, naming the maximum
        with pytest.raises(ValueError, match=f"at most {DEFAULT_MAX_TTL_SECONDS}"):
            _mint(ttl_seconds=ttl)
    # AND a raised maximum lets a longer token be minted, which a verifier with the
    # same maximum accepts
    day = _mint(ttl_seconds=24 * HOUR, max_ttl_seconds=24 * HOUR)
    assert _verifier(max_ttl_seconds=24 * HOUR).verify(day, session_id="standup-42")
    with pytest.raises(TokenInvalid, match="maximum"):
        _verifier().verify(day, session_id="standup-42")


@pytest.mark.parametrize(
    "overrides",
    [
        {"ttl_seconds": True},
        {"ttl_seconds": 600.0},
        {"ttl_seconds": "600"},
        {"ttl_seconds": -1},
        {"max_ttl_seconds": True},
        {"max_ttl_seconds": 0},
    ],
)
def test_mint_takes_only_positive_integers_for_durations(overrides: dict[str, Any]) -> None:
    # GIVEN a duration that is a bool, a float, a string or not positive
    # WHEN minting / THEN ValueError (True is not "one second"), and no token
    with pytest.raises(ValueError):
        _mint(**overrides)


# --- refusals -----------------------------------------------------------------


@pytest.mark.parametrize("token", [None, ""])
def test_missing_token(token: str | None) -> None:
    # GIVEN no token / WHEN verified / THEN TokenMissing (401)
    with pytest.raises(TokenMissing) as info:
        _verifier().verify(token, session_id="standup-42")
    assert info.value.status == 401


def test_expired_by_the_injected_clock() -> None:
    # GIVEN a token minted at T0 with a 600 s lifetime
    token = _mint(ttl_seconds=600)
    # WHEN verified one second after it expired (by the injected clock,
    # whatever the wall clock says)
    # THEN it is refused as expired; just before, it passes
    assert _verifier(T0 + 599).verify(token, session_id="standup-42")
    with pytest.raises(TokenExpired) as info:
        _verifier(T0 + 601).verify(token, session_id="standup-42")
    assert info.value.status == 401


def test_clock_in_the_future_of_wall_time_is_respected() -> None:
    # GIVEN a token minted far in the future of the wall clock
    future = 4_000_000_000.0
    token = _mint(now=future)
    # WHEN verified with a clock at that time
    # THEN it passes (PyJWT's wall-clock iat/exp checks are not used)
    grant = _verifier(future + 1).verify(token, session_id="standup-42")
    assert grant.expires_at == future + 600


def test_forged_with_another_secret() -> None:
    # GIVEN a token signed with another secret
    token = _mint(secret=OTHER_SECRET)
    # WHEN verified / THEN invalid signature
    with pytest.raises(TokenInvalid, match="signature"):
        _verifier().verify(token, session_id="standup-42")


def test_tampered_payload() -> None:
    # GIVEN a real token whose payload is rewritten to grant another user
    header, payload, signature = _mint().split(".")
    claims = json.loads(_unb64(payload))
    claims["sub"] = "u-mallory"
    forged = ".".join([header, _b64(json.dumps(claims).encode()), signature])
    # WHEN verified / THEN the signature no longer matches
    with pytest.raises(TokenInvalid, match="signature"):
        _verifier().verify(forged, session_id="standup-42")


def test_alg_none_is_refused() -> None:
    # GIVEN an unsigned token (alg none) with valid-looking claims
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    body = _b64(json.dumps(_claims()).encode())
    for unsigned in (f"{header}.{body}.", f"{header}.{body}"):
        # WHEN verified / THEN refused, never accepted
        with pytest.raises(TokenInvalid):
            _verifier().verify(unsigned, session_id="standup-42")


def test_other_hmac_algorithm_is_refused() -> None:
    # GIVEN a token correctly signed with the secret but as HS512
    secret = SECRET * 2  # long enough for HS512, so only the algorithm is wrong
    token = jwt.encode(_claims(), secret, algorithm="HS512")
    # WHEN verified / THEN the algorithm is refused
    with pytest.raises(TokenInvalid, match="algorithm"):
        _verifier(secret=secret).verify(token, session_id="standup-42")


def test_wrong_audience() -> None:
    # GIVEN a token for another audience
    token = _mint(audience="someone-else")
    # WHEN verified for "rejoin" / THEN refused
    with pytest.raises(TokenInvalid, match="audience"):
        _verifier().verify(token, session_id="standup-42")


def test_other_session_is_403() -> None:
    # GIVEN a valid token for standup-42
    token = _mint()
    # WHEN used for another session
    with pytest.raises(TokenWrongSession) as info:
        _verifier().verify(token, session_id="standup-43")
    # THEN it is refused with 403, not 401
    assert info.value.status == 403


def test_expired_token_for_another_session_is_expired() -> None:
    # GIVEN an expired token for another session / WHEN verified
    # THEN expiry is reported (401: a fresh token is what the client needs)
    with pytest.raises(TokenExpired):
        _verifier(T0 + 601).verify(_mint(), session_id="other")


def test_malformed_session_id_is_checked_first() -> None:
    # GIVEN a malformed session id / WHEN verifying, even without a token
    # THEN the session id is refused (400 territory), not the token
    with pytest.raises(InvalidSessionId):
        _verifier().verify(None, session_id="bad}id")


@pytest.mark.parametrize("claim", ["sub", "name", "sid", "exp", "iat", "aud"])
def test_missing_claims(claim: str) -> None:
    # GIVEN a correctly signed token lacking one required claim
    token = jwt.encode(_claims(**{claim: None}), SECRET, algorithm="HS256")
    # WHEN verified / THEN refused, naming the claim
    with pytest.raises(TokenInvalid, match=claim):
        _verifier().verify(token, session_id="standup-42")


@pytest.mark.parametrize(
    "overrides",
    [
        {"sub": 42},
        {"sub": "has space"},
        {"sub": "x" * 129},
        {"name": ""},
        {"name": "   "},
        {"name": "x" * 81},
        {"name": "line\nbreak"},
        {"name": ["Ada"]},
        {"sid": "bad}sid"},
        {"sid": 42},
        {"exp": "tomorrow"},
        {"exp": True},
        {"exp": str(int(T0) + 600)},
        {"exp": float("inf")},
        {"iat": "now"},
        {"iat": False},
        {"iat": True},
        {"iat": str(int(T0))},
        {"iat": float("nan")},
        {"iat": [int(T0)]},
    ],
)
def test_bad_claim_values(overrides: dict[str, Any]) -> None:
    # GIVEN a correctly signed token with one claim of a bad type or value
    token = jwt.encode(_claims(**overrides), SECRET, algorithm="HS256")
    # WHEN verified / THEN TokenInvalid
    with pytest.raises(TokenInvalid):
        _verifier().verify(token, session_id="standup-42")


@pytest.mark.parametrize(
    "garbage",
    [
        "garbage",
        "a.b.c",
        "....",
        "eyJhbGciOiJIUzI1NiJ9.not-base64!.sig",
        _b64(b"[1,2]") + "." + _b64(b"{}") + ".x",
        _b64(b'{"alg":"HS256"}') + "." + _b64(b"[1]") + ".x",
        "x" * 10_000,
    ],
)
def test_garbage_strings(garbage: str) -> None:
    # GIVEN a string that is not a JWT / WHEN verified / THEN TokenInvalid
    with pytest.raises(TokenInvalid):
        _verifier().verify(garbage, session_id="standup-42")


def test_errors_never_contain_the_token_or_secret() -> None:
    # GIVEN tokens refused for several reasons
    cases = [
        (_mint(secret=OTHER_SECRET), T0),
        (_mint(), T0 + 10_000),
        (_mint(session_id="elsewhere"), T0),
        (_mint()[:-3], T0),
    ]
    for token, at in cases:
        # WHEN each is verified
        with pytest.raises(AuthError) as info:
            _verifier(at).verify(token, session_id="standup-42")
        # THEN neither the token (or its signature) nor a secret shows in the error
        text = f"{info.value} {info.value!r}"
        assert token not in text and token.split(".")[-1] not in text
        assert SECRET not in text and OTHER_SECRET not in text
        # and PyJWT's exception (which could carry details) is not chained
        assert info.value.__cause__ is None
    assert SECRET not in repr(_verifier())


# --- configuration -------------------------------------------------------------


def test_short_secret_is_refused() -> None:
    # GIVEN a 31-byte secret / WHEN minting or building a verifier / THEN ConfigError
    short = "x" * 31
    with pytest.raises(ConfigError, match="32 bytes"):
        mint_token(secret=short, session_id="s", user_id="u", name="n")
    with pytest.raises(ConfigError, match="32 bytes"):
        TokenVerifier(secret=short)
    # and 32 bytes is enough
    assert mint_token(secret="x" * 32, session_id="s", user_id="u", name="n")


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"secret": SECRET, "jwks_url": "https://example.com/jwks.json"},
        {"jwks_url": "ftp://example.com/jwks.json"},
        {"jwks_url": "http://example.com/jwks.json"},
        {"secret": SECRET, "audience": ""},
        {"secret": SECRET, "leeway": -1},
    ],
)
def test_verifier_configuration_errors(kwargs: dict[str, Any]) -> None:
    # GIVEN a bad key source or option / WHEN building / THEN ConfigError
    with pytest.raises(ConfigError):
        TokenVerifier(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_ttl_seconds": 0},
        {"max_ttl_seconds": -1},
        {"max_ttl_seconds": True},
        {"max_ttl_seconds": float("nan")},
        {"max_ttl_seconds": float("inf")},
        {"iat_leeway": -1},
        {"iat_leeway": float("nan")},
        {"leeway": float("inf")},
    ],
)
def test_lifetime_options_are_checked(kwargs: dict[str, Any]) -> None:
    # GIVEN a maximum lifetime or a leeway that is not a sensible number
    # WHEN building a verifier / THEN ConfigError
    with pytest.raises(ConfigError):
        TokenVerifier(secret=SECRET, **kwargs)


@pytest.mark.parametrize(
    "url",
    [
        "http://idp.example/.well-known/jwks.json",
        "HTTP://idp.example/jwks.json",
        "https:///jwks.json",
        "https:jwks.json",
        "ftp://idp.example/jwks.json",
        "idp.example/jwks.json",
        "//idp.example/jwks.json",
    ],
)
def test_a_jwks_url_must_be_https(url: str) -> None:
    # GIVEN a JWKS URL that is plain http (keys anyone on the path could swap), or no URL
    # WHEN building a verifier / THEN ConfigError naming https, before any fetch
    with pytest.raises(ConfigError, match="https://"):
        TokenVerifier(jwks_url=url)


def test_an_https_jwks_url_and_an_injected_client_are_accepted(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    # GIVEN an https URL (any case of the scheme) / WHEN building / THEN accepted
    assert TokenVerifier(jwks_url="HTTPS://idp.example/jwks.json")
    # AND a ready client may still be injected (tests, a shared cache): no URL to check
    verifier = TokenVerifier(jwks_client=LocalJWKClient(_jwks(rsa1=rsa_key)), clock=lambda: T0)
    token = jwt.encode(_claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa1"})
    assert verifier.verify(token, session_id="standup-42").participant.user_id == "u-ada"


def test_a_deployment_with_an_http_jwks_url_cannot_verify() -> None:
    # GIVEN settings read from an environment naming a plain-http JWKS URL
    settings = Settings.from_env({"REJOIN_JWKS_URL": "http://idp.example/jwks.json"})
    # WHEN the runtime builds its verifier / THEN ConfigError (a 503, never an open door)
    with pytest.raises(ConfigError, match="https://"):
        Runtime(settings).verifier()


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"session_id": "no spaces"}, InvalidSessionId),
        ({"user_id": "u ada"}, InvalidParticipant),
        ({"name": "\t"}, InvalidParticipant),
        ({"ttl_seconds": 0}, ValueError),
    ],
)
def test_mint_validates_its_input(overrides: dict[str, Any], error: type[Exception]) -> None:
    # GIVEN bad input / WHEN minting / THEN the matching error, and no token
    with pytest.raises(error):
        _mint(**overrides)


def test_participant_rules() -> None:
    # GIVEN names and ids at and past the limits
    # THEN the allowed ones construct (stripped) and the others raise
    assert Participant("a.b@c:d_e-f", " Zoë 👩‍💻 ").name == "Zoë 👩‍💻"
    assert Participant("u" * 128, "n" * 80).user_id == "u" * 128
    for user_id, name in [("u" * 129, "n"), ("", "n"), ("u", "n" * 81), ("u", "a\x00b")]:
        with pytest.raises(InvalidParticipant):
            Participant(user_id, name)


# --- JWKS (RS256/ES256, e.g. Cognito) ------------------------------------------


class LocalJWKClient(PyJWKClient):
    """A real PyJWKClient whose key set comes from memory instead of the network."""

    def __init__(self, jwks: dict[str, Any]) -> None:
        super().__init__("https://keys.invalid/jwks.json")
        self._jwks = jwks
        self.fetches = 0

    def fetch_data(self) -> Any:
        self.fetches += 1
        return self._jwks


def _to_jwk_dict(public_key: Any) -> dict[str, Any]:
    if isinstance(public_key, rsa.RSAPublicKey):
        return json.loads(RSAAlgorithm.to_jwk(public_key))  # type: ignore[no-any-return]
    return json.loads(ECAlgorithm.to_jwk(public_key))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _jwks(**keys: Any) -> dict[str, Any]:
    out = []
    for kid, private in keys.items():
        jwk = _to_jwk_dict(private.public_key())
        jwk["kid"] = kid
        out.append(jwk)
    return {"keys": out}


def test_jwks_verifies_rs256_and_es256(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    # GIVEN a key set with an RSA and an EC key, served from memory
    client = LocalJWKClient(_jwks(rsa1=rsa_key, ec1=ec_key))
    verifier = TokenVerifier(jwks_client=client, clock=lambda: T0 + 1)
    rs = jwt.encode(_claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa1"})
    es = jwt.encode(_claims(sub="u-bob"), ec_key, algorithm="ES256", headers={"kid": "ec1"})
    # WHEN tokens signed by each are verified
    # THEN both pass, naming their subjects
    assert verifier.verify(rs, session_id="standup-42").participant.user_id == "u-ada"
    assert verifier.verify(es, session_id="standup-42").participant.user_id == "u-bob"


def test_jwks_refuses_unknown_kid_foreign_key_and_hmac_confusion(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    # GIVEN a verifier trusting one RSA key
    client = LocalJWKClient(_jwks(rsa1=rsa_key))
    verifier = TokenVerifier(jwks_client=client, clock=lambda: T0 + 1)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    unknown_kid = jwt.encode(_claims(), rsa_key, algorithm="RS256", headers={"kid": "nope"})
    foreign = jwt.encode(_claims(), stranger, algorithm="RS256", headers={"kid": "rsa1"})
    # an HS256 token "signed" with the public key: the classic alg-confusion attack
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa1"}).encode())
    body = _b64(json.dumps(_claims()).encode())
    mac = hmac.new(pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
    confused = f"{header}.{body}.{_b64(mac)}"
    # WHEN each is verified / THEN all are refused
    for token in (unknown_kid, foreign, confused):
        with pytest.raises(TokenInvalid):
            verifier.verify(token, session_id="standup-42")


def test_jwks_url_builds_the_client_lazily(
    monkeypatch: pytest.MonkeyPatch, rsa_key: rsa.RSAPrivateKey
) -> None:
    # GIVEN PyJWKClient replaced by an in-memory one that records its URL
    built: list[str] = []

    class Recording(LocalJWKClient):
        def __init__(self, uri: str, **kwargs: Any) -> None:
            built.append(uri)
            super().__init__(_jwks(rsa1=rsa_key))

    monkeypatch.setattr(tokens, "PyJWKClient", Recording)
    url = "https://cognito-idp.us-east-1.amazonaws.com/pool/.well-known/jwks.json"
    # WHEN a verifier is built with a JWKS URL
    verifier = TokenVerifier(jwks_url=url, clock=lambda: T0 + 1)
    # THEN no client exists until the first verify, and then exactly one for that URL
    assert built == []
    token = jwt.encode(_claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa1"})
    for _ in range(3):
        assert verifier.verify(token, session_id="standup-42").session_id == "standup-42"
    assert built == [url]


def test_jwks_fetch_failure_is_an_auth_error_not_invalid_token() -> None:
    # GIVEN a JWKS client whose fetch fails (network down)
    class Down(PyJWKClient):
        def fetch_data(self) -> Any:
            raise jwt.PyJWKClientConnectionError("connection refused")

    verifier = TokenVerifier(jwks_client=Down("https://keys.invalid"), clock=lambda: T0)
    token = jwt.encode(_claims(), "k" * 32, algorithm="HS256", headers={"kid": "x"})
    # WHEN a token is verified / THEN a plain AuthError says the keys are unavailable
    with pytest.raises(AuthError, match="signing keys") as info:
        verifier.verify(token, session_id="standup-42")
    assert not isinstance(info.value, TokenInvalid)


# --- the CLI ---------------------------------------------------------------------


def test_cli_prints_a_verifiable_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the secret in an environment variable
    monkeypatch.setenv("MY_SECRET", SECRET)
    # WHEN the CLI mints a token
    code = main(
        ["--session", "demo", "--user", "u-1", "--name", "Ada", "--secret-env", "MY_SECRET"]
    )
    out = capsys.readouterr()
    # THEN it prints one token that verifies for that session and user
    assert code == 0
    grant = TokenVerifier(secret=SECRET).verify(out.out.strip(), session_id="demo")
    assert grant.participant == Participant("u-1", "Ada")


def test_cli_without_the_secret_fails_clearly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN no secret in the environment
    monkeypatch.delenv("REJOIN_TOKEN_SECRET", raising=False)
    # WHEN the CLI runs
    code = main(["--session", "demo", "--user", "u-1", "--name", "Ada"])
    out = capsys.readouterr()
    # THEN it exits 2, names the variable, and prints no token
    assert code == 2
    assert "REJOIN_TOKEN_SECRET" in out.err
    assert out.out == ""


def test_cli_refuses_bad_input(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a secret but a malformed session id / WHEN the CLI runs
    monkeypatch.setenv("REJOIN_TOKEN_SECRET", SECRET)
    code = main(["--session", "bad id", "--user", "u-1", "--name", "Ada"])
    # THEN it exits 2 with the reason
    assert code == 2
    assert "session id" in capsys.readouterr().err


def test_module_is_runnable() -> None:
    # GIVEN the package on the path and the secret in the environment
    env = {**os.environ, "PYTHONPATH": str(ROOT / "shared"), "REJOIN_TOKEN_SECRET": SECRET}
    # WHEN `python -m rejoin.tokens` runs
    done = subprocess.run(
        [sys.executable, "-m", "rejoin.tokens", "--session", "s1", "--user", "u", "--name", "N"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # THEN it prints a token for that session
    assert done.returncode == 0, done.stderr
    assert TokenVerifier(secret=SECRET).verify(done.stdout.strip(), session_id="s1")


def test_cli_refuses_a_ttl_over_the_maximum_unless_the_environment_raises_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the secret, and no maximum lifetime in the environment (so 12 h)
    monkeypatch.setenv("REJOIN_TOKEN_SECRET", SECRET)
    monkeypatch.delenv("REJOIN_TOKEN_MAX_TTL_SECONDS", raising=False)
    args = ["--session", "demo", "--user", "u-1", "--name", "Ada", "--ttl", str(24 * HOUR)]
    # WHEN the CLI mints a day-long token / THEN it exits 2 naming the maximum, no token
    assert main(args) == 2
    out = capsys.readouterr()
    assert f"at most {DEFAULT_MAX_TTL_SECONDS}" in out.err and out.out == ""
    # AND with the deployment's variable raised to two days, it mints one
    monkeypatch.setenv("REJOIN_TOKEN_MAX_TTL_SECONDS", str(48 * HOUR))
    assert main(args) == 0
    token = capsys.readouterr().out.strip()
    grant = TokenVerifier(secret=SECRET, max_ttl_seconds=48 * HOUR).verify(token, session_id="demo")
    assert grant.expires_at - grant.issued_at == 24 * HOUR
    # AND a malformed variable is a clear error
    monkeypatch.setenv("REJOIN_TOKEN_MAX_TTL_SECONDS", "a day")
    assert main(args) == 2
    assert "REJOIN_TOKEN_MAX_TTL_SECONDS" in capsys.readouterr().err


# --- settings: the deployment's lifetime options reach the verifier ---------------------


def test_settings_defaults_agree_with_the_token_module() -> None:
    # GIVEN settings from an empty environment
    settings = Settings.from_env({})
    # THEN the lifetime options are the documented defaults (12 h, 60 s)
    assert settings.token_max_ttl_seconds == DEFAULT_MAX_TTL_SECONDS == 12 * HOUR
    assert settings.token_iat_leeway_seconds == DEFAULT_IAT_LEEWAY_SECONDS == 60


def test_the_runtime_verifier_uses_the_configured_lifetime_options() -> None:
    # GIVEN a deployment allowing 10-minute tokens and no iat leeway
    settings = Settings.from_env(
        {
            "REJOIN_TOKEN_SECRET": SECRET,
            "REJOIN_TOKEN_MAX_TTL_SECONDS": "600",
            "REJOIN_TOKEN_IAT_LEEWAY_SECONDS": "0",
        }
    )
    verifier = Runtime(settings, clock=lambda: T0).verifier()
    # WHEN tokens at the limit, over it, and issued a second ahead are verified
    # THEN only the first passes
    assert verifier.verify(_signed(exp=int(T0) + 600), session_id="standup-42")
    with pytest.raises(TokenInvalid, match="maximum of 600 seconds"):
        verifier.verify(_signed(exp=int(T0) + 601), session_id="standup-42")
    with pytest.raises(TokenInvalid, match="issued in the future"):
        verifier.verify(_signed(iat=int(T0) + 1, exp=int(T0) + 60), session_id="standup-42")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REJOIN_TOKEN_MAX_TTL_SECONDS", "0"),
        ("REJOIN_TOKEN_MAX_TTL_SECONDS", "12h"),
        ("REJOIN_TOKEN_MAX_TTL_SECONDS", "true"),
        ("REJOIN_TOKEN_IAT_LEEWAY_SECONDS", "-1"),
        ("REJOIN_TOKEN_IAT_LEEWAY_SECONDS", "1.5"),
    ],
)
def test_malformed_lifetime_settings_are_config_errors(name: str, value: str) -> None:
    # GIVEN a malformed variable / WHEN the settings are read / THEN ConfigError naming it
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_a_jwks_token_is_held_to_the_same_lifetime_rules(rsa_key: rsa.RSAPrivateKey) -> None:
    # GIVEN an identity provider's key set, and RS256 tokens valid for a hundred years
    # or issued ten years ahead
    verifier = TokenVerifier(jwks_client=LocalJWKClient(_jwks(rsa1=rsa_key)), clock=lambda: T0)
    long_lived = _claims(exp=int(T0) + 100 * YEAR)
    future = _claims(iat=int(T0) + 10 * YEAR, exp=int(T0) + 10 * YEAR + 600)
    for claims, reason in ((long_lived, "maximum"), (future, "issued in the future")):
        token = jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": "rsa1"})
        # WHEN verified / THEN refused like an HS256 token would be
        with pytest.raises(TokenInvalid, match=reason):
            verifier.verify(token, session_id="standup-42")
