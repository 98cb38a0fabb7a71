"""The local stack under load (issue 10, item 5): fan-out latency over real WebSockets.

What runs:

- a private ``redis-server`` (:func:`bench._stack.private_redis`, never the
  shared one on 6379);
- the local stack as a user starts it, ``python -m rejoin_local`` in a child
  process on free ports, over that Redis, with reply mode ``addressed`` (a
  plain ``say`` is logged and fanned out, no agent turn: what is measured is
  the message path, not a model);
- this process is the load generator (its own interpreter, so it does not
  share the stack's GIL): N sessions, each with 2 real WebSocket clients
  (the ``websockets`` library), tokens minted with ``rejoin.tokens`` and the
  stack's signing key, as ``make token`` does.

Phases:

1. **connect**: every client opens its socket and sends ``resume``; the time
   to its ``welcome`` is its connect time (50 handshakes in flight at most).
2. **burst**: every client sends one ``say`` at once.
3. **paced**: ``say`` frames at an aggregate rate R for T seconds, spread
   over the clients in a shuffled round robin.

Send-to-other-client latency: the text of each ``say`` carries the
``time.monotonic_ns()`` taken just before the frame is written; the other
client of the session parses it when its ``message`` event arrives. Both
ends are this process (one clock). A message is lost when the other client
has not seen it ``DRAIN_SECONDS`` after the last send; seen twice, it is a
duplicate. Nothing is dropped from the percentiles.

Memory and CPU: RSS (now and peak) and CPU seconds of the stack's process
and of its child processes (the Upstash endpoint, unless it runs in the
stack's process), read from ``/proc``.

Profiling: ``--profile DIR`` attaches ``py-spy`` (when it is on ``PATH``) to
the stack and its children for the burst and paced phases, writes the raw
collapsed stacks to ``DIR`` and prints the top functions by samples.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from rejoin.tokens import mint_token
from rejoin_local.redis_server import stop_process

from ._measure import Report, print_table
from ._stack import REPO_ROOT, StackError, private_redis

__all__ = ["LoadOptions", "run"]

BURST_GOAL_MS = 1000.0
PACED_GOAL_MS = 50.0
CONNECT_CONCURRENCY = 50
DRAIN_SECONDS = 30.0
"""How long after the last send a message may still arrive before it counts as lost."""
CONNECT_TIMEOUT = 60.0
START_TIMEOUT = 60.0
_BANNER_END = "Press Ctrl-C"


@dataclass(frozen=True)
class LoadOptions:
    """What the load run does.

    Attributes:
        sessions: sessions, each with 2 WebSocket clients.
        rate: aggregate ``say`` frames per second in the paced phase.
        seconds: how long the paced phase lasts.
        profile: a directory for py-spy's output, or None for no profile.
        stack_args: extra arguments for ``python -m rejoin_local``.
    """

    sessions: int = 500
    rate: float = 100.0
    seconds: float = 10.0
    profile: Path | None = None
    stack_args: tuple[str, ...] = ()

    @classmethod
    def quick(cls, **changes: Any) -> LoadOptions:
        """The reduced run: 50 sessions, 3 paced seconds."""
        return cls(**({"sessions": 50, "seconds": 3.0} | changes))


# ---------------------------------------------------------------------------
# The stack, as a user starts it
# ---------------------------------------------------------------------------


@dataclass
class StackProcess:
    """``python -m rejoin_local`` in a child process."""

    proc: subprocess.Popen[bytes]
    ws_url: str
    upstash_url: str
    signing_key: str
    banner: str
    log_path: Path


def raise_fd_limit(needed: int) -> int:
    """Raise this process's open-file soft limit to the hard limit if ``needed`` is over it.

    Children inherit the raised limit.

    Returns:
        The soft limit now in force.

    Raises:
        StackError: even the hard limit is under ``needed``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else hard
    if target < needed:
        raise StackError(
            f"the load needs about {needed} open files, but the hard limit is {hard} "
            "(raise it, e.g. `ulimit -Hn`, or run fewer --sessions)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


@contextlib.contextmanager
def stack_process(redis_url: str, extra_args: Sequence[str] = ()) -> Iterator[StackProcess]:
    """Start ``python -m rejoin_local`` on free ports over ``redis_url``; stop it after."""
    signing_key = secrets.token_urlsafe(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "REJOIN_"))}
    env |= {
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "local"), str(REPO_ROOT / "shared")]),
        "REJOIN_REPLY_MODE": "addressed",
        "REJOIN_TOKEN_SECRET": signing_key,
        "REJOIN_ADMIN_KEY": secrets.token_urlsafe(16),
        "PYTHONUNBUFFERED": "1",
    }
    args = [sys.executable, "-m", "rejoin_local", "--port", "0", "--upstash-port", "0"]
    args += ["--redis-url", redis_url, *extra_args]
    with tempfile.TemporaryDirectory(prefix="rejoin-bench-load-") as workdir:
        log_path = Path(workdir) / "stack.log"
        # A file, not a pipe: a pipe nobody reads could fill and stall the stack.
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                args, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            banner = _wait_for_banner(proc, log_path)
            ws = re.search(r"WebSocket\s+(ws://\S+/ws)\?", banner)
            upstash = re.search(r"Upstash REST\s+(http://\S+)", banner)
            if ws is None or upstash is None:
                raise StackError(f"unexpected banner:\n{banner}")
            yield StackProcess(
                proc=proc,
                ws_url=ws.group(1),
                upstash_url=upstash.group(1),
                signing_key=signing_key,
                banner=banner,
                log_path=log_path,
            )
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # what Ctrl-C does: sockets closed, children too
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    stop_process(proc)


