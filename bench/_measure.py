"""Timing, tables and goals shared by the benchmarks.

The machine is shared and small, so absolute times drift: every comparison
runs its subjects interleaved (A, B, B, A, A, B, ...) after a warm-up, and
what is reported is the ratio of their medians, measured in the same run.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Goal",
    "Report",
    "Summary",
    "interleave",
    "interleave_sync",
    "print_table",
    "ratio",
    "summarize",
]


@dataclass(frozen=True)
class Summary:
    """Median and 90th percentile of a sample, in the sample's unit."""

    median: float
    p90: float
    n: int


def summarize(samples: Sequence[float]) -> Summary:
    """Median and p90 (``statistics.quantiles``, inclusive) of ``samples``."""
    if not samples:
        raise ValueError("no samples")
    if len(samples) == 1:
        return Summary(samples[0], samples[0], 1)
    p90 = statistics.quantiles(samples, n=10, method="inclusive")[-1]
    return Summary(statistics.median(samples), p90, len(samples))


def ratio(subject: Sequence[float], baseline: Sequence[float]) -> float:
    """Median of ``subject`` over median of ``baseline``."""
    return statistics.median(subject) / statistics.median(baseline)


def _orders(names: list[str], rounds: int) -> list[list[str]]:
    # A B / B A alternation: each subject goes first as often as last.
    return [names if i % 2 == 0 else names[::-1] for i in range(rounds)]


async def interleave(
    subjects: dict[str, Callable[[], Awaitable[Any]]], *, rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Time async callables interleaved; returns milliseconds per call, per subject."""
    names = list(subjects)
    for _ in range(warmup):
        for name in names:
            await subjects[name]()
    gc.collect()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for order in _orders(names, rounds):
        for name in order:
            start = time.perf_counter_ns()
            await subjects[name]()
            samples[name].append((time.perf_counter_ns() - start) / 1e6)
    return samples


def interleave_sync(
    subjects: dict[str, Callable[[], Any]], *, rounds: int, warmup: int
) -> dict[str, list[float]]:
    """As :func:`interleave`, for plain callables; what a callable returns is the
    time to record (milliseconds) if it is a float, else its wall time is used."""
    names = list(subjects)
    for _ in range(warmup):
        for name in names:
            subjects[name]()
    gc.collect()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for order in _orders(names, rounds):
        for name in order:
            start = time.perf_counter_ns()
            measured = subjects[name]()
            wall = (time.perf_counter_ns() - start) / 1e6
            samples[name].append(measured if isinstance(measured, float) else wall)
    return samples


@dataclass(frozen=True)
class Goal:
    """A figure and the most it may be (goals are reported, not enforced)."""

    name: str
    value: float
    limit: float
    unit: str = ""

    @property
    def passed(self) -> bool:
        return self.value <= self.limit

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        value, limit = f"{self.value:.3g}{self.unit}", f"{self.limit:g}{self.unit}"
        return f"{verdict}  {self.name}: {value} (goal <= {limit})"


@dataclass
class Report:
    """What one benchmark found: goals, checks and raw figures (for --json)."""

    name: str
    goals: list[Goal] = field(default_factory=list)
    checks: list[tuple[str, bool]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def goal(self, name: str, value: float, limit: float, unit: str = "") -> Goal:
        g = Goal(name, value, limit, unit)
        self.goals.append(g)
        print(g.line())
        return g

    def check(self, name: str, ok: bool) -> None:
        self.checks.append((name, ok))
        print(f"{'OK  ' if ok else 'FAIL'}  {name}")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a GitHub-flavoured Markdown table (pasteable into bench/README.md)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def fmt(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    print(f"\n{title}\n")
    print(fmt(list(headers)))
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for row in cells:
        print(fmt(row))
    print()
