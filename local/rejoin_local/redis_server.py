"""A throwaway ``redis-server`` on a free loopback port, for the tests and the benchmarks.

:class:`PrivateRedis` runs ``redis-server --port <free> --bind 127.0.0.1
--save '' --appendonly no`` (no persistence) with its working directory and
logs in a directory the caller gives, waits until it answers PING, and
terminates it on :meth:`~PrivateRedis.stop`. A port that was free a moment ago
may be taken before Redis binds it, so a start is tried three times, each
with a fresh port. Nothing else knows the server, so its owner may flush it.

Without a ``redis-server`` binary it either refuses (the default) or, with
``embedded_fallback=True``, serves the embedded fakeredis store
(:class:`~rejoin_local.upstash_rest.EmbeddedRedis`) instead, owned just the
same; :attr:`PrivateRedis.embedded` says which one runs.

::

    with PrivateRedis(workdir) as private:
        client = redis.Redis.from_url(private.url)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import redis

if TYPE_CHECKING:
    from .upstash_rest import EmbeddedRedis

__all__ = ["PrivateRedis", "RedisStartError", "stop_process"]

_ATTEMPTS = 3
_PING_TIMEOUT = 10.0


class RedisStartError(RuntimeError):
    """No ``redis-server`` on PATH (and no fallback allowed), or it would not start."""


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a child process (kill it if it is still there after 5 s) and reap it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers_ping(url: str, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False  # exited: most likely the port was taken meanwhile
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            if client.ping():
                return True
        except redis.ConnectionError:
            time.sleep(0.02)
        finally:
            client.close()
    return False


class PrivateRedis:
    """A ``redis-server`` of our own (or the embedded store), started and stopped here.

    Args:
        workdir: Redis' working directory; each attempt logs to
            ``redis-<port>.log`` in it. It must exist and is left in place.
        embedded_fallback: without ``redis-server`` on PATH, serve the embedded
            fakeredis store instead of raising :class:`RedisStartError`.
    """

    def __init__(self, workdir: str | os.PathLike[str], *, embedded_fallback: bool = False):
        self.workdir = Path(workdir)
        self._embedded_fallback = embedded_fallback
        self._proc: subprocess.Popen[bytes] | None = None
        self._embedded: EmbeddedRedis | None = None
        self._url: str | None = None

    @property
    def url(self) -> str | None:
        """``redis://127.0.0.1:<port>/0`` while running, else None."""
        return self._url

    @property
    def embedded(self) -> bool:
        """True when the embedded fakeredis store runs instead of ``redis-server``."""
        return self._embedded is not None

    def start(self) -> str:
        """Start the server (idempotent) and return its URL.

        Raises:
            RedisStartError: no ``redis-server`` on PATH (without the fallback),
                or it did not answer PING in any of the attempts.
        """
        if self._url is not None:
            return self._url
        binary = shutil.which("redis-server")
        if binary is None:
            if not self._embedded_fallback:
                raise RedisStartError("redis-server is not on PATH (apt-get install redis-server)")
            from .upstash_rest import EmbeddedRedis

            embedded = EmbeddedRedis()
            self._url = embedded.start()
            self._embedded = embedded
            return self._url
        for _attempt in range(_ATTEMPTS):
            port = _free_port()
            url = f"redis://127.0.0.1:{port}/0"
            args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.workdir)]
            args += ["--save", "", "--appendonly", "no"]  # a throwaway server: no persistence
            with (self.workdir / f"redis-{port}.log").open("wb") as log:
                proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
            try:
                up = _answers_ping(url, proc, _PING_TIMEOUT)
            except BaseException:
                stop_process(proc)
                raise
            if up:
                self._proc, self._url = proc, url
                return url
            stop_process(proc)
        raise RedisStartError(f"could not start redis-server (logs in {self.workdir})")

    def stop(self) -> None:
        """Stop the server (idempotent); its data is gone."""
        proc, embedded = self._proc, self._embedded
        self._proc = self._embedded = None
        self._url = None
        if proc is not None:
            stop_process(proc)
        if embedded is not None:
            embedded.stop()

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