def _wait_for_banner(proc: subprocess.Popen[bytes], log_path: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if _BANNER_END in text:
            return text
        if proc.poll() is not None:
            raise StackError(f"the stack exited ({proc.returncode}) before serving:\n{text}")
        time.sleep(0.05)
    raise StackError(f"the stack did not start within {START_TIMEOUT:g} s")


# ---------------------------------------------------------------------------
# /proc: memory and CPU of the stack's processes
# ---------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return sorted(found)


def process_tree(pid: int) -> list[int]:
    """``pid`` and every descendant of it."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(_children(current))
    return tree


@dataclass(frozen=True)
class ProcSample:
    """One process at one moment."""

    pid: int
    name: str
    rss_mb: float
    peak_mb: float
    cpu_seconds: float


def sample(pid: int) -> ProcSample | None:
    """RSS, peak RSS and CPU time of ``pid`` (None when it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)

    def mb(name: str) -> float:
        return int(fields.get(name, "0 kB").split()[0]) / 1024

    ticks = os.sysconf("SC_CLK_TCK")
    after = stat.rsplit(")", 1)[1].split()
    cpu = (int(after[11]) + int(after[12])) / ticks
    args = [a.decode(errors="replace") for a in cmdline if a]
    name = " ".join(args[1:4]) if len(args) > 1 else (args[0] if args else str(pid))
    return ProcSample(pid, name, mb("VmRSS"), mb("VmHWM"), cpu)


def snapshot(root: int) -> dict[int, ProcSample]:
    """Every process of the stack (the python ones; py-spy is left out)."""
    out: dict[int, ProcSample] = {}
    for pid in process_tree(root):
        s = sample(pid)
        if s is not None and "py-spy" not in s.name:
            out[pid] = s
    return out


# ---------------------------------------------------------------------------
# The clients
# ---------------------------------------------------------------------------


@dataclass
class Tally:
    """What the clients saw, for one phase."""

    expected: set[str] = field(default_factory=set)
    received: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies_ms: list[float] = field(default_factory=list)
    first_send: float = 0.0
    last_send: float = 0.0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def arrived(self, message_id: str, latency_ms: float) -> None:
        self.received[message_id] += 1
        if self.received[message_id] == 1:
            self.latencies_ms.append(latency_ms)
        if self.expected and len(self.latencies_ms) >= len(self.expected):
            self.done.set()

    @property
    def lost(self) -> int:
        return len(self.expected - self.received.keys())

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.received.values() if n > 1)

    @property
    def unexpected(self) -> int:
        return len(self.received.keys() - self.expected)


