"""Cold import time of each Lambda handler against ``import boto3``.

Each import runs in a fresh interpreter (a cold start's import phase), with
``shared/`` on the path as the layer puts it and the function's folder as the
task root. Handlers and boto3 take turns, round after round (the order
rotates), and each handler is reported as a ratio of medians to boto3 in the
same run, both in CPU time (the child's process time: what the import itself
costs, steadier on a shared machine) and in wall time. Each child also reports
which heavy packages ended up in ``sys.modules``: authorize, connect,
disconnect, message and cleanup must not load the Agents SDK.

The venv holds dev tools the Lambda layer does not (pytest, schemathesis and
its ``rich``, moto, ...), and some libraries import optional extras when they
are installed (``httpx`` imports its CLI, so ``click`` and ``rich``, if it
can). So each child hides every installed distribution that is not in the
function's dependency closure (``shared/requirements.txt``, the function's
own ``requirements.txt``, and boto3 from the Lambda runtime): what it imports
is what it would import on Lambda.
"""

from __future__ import annotations

import functools
import json
import os
import re
import statistics
import subprocess
import sys
from collections import defaultdict
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ._measure import Report, print_table, ratio, summarize
from ._stack import REPO_ROOT

__all__ = ["run_imports"]

ROUNDS, QUICK_ROUNDS = 10, 1
IMPORTTIME_RUNS = 3
# What the Lambda Python runtime provides besides the standard library.
RUNTIME_PACKAGES = ("boto3",)
MUST_NOT_IMPORT_AGENTS = ("authorize", "connect", "disconnect", "message", "cleanup")
# Issue 10: these cold-import in at most 1.5x `import boto3`.
IMPORT_GOAL = 1.5
WATCHED = ("agents", "openai", "boto3", "botocore", "pydantic", "fastapi", "httpx")

_CHILD = r"""
import importlib.util, json, os, sys, time
target, shared = sys.argv[1], sys.argv[2]
hidden = frozenset(filter(None, os.environ.get("REJOIN_BENCH_HIDE", "").split(",")))

class Hide:
    # Installed here, absent from the Lambda layer: import fails as it would there.
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Hide())
sys.path.insert(0, shared)
start, cpu = time.perf_counter(), time.process_time()
if target == "boto3":
    import boto3
else:
    folder = target.rsplit("/", 1)[0]
    sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location("app", target)
    module = importlib.util.module_from_spec(spec)
    sys.modules["app"] = module
    spec.loader.exec_module(module)
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
watched = sys.argv[3].split(",")
loaded = {m: m in sys.modules for m in watched}
print(json.dumps({"seconds": seconds, "cpu": cpu, "loaded": loaded}))
"""


def handlers() -> list[str]:
    """Functions with an ``app.py``: authorize, connect, disconnect, message, cleanup, turn, api."""
    order = ["authorize", "connect", "disconnect", "message", "cleanup", "turn", "api"]
    present = {p.parent.name for p in (REPO_ROOT / "functions").glob("*/app.py")}
    return [n for n in order if n in present] + sorted(present - set(order))


