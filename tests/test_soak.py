"""A seeded random soak through the real handlers, with faults on a few percent of
all store requests (answer lost after apply, 503, hang past the client timeout).

Several sessions, a few participants each, thousands of operations: messages
(resent with the same id until acknowledged, as a client does), pings,
drops and reconnects with resume, leaves, agent turns (redelivered when they
fail, as SQS does) and cleanups. At the end it prints what it did and what it
found, and fails on any duplicate or loss:

- duplicate: a message or agent reply logged twice, an item stored twice in
  the agent's history, an event delivered twice to one connection;
- loss: an acknowledged message missing from the log or from the agent's
  history, a turn that never got its reply.

``REJOIN_SOAK_OPS`` (default 2000) and ``REJOIN_SOAK_SEED`` (default 8) change
the run; the figures in bench/README.md come from
``REJOIN_SOAK_OPS=10000 make test ARGS="-k soak -s"``.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis
from harness import Stack, make_stack, offline_agent

from rejoin import rooms
from rejoin import session as store
from rejoin._lua import Script
from rejoin.runtime import set_runtime

OPS = int(os.environ.get("REJOIN_SOAK_OPS", "2000"))
SEED = int(os.environ.get("REJOIN_SOAK_SEED", "8"))
FAULT_RATE = 0.03
SESSIONS = 6
PEOPLE = ("ada", "bob", "cy")


@dataclass
class Person:
    user: str
    session: str
    cid: str | None = None
    epoch: str | None = None
    last_seq: int = 0
    sent: int = 0
    acked: dict[str, int] = field(default_factory=dict)  # message id -> seq


@dataclass
class Tally:
    operations: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    duplicates: list[str] = field(default_factory=list)
    losses: list[str] = field(default_factory=list)


def test_soak(upstash: Any, raw_redis: redis.Redis) -> None:
    rng = random.Random(SEED)
    stack = make_stack(
        upstash,
        agent=offline_agent(),
        upstash_timeout=0.3,
        event_log_size=100_000,  # nothing trimmed: every message can be checked
        compact_at_tokens=0,  # every item stays, so every message can be checked
    )
    tally = Tally()
    try:
        _warm(stack)
        injected = upstash.faults.chaos(FAULT_RATE, seed=SEED, hang_seconds=0.5)
        people = [Person(u, f"soak-{n}") for n in range(SESSIONS) for u in PEOPLE]
        for _ in range(OPS):
            _step(stack, rng.choice(people), rng, tally)
            if rng.random() < 0.05:
                _turns(stack, tally)
        upstash.faults.clear()
        upstash.faults.settle()
        _turns(stack, tally, until_done=True)
        for p in people:
            _check(stack, raw_redis, p, tally)
        for n in range(SESSIONS):
            _check_session(stack, raw_redis, f"soak-{n}", people, tally)
    finally:
        upstash.faults.clear()
        set_runtime(None)
    report = {
        "operations": sum(tally.operations.values()),
        "by_kind": dict(tally.operations),
        "faults_injected": dict(injected),
        "clear_errors": dict(tally.errors),
        "duplicates": len(tally.duplicates),
        "losses": len(tally.losses),
    }
    print("\nsoak:", json.dumps(report, sort_keys=True))
    assert sum(injected.values()) > OPS // 100, "the soak injected almost no faults"
    assert tally.duplicates == [], tally.duplicates[:10]
    assert tally.losses == [], tally.losses[:10]


def _warm(stack: Stack) -> None:
    async def load() -> None:
        client = stack.rt.redis()
        for module in (rooms, store):
            for value in vars(module).values():
                if isinstance(value, Script):
                    await client.script_load(value.source)  # type: ignore[attr-defined]

    stack.rt.run(load())


def _connect(stack: Stack, p: Person, tally: Tally) -> bool:
    try:
        status, cid = stack.connect(p.session, p.user)
    except Exception as exc:  # the store failed on both tries: a 500 to the client
        tally.errors[f"connect:{type(exc).__name__}"] += 1
        return False
    if status != 200:
        tally.errors[f"connect:{status}"] += 1
        return False
    p.cid = cid
    stack.send(cid, {"action": "resume", "epoch": p.epoch, "last_seq": p.last_seq})
    welcome = [f for f in stack.frames(cid) if f["type"] == "welcome"]
    if not welcome:
        tally.errors["resume:" + _last_error(stack, cid)] += 1
        p.cid = None  # try again later, as a client would
        stack.drop(cid)
        return False
    w = welcome[-1]
    if p.epoch is not None and w["epoch"] != p.epoch:
        tally.losses.append(f"{p.session}/{p.user}: the session was lost while in use")
    p.epoch = w["epoch"]
    _advance(stack, p)
    return True


def _advance(stack: Stack, p: Person) -> None:
    assert p.cid is not None
    seqs = [e["seq"] for f in stack.frames(p.cid, "welcome", "replay") for e in _backlog(f)]
    seqs += [f["seq"] for f in stack.logged(p.cid)]
    if seqs:
        p.last_seq = max(p.last_seq, *seqs)


def _backlog(frame: dict[str, Any]) -> list[dict[str, Any]]:
    return list(frame.get("events") or []) + list(frame.get("transcript") or [])


def _last_error(stack: Stack, cid: str) -> str:
    errors = stack.frames(cid, "error")
    return errors[-1]["code"] if errors else "none"


def _step(stack: Stack, p: Person, rng: random.Random, tally: Tally) -> None:
    if p.cid is None:
        tally.operations["connect"] += 1
        _connect(stack, p, tally)
        return
    roll = rng.random()
    if roll < 0.6:
        tally.operations["say"] += 1
        p.sent += 1
        mid = f"{p.user}-{p.sent}"
        for _attempt in range(5):  # a client resends until acknowledged
            reply = stack.say(p.cid, f"{p.session} {mid}", msg_id=mid)
            if reply["type"] == "ack":
                p.acked[mid] = reply["seq"]
                break
            tally.errors[f"say:{reply['code']}"] += 1
        else:
            tally.errors["say:gave_up"] += 1
    elif roll < 0.75:
        tally.operations["ping"] += 1
        stack.send(p.cid, {"action": "ping"})
    elif roll < 0.9:
        tally.operations["drop_and_resume"] += 1
        _advance(stack, p)
        stack.drop(p.cid)
        p.cid = None
        _connect(stack, p, tally)
    elif roll < 0.95:
        tally.operations["leave"] += 1
        _advance(stack, p)
        stack.send(p.cid, {"action": "leave"})
        stack.sender.close_socket(p.cid)
        p.cid = None
    else:
        tally.operations["cleanup"] += 1
        try:
            stack.cleanup()
        except Exception as exc:
            tally.errors[f"cleanup:{type(exc).__name__}"] += 1


def _turns(stack: Stack, tally: Tally, *, until_done: bool = False) -> None:
    for _ in range(200 if until_done else 1):
        sessions = stack.queue.sessions()
        if not sessions:
            return
        for sid in sessions:
            batch = stack.queue.take(sid)
            tally.operations["turn_batch"] += 1
            try:
                result = stack.deliver(batch)
                failed = {f["itemIdentifier"] for f in result["batchItemFailures"]}
            except Exception as exc:
                tally.errors[f"turn:{type(exc).__name__}"] += 1
                failed = {"*"}
            if failed:
                tally.errors["turn:redelivered"] += 1
                # SQS redelivers the failed record and the ones after it, in order
                stack.queue._queues[sid] = batch + stack.queue._queues.get(sid, [])


def _check(stack: Stack, raw_redis: redis.Redis, p: Person, tally: Tally) -> None:
    for cid in [c for c, ident in stack.identities.items() if ident["session"] == p.session]:
        if stack.identities[cid]["user"] != p.user:
            continue
        seqs = [f["seq"] for f in stack.logged(cid)]
        for seq, n in Counter(seqs).items():
            if n > 1:
                tally.duplicates.append(f"{p.session}/{cid}: event {seq} delivered {n} times")


def _check_session(
    stack: Stack, raw_redis: redis.Redis, sid: str, people: list[Person], tally: Tally
) -> None:
    events = [json.loads(e) for e in raw_redis.lrange(f"rejoin:{{{sid}}}:events", 0, -1)]
    items = [json.loads(i) for i in raw_redis.lrange(f"rejoin:{{{sid}}}:items", 0, -1)]
    epochs = {p.epoch for p in people if p.session == sid}
    messages = Counter((e["user"], e["id"]) for e in events if e["type"] == "message")
    for key, n in messages.items():
        if n > 1:
            tally.duplicates.append(f"{sid}: message {key} logged {n} times")
    replies = Counter(e["turn"] for e in events if e["type"] == "agent_message")
    for turn, n in replies.items():
        if n > 1:
            tally.duplicates.append(f"{sid}: turn {turn} answered {n} times")
    said = Counter(i["content"] for i in items if i.get("role") == "user")
    for _content, n in said.items():
        if n > 1:
            tally.duplicates.append(f"{sid}: history holds a message {n} times")
    if len(epochs) != 1:
        return  # the session expired and started over: its old log is gone on purpose
    in_history = {(b["speaker"]["user"], b["id"]) for b in map(json.loads, said)}
    for p in people:
        if p.session != sid:
            continue
        for mid in p.acked:
            if (p.user, mid) not in messages:
                tally.losses.append(f"{sid}: acknowledged {mid} is not in the log")
            if (p.user, mid) not in in_history:
                tally.losses.append(f"{sid}: acknowledged {mid} is not in the agent's history")
    answered = {e["reply_to"] for e in events if e["type"] == "agent_message"}
    asked = {e["seq"] for e in events if e["type"] == "message"}
    for seq in sorted(asked - answered):
        tally.losses.append(f"{sid}: message {seq} never got the agent's answer")
