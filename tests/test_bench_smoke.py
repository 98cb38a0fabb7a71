"""The benchmarks still run: ``python -m bench --quick`` exits 0 and prints every section.

Goals are reported, not enforced (a FAIL line is not a test failure); what
this guards against is the benchmark rotting as the code it measures changes.
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
    "## Rooms benchmark",
    "Per operation, two participants",
    "Broadcast, 20 ms per post",
    "Cold import, fresh interpreter each",
    "Sample meeting replayed",
    "What this meeting costs",
    "## Meeting benchmark",
    "Input tokens of a turn's first model request, by meeting minute",
    "## Goals",
]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="the benchmark needs redis-server")
def test_quick_benchmark_runs_and_prints_every_section() -> None:
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
    for line in ("get_items(limit=20) / raw LRANGE", "broadcast to 100 / one post"):
        assert any(
            line in out and ("PASS" in out or "FAIL" in out) for out in done.stdout.splitlines()
        ), line
    for handler in ("connect", "disconnect", "message", "cleanup"):
        assert f"functions/{handler} does not import agents" in done.stdout