class LoadClient:
    """One participant: a WebSocket, its reader, and what it saw."""

    def __init__(self, session: str, index: int, url: str, token: str, tallies: dict[str, Tally]):
        self.session = session
        self.user = f"u{index}"
        self.url = f"{url}?session={session}&token={token}"
        self.tallies = tallies
        self.ws: ClientConnection | None = None
        self.welcomed = asyncio.Event()
        self.errors: collections.Counter[str] = collections.Counter()
        self.acks = 0
        self.sent = 0
        self.connect_ms = 0.0
        self.closed_early = False
        self._reader: asyncio.Task[None] | None = None

    async def open(self) -> None:
        started = time.monotonic_ns()
        self.ws = await connect(
            self.url, compression=None, ping_interval=None, open_timeout=CONNECT_TIMEOUT
        )
        self._reader = asyncio.create_task(self._read())
        await self.ws.send('{"action":"resume"}')
        await asyncio.wait_for(self.welcomed.wait(), CONNECT_TIMEOUT)
        self.connect_ms = (time.monotonic_ns() - started) / 1e6

    async def say(self, phase: str) -> None:
        assert self.ws is not None
        self.sent += 1
        message_id = f"{phase}.{self.session}.{self.user}.{self.sent}"
        self.tallies[phase].expected.add(message_id)
        # The clock is read last, just before the frame is written.
        frame = '{"action":"say","id":"%s","text":"load %s %d"}'
        await self.ws.send(frame % (message_id, message_id, time.monotonic_ns()))

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            async for raw in self.ws:
                now = time.monotonic_ns()
                frame = json.loads(raw)
                kind = frame.get("type")
                if kind == "message" and frame.get("user") != self.user:
                    _, message_id, sent = str(frame.get("text", "")).split(" ")
                    phase = message_id.split(".", 1)[0]
                    tally = self.tallies.get(phase)
                    if tally is not None:
                        tally.arrived(message_id, (now - int(sent)) / 1e6)
                elif kind == "welcome":
                    self.welcomed.set()
                elif kind == "ack":
                    self.acks += 1
                elif kind == "error":
                    self.errors[str(frame.get("code"))] += 1
                elif "message" in frame and "connectionId" in frame:
                    self.errors[f"gateway: {frame['message']}"] += 1
        except Exception:
            pass
        finally:
            self.closed_early = True

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 10)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader


async def _loop_lag(stop: asyncio.Event, worst: list[float]) -> None:
    """How late this process's own loop runs its callbacks (the generator's own delay)."""
    while not stop.is_set():
        before = time.monotonic()
        await asyncio.sleep(0.01)
        worst.append((time.monotonic() - before - 0.01) * 1000)


