"""The Upstash-compatible endpoint in a child process: what ``make dev`` runs by default.

On AWS, Upstash is another machine; locally, in the stack's own interpreter,
the endpoint's work would share one GIL with the gateway and the handlers
(``bench/README.md``, "Local stack under load", measures the difference).
:func:`endpoint_process` runs ``python -m rejoin_local.upstash_rest`` as a
child instead:

- started, and waited for until it answers (its URL is read from its
  output, then ``GET /`` must answer 200);
- in its own process group, so a Ctrl-C in the terminal reaches only the
  stack, which stops it last (the handlers' ``$disconnect`` still has its
  store while the sockets close);
- never orphaned: it holds the read end of a pipe whose write end only this
  process has (``--parent-fd``); when this process is gone, however it died,
  the child reads end-of-file and stops;
- watched: if it exits while the stack runs, ``on_exit`` is called with its
  exit status (the stack says so and stops).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EndpointProcess", "EndpointStartError", "endpoint_process"]

log = logging.getLogger("rejoin_local.upstash")

_LOCAL_DIR = Path(__file__).resolve().parents[1]
_URL_PREFIX = "UPSTASH_REDIS_REST_URL="


class EndpointStartError(RuntimeError):
    """The endpoint's process exited, or did not answer, before serving."""


@dataclass(frozen=True)
class EndpointProcess:
    """A running endpoint process.

    Attributes:
        url: its base URL, ``http://host:port``.
        pid: its process id.
    """

    url: str
    pid: int


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill ``proc`` (it did not stop when asked) and reap it."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=5)


def _lines(stream: Iterator[bytes], into: queue.Queue[str | None]) -> None:
    for raw in stream:
        into.put(raw.decode(errors="replace").rstrip("\n"))
    into.put(None)


def _answers(url: str, deadline: float, proc: subprocess.Popen[bytes]) -> bool:
    # Straight to the loopback port, whatever http_proxy says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() < deadline and proc.poll() is None:
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            opener.open(url + "/", timeout=2) as response,
        ):
            if response.status == 200:
                return True
        time.sleep(0.02)
    return False


@contextlib.contextmanager
def endpoint_process(
    host: str,
    port: int,
    *,
    redis_url: str | None,
    token: str,
    on_exit: Callable[[int], None] | None = None,
    start_timeout: float = 30.0,
) -> Iterator[EndpointProcess]:
    """Run ``python -m rejoin_local.upstash_rest`` in a child process until the block exits.

    Args:
        host: the interface it binds.
        port: its port (0: a free one).
        redis_url: the Redis it fronts; None: its embedded store (in the child).
        token: its bearer token.
        on_exit: called (from a watcher thread) with the exit status if the
            child exits before the block does.
        start_timeout: seconds to wait until it answers.

    Yields:
        Where it answers, and its pid.

    Raises:
        EndpointStartError: it exited or did not answer in time; the message
            carries what it printed.
    """
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_LOCAL_DIR), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    lifeline_read, lifeline_write = os.pipe()
    args = [sys.executable, "-m", "rejoin_local.upstash_rest", "--host", host]
    # --token=...: a token may start with "-", which argparse would take for an option.
    args += ["--port", str(port), f"--token={token}", "--parent-fd", str(lifeline_read)]
    if redis_url:
        args += ["--redis-url", redis_url]
    try:
        proc = subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=(lifeline_read,),
            start_new_session=True,  # Ctrl-C reaches the stack only; it stops this last
        )
    except BaseException:
        os.close(lifeline_write)
        raise
    finally:
        os.close(lifeline_read)  # only the child holds the read end now
    stopping = threading.Event()
    output: queue.Queue[str | None] = queue.Queue()
    assert proc.stdout is not None
    reader = threading.Thread(
        target=_lines, args=(proc.stdout, output), name="rejoin-upstash-output", daemon=True
    )
    reader.start()
    try:
        url = _wait_for_url(proc, output, start_timeout)
        log.info("Upstash endpoint: pid %d at %s", proc.pid, url)

        def forward() -> None:
            # What the child prints from now on (warnings, errors) goes to the log.
            while (line := output.get()) is not None:
                log.warning("upstash endpoint: %s", line)

        def watch() -> None:
            status = proc.wait()
            if not stopping.is_set() and on_exit is not None:
                on_exit(status)

        threading.Thread(target=forward, name="rejoin-upstash-log", daemon=True).start()
        threading.Thread(target=watch, name="rejoin-upstash-watch", daemon=True).start()
        yield EndpointProcess(url=url, pid=proc.pid)
    finally:
        stopping.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # as Ctrl-C: uvicorn stops gracefully
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _stop(proc)
        os.close(lifeline_write)
        reader.join(timeout=2)


def _wait_for_url(
    proc: subprocess.Popen[bytes], output: queue.Queue[str | None], timeout: float
) -> str:
    deadline = time.monotonic() + timeout
    printed: list[str] = []
    while time.monotonic() < deadline:
        try:
            line = output.get(timeout=0.1)
        except queue.Empty:
            continue
        if line is None:
            break  # it exited
        printed.append(line)
        if line.startswith(_URL_PREFIX):
            url = line[len(_URL_PREFIX) :].split()[0]
            if _answers(url, deadline, proc):
                return url
            break
    status = proc.poll()
    if status is None:
        _stop(proc)
        why = f"did not answer within {timeout:g} s"
    else:
        why = f"exited with status {status}"
    shown = "\n".join(f"  {line}" for line in printed) or "  (it printed nothing)"
    raise EndpointStartError(f"the Upstash endpoint {why}; it printed:\n{shown}")
