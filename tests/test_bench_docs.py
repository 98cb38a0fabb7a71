"""The benchmark write-ups say what was measured (issue 10, item 6): their
tables are whole tables, and the prose quotes the tables' figures.

Checks on the committed text only; nothing is re-measured here.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_README = ROOT / "bench" / "README.md"
SCALE = ROOT / "docs" / "scale.md"


def table_blocks(text: str) -> list[tuple[int, list[str], str]]:
    """(first line number, the block's lines, the line before it) of each run of ``|`` lines."""
    lines = text.splitlines()
    blocks: list[tuple[int, list[str], str]] = []
    i = 0
    while i < len(lines):
        if lines[i].startswith("|"):
            start = i
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            blocks.append((start + 1, lines[start:i], lines[start - 1] if start else ""))
        else:
            i += 1
    return blocks


def test_every_table_row_in_the_bench_readme_belongs_to_a_table() -> None:
    """GIVEN bench/README.md
    WHEN its runs of ``|`` lines are read
    THEN each is a table: a blank line before it, a header and a ``---`` separator
    (a row glued under a paragraph renders as stray text, not as a goal).
    """
    for line, rows, before in table_blocks(BENCH_README.read_text()):
        assert before.strip() == "", f"line {line}: no blank line before"
        assert len(rows) >= 2 and re.fullmatch(r"\|[\s:|-]+\|", rows[1]), (
            f"line {line}: not a table (no header and separator): {rows[0][:80]}"
        )


def test_the_broadcast_goal_is_in_the_goals_table() -> None:
    """GIVEN bench/README.md's issue 10 goals table
    WHEN its rows are read
    THEN the broadcast goal (item 3) is one of them, with its 3x limit.
    """
    text = BENCH_README.read_text()
    goals = text.split("## Issue 10 goals", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in goals.splitlines() if r.startswith("| broadcast to 100 connections")]
    assert len(rows) == 1 and "| 3 |" in rows[0], rows


def cleanup_handler_ms() -> list[float]:
    """The handler milliseconds of bench/README.md's cleanup table (cold, warm)."""
    section = BENCH_README.read_text().split("### The cleanup", 1)[1].split("\n### ", 1)[0]
    rows = [r for r in section.splitlines() if r.startswith("| cold") or r.startswith("| warm")]
    header = next(r for r in section.splitlines() if r.startswith("| script cache"))
    column = [c.strip() for c in header.split("|")].index("handler ms (here)")
    return [float(r.split("|")[column].strip().replace(",", "")) for r in rows]


def test_scale_md_quotes_the_cleanup_time_the_benchmark_measured() -> None:
    """GIVEN the cleanup table of bench/README.md (1,000 sessions deleted in one run)
    WHEN docs/scale.md says how long that run took
    THEN it quotes the table's handler time in seconds, rounded to 0.1 s.
    """
    ms = cleanup_handler_ms()
    assert len(ms) == 2
    prose = " ".join(SCALE.read_text().split())
    claim = prose.split("the rooms benchmark deleted", 1)[1].split("against the local endpoint")[0]
    quoted = re.findall(r"(\d+(?:\.\d+)?) s\b", claim)
    assert quoted, claim
    assert all(round(max(ms) / 1000, 1) >= float(q) >= round(min(ms) / 1000, 1) for q in quoted)


def test_the_runner_names_every_benchmark() -> None:
    """GIVEN the names ``python -m bench --only`` accepts
    WHEN bench/README.md's opening command block lists them
    THEN it names every one.
    """
    main = (ROOT / "bench" / "__main__.py").read_text()
    names = re.search(r'"--only",\s*choices=\[([^\]]*)\]', main)
    assert names
    choices = re.findall(r'"(\w+)"', names.group(1))
    opening = BENCH_README.read_text().split("```sh", 1)[1].split("```", 1)[0]
    only_line = next(line for line in opening.splitlines() if "--only store" in line)
    missing = [c for c in choices if c not in only_line and f"--only {c}" not in opening]
    assert not missing, missing


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), BENCH_README]


def test_stack_wide_keys_named_in_the_docs_are_the_stores() -> None:
    """GIVEN every doc page
    WHEN it names a stack-wide key (`rejoin:<name>`, no session hash tag)
    THEN the room store builds that key: a page must not describe keys the code
    no longer writes.
    """
    from rejoin.rooms import RoomStore

    store = RoomStore(object(), key_prefix="rejoin")  # type: ignore[arg-type]
    built = {store.schedule_key}
    named = {
        (doc.name, key)
        for doc in DOCS
        for key in re.findall(r"`(rejoin:[a-z_]+)`", doc.read_text())
    }
    assert {(doc, key) for doc, key in named if key not in built} == set()


def test_deploy_md_does_not_rule_out_the_cluster_the_tests_run_on() -> None:
    """GIVEN tests/test_transport.py::TestRoomsOnCluster, which runs the whole deployment
    on a three-node Redis Cluster (redis+cluster://)
    WHEN docs/deploy.md describes Redis Cluster
    THEN it does not tell the reader to avoid it, and points at that test.
    """
    text = " ".join((ROOT / "docs" / "deploy.md").read_text().split())
    note = text.split("**Redis Cluster.**", 1)[1].split("**2.", 1)[0]
    assert "cluster-mode-disabled cache" not in note and "CROSSSLOT" not in note, note
    assert "TestRoomsOnCluster" in note
    transport = (ROOT / "tests" / "test_transport.py").read_text()
    assert "class TestRoomsOnCluster" in transport
