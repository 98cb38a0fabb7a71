"""The benchmarks still run: ``python -m bench --quick`` exits 0 and prints every section.

Goals are reported, not enforced (a FAIL line is not a test failure); what
this guards against is the benchmark rotting as the code it measures changes.
A quick run leaves the committed ``bench/counts.json`` alone (only a full
run of the rooms benchmark rewrites it).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SECTIONS = [
    "# rejoin benchmarks (quick)",
    "## Store benchmark (UpstashSession)",
    "Upstash requests per UpstashSession method",
    "Latency through the endpoint, same client",
    "get_items(limit=20) against history length",
    "Reference: the SDK's RedisSession over TCP",
    "Requests (round trips) per method on each transport",
    "Each method against a raw GET on the same transport",
    "CPU of this process per request, upstash-redis over httpx vs the lean client",
    "## Rooms benchmark",
    "Per frame and per turn: two participants, rate limiting on",
    "The cleanup: 20 sessions past their grace and 20 live ones",
    "Cold import, fresh interpreter each",
    "-minute meeting replayed: 8 participants",
    "-minute meeting costs",
    "## Meeting benchmark",
    "Input tokens of a turn's first model request, by meeting minute",
    "## Encryption at rest: cost per turn",
    "## Goals",
]
GOALS = [
    "get_items(limit=20) / raw LRANGE",
    "plain say, rate limiting on, reply mode addressed: Upstash requests",
    "say to the agent + its whole turn, 3 tool rounds",
    "every later frame (resume, ping, stop, leave, $disconnect)",
    "cleanup, extra requests per expired session, cold",
    "cold import of functions/connect / import boto3",
    "say + turn, encrypted / plain (median time)",
]
COUNTS = ROOT / "bench" / "counts.json"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="the benchmark needs redis-server")
def test_quick_benchmark_runs_and_prints_every_section() -> None:
    counts = COUNTS.read_bytes() if COUNTS.exists() else None
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    missing = [s for s in SECTIONS if s not in done.stdout]
    assert not missing, f"missing sections {missing}:\n{done.stdout[-3000:]}"
    assert "crashed" not in done.stdout, done.stderr[-3000:]
    for line in GOALS:
        assert any(
            line in out and ("PASS" in out or "FAIL" in out) for out in done.stdout.splitlines()
        ), line
    for handler in ("authorize", "connect", "disconnect", "message", "cleanup"):
        assert f"OK    functions/{handler} does not import agents" in done.stdout
    assert (COUNTS.read_bytes() if COUNTS.exists() else None) == counts
