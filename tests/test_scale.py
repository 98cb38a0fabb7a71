"""The scale model (``bench/scale.py``): docs/scale.md shows what it computes, and it
follows the counts it is given.

The model reads ``bench/counts.json`` (written by ``python -m bench --only rooms``);
these tests read the committed file, or a changed copy of it.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import scale  # noqa: E402

A = scale.Assumptions()


@pytest.fixture
def counts() -> dict[str, Any]:
    return scale.load_counts()


def test_docs_scale_md_holds_exactly_the_tables_the_script_prints(counts):
    # GIVEN the committed counts and docs/scale.md
    generated = scale.blocks(counts)
    found = scale.doc_blocks(scale.DOC_PATH.read_text())
    # THEN the document has a block for every table, and each is what the script makes
    assert sorted(found) == sorted(generated)
    stale = [name for name in generated if found[name] != generated[name]]
    assert not stale, f"docs/scale.md is out of date in {stale}: run python -m bench.scale --write"


def test_the_counts_come_from_a_full_run_of_the_documented_command(counts):
    # GIVEN the committed counts
    # THEN they name the command that made them and come from the one-hour meeting
    assert counts["command"] == ".venv/bin/python -m bench --only rooms"
    assert counts["meeting"]["shape"]["minutes"] == 60
    assert counts["meeting"]["turns"] == 45


def test_check_finds_a_stale_document_and_write_fixes_it(tmp_path, capsys):
    # GIVEN a copy of the document with one cell of a generated table changed
    text = scale.DOC_PATH.read_text()
    stale = text.replace("| 1,000 ", "| 1,001 ", 1)
    assert stale != text
    doc = tmp_path / "scale.md"
    doc.write_text(stale)
    # WHEN it is checked, THEN the check fails
    assert scale.main(["--check", str(doc)]) == 1
    # WHEN the tables are written, THEN it matches the original again
    assert scale.main(["--write", str(doc)]) == 0
    assert doc.read_text() == text
    assert scale.main(["--check", str(doc)]) == 0


def test_more_commands_per_session_cost_their_price_on_upstash_pay_as_you_go(counts):
    # GIVEN the measured counts, and the same with twice the measured store commands
    more = copy.deepcopy(counts)
    more["meeting"]["meeting_commands"] *= 2
    more["meeting"]["meeting_requests"] *= 2
    d, d2 = scale.demand(counts, A), scale.demand(more, A)
    assert d2.store_commands > d.store_commands
    # WHEN both are priced for 10,000 sessions
    base = scale.store_costs(d, 10_000, A)["Upstash pay as you go"][0]
    more_cost = scale.store_costs(d2, 10_000, A)["Upstash pay as you go"][0]
    # THEN the bill grows by at least the list price of the extra commands
    extra = 10_000 * (d2.store_commands - d.store_commands) * 0.20 / 100_000
    assert more_cost - base >= extra * 0.999


def test_the_first_limit_is_the_quota_a_session_uses_most_of(counts):
    # GIVEN sessions that each keep 10,000 times more data in the store
    big = copy.deepcopy(counts)
    big["meeting"]["session_bytes_at_end"] *= 10_000
    # WHEN the model looks at 1,000 sessions
    first = scale.blocks(big)["first"]
    row = next(line for line in first.splitlines() if line.startswith("| 1,000 "))
    # THEN the first limit reached is the Upstash data size
    assert "| Upstash data size (" in row
    # AND with the measured counts it is not
    measured = scale.blocks(counts)["first"]
    assert "| Upstash data size (" not in measured


def test_a_longer_model_turn_means_more_polls_and_more_lambda(counts):
    # GIVEN the same counts with a model twice as slow
    slow = scale.Assumptions(model_seconds=2 * A.model_seconds)
    d, d_slow = scale.demand(counts, A), scale.demand(counts, slow)
    # THEN the worker polls the session more often and holds Lambda longer
    assert d_slow.polls_per_turn > d.polls_per_turn
    assert d_slow.store_requests > d.store_requests
    assert d_slow.concurrency() > 1.5 * d.concurrency()


@pytest.mark.parametrize(("seconds", "expected"), [(1.0, 0), (1.5, 0), (2.0, 1), (6.0, 2), (10, 3)])
def test_polls_while_a_turn_runs(seconds, expected):
    # The worker reads the session first after 1.5 s, then every 3 s.
    assert scale.polls(seconds, 1.5, 3.0) == expected


def test_python_m_bench_only_scale_prints_the_model():
    # WHEN the runner is asked for the scale model alone
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "scale"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # THEN it prints the tables without starting any Redis
    assert done.returncode == 0, done.stderr[-2000:]
    assert "## first" in done.stdout
    assert "private redis-server" not in done.stdout
