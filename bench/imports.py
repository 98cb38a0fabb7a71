"""Cold import time of each Lambda handler against ``import boto3``.

Each import runs in a fresh interpreter (a cold start's import phase), with
``shared/`` on the path as the layer puts it and the function's folder as the
task root. Handlers and boto3 take turns, round after round (the order
rotates), and each handler is reported as a ratio of medians to boto3 in the
same run. Each child also reports which heavy packages ended up in
``sys.modules``: connect, disconnect, message and cleanup must not load the
Agents SDK.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from typing import Any

from ._measure import Report, print_table, ratio, summarize
from ._stack import REPO_ROOT

__all__ = ["run_imports"]

ROUNDS, QUICK_ROUNDS = 15, 1
MUST_NOT_IMPORT_AGENTS = ("connect", "disconnect", "message", "cleanup")
WATCHED = ("agents", "openai", "boto3", "botocore", "pydantic", "fastapi", "httpx")

_CHILD = r"""
import importlib.util, json, sys, time
target, shared = sys.argv[1], sys.argv[2]
sys.path.insert(0, shared)
start = time.perf_counter()
if target == "boto3":
    import boto3
else:
    folder = target.rsplit("/", 1)[0]
    sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location("app", target)
    module = importlib.util.module_from_spec(spec)
    sys.modules["app"] = module
    spec.loader.exec_module(module)
seconds = time.perf_counter() - start
watched = sys.argv[3].split(",")
print(json.dumps({"seconds": seconds, "loaded": {m: m in sys.modules for m in watched}}))
"""


def handlers() -> list[str]:
    """Functions with an ``app.py``: connect, disconnect, message, cleanup, turn, api."""
    order = ["connect", "disconnect", "message", "cleanup", "turn", "api"]
    present = {p.parent.name for p in (REPO_ROOT / "functions").glob("*/app.py")}
    return [n for n in order if n in present] + sorted(present - set(order))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    # As on Lambda: nothing from this checkout besides what the child puts on its path.
    env["POWERTOOLS_SERVICE_NAME"] = "rejoin"
    env["AWS_DEFAULT_REGION"] = env.get("AWS_DEFAULT_REGION", "us-east-1")
    return env


def _import_once(target: str, *, importtime: bool = False) -> tuple[dict[str, Any], str]:
    path = target if target == "boto3" else str(REPO_ROOT / "functions" / target / "app.py")
    args = [sys.executable]
    if importtime:
        args += ["-X", "importtime"]
    args += ["-c", _CHILD, path, str(REPO_ROOT / "shared"), ",".join(WATCHED)]
    done = subprocess.run(
        args, capture_output=True, text=True, env=_env(), cwd=REPO_ROOT, timeout=120
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
    names = handlers()
    targets = ["boto3", *names]
    rounds = QUICK_ROUNDS if quick else ROUNDS
    samples: dict[str, list[float]] = {t: [] for t in targets}
    loaded: dict[str, dict[str, bool]] = {}
    _import_once("boto3")  # warm the disk cache and the bytecode caches
    for name in names:
        _import_once(name)
    for i in range(rounds):
        shift = i % len(targets)
        for target in targets[shift:] + targets[:shift]:
            result, _ = _import_once(target)
            samples[target].append(result["seconds"] * 1000)
            loaded[target] = result["loaded"]
    rows = []
    base = samples["boto3"]
    for target in targets:
        sm = summarize(samples[target])
        label = "import boto3" if target == "boto3" else f"functions/{target}/app.py"
        watched = ", ".join(m for m in WATCHED if loaded[target][m]) or "-"
        rows.append([label, sm.median, sm.p90, ratio(samples[target], base), watched])
    print_table(
        f"Cold import, fresh interpreter each ({rounds} rounds, rotating order; ms)",
        ["import", "median ms", "p90 ms", "ratio to boto3", "heavy packages loaded"],
        rows,
    )
    report.data["imports"] = {
        t: {"ms": summarize(samples[t]).__dict__, "ratio_to_boto3": ratio(samples[t], base)}
        | {"loaded": loaded[t]}
        for t in targets
    }
    if not quick:
        # Where the time goes: one -X importtime run per handler, by top-level package.
        rows = []
        for name in names:
            _, stderr = _import_once(name, importtime=True)
            by_package = sorted(_self_time_by_package(stderr).items(), key=lambda kv: -kv[1])
            top = ", ".join(f"{pkg} {ms:.0f}" for pkg, ms in by_package[:6])
            rows.append([name, sum(ms for _, ms in by_package), top])
        print_table(
            "Where import time goes (one `-X importtime` run, own time per top-level package, ms)",
            ["handler", "total ms", "largest packages (ms)"],
            rows,
        )
    for name in MUST_NOT_IMPORT_AGENTS:
        if name in loaded:
            report.check(f"functions/{name} does not import agents", not loaded[name]["agents"])
    if "turn" in loaded:
        report.check("functions/turn imports agents (it runs the agent)", loaded["turn"]["agents"])

