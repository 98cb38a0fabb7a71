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

:class:`PrivateRedisCluster` starts a Redis Cluster of three (by default)
primaries the same way (``--cluster-enabled yes``, joined with ``redis-cli
--cluster create``, no replicas), for the hash-slot tests of the TCP transport.

::

    with PrivateRedis(workdir) as private:
        client = redis.Redis.from_url(private.url)
    with PrivateRedisCluster(workdir) as cluster:
        client = redis.cluster.RedisCluster.from_url(cluster.url)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

if TYPE_CHECKING:
    from .upstash_rest import EmbeddedRedis

__all__ = [
    "PrivateRedis",
    "PrivateRedisCluster",
    "RedisStartError",
    "TlsFiles",
    "stop_process",
]

_ATTEMPTS = 3
_PING_TIMEOUT = 10.0


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS-only :class:`PrivateRedis`."""

    cert: Path
    key: Path
    ca: Path


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


def _answers_ping(url: str, proc: subprocess.Popen[bytes], timeout: float, **options: Any) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False  # exited: most likely the port was taken meanwhile
        client = redis.Redis.from_url(
            url, socket_connect_timeout=0.5, socket_timeout=0.5, **options
        )
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
        tls: serve TLS only (``rediss://``), with these PEM files: the server's
            certificate, its key, and the CA that signed it (clients are not
            asked for certificates). Needs a ``redis-server`` built with TLS.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        embedded_fallback: bool = False,
        tls: TlsFiles | None = None,
    ):
        self.workdir = Path(workdir)
        self._embedded_fallback = embedded_fallback
        self._tls = tls
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
            if not self._embedded_fallback or self._tls is not None:
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
            ping_options: dict[str, Any] = {}
            if self._tls is not None:
                url = f"rediss://127.0.0.1:{port}/0"
                args[1:3] = ["--port", "0", "--tls-port", str(port)]
                args += ["--tls-cert-file", str(self._tls.cert)]
                args += ["--tls-key-file", str(self._tls.key)]
                args += ["--tls-ca-cert-file", str(self._tls.ca), "--tls-auth-clients", "no"]
                ping_options["ssl_ca_certs"] = str(self._tls.ca)
            with (self.workdir / f"redis-{port}.log").open("wb") as log:
                proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
            try:
                up = _answers_ping(url, proc, _PING_TIMEOUT, **ping_options)
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


def _free_cluster_port() -> int:
    # A cluster node also listens on its bus port, port + 10000.
    for _ in range(50):
        port = _free_port()
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RedisStartError("no free port pair (port, port + 10000) for a cluster node")


class PrivateRedisCluster:
    """A Redis Cluster of our own: ``nodes`` primaries on loopback, no replicas.

    Each node is ``redis-server --cluster-enabled yes`` without persistence,
    its files in ``workdir``; ``redis-cli --cluster create`` spreads the 16384
    slots over them, and :meth:`start` returns once every node reports
    ``cluster_state:ok``. Nothing else knows the cluster: its owner may flush it.

    Args:
        workdir: the nodes' working directory (node configs and logs); it must exist.
        nodes: how many primaries (at least 3, as ``redis-cli`` requires).
    """

    def __init__(self, workdir: str | os.PathLike[str], *, nodes: int = 3) -> None:
        if nodes < 3:
            raise ValueError("a Redis Cluster needs at least 3 primaries")
        self.workdir = Path(workdir)
        self._count = nodes
        self._procs: list[subprocess.Popen[bytes]] = []
        self._ports: list[int] = []

    @property
    def url(self) -> str | None:
        """``redis://127.0.0.1:<first node's port>/0`` while running, else None."""
        return f"redis://127.0.0.1:{self._ports[0]}/0" if self._ports else None

    @property
    def node_urls(self) -> list[str]:
        """Every node's ``redis://`` URL (empty when stopped)."""
        return [f"redis://127.0.0.1:{port}/0" for port in self._ports]

    @staticmethod
    def available() -> str | None:
        """None if a cluster can be started here, else why not."""
        missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
        return f"{' and '.join(missing)} not on PATH" if missing else None

    def start(self) -> str:
        """Start the nodes, create the cluster (idempotent) and return :attr:`url`.

        Raises:
            RedisStartError: a binary is missing, a node did not start, or the
                cluster did not become healthy in time (logs in ``workdir``).
        """
        if self._ports:
            return str(self.url)
        why = self.available()
        if why is not None:
            raise RedisStartError(why)
        try:
            for _ in range(self._count):
                self._start_node()
            self._create()
        except BaseException:
            self.stop()
            raise
        return str(self.url)

    def _start_node(self) -> None:
        for _attempt in range(_ATTEMPTS):
            port = _free_cluster_port()
            args = [
                str(shutil.which("redis-server")),
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--dir", str(self.workdir),
                "--save", "",
                "--appendonly", "no",
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", "5000",
            ]  # fmt: skip
            with (self.workdir / f"redis-cluster-{port}.log").open("wb") as log:
                proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
            if _answers_ping(f"redis://127.0.0.1:{port}/0", proc, _PING_TIMEOUT):
                self._procs.append(proc)
                self._ports.append(port)
                return
            stop_process(proc)
        raise RedisStartError(f"could not start a cluster node (logs in {self.workdir})")

    def _create(self) -> None:
        cli = str(shutil.which("redis-cli"))
        nodes = [f"127.0.0.1:{port}" for port in self._ports]
        done = subprocess.run(
            [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            tail = done.stdout.decode(errors="replace")[-500:] + done.stderr.decode()[-500:]
            raise RedisStartError(f"redis-cli --cluster create failed: {tail}")
        deadline = time.monotonic() + 30
        pending = list(self.node_urls)
        while pending and time.monotonic() < deadline:
            client = redis.Redis.from_url(pending[0], socket_timeout=2)
            try:
                info = client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
            finally:
                client.close()
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" in text:
                pending.pop(0)
            else:
                time.sleep(0.05)
        if pending:
            raise RedisStartError(f"the cluster did not become healthy (logs in {self.workdir})")

    def flush(self) -> None:
        """FLUSHALL and SCRIPT FLUSH on every node (the cluster is private)."""
        for url in self.node_urls:
            client = redis.Redis.from_url(url)
            try:
                client.flushall()
                client.script_flush()
            finally:
                client.close()

    def stop(self) -> None:
        """Stop every node (idempotent); the data is gone."""
        procs, self._procs, self._ports = self._procs, [], []
        for proc in procs:
            stop_process(proc)

    def __enter__(self) -> PrivateRedisCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
