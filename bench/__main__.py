"""``python -m bench [--quick] [--only NAME] [--json PATH]`` (NAME: see ``--help``).

``--only load`` (``make load``) runs the local stack under load instead
(``bench/load.py``; options ``--sessions``, ``--rate``, ``--seconds``,
``--profile``): it is not part of the default run, as it takes every core.

Starts a private ``redis-server`` (never the shared one) and the local
Upstash-compatible endpoint in front of it, runs the benchmarks, prints their
tables (Markdown) and each goal as PASS/FAIL. Goals are reported, not
enforced: the exit status is non-zero only when a benchmark crashes. The
broadcast benchmark needs neither (it starts its own stand-in of API
Gateway's ``@connections``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
# shared/ is the Lambda layer, local/ the local stack, tests/ the harness.
for _path in (_ROOT / "tests", _ROOT / "local", _ROOT / "shared"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# Handlers log JSON lines and flush metrics to stdout on every call: keep the
# tables readable (warnings and errors still show).
os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "WARNING")
os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")

import argparse  # noqa: E402
import datetime  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any, TextIO  # noqa: E402

from bench._measure import Report  # noqa: E402
from bench._stack import private_redis, upstash_endpoint  # noqa: E402


class _DropEmf(io.TextIOBase):
    """stdout without Powertools' EMF metric lines (it prints them when 100 pile up)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        while "\n" in self._pending:
            line, self._pending = self._pending.split("\n", 1)
            if not line.startswith('{"_aws":'):
                self._out.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self._out.flush()

    def close(self) -> None:
        if self._pending:
            self._out.write(self._pending)
            self._pending = ""
        self._out.flush()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a reduced run (a few seconds)")
    parser.add_argument(
        "--only",
        choices=["store", "rooms", "meeting", "encryption", "broadcast", "scale", "load"],
        help="run one benchmark (load: only this way, or `make load`)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the raw figures as JSON")
    load = parser.add_argument_group("the load benchmark (--only load)")
    load.add_argument(
        "--sessions", type=int, metavar="N", help="sessions of 2 clients each (500; --quick: 50)"
    )
    load.add_argument("--rate", type=float, default=100.0, help="paced say frames per second (100)")
    load.add_argument(
        "--seconds", type=float, metavar="T", help="paced phase length (10 s; --quick: 3 s)"
    )
    load.add_argument(
        "--profile",
        metavar="DIR",
        help="profile the stack's processes with py-spy (if on PATH) into DIR",
    )
    load.add_argument(
        "--stack-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra argument for python -m rejoin_local (repeatable), e.g. "
        "--stack-arg=--upstash-in-process",
    )
    return parser


def _machine() -> str:
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs (shared), "
        f"Python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    stdout, filtered = sys.stdout, _DropEmf(sys.stdout)
    sys.stdout = filtered
    try:
        return _main(args)
    finally:
        filtered.close()
        sys.stdout = stdout


def _crashed(name: str) -> bool:
    print(f"\n!! the {name} benchmark crashed (traceback on stderr)")
    sys.stdout.flush()
    traceback.print_exc()
    return True


def load_benchmark(args: argparse.Namespace) -> Report:
    """The load benchmark with the command line's options."""
    from bench import load

    changes: dict[str, Any] = {"rate": args.rate, "stack_args": tuple(args.stack_arg)}
    if args.sessions is not None:
        changes["sessions"] = args.sessions
    if args.seconds is not None:
        changes["seconds"] = args.seconds
    if args.profile:
        changes["profile"] = Path(args.profile)
    options = load.LoadOptions.quick(**changes) if args.quick else load.LoadOptions(**changes)
    return load.run(options)


def _main(args: argparse.Namespace) -> int:
    if args.only == "scale":
        # The scale model reads bench/counts.json: no Redis, no endpoint.
        from bench import scale

        return scale.main([])
    from bench import broadcast, encryption, meeting, rooms, store

    started = time.monotonic()
    print(f"# rejoin benchmarks{' (quick)' if args.quick else ''}")
    print(f"\n{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; {_machine()}")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
    reports: list[Report] = []
    crashed = False
    if args.only == "load":
        try:
            reports.append(load_benchmark(args))
        except Exception:
            crashed = _crashed("load")
    if args.only in (None, "store", "rooms", "meeting", "encryption"):
        with private_redis() as redis_url, upstash_endpoint(redis_url) as endpoint:
            print(f"private redis-server at {redis_url}; Upstash endpoint {endpoint.url}")
            benchmarks = (
                ("store", store),
                ("rooms", rooms),
                ("meeting", meeting),
                ("encryption", encryption),
            )
            for name, module in benchmarks:
                if args.only and args.only != name:
                    continue
                try:
                    reports.append(module.run(endpoint, quick=args.quick))
                except Exception:
                    crashed = _crashed(name)
    if args.only in (None, "broadcast"):
        try:
            reports.append(broadcast.run(quick=args.quick))
        except Exception:
            crashed = _crashed("broadcast")

    print("\n## Goals\n")
    for report in reports:
        for goal in report.goals:
            print(f"- [{report.name}] {goal.line()}")
        for check, ok in report.checks:
            print(f"- [{report.name}] {'OK  ' if ok else 'FAIL'}  {check}")
    print(f"\n(took {time.monotonic() - started:.0f} s)")
    if args.json:
        payload: dict[str, Any] = {
            "quick": args.quick,
            "machine": _machine(),
            "reports": {
                r.name: {
                    "goals": [g.__dict__ | {"passed": g.passed} for g in r.goals],
                    "checks": dict(r.checks),
                    "data": r.data,
                }
                for r in reports
            },
        }
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
