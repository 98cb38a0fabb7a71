"""The broadcast benchmark (issue 10, item 3): is fan-out bounded by the network or the CPU?

The real :class:`rejoin.sender.ApiGatewaySender`, with :func:`rejoin.sender.broadcast`,
posts to a stand-in of API Gateway's ``@connections`` API
(``bench/_connections.py``) that runs **in its own process** on 127.0.0.1 and
answers every request after 20 ms, so this process's CPU time is the
sender's alone. The same run measures, interleaved (A B, B A, ...):

- rejoin's ``ApiGatewaySender``: one post, and one frame broadcast to 100
  connections;
- the sender before this change (boto3's client on 64 threads,
  ``bench/_others.py``): the same two;
- rejoin's signing sent with ``httpx.AsyncClient`` (100 connections): the same two.

For each call: wall time, and this process's CPU time (``time.process_time``,
every thread) divided by the posts it made. The ratio is the median
broadcast over the median one post of the same sender. Then, with the
stand-in checking every signature with botocore's own SigV4 signer, one more
broadcast to 100 must be delivered with no signature refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from rejoin_local.redis_server import stop_process

from ._measure import Report, print_table, summarize

__all__ = ["run"]

REPO_ROOT = Path(__file__).resolve().parents[1]
FANOUT = 100
LATENCY = 0.02
ROUNDS, QUICK_ROUNDS = 20, 3
FIRST_POST_ROUNDS = 6
WARMUP = 2
REGION = "us-east-1"
# Credentials for the stand-in only: the benchmark never talks to AWS.
_BENCH_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIDBENCHMARK0000000",
    "AWS_SECRET_ACCESS_KEY": "bench/secret+key=0000000000000000000000",
    "AWS_SESSION_TOKEN": "bench-session-token//+==",
    "AWS_REGION": REGION,
}


@contextlib.contextmanager
def _bench_credentials() -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in _BENCH_ENV}
    os.environ.update(_BENCH_ENV)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def standin_process(latency: float) -> Iterator[str]:
    """``python -m bench._connections`` in a child process; yields its endpoint URL."""
    args = [sys.executable, "-m", "bench._connections", "--latency", str(latency), "--open-all"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "shared")])}
    proc = subprocess.Popen(
        args, cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()  # blocks until it serves (or dies)
        if not line.startswith("URL="):
            raise RuntimeError(f"the @connections stand-in did not start (said {line!r})")
        yield line.removeprefix("URL=")
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # its signal to stop
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            stop_process(proc)


async def _timed(
    subjects: dict[str, tuple[Callable[[], Awaitable[Any]], int]], rounds: int
) -> dict[str, tuple[list[float], list[float]]]:
    """Wall ms and CPU us per post for each subject, interleaved A B / B A."""
    names = list(subjects)
    for _ in range(WARMUP):
        for name in names:
            await subjects[name][0]()
    out: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in names}
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            call, posts = subjects[name]
            cpu, wall = time.process_time(), time.perf_counter()
            result = await call()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if result.failed or result.gone:
                raise RuntimeError(f"{name}: not delivered: {result.failed or result.gone}")
            out[name][0].append(wall * 1000)
            out[name][1].append(cpu / posts * 1e6)
    return out


async def _measure(url: str, report: Report, quick: bool) -> None:
    from rejoin.sender import ApiGatewaySender, broadcast

    from ._others import Boto3Sender, HttpxSender

    ids = [f"conn-{i:03d}=" for i in range(FANOUT)]
    frame = {"type": "message", "seq": 1, "user": "ada", "name": "Ada", "text": "hello " * 20}
    rejoin_sender = ApiGatewaySender(url, region=REGION)
    boto3_sender = Boto3Sender(url, REGION)
    httpx_sender = HttpxSender(url, REGION)
    senders: dict[str, Any] = {
        "ApiGatewaySender": rejoin_sender,
        "boto3 on 64 threads (before)": boto3_sender,
        "httpx.AsyncClient, same signing": httpx_sender,
    }

    def to(sender: Any, targets: list[str]) -> Callable[[], Awaitable[Any]]:
        return lambda: broadcast(sender, targets, frame)

    subjects: dict[str, tuple[Callable[[], Awaitable[Any]], int]] = {}
    for label, sender in senders.items():
        subjects[f"{label}: one post"] = (to(sender, ids[:1]), 1)
        subjects[f"{label}: broadcast to {FANOUT}"] = (to(sender, ids), FANOUT)
    rounds = QUICK_ROUNDS if quick else ROUNDS
    try:
        samples = await _timed(subjects, rounds)
        rows = []
        ratios: dict[str, float] = {}
        cpu_per_post: dict[str, float] = {}
        for label in senders:
            one, many = samples[f"{label}: one post"], samples[f"{label}: broadcast to {FANOUT}"]
            ratios[label] = statistics.median(many[0]) / statistics.median(one[0])
            cpu_per_post[label] = statistics.median(many[1])
            named = ((f"{label}: one post", one), (f"{label}: broadcast to {FANOUT}", many))
            for name, (wall, cpu) in named:
                sm = summarize(wall)
                ratio = sm.median / statistics.median(one[0])
                rows.append([name, sm.median, sm.p90, ratio, statistics.median(cpu)])
        print_table(
            f"Broadcast through HTTP, real senders, stand-in in its own process answering after "
            f"{LATENCY * 1000:.0f} ms ({rounds} interleaved rounds)",
            ["call", "median ms", "p90 ms", "ratio to one post", "CPU us per post"],
            rows,
        )
        report.data["broadcast_http"] = {
            name: {"wall_ms": summarize(w).__dict__, "cpu_us_per_post": summarize(c).__dict__}
            for name, (w, c) in samples.items()
        }
        report.goal(
            f"broadcast to {FANOUT} / one post (ApiGatewaySender over HTTP, "
            f"{LATENCY * 1000:.0f} ms stand-in)",
            ratios["ApiGatewaySender"],
            3,
        )
        print(
            "For comparison in the same run: "
            + "; ".join(
                f"{label} {ratios[label]:.2f}x, {cpu_per_post[label]:.0f} us CPU/post"
                for label in senders
            )
        )
        await _check_signatures(url, rejoin_sender, ids, frame, report)
    finally:
        await rejoin_sender.aclose()
        await httpx_sender.aclose()
        boto3_sender.shutdown()


async def _check_signatures(
    url: str, sender: Any, ids: list[str], frame: dict[str, Any], report: Report
) -> None:
    from rejoin.sender import broadcast

    control = url.rsplit("/", 1)[0] + "/_standin"
    credentials = {
        "access_key": _BENCH_ENV["AWS_ACCESS_KEY_ID"],
        "secret_key": _BENCH_ENV["AWS_SECRET_ACCESS_KEY"],
        "token": _BENCH_ENV["AWS_SESSION_TOKEN"],
    }
    async with httpx.AsyncClient(timeout=10) as http:
        (await http.post(f"{control}/credentials", json=[credentials])).raise_for_status()
        (await http.post(f"{control}/reset")).raise_for_status()
        result = await broadcast(sender, ids, frame)
        stats = (await http.get(f"{control}/stats")).json()
        (await http.post(f"{control}/credentials", json=[])).raise_for_status()
    report.check(
        f"ApiGatewaySender: {FANOUT} posts verified with botocore's SigV4 signer, "
        f"{stats['bad_signatures']} refused",
        len(result.delivered) == FANOUT
        and stats["verified"] == FANOUT
        and stats["bad_signatures"] == 0,
    )


_FIRST_POST = """
import asyncio, sys, time
import rejoin.sender  # what a handler has imported already: not timed
which, url = sys.argv[1], sys.argv[2]
started = time.perf_counter()
if which == "rejoin":
    sender = rejoin.sender.ApiGatewaySender(url)
