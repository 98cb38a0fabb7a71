"""The load benchmark (``python -m bench --only load``, ``make load``) runs and counts right.

It is run small (a few sessions, two paced seconds) against the real stack
as a user starts it: every message each client sent reaches the other client
of its session exactly once, and the report carries every figure the README
quotes. Speed is what the benchmark reports, not what this test asserts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="the benchmark needs redis-server")
def test_quick_load_delivers_every_message_once(tmp_path: Path) -> None:
    """GIVEN the stack started as `make dev` does, and 12 sessions of 2 WebSocket clients
    WHEN every client sends one say at once, then 20 more per second for 2 seconds
    THEN each message reaches the session's other client exactly once, nothing is lost,
    no error frame comes back, and the report has the latency, memory and goal lines."""
    out = tmp_path / "load.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "load", "--quick", "--sessions", "12",
         "--rate", "20", "--seconds", "2", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "crashed" not in done.stdout, done.stderr[-3000:]
    data = json.loads(out.read_text())["reports"]["load"]["data"]
    assert data["clients"] == 24 and data["connected"] == 24
    burst, paced = data["phases"]["burst"], data["phases"]["paced"]
    assert burst["sent"] == 24  # one say from every client
    assert paced["sent"] == 40  # 20 per second for 2 seconds
    for phase in (burst, paced):
        assert phase["received"] == phase["sent"]
        assert phase["lost"] == 0
        assert phase["duplicates"] == 0
        assert phase["unexpected"] == 0
        assert set(phase["latency"]) == {"p50", "p90", "p99", "max"}
    assert data["errors"] == {}
    assert data["closed_early"] == 0
    stack = data["memory_mb"]["stack (python -m rejoin_local)"]
    assert stack["rss end"] > 0 and stack["peak"] >= stack["rss end"]
    for line in (
        "Send-to-other-client latency, ms (12 sessions x 2 clients)",
        "The stack's processes: memory (MB) and CPU seconds per phase",
        "burst: p99 send-to-other-client",
        "paced 20 msg/s: p99 send-to-other-client",
        "PASS  messages lost (burst + paced): 0",
        "OK    no duplicate messages",
    ):
        assert line in done.stdout, line