def _requirements(path: Path) -> list[str]:
    if not path.is_file():
        return []
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def _closure(requirements: list[str]) -> set[str]:
    """Distributions (canonical names) these requirements pull in, extras and markers applied."""
    extras_of: dict[str, set[str]] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in extras_of and set(req.extras) <= extras_of[name]:
            continue
        extras = extras_of.setdefault(name, set())
        extras.update(req.extras)
        try:
            requires = metadata.distribution(req.name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for raw in requires:
            sub = Requirement(raw)
            if sub.marker is None or any(
                sub.marker.evaluate({"extra": e}) for e in (extras | {""})
            ):
                todo.append(sub)
    return set(extras_of)


def _top_levels(dist: metadata.Distribution) -> set[str]:
    text = dist.read_text("top_level.txt")
    if text:
        return {line.strip() for line in text.splitlines() if line.strip()}
    out = set()
    for file in dist.files or []:
        first = file.parts[0]
        if first in ("..", "__pycache__") or first.endswith((".dist-info", ".data", ".pth")):
            continue
        out.add(first.split(".")[0] if "." in first else first)
    return out


@functools.cache
def hidden_packages(function: str) -> tuple[str, ...]:
    """Top-level modules installed here but not in ``function``'s Lambda dependencies."""
    needed = _closure(
        [
            *_requirements(REPO_ROOT / "shared" / "requirements.txt"),
            *_requirements(REPO_ROOT / "functions" / function / "requirements.txt"),
            *RUNTIME_PACKAGES,
        ]
    )
    keep: set[str] = set()
    hide: set[str] = set()
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"] or "")
        (keep if name in needed else hide).update(_top_levels(dist))
    return tuple(sorted(hide - keep - set(sys.stdlib_module_names)))


def _env(function: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    # As on Lambda: nothing from this checkout besides what the child puts on its path.
    env["POWERTOOLS_SERVICE_NAME"] = "rejoin"
    env["AWS_DEFAULT_REGION"] = env.get("AWS_DEFAULT_REGION", "us-east-1")
    env["REJOIN_BENCH_HIDE"] = ",".join(hidden_packages(function))
    return env


def _import_once(target: str, *, importtime: bool = False) -> tuple[dict[str, Any], str]:
    path = target if target == "boto3" else str(REPO_ROOT / "functions" / target / "app.py")
    args = [sys.executable]
    if importtime:
        args += ["-X", "importtime"]
    args += ["-c", _CHILD, path, str(REPO_ROOT / "shared"), ",".join(WATCHED)]
    done = subprocess.run(
        args, capture_output=True, text=True, env=_env(target), cwd=REPO_ROOT, timeout=120
    )
    if done.returncode != 0:
        raise RuntimeError(f"importing {target} failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result, done.stderr


_IMPORTTIME = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def _self_time_by_package(stderr: str) -> dict[str, float]:
    # -X importtime: "import time: self [us] | cumulative | name"; add up each
    # module's own time under its top-level package.
    out: dict[str, float] = defaultdict(float)
    for match in _IMPORTTIME.finditer(stderr):
        out[match.group(4).split(".")[0]] += int(match.group(1)) / 1000
    return dict(out)


def run_imports(report: Report, *, quick: bool) -> None:
    """Time the imports and check what each handler loads."""
    # --quick skips the slow turn worker (the Agents SDK alone takes seconds).
    names = [n for n in handlers() if not (quick and n == "turn")]
    targets = ["boto3", *names]
    rounds = QUICK_ROUNDS if quick else ROUNDS
    samples: dict[str, list[float]] = {t: [] for t in targets}
    cpu: dict[str, list[float]] = {t: [] for t in targets}
    loaded: dict[str, dict[str, bool]] = {}
    if not quick:
        for target in targets:  # warm the disk cache and the bytecode caches
            _import_once(target)
    for i in range(rounds):
        shift = i % len(targets)
        for target in targets[shift:] + targets[:shift]:
            result, _ = _import_once(target)
            samples[target].append(result["seconds"] * 1000)
            cpu[target].append(result["cpu"] * 1000)
            loaded[target] = result["loaded"]
    rows = []
    base, base_cpu = samples["boto3"], cpu["boto3"]
    for target in targets:
        sm, sc = summarize(samples[target]), summarize(cpu[target])
        label = "import boto3" if target == "boto3" else f"functions/{target}/app.py"
        watched = ", ".join(m for m in WATCHED if loaded[target][m]) or "-"
        rows.append(
            [
                label,
                sc.median,
                ratio(cpu[target], base_cpu),
                sm.median,
                sm.p90,
                ratio(samples[target], base),
                watched,
            ]
        )
    print_table(
        f"Cold import, fresh interpreter each, dev-only packages hidden ({rounds} rounds, "
        "rotating order; CPU ms = the child's process time, wall ms = elapsed)",
        [
            "import",
            "CPU ms (median)",
            "CPU ratio to boto3",
            "wall ms (median)",
            "wall p90",
            "wall ratio to boto3",
            "heavy packages loaded",
        ],
        rows,
    )
    hidden = hidden_packages("connect")
    examples = ", ".join(m for m in hidden if m in ("rich", "pygments", "pytest", "moto", "redis"))
    print(
        f"Hidden in each child (installed here, not in the layer): {len(hidden)} top-level "
        f"modules, e.g. {examples}."
    )
    report.data["imports"] = {
        t: {
            "wall_ms": summarize(samples[t]).__dict__,
            "wall_ratio_to_boto3": ratio(samples[t], base),
            "cpu_ms": summarize(cpu[t]).__dict__,
            "cpu_ratio_to_boto3": ratio(cpu[t], base_cpu),
            "loaded": loaded[t],
        }
        for t in targets
    }
    if not quick:
        # Where the time goes: -X importtime, own time per top-level package, median of runs.
        rows = []
        for name in names:
            runs = [
                _self_time_by_package(_import_once(name, importtime=True)[1])
                for _ in range(IMPORTTIME_RUNS)
            ]
            packages = {p for run in runs for p in run}
            by_package = sorted(
                ((p, statistics.median(run.get(p, 0.0) for run in runs)) for p in packages),
                key=lambda kv: -kv[1],
            )
            top = ", ".join(f"{pkg} {ms:.0f}" for pkg, ms in by_package[:6])
            rows.append([name, sum(ms for _, ms in by_package), top])
        print_table(
            f"Where import time goes (`-X importtime`, own time per top-level package, "
            f"median of {IMPORTTIME_RUNS} runs; ms)",
            ["handler", "total ms", "largest packages (ms)"],
            rows,
        )
    for name in MUST_NOT_IMPORT_AGENTS:
        if name in loaded:
            report.check(f"functions/{name} does not import agents", not loaded[name]["agents"])
            report.goal(
                f"cold import of functions/{name} / import boto3, CPU time ({rounds} rounds)",
                ratio(cpu[name], base_cpu),
                IMPORT_GOAL,
            )
    if "turn" in loaded:
        report.check("functions/turn imports agents (it runs the agent)", loaded["turn"]["agents"])