def _percentiles(samples: Sequence[float]) -> dict[str, float]:
    if not samples:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(samples)

    def q(p: float) -> float:
        # Nearest rank: a real sample, never an interpolation below it.
        return ordered[min(len(ordered) - 1, max(0, int(-(-p * len(ordered) // 1)) - 1))]

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": ordered[-1]}


@dataclass
class Phase:
    """One phase's figures (latencies in milliseconds)."""

    name: str
    sent: int
    received: int
    lost: int
    duplicates: int
    unexpected: int
    latency: dict[str, float]
    seconds: float
    rate: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)


async def _drain(tally: Tally) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(tally.done.wait(), DRAIN_SECONDS)
    await asyncio.sleep(0.5)  # a duplicate would arrive about now


def _phase(name: str, tally: Tally, seconds: float, rate: float = 0.0) -> Phase:
    return Phase(
        name=name,
        sent=len(tally.expected),
        received=len(tally.expected & tally.received.keys()),
        lost=tally.lost,
        duplicates=tally.duplicates,
        unexpected=tally.unexpected,
        latency=_percentiles(tally.latencies_ms),
        seconds=seconds,
        rate=rate,
    )


@dataclass
class LoadResult:
    """Everything the run measured."""

    connect: dict[str, float]
    connect_seconds: float
    connected: int
    phases: list[Phase]
    errors: dict[str, int]
    closed_early: int
    memory: dict[str, dict[str, float]]
    generator_lag_ms: dict[str, float]


async def _generate(
    stack: StackProcess, options: LoadOptions, profile: _Profiler | None
) -> LoadResult:
    tallies = {"burst": Tally(), "paced": Tally()}
    clients: list[LoadClient] = []
    for s in range(options.sessions):
        session = f"load-{s:04d}-{secrets.token_hex(3)}"
        for index in range(2):
            token = mint_token(
                secret=stack.signing_key,
                session_id=session,
                user_id=f"u{index}",
                name=f"User {index}",
                ttl_seconds=3600,
            )
            clients.append(LoadClient(session, index, stack.ws_url, token, tallies))
    root = stack.proc.pid
    memory: dict[str, dict[str, float]] = collections.defaultdict(dict)

    def mark(label: str) -> dict[int, ProcSample]:
        now = snapshot(root)
        for s in now.values():
            role = _role(s, root)
            memory[role][f"rss {label}"] = s.rss_mb
            memory[role]["peak"] = s.peak_mb
        return now

    stop_lag = asyncio.Event()
    lag: list[float] = []
    lag_task = asyncio.create_task(_loop_lag(stop_lag, lag))
    mark("idle")

    # 1. connect
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    failures: collections.Counter[str] = collections.Counter()

    async def open_one(client: LoadClient) -> None:
        async with gate:
            try:
                await client.open()
            except Exception as exc:
                failures[f"connect: {type(exc).__name__}"] += 1

    started = time.monotonic()
    await asyncio.gather(*(open_one(c) for c in clients))
    connect_seconds = time.monotonic() - started
    connected = [c for c in clients if c.welcomed.is_set()]
    after_connect = mark("connected")
    print(f"connected {len(connected)}/{len(clients)} clients in {connect_seconds:.1f} s")

    # 2. burst: every client sends one say at once.
    phases: list[Phase] = []
    if profile is not None:
        profile.start(root, "burst")
    lag.clear()
    started = time.monotonic()
    await asyncio.gather(*(c.say("burst") for c in connected))
    await _drain(tallies["burst"])
    burst = _phase("burst", tallies["burst"], time.monotonic() - started)
    if profile is not None:
        profile.stop()
        profile.start(root, "paced")
    after_burst = mark("after burst")
    burst.cpu = _cpu(after_connect, after_burst, root)
    phases.append(burst)
    print(f"burst: {burst.received}/{burst.sent} received, p99 {burst.latency['p99']:.0f} ms")

    # 3. paced: R frames/s for T seconds, spread over the clients.
    order = list(connected)
    random.Random(7).shuffle(order)
    total = int(options.rate * options.seconds)
    interval = 1.0 / options.rate
    started = time.monotonic()
    for k in range(total):
        delay = started + k * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await order[k % len(order)].say("paced")
    sending = time.monotonic() - started
    await _drain(tallies["paced"])
    paced = _phase("paced", tallies["paced"], time.monotonic() - started, total / sending)
    end = mark("end")
    paced.cpu = _cpu(after_burst, end, root)
    phases.append(paced)
    print(f"paced: {paced.received}/{paced.sent} received, p99 {paced.latency['p99']:.0f} ms")
    if profile is not None:
        profile.stop()
    stop_lag.set()
    await lag_task

    errors: collections.Counter[str] = collections.Counter(failures)
    for c in clients:
        errors.update(c.errors)
    closed_early = sum(c.closed_early for c in connected)
    # Close gently, 50 at a time, so the stack's $disconnect work is bounded too.
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def close_one(client: LoadClient) -> None:
        async with gate:
            await client.close()

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(close_one(c) for c in clients)), 60)
    return LoadResult(
        connect=_percentiles([c.connect_ms for c in connected]),
        connect_seconds=connect_seconds,
        connected=len(connected),
        phases=phases,
        errors=dict(errors),
        closed_early=closed_early,
        memory={k: dict(v) for k, v in memory.items()},
        generator_lag_ms=_percentiles(lag),
    )


def _role(s: ProcSample, root: int) -> str:
    if s.pid == root:
        return "stack (python -m rejoin_local)"
    if "upstash" in s.name:
        return "Upstash endpoint (child process)"
    return f"child: {s.name}"


def _cpu(
    before: dict[int, ProcSample], after: dict[int, ProcSample], root: int
) -> dict[str, float]:
    out: dict[str, float] = {}
    for pid, s in after.items():
        if pid in before:
            out[_role(s, root)] = s.cpu_seconds - before[pid].cpu_seconds
    return out


# ---------------------------------------------------------------------------
# py-spy
# ---------------------------------------------------------------------------


class _Profiler:
    """py-spy attached to the stack's processes, one recording per phase."""

    def __init__(self, directory: Path, binary: str) -> None:
        self.directory = directory
        self.binary = binary
        self.procs: list[subprocess.Popen[bytes]] = []
        self.outputs: list[Path] = []

    def start(self, root: int, phase: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.procs = []
        for pid in process_tree(root):
            s = sample(pid)
            if s is None or "py-spy" in s.name:
                continue
            role = "stack" if pid == root else "upstash" if "upstash" in s.name else "child"
            out = self.directory / f"{phase}-{role}-{pid}.txt"
            args = [self.binary, "record", "--pid", str(pid), "--format", "raw", "--threads"]
            args += ["--rate", "250", "--nonblocking", "-o", str(out)]
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.procs.append(proc)
            self.outputs.append(out)
        time.sleep(1.0)  # py-spy attaches before the phase starts

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stop_process(proc)

    def summary(self, top: int = 15) -> None:
        for path in self.outputs:
            if path.exists():
                summarize_collapsed(path, top)


# Leaf frames where a thread waits (for I/O, work or a lock) rather than runs.
_IDLE_LEAVES = ("select (selectors.py)", "_worker (futures/thread.py)", "wait (threading.py)")
_IDLE_LEAF_NAMES = ("EpollSelector.select", "Condition.wait", "Event.wait", "Thread.join")
# What a sample is spent on: the first of these found from the leaf up names
# it; the event loop's own frames are skipped, so a socket write or a wakeup
# counts for whoever asked for it (the event loop only when nobody did).
_LOOP = ("asyncio/", "futures/", "threading.py", "selectors.py", "trsock.py")
_CATEGORIES = (
    ("JSON", ("json/",)),
    ("pydantic", ("pydantic",)),
    ("Powertools logging/metrics", ("aws_lambda_powertools", "observability.py")),
    (
        "HTTP client to Upstash (rejoin._http1; httpx under a proxy)",
        ("httpx/", "httpcore", "_http1.py", "_upstash_http.py"),
    ),
    ("upstash-redis client", ("upstash_redis",)),
    ("Upstash endpoint (Starlette app, RESP to Redis)", ("upstash_rest.py",)),
    ("uvicorn WebSocket protocol / websockets", ("websockets", "websockets_sansio_impl")),
    ("uvicorn HTTP (h11) and Starlette", ("uvicorn/", "starlette/", "h11/")),
    ("gateway (events, delivery)", ("rejoin_local/gateway.py",)),
    ("local stack (sender, worker)", ("rejoin_local/",)),
    ("rejoin (rooms, routes, sender)", ("rejoin/",)),
)


def _category(frames: list[str]) -> str:
    for frame in reversed(frames):
        if any(n in frame for n in _LOOP):
            continue
        for name, needles in _CATEGORIES:
            if any(n in frame for n in needles):
                return name
    return "the event loop itself (polling, callbacks, wakeups)"


def _thread_group(frame: str) -> str:
    name = frame.split(":", 1)[-1].strip()
    if name.startswith("rejoin-handler"):
        return "handler threads"
    if name == "MainThread":
        return "main thread (gateway loop)"
    return name


def summarize_collapsed(path: Path, top: int = 15) -> None:
    """Print where a py-spy raw (collapsed) recording spent its busy samples.

    Samples whose leaf is a wait (``select``, an idle pool worker, a lock) are
    left out: the rest is CPU the process spent. Shown: the share per thread
    group, per kind of work (the first match from the leaf up), and the
    functions with the most own samples.
    """
    own: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    busy = idle = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";")]
        leaf = frames[-1] if frames else ""
        if leaf.endswith(_IDLE_LEAVES) or leaf.startswith(_IDLE_LEAF_NAMES):
            idle += n
            continue
        busy += n
        own[leaf] += n
        threads[_thread_group(frames[0]) if frames[0].startswith("thread") else "?"] += n
        kinds[_category(frames[1:])] += n
    if not busy:
        return
    title = f"py-spy, {path.stem}: {busy:,} busy samples ({idle:,} waiting left out)"
    print_table(
        title + ", by thread",
        ["thread", "% of busy"],
        [[t, 100 * n / busy] for t, n in threads.most_common()],
    )
    print_table(
        title + ", by kind of work (who asked for it)",
        ["work", "% of busy"],
        [[k, 100 * n / busy] for k, n in kinds.most_common()],
    )
    print_table(
        title + ", top functions (own samples)",
        ["function", "% of busy"],
        [[f, 100 * n / busy] for f, n in own.most_common(top)],
    )


def _short(frame: str) -> str:
    # py-spy raw frames: "function (path/to/file.py:line)"; keep the file's last parts.
    match = re.match(r"(.*) \((.*?):?(\d*)\)$", frame.strip())
    if not match:
        return frame.strip()
    function, path = match.group(1), match.group(2)
    parts = Path(path).parts
    return f"{function} ({'/'.join(parts[-2:])})"


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def run(options: LoadOptions | None = None) -> Report:
    """Run the load benchmark; prints its tables and goals."""
    options = options or LoadOptions()
    if options.sessions < 1 or options.rate <= 0 or options.seconds <= 0:
        raise ValueError("--sessions, --rate and --seconds must be positive")
    report = Report("load")
    clients = options.sessions * 2
    # Client sockets here, their server ends in the stack, the stack's Upstash
    # and Redis connections: raise the limit this process (and its children) has.
    limit = raise_fd_limit(2 * clients + 512)
    mode = " ".join(options.stack_args) or "default options"
    print(
        f"\n## Local stack under load: {options.sessions} sessions x 2 WebSocket clients\n"
        f"\nstack: python -m rejoin_local ({mode}), reply mode addressed; "
        f"paced {options.rate:g} msg/s for {options.seconds:g} s; open-file limit {limit}"
    )
    profiler: _Profiler | None = None
    if options.profile is not None:
        binary = shutil.which("py-spy")
        if binary is None:
            print("(--profile: py-spy is not on PATH: no profile)")
        else:
            profiler = _Profiler(options.profile, binary)
    started = time.monotonic()
    with private_redis() as redis_url, stack_process(redis_url, options.stack_args) as stack:
        print(f"private redis-server at {redis_url}; stack at {stack.ws_url}")
        result = asyncio.run(_generate(stack, options, profiler))
    _print(result, options)
    burst, paced = result.phases
    report.data = {
        "sessions": options.sessions,
        "clients": clients,
        "connected": result.connected,
        "connect_ms": result.connect,
        "connect_seconds": result.connect_seconds,
        "phases": {p.name: p.__dict__ for p in result.phases},
        "errors": result.errors,
        "closed_early": result.closed_early,
        "memory_mb": result.memory,
        "generator_lag_ms": result.generator_lag_ms,
        "stack_args": list(options.stack_args),
    }
    report.goal("burst: p99 send-to-other-client", burst.latency["p99"], BURST_GOAL_MS, " ms")
    report.goal(
        f"paced {options.rate:g} msg/s: p99 send-to-other-client",
        paced.latency["p99"],
        PACED_GOAL_MS,
        " ms",
    )
    report.goal("messages lost (burst + paced)", burst.lost + paced.lost, 0)
    report.check(
        f"every client connected ({result.connected}/{clients})", result.connected == clients
    )
    report.check("no duplicate messages", burst.duplicates + paced.duplicates == 0)
    report.check("no error frames", not result.errors)
    report.check("no socket closed under load", result.closed_early == 0)
    if profiler is not None:
        profiler.summary()
    print(f"({time.monotonic() - started:.1f} s)")
    return report


def _print(result: LoadResult, options: LoadOptions) -> None:
    c = result.connect
    rows: list[list[Any]] = [
        [
            f"connect (handshake + welcome, {CONNECT_CONCURRENCY} in flight)",
            result.connected,
            result.connected,
            2 * options.sessions - result.connected,
            0,
            c["p50"],
            c["p90"],
            c["p99"],
            c["max"],
            result.connect_seconds,
        ]
    ]
    for p in result.phases:
        label = "burst (every client, one say at once)"
        if p.name == "paced":
            label = f"paced ({p.rate:.0f} msg/s achieved for {options.seconds:g} s)"
        lat = p.latency
        rows.append(
            [label, p.sent, p.received, p.lost, p.duplicates, lat["p50"], lat["p90"],
             lat["p99"], lat["max"], p.seconds]
        )  # fmt: skip
    print_table(
        f"Send-to-other-client latency, ms ({options.sessions} sessions x 2 clients)",
        ["phase", "sent", "received", "lost", "dup", "p50", "p90", "p99", "max", "wall s"],
        rows,
    )
    mem_rows: list[list[Any]] = []
    for role, figures in result.memory.items():
        cpu = [p.cpu.get(role, 0.0) for p in result.phases]
        mem_rows.append(
            [role, figures.get("rss idle", 0.0), figures.get("rss connected", 0.0),
             figures.get("rss end", 0.0), figures.get("peak", 0.0), *cpu]
        )  # fmt: skip
    print_table(
        "The stack's processes: memory (MB) and CPU seconds per phase",
        ["process", "RSS idle", "RSS connected", "RSS end", "peak RSS", "CPU burst",
         "CPU paced"],
        mem_rows,
    )  # fmt: skip
    lag = result.generator_lag_ms
    print(
        f"load generator's own loop lag (burst + paced): p50 {lag['p50']:.1f} ms, "
        f"p99 {lag['p99']:.1f} ms, max {lag['max']:.1f} ms"
    )
    if result.errors:
        print(f"error frames: {result.errors}")
