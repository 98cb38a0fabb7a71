"""Serving an ASGI app with uvicorn in a background thread (the gateway and the Upstash endpoint).

- :func:`bind` opens the listening socket (port 0: a free one), so the port is
  known before uvicorn starts;
- :func:`client_address` / :func:`base_url` say where a client on this machine
  connects (a wildcard address becomes loopback);
- :func:`serve_uvicorn` runs ``uvicorn.Server`` on that socket in a daemon
  thread, waits until it accepts, and stops it cleanly when the block exits.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import uvicorn

__all__ = ["Served", "base_url", "bind", "client_address", "serve_uvicorn"]

_START_TIMEOUT = 15.0
_FORCE_EXIT_TIMEOUT = 5.0


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def client_address(sock: socket.socket) -> tuple[str, int]:
    """The host and port a client on this machine connects to."""
    host, port = sock.getsockname()[:2]
    if host == "0.0.0.0":
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, port


def base_url(host: str, port: int, scheme: str = "http") -> str:
    """``scheme://host:port``, an IPv6 host in brackets."""
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}"


@dataclass(frozen=True, slots=True)
class Served:
    """A server started by :func:`serve_uvicorn`.

    Attributes:
        host: the host clients connect to (see :func:`client_address`).
        port: the bound port.
        server: the uvicorn server.
    """

    host: str
    port: int
    server: uvicorn.Server

    def url(self, scheme: str = "http") -> str:
        """``scheme://host:port`` (see :func:`base_url`)."""
        return base_url(self.host, self.port, scheme)


@contextlib.contextmanager
def serve_uvicorn(
    config: uvicorn.Config,
    host: str,
    port: int,
    *,
    thread_name: str,
    description: str,
    stop_timeout: float,
    before_stop: Callable[[], None] | None = None,
) -> Iterator[Served]:
    """Serve ``config`` on ``host:port`` in a daemon thread until the block exits.

    Args:
        config: the uvicorn config (the app and its options).
        host: the interface to bind.
        port: the port, 0 for a free one.
        thread_name: the server thread's name.
        description: what is served, for the start-failure message.
        stop_timeout: seconds to wait for a graceful stop before forcing it
            (then up to 5 more seconds).
        before_stop: called first when the block exits (e.g. to release
            requests that would hold up the graceful stop).

    Yields:
        Where the server listens, once it accepts connections.

    Raises:
        OSError: ``host:port`` cannot be bound.
        RuntimeError: the server did not start within 15 seconds (or died).
    """
    server = uvicorn.Server(config)
    sock = bind(host, port)
    client_host, bound_port = client_address(sock)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=thread_name, daemon=True
    )
    try:
        thread.start()
        deadline = time.monotonic() + _START_TIMEOUT
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{description} failed to start")
            time.sleep(0.005)
        yield Served(host=client_host, port=bound_port, server=server)
    finally:
        if before_stop is not None:
            before_stop()
        server.should_exit = True
        thread.join(timeout=stop_timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout=_FORCE_EXIT_TIMEOUT)
        sock.close()