else:
    from bench._others import Boto3Sender
    sender = Boto3Sender(url, "us-east-1")
asyncio.run(sender.post("conn-000=", b"{}"))
print(time.perf_counter() - started)
"""


def _first_posts(url: str, report: Report, quick: bool) -> None:
    """A fresh interpreter's first post: what a Lambda cold start pays to post."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "shared"), str(REPO_ROOT)])}
    names = {"rejoin": "ApiGatewaySender", "boto3": "boto3 on 64 threads (before)"}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(FIRST_POST_ROUNDS if not quick else 1):
        for which in names if i % 2 == 0 else list(names)[::-1]:
            done = subprocess.run(
                [sys.executable, "-c", _FIRST_POST, which, url],
                env=env,
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            )
            samples[which].append(float(done.stdout.strip().splitlines()[-1]) * 1000)
    base = statistics.median(samples["rejoin"])
    rows = [
        [label, summarize(samples[which]).median, statistics.median(samples[which]) / base]
        for which, label in names.items()
    ]
    print_table(
        "First post of a fresh interpreter (building the sender, importing what it needs, "
        "connecting; rejoin already imported)",
        ["sender", "median ms", "ratio to ApiGatewaySender"],
        rows,
    )
    report.data["first_post_ms"] = {w: summarize(v).__dict__ for w, v in samples.items()}


def run(*, quick: bool) -> Report:
    """Run the broadcast benchmark; prints its table and goal."""
    print("\n## Broadcast benchmark (ApiGatewaySender over HTTP)\n")
    report = Report("broadcast")
    started = time.monotonic()
    with _bench_credentials(), standin_process(LATENCY) as url:
        print(f"@connections stand-in (own process) at {url}")
        asyncio.run(_measure(url, report, quick))
        _first_posts(url, report, quick)
    print(f"({time.monotonic() - started:.1f} s)")
    return report
