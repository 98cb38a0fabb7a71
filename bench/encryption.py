"""What encryption at rest costs per turn: ``python -m bench --only encryption``.

Two deployments side by side on the same endpoint, one with a key: in each,
a participant says something addressed to the agent and the turn runs (the
real handlers, the offline model with no delay, one tool round), timed
interleaved, so the machine's load falls on both alike. Reported: the time
of a say + turn with encryption over the time without, the store requests
(the same: encryption is Python work around the same scripts), and the bytes
the history and the event log take in Redis with and without.
"""

from __future__ import annotations

import time
from typing import Any

from cryptography.fernet import Fernet

from ._measure import Report, print_table, ratio, summarize
from ._stack import Endpoint
from .rooms import HANDLERS, build_stack

ROUNDS = 40
QUICK_ROUNDS = 6
TEXT = "what time is it? " + "a meeting message of ordinary length, " * 4


def _stack(endpoint: Endpoint, keys: tuple[str, ...]) -> Any:
    from harness import offline_agent

    return build_stack(endpoint, offline_agent(), encryption_keys=keys)


def _turn(stack: Any, cid: str, n: int) -> float:
    started = time.perf_counter()
    stack.say(cid, f"@agent {TEXT} {n}", msg_id=f"m-{n}")
    stack.run_turns()
    return time.perf_counter() - started


def _bytes(endpoint: Endpoint, stack: Any, session: str) -> int:
    import redis

    client = redis.Redis.from_url(endpoint.redis_url)
    try:
        prefix = stack.settings.key_prefix
        keys = [f"{prefix}:{{{session}}}:{k}" for k in ("items", "events")]
        return sum(int(client.memory_usage(key) or 0) for key in keys)
    finally:
        client.close()


def run(endpoint: Endpoint, *, quick: bool) -> Report:
    """Time a say + turn with and without encryption at rest; print the table."""
    from rejoin.runtime import set_runtime

    print("\n## Encryption at rest: cost per turn\n")
    report = Report("encryption")
    rounds = QUICK_ROUNDS if quick else ROUNDS
    with HANDLERS.installed():
        plain = _stack(endpoint, ())
        sealed = _stack(endpoint, (Fernet.generate_key().decode(),))
        stacks = {"plain": plain, "encrypted": sealed}
        cids = {}
        for name, stack in stacks.items():
            set_runtime(stack.rt)
            cids[name], _ = stack.join(f"enc-{name}", "ada")
            _turn(stack, cids[name], -1)  # warm the scripts and the model
        times: dict[str, list[float]] = {name: [] for name in stacks}
        requests: dict[str, int] = {name: 0 for name in stacks}
        for n in range(rounds):
            for name in ("plain", "encrypted") if n % 2 else ("encrypted", "plain"):
                stack = stacks[name]
                set_runtime(stack.rt)
                before = endpoint.stats()["total_requests"]
                times[name].append(_turn(stack, cids[name], n))
                requests[name] += endpoint.stats()["total_requests"] - before
        set_runtime(None)
    sizes = {name: _bytes(endpoint, stacks[name], f"enc-{name}") for name in stacks}
    rows = []
    for name in stacks:
        sm = summarize([t * 1000 for t in times[name]])
        rows.append([name, sm.median, sm.p90, requests[name] / rounds, sizes[name] / (rounds + 1)])
    print_table(
        f"A say addressed to the agent and its turn (one tool round), {rounds} each, interleaved",
        ["store", "median ms", "p90 ms", "store requests per say + turn", "stored bytes per turn"],
        rows,
    )
    slower = ratio(times["encrypted"], times["plain"])
    report.goal("say + turn, encrypted / plain (median time)", slower, 1.25)
    report.goal(
        "store requests per say + turn, encrypted - plain",
        (requests["encrypted"] - requests["plain"]) / rounds,
        0,
    )
    report.data.update(times=times, requests=requests, sizes=sizes)
    print(f"\nstored bytes, encrypted / plain: {sizes['encrypted'] / max(1, sizes['plain']):.2f}")
    return report
