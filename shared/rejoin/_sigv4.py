"""AWS Signature Version 4 for the few requests rejoin signs itself, and their credentials.

:class:`Signer` signs one request in a few microseconds: the per-day signing
key is derived once per (secret, day) and reused, and only the headers the
service needs are signed (``host``, ``x-amz-date``, ``x-amz-security-token``).
The canonical request follows botocore's ``SigV4Auth`` exactly (the path is
normalised and URI-encoded once more, as for every service but S3), so a
request signed here verifies wherever one signed by boto3 does;
``tests/test_sender.py`` checks this against botocore's own signer.

:class:`CredentialSource` reads the credentials Lambda puts in the environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``), and
reads them again at most once a second, so rotated values are picked up.
Without them (SnapStart functions, which get container
credentials; a developer's profile) it falls back to botocore's default
credential chain, resolved once and refreshed by botocore before it expires.
botocore is imported only then.

This module imports only the standard library.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from .errors import ConfigError

__all__ = ["EMPTY_SHA256", "CredentialSource", "Credentials", "Signer", "canonical_path"]

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_ALGORITHM = "AWS4-HMAC-SHA256"


@dataclass(frozen=True, slots=True)
class Credentials:
    """One set of AWS credentials. The secret and the token never show in ``repr``."""

    access_key: str
    secret_key: str = field(repr=False)
    token: str | None = field(default=None, repr=False)


def _remove_dot_segments(path: str) -> str:
    # RFC 3986 section 5.2.4, plus what AWS also requires (and botocore does):
    # empty segments ("//") collapse.
    out: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if out:
                out.pop()
        elif segment and segment != ".":
            out.append(segment)
    first = "/" if path.startswith("/") else ""
    last = "/" if path.endswith("/") and out else ""
    return first + "/".join(out) + last


def canonical_path(path: str) -> str:
    """The canonical URI of a request path as sent (already percent-encoded).

    Every service but S3 encodes the path a second time: ``%3D`` becomes
    ``%253D``, and ``@`` becomes ``%40``.
    """
    return quote(_remove_dot_segments(path) if path else "/", safe="/~")


class Signer:
    """Signs requests to one service in one region with SigV4 (header auth).

    Args:
        region: the region the request goes to, e.g. ``us-east-1``.
        service: the signing name, e.g. ``execute-api``.
    """

    def __init__(self, region: str, service: str) -> None:
        self.region = region
        self.service = service
        self._scope_tail = f"/{region}/{service}/aws4_request"
        # (secret, day, signing key, its HMAC's inner and outer hashes): one
        # entry, the key changes once a day. Replaced whole, so threads reading
        # it never see half an update.
        self._key: tuple[str, str, bytes, Any, Any] | None = None
        self._stamp: tuple[int, str] = (-1, "")  # X-Amz-Date of the current second
        self._token: tuple[str | None, str] = (None, "")

    def signing_key(self, secret_key: str, day: str) -> bytes:
        """The derived key for ``day`` (``YYYYMMDD``); computed once per secret and day."""
        return self._keyed(secret_key, day)[2]

    def _keyed(self, secret_key: str, day: str) -> tuple[str, str, bytes, Any, Any]:
        cached = self._key
        if cached is not None and cached[0] == secret_key and cached[1] == day:
            return cached
        key = _hmac(("AWS4" + secret_key).encode(), day)
        for part in (self.region, self.service, "aws4_request"):
            key = _hmac(key, part)
        # HMAC-SHA256 with this key, its inner and outer hashes started once:
        # copying them is ~4x cheaper than hmac.digest under OpenSSL 3.
        padded = key.ljust(64, b"\0")
        inner = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
        outer = hashlib.sha256(bytes(b ^ 0x5C for b in padded))
        cached = self._key = (secret_key, day, key, inner, outer)
        return cached

    def sign(
        self,
        method: str,
        host: str,
        path: str,
        payload_sha256: str,
        credentials: Credentials,
        now: float,
        *,
        canonical_uri: str | None = None,
        query: str = "",
    ) -> list[tuple[str, str]]:
        """The headers that sign the request: ``X-Amz-Date``, the session token, ``Authorization``.

        Args:
            method: the HTTP method.
            host: the ``Host`` header exactly as sent (with a non-default port).
            path: the request path as sent (percent-encoded).
            payload_sha256: the hex SHA-256 of the body (:data:`EMPTY_SHA256` for none).
            credentials: who signs.
            now: the signing time, seconds since the epoch.
            canonical_uri: ``canonical_path(path)`` when the caller has it already.
            query: the canonical query string (already sorted and encoded).

        Returns:
            ``(name, value)`` pairs to add to the request.
        """
        second = int(now)
        stamp = self._stamp
        if stamp[0] != second:
            stamp = self._stamp = (second, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(second)))
        amz_date = stamp[1]
        day = amz_date[:8]
        token = credentials.token
        if canonical_uri is None:
            canonical_uri = canonical_path(path)
        if token:
            headers_block = (
                f"host:{_trim(host)}\nx-amz-date:{amz_date}\n"
                f"x-amz-security-token:{self._trimmed_token(token)}\n"
            )
            signed = "host;x-amz-date;x-amz-security-token"
        else:
            headers_block = f"host:{_trim(host)}\nx-amz-date:{amz_date}\n"
            signed = "host;x-amz-date"
        canonical_request = (
            f"{method}\n{canonical_uri}\n{query}\n{headers_block}\n{signed}\n{payload_sha256}"
        )
        scope = day + self._scope_tail
        string_to_sign = (
            f"{_ALGORITHM}\n{amz_date}\n{scope}\n"
            f"{hashlib.sha256(canonical_request.encode()).hexdigest()}"
        )
        _, _, _, inner_start, outer_start = self._keyed(credentials.secret_key, day)
        inner = inner_start.copy()
        inner.update(string_to_sign.encode())
        outer = outer_start.copy()
        outer.update(inner.digest())
        signature = outer.hexdigest()
        headers = [("X-Amz-Date", amz_date)]
        if token:
            headers.append(("X-Amz-Security-Token", token))
        headers.append(
            (
                "Authorization",
                f"{_ALGORITHM} Credential={credentials.access_key}/{scope}, "
                f"SignedHeaders={signed}, Signature={signature}",
            )
        )
        return headers

    def _trimmed_token(self, token: str) -> str:
        # A session token is ~1 KB: trim it once, not per request.
        cached = self._token
        if cached[0] is not token:
            cached = self._token = (token, _trim(token))
        return cached[1]


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.digest(key, message.encode(), "sha256")


def _trim(value: str) -> str:
    # SigV4 "Trimall": no outer spaces, runs of spaces become one.
    return " ".join(value.split())


class CredentialSource:
    """The credentials of this process, as boto3 would find them.

    The environment first (what Lambda sets for the function's role), read
    again at most every ``recheck_every`` seconds so rotated values are picked
    up; else botocore's default chain (container credentials on SnapStart,
    ``AWS_PROFILE``, ...), resolved once and refreshed by botocore before it
    expires. Safe to share between threads and event loops.

    Args:
        clock: seconds (any epoch); when it moves ``recheck_every`` away from
            the last read, the environment is read again.
        recheck_every: seconds between two reads of the environment.
    """

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, recheck_every: float = 1.0
    ) -> None:
        self._clock = clock
        self._recheck_every = recheck_every
        self._env_read_at: float | None = None
        self._env_credentials: Credentials | None = None
        self._chain: Any = None  # botocore Credentials or RefreshableCredentials
        self._chain_frozen: tuple[Any, Credentials] | None = None
        self._chain_lock = threading.Lock()

    async def get(self) -> Credentials:
        """The credentials to sign the next request with.

        Raises:
            ConfigError: no credentials anywhere.
        """
        now = self._clock()
        if self._env_read_at is None or abs(now - self._env_read_at) >= self._recheck_every:
            self._read_env(now)
        cached = self._env_credentials
        if cached is not None:
            return cached
        return await self._from_chain()

    def _read_env(self, now: float) -> None:
        env = os.environ
        key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        token = env.get("AWS_SESSION_TOKEN") or None
        cached = self._env_credentials
        if not (key and secret):
            cached = None
        elif cached is None or (key, secret, token) != (
            cached.access_key,
            cached.secret_key,
            cached.token,
        ):
            cached = Credentials(key, secret, token)
        self._env_credentials = cached
        self._env_read_at = now

    async def _from_chain(self) -> Credentials:
        chain = self._chain
        if chain is None:
            # Resolving may call the container credentials endpoint: not on the loop.
            chain = await asyncio.to_thread(self._resolve_chain)
        refresh_needed = getattr(chain, "refresh_needed", None)
        if refresh_needed is not None and refresh_needed():
            frozen = await asyncio.to_thread(chain.get_frozen_credentials)
        else:
            frozen = chain.get_frozen_credentials()
        last = self._chain_frozen
        if last is not None and last[0] == frozen:
            return last[1]
        credentials = Credentials(frozen.access_key, frozen.secret_key, frozen.token or None)
        self._chain_frozen = (frozen, credentials)
        return credentials

    def _resolve_chain(self) -> Any:
        with self._chain_lock:
            if self._chain is None:
                import botocore.session

                found = botocore.session.get_session().get_credentials()
                if found is None:
                    raise ConfigError(
                        "no AWS credentials: on Lambda they come from the function's role; "
                        "elsewhere set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
                    )
                self._chain = found
            return self._chain
