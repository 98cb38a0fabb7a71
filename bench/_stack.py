"""What the benchmarks run against: a private Redis and the Upstash-compatible endpoint.

- :func:`private_redis` starts ``redis-server`` on a free loopback port with no
  persistence (``--save '' --appendonly no``) with
  :class:`rejoin_local.redis_server.PrivateRedis`, as ``tests/conftest.py`` does.
  The benchmarks never touch any other Redis (a shared one may be running on
  6379: it is not ours).
- :func:`upstash_endpoint` serves ``rejoin_local.upstash_rest`` in front of it
  in a child process (its own interpreter, so its work does not share the
  benchmark's GIL, as a real Upstash is a separate machine), and reads its
  request counters over ``GET /_rejoin/stats``.
- :class:`CommandStats` reads ``INFO commandstats`` of the private Redis, to
  count what ran inside Redis (the commands a Lua script calls included).
"""

from __future__ import annotations

import contextlib
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from rejoin_local.redis_server import PrivateRedis, RedisStartError
from rejoin_local.upstash_process import EndpointStartError, endpoint_process

REPO_ROOT = Path(__file__).resolve().parents[1]


class StackError(RuntimeError):
    """The private Redis or the endpoint could not be started."""


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """Start a throwaway ``redis-server``; yields its ``redis://`` URL.

    Raises:
        StackError: no ``redis-server`` on PATH, or it would not start.
    """
    with tempfile.TemporaryDirectory(prefix="rejoin-bench-redis-") as workdir:
        private = PrivateRedis(workdir)
        try:
            url = private.start()
        except RedisStartError as exc:
            raise StackError(str(exc)) from None
        try:
            yield url
        finally:
            private.stop()


@dataclass
class Endpoint:
    """The Upstash-compatible endpoint, running in a child process."""

    url: str
    token: str
    redis_url: str
    _http: httpx.Client

    def stats(self) -> dict[str, Any]:
        """``{"requests": {path: n}, "commands": {NAME: n}, "total_requests": n, ...}``."""
        response = self._http.get(f"{self.url}/_rejoin/stats")
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats

    def reset(self) -> None:
        """Zero the endpoint's counters (the stats routes themselves are not counted)."""
        self._http.post(f"{self.url}/_rejoin/stats/reset").raise_for_status()


@contextlib.contextmanager
def upstash_endpoint(redis_url: str) -> Iterator[Endpoint]:
    """Serve ``python -m rejoin_local.upstash_rest`` in front of ``redis_url``.

    The child is started and stopped as ``make dev`` does it
    (:func:`rejoin_local.upstash_process.endpoint_process`).

    Raises:
        StackError: the endpoint did not start.
    """
    token = secrets.token_urlsafe(16)
    with contextlib.ExitStack() as stack:
        try:
            running = stack.enter_context(
                endpoint_process("127.0.0.1", 0, redis_url=redis_url, token=token)
            )
        except EndpointStartError as exc:
            raise StackError(str(exc)) from None
        http = stack.enter_context(
            httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=10.0)
        )
        yield Endpoint(url=running.url, token=token, redis_url=redis_url, _http=http)


class CommandStats:
    """Counts of commands Redis executed (``INFO commandstats``), as deltas.

    Commands a Lua script runs are counted too, so this shows what a script
    costs inside Redis, beyond the one EVALSHA the endpoint sees.
    """

    def __init__(self, redis_url: str) -> None:
        self._client = redis.Redis.from_url(redis_url)

    def snapshot(self) -> dict[str, int]:
        """Calls per command name (lower case), the INFO calls excluded."""
        info = self._client.info("commandstats")
        out: dict[str, int] = {}
        for key, value in info.items():
            name = key.removeprefix("cmdstat_")
            if name != "info":
                out[name] = int(value["calls"])
        return out

    def usec(self) -> dict[str, tuple[int, int]]:
        """(calls, total microseconds) per command name, as Redis times them."""
        info = self._client.info("commandstats")
        return {
            key.removeprefix("cmdstat_"): (int(value["calls"]), int(value["usec"]))
            for key, value in info.items()
        }

    @staticmethod
    def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        """Commands run between two snapshots."""
        names = set(before) | set(after)
        diff = {n: after.get(n, 0) - before.get(n, 0) for n in names}
        return {n: d for n, d in sorted(diff.items()) if d}

    def script_flush(self) -> None:
        """Drop Redis' script cache (the next EVALSHA misses)."""
        self._client.script_flush()

    def client(self) -> redis.Redis:
        """The redis-py client on the private Redis (bytes replies)."""
        return self._client

    def close(self) -> None:
        self._client.close()
