"""The fault matrix: every room transition and every store write, with each fault
the Upstash path has, on its first try, and on every try where that is the
fault that really happens.

The local Upstash-compatible endpoint injects the faults for one script at a
time (matched by its sha1):

- ``lose``: the script is applied, then its answer is lost (a 502 with no
  JSON); ``upstash-redis`` retries the same request, not knowing it was applied;
- ``fail``: a 503 before anything is applied; the client retries;
- ``hang``: the request waits past the client's timeout, then is applied; the
  client has retried meanwhile, so both copies reach Redis.

For each, what every participant received and what is stored afterwards is
checked: each event reaches each connection once, nothing is stored twice,
nothing is lost, and an operation that really failed (the fault on every try)
gives one clear error and changes nothing.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from agents.testing import ModelStep, assistant_message
from harness import Stack, make_stack, offline_agent, scripted_agent

from rejoin import UpstashSession, rooms
from rejoin import session as store
from rejoin._lua import Script
from rejoin.runtime import set_runtime

FIRST_TRY = ["lose", "fail", "hang"]
TIMEOUT = 0.5  # the client's request timeout here; a hang lasts longer
HANG = 1.0


def inject(upstash: Any, kind: str, script: Script, times: int = 1) -> None:
    if kind == "lose":
        upstash.faults.lose_response(times=times, script=script.sha)
    elif kind == "fail":
        upstash.faults.fail(503, times=times, script=script.sha)
    else:
        upstash.faults.hang(HANG, times=times, script=script.sha)


def scripts(module: Any) -> list[Script]:
    return [v for v in vars(module).values() if isinstance(v, Script)]


@pytest.fixture
def stack(upstash: Any) -> Iterator[Stack]:
    s = make_stack(upstash, agent=offline_agent(), upstash_timeout=TIMEOUT, rate_limit=50)

    async def warm() -> None:
        # Every script cached, so a fault meets the request it is meant for
        # (not a first EVALSHA answered NOSCRIPT).
        client = s.rt.redis()
        for script in [*scripts(rooms), *scripts(store)]:
            await client.script_load(script.source)  # type: ignore[attr-defined]

    s.rt.run(warm())
    yield s
    set_runtime(None)


def check_no_duplicates(stack: Stack, raw_redis: redis.Redis, session: str) -> None:
    """Each logged event reached each connection at most once, and the log and
    the agent's history hold nothing twice."""
    for cid in stack.identities:
        seqs = [f["seq"] for f in stack.logged(cid)]
        assert len(seqs) == len(set(seqs)), f"{cid} got an event twice: {seqs}"
        acks = Counter(f["id"] for f in stack.frames(cid, "ack") if not f["duplicate"])
        assert all(n == 1 for n in acks.values()), acks
    events = [json.loads(e) for e in raw_redis.lrange(f"rejoin:{{{session}}}:events", 0, -1)]
    assert [e["seq"] for e in events] == sorted({e["seq"] for e in events})
    messages = Counter((e["user"], e["id"]) for e in events if e["type"] == "message")
    assert all(n == 1 for n in messages.values()), messages
    replies = Counter(e["turn"] for e in events if e["type"] == "agent_message")
    assert all(n == 1 for n in replies.values()), replies
    items = raw_redis.lrange(f"rejoin:{{{session}}}:items", 0, -1)
    assert len(items) == len(set(items)), "an item was stored twice"


def seen(stack: Stack, cid: str, kind: str) -> list[dict[str, Any]]:
    return [f for f in stack.logged(cid) if f["type"] == kind]


# --- the room transitions, through the real handlers -----------------------------


def op_connect(stack: Stack, upstash: Any, kind: str) -> None:
    ada, _ = stack.join("f", "ada")
    inject(upstash, kind, rooms._CONNECT)
    status, _bob = stack.connect("f", "bob")
    assert status == 200
    # Ada saw Bob arrive once ("active, away, active" would be a replayed join)
    assert [(p["user"], p["status"]) for p in seen(stack, ada, "presence")] == [("bob", "active")]
    state = stack.rt.run(stack.rt.rooms().status("f"))
    assert state["connections"] == 2


def op_resume(stack: Stack, upstash: Any, kind: str) -> None:
    ada, _ = stack.join("f", "ada")
    stack.say(ada, "before bob")
    _status, bob = stack.connect("f", "bob")
    inject(upstash, kind, rooms._RESUME)
    welcome = stack.resume(bob)
    assert [e["text"] for e in welcome["transcript"] if e["type"] == "message"] == ["before bob"]
    assert len(stack.frames(bob, "welcome")) == 1
    stack.say(ada, "after bob")
    assert [m["text"] for m in seen(stack, bob, "message")] == ["after bob"]


def op_say(stack: Stack, upstash: Any, kind: str) -> None:
    ada, _ = stack.join("f", "ada")
    bob, _ = stack.join("f", "bob")
    inject(upstash, kind, rooms._SAY)
    ack = stack.say(ada, "exactly once", msg_id="m-1")
    # THEN the sender got a normal ack, and everyone the message live, once
    assert ack["type"] == "ack" and ack["duplicate"] is False
    for cid in (ada, bob):
        assert [m["text"] for m in seen(stack, cid, "message")] == ["exactly once"]
    assert len(stack.queue.pending("f")) == 1
    stack.run_turns()
    for cid in (ada, bob):
        assert len(seen(stack, cid, "agent_message")) == 1


def op_ping(stack: Stack, upstash: Any, kind: str) -> None:
    ada, _ = stack.join("f", "ada")
    inject(upstash, kind, rooms._PING)
    stack.send(ada, {"action": "ping"})
    assert len(stack.frames(ada, "pong")) == 1 and not stack.frames(ada, "error")


def op_leave(stack: Stack, upstash: Any, kind: str) -> None:
    ada, _ = stack.join("f", "ada")
    bob, _ = stack.join("f", "bob")
    inject(upstash, kind, rooms._DEPART)
    stack.send(bob, {"action": "leave"})
    assert len(stack.frames(bob, "left")) == 1
    assert [(p["user"], p["status"]) for p in seen(stack, ada, "presence")][-1:] == [
        ("bob", "left")
    ]
    assert sum(1 for p in seen(stack, ada, "presence") if p["status"] == "left") == 1


def op_disconnect(stack: Stack, upstash: Any, kind: str) -> None:
    ada, _ = stack.join("f", "ada")
    bob, _ = stack.join("f", "bob")
    inject(upstash, kind, rooms._DEPART)
    stack.drop(bob)
    assert sum(1 for p in seen(stack, ada, "presence") if p["status"] == "away") == 1
    inject(upstash, kind, rooms._DEPART)
    stack.drop(ada)  # the last one: grace starts, once
    state = stack.rt.run(stack.rt.rooms().status("f"))
    assert state["state"] == "grace" and state["connections"] == 0


def op_turn(script: Script) -> Callable[[Stack, Any, str], None]:
    def run(stack: Stack, upstash: Any, kind: str) -> None:
        ada, _ = stack.join("f", "ada")
        bob, _ = stack.join("f", "bob")
        stack.say(ada, "question")
        inject(upstash, kind, script)
        stack.run_turns()
        for cid in (ada, bob):
            assert len(seen(stack, cid, "agent_message")) == 1

    return run


def op_release(stack: Stack, upstash: Any, kind: str) -> None:
    stack.agent = scripted_agent(
        [ModelStep.raise_error(RuntimeError("model down")), [assistant_message("fine now")]]
    )
    ada, _ = stack.join("f", "ada")
    stack.say(ada, "question")
    batch = stack.queue.take("f")
    inject(upstash, kind, rooms._RELEASE_TURN)
    assert stack.deliver(batch)["batchItemFailures"]
    assert len(stack.frames(ada, "error")) == 1  # turn_failed, once
    # the lease was released: the retry runs at once
    assert stack.deliver(batch)["batchItemFailures"] == []
    assert [m["text"] for m in seen(stack, ada, "agent_message")] == ["fine now"]


def op_stop(stack: Stack, upstash: Any, kind: str) -> None:
    ada, _ = stack.join("f", "ada")
    inject(upstash, kind, rooms._STOP)
    stack.send(ada, {"action": "stop"})
    assert len(stack.frames(ada, "stopping")) == 1 and not stack.frames(ada, "error")


def op_kick(stack: Stack, upstash: Any, kind: str) -> None:
    _ada, _ = stack.join("f", "ada")
    mal, _ = stack.join("f", "mal")
    inject(upstash, kind, rooms._KICK)
    kicked = stack.rt.run(stack.rt.rooms().kick("f", "mal"))
    assert kicked is not None and kicked.connections == [mal]
    assert kicked.event is not None and kicked.event["status"] == "removed"


def op_end(stack: Stack, upstash: Any, kind: str) -> None:
    ada, _ = stack.join("f", "ada")
    inject(upstash, kind, rooms._END)
    # a lost answer must not turn "ended" into "there was no such session"
    assert stack.rt.run(stack.rt.rooms().end("f")) == [ada]


def op_create(stack: Stack, upstash: Any, kind: str) -> None:
    inject(upstash, kind, rooms._CREATE)
    epoch, created = stack.rt.run(stack.rt.rooms().create("f", mode="every"))
    assert created is True
    assert stack.rt.run(stack.rt.rooms().status("f"))["epoch"] == epoch


def op_visit(stack: Stack, upstash: Any, kind: str) -> None:
    ada, _ = stack.join("f", "ada")
    stack.drop(ada)
    stack.clock.advance(123)
    inject(upstash, kind, rooms._VISIT)
    report = stack.cleanup()
    assert report["expired"] + report["already_gone"] == ["f"]
    assert stack.rt.run(stack.rt.rooms().status("f")) is None


def op_stale(stack: Stack, upstash: Any, kind: str) -> None:
    ada, _ = stack.join("f", "ada")
    bob, _ = stack.join("f", "bob")
    stack.drop(bob, lose_disconnect=True)
    stack.clock.advance(300)
    stack.send(ada, {"action": "ping"})
    stack.clock.advance(400)
    inject(upstash, kind, rooms._DEPART)
    report = stack.cleanup()
    assert report["stale_connections"] == [bob]
    assert sum(1 for p in seen(stack, ada, "presence") if p["status"] == "away") == 1


ROOM_OPS: dict[str, Callable[[Stack, Any, str], None]] = {
    "connect": op_connect,
    "resume": op_resume,
    "say": op_say,
    "ping": op_ping,
    "leave": op_leave,
    "disconnect": op_disconnect,
    "begin_turn": op_turn(rooms._BEGIN_TURN),
    "commit_turn": op_turn(rooms._COMMIT_TURN),
    "release_turn": op_release,
    "stop": op_stop,
    "kick": op_kick,
    "end": op_end,
    "create": op_create,
    "cleanup_visit": op_visit,
    "cleanup_stale_disconnect": op_stale,
}


@pytest.mark.parametrize("kind", FIRST_TRY)
@pytest.mark.parametrize("op", sorted(ROOM_OPS))
def test_room_transition_survives_a_fault_on_its_first_try(
    stack: Stack, upstash: Any, raw_redis: redis.Redis, op: str, kind: str
) -> None:
    ROOM_OPS[op](stack, upstash, kind)
    assert upstash.faults.pending() == 0, "the fault was never met"
    check_no_duplicates(stack, raw_redis, "f")


# --- when the fault is on every try: one clear error, nothing changed --------------


@pytest.mark.parametrize("kind", ["fail", "hang"])
@pytest.mark.parametrize(
    "frame, script",
    [
        ({"action": "say", "id": "m-9", "text": "lost?"}, rooms._SAY),
        ({"action": "ping"}, rooms._PING),
        ({"action": "resume"}, rooms._RESUME),
        ({"action": "leave"}, rooms._DEPART),
        ({"action": "stop"}, rooms._STOP),
    ],
)
def test_a_frame_that_really_failed_gets_one_clear_error(
    stack: Stack,
    upstash: Any,
    raw_redis: redis.Redis,
    frame: dict[str, Any],
    script: Script,
    kind: str,
) -> None:
    ada, _ = stack.join("f", "ada")
    bob, _ = stack.join("f", "bob")
    keep = ("events", "items", "users", "meta")
    before = {k: raw_redis.dump(f"rejoin:{{f}}:{k}") for k in keep}
    inject(upstash, kind, script, times=2)  # the first try and the client's retry
    stack.send(ada, frame)
    (error,) = stack.frames(ada, "error")
    # a timeout may have been applied after all: only a refusal is "not applied"
    wording = "not applied" if kind == "fail" else "may have been applied"
    assert error["code"] == "internal" and wording in error["message"]
    if frame.get("id"):
        assert error["id"] == frame["id"]
    upstash.faults.clear()
    if kind == "hang":
        # the hung requests were applied later, as a delayed request would be:
        # at most once, and the others saw it at most once
        check_no_duplicates(stack, raw_redis, "f")
        return
    assert {k: raw_redis.dump(f"rejoin:{{f}}:{k}") for k in keep} == before
    assert not seen(stack, bob, "message") or frame["action"] != "say"
    assert stack.queue.pending() == []


def test_a_say_that_timed_out_on_every_try_is_not_reported_as_unapplied(
    stack: Stack, upstash: Any, raw_redis: redis.Redis
) -> None:
    """GIVEN the say script hangs past the client's timeout on the first try and
    on the client's retry (both copies reach Redis later, as a slow request does)
    WHEN Ada sends a say
    THEN her error does not claim the frame was not applied (it was), it says the
    outcome is unknown and that resending the same id is safe
    AND resending it then is acknowledged as the message already stored, once."""
    ada, _ = stack.join("f", "ada")
    inject(upstash, "hang", rooms._SAY, times=2)
    stack.send(ada, {"action": "say", "id": "m-t", "text": "slow"})
    (error,) = stack.frames(ada, "error")
    assert error["code"] == "internal" and error["id"] == "m-t"
    assert "not applied" not in error["message"]
    assert "may have been applied" in error["message"] and "same id" in error["message"]
    upstash.faults.clear()
    # the hung copies land (HANG seconds in) after the client gave up
    deadline = time.monotonic() + 5 * HANG
    while time.monotonic() < deadline and not raw_redis.hget("rejoin:{f}:meta", "m:ada:m-t"):
        time.sleep(0.05)
    ack = stack.say(ada, "slow", msg_id="m-t")
    assert ack["type"] == "ack" and ack["duplicate"] is True
    check_no_duplicates(stack, raw_redis, "f")


def test_a_turn_whose_commit_really_failed_is_retried_and_answers_once(
    stack: Stack, upstash: Any, raw_redis: redis.Redis
) -> None:
    ada, _ = stack.join("f", "ada")
    stack.say(ada, "question")
    batch = stack.queue.take("f")
    inject(upstash, "fail", rooms._COMMIT_TURN, times=2)
    assert stack.deliver(batch)["batchItemFailures"]
    assert stack.last(ada, "error")["code"] == "turn_failed"
    assert [i for i in raw_redis.lrange("rejoin:{f}:items", 0, -1) if '"assistant"' in i] == []
    assert stack.deliver(batch)["batchItemFailures"] == []
    assert len(seen(stack, ada, "agent_message")) == 1
    check_no_duplicates(stack, raw_redis, "f")


def test_a_connect_that_really_failed_stores_nothing(
    stack: Stack, upstash: Any, raw_redis: redis.Redis
) -> None:
    inject(upstash, "fail", rooms._CONNECT, times=2)
    with pytest.raises(Exception, match="Upstash"):
        stack.connect("f", "ada")
    assert raw_redis.keys("rejoin:{f}:*") == []


# --- the store's own writes, through UpstashSession --------------------------------


@pytest.mark.parametrize("kind", FIRST_TRY)
@pytest.mark.parametrize("method", ["add_items", "pop_item", "clear_session", "replace"])
async def test_store_write_survives_a_fault_on_its_first_try(
    upstash: Any, raw_redis: redis.Redis, method: str, kind: str
) -> None:
    from rejoin import upstash_client

    client = upstash_client(upstash.url, upstash.token, timeout=TIMEOUT, retry_interval=0.01)
    for script in scripts(store):
        await client.script_load(script.source)
    s = UpstashSession("store-f", redis=client)
    await s.add_items([{"role": "user", "content": "one"}, {"role": "user", "content": "two"}])
    target = {
        "add_items": store._ADD,
        "pop_item": store._POP,
        "clear_session": store._CLEAR,
        "replace": store._REPLACE,
    }[method]
    inject(upstash, kind, target)
    if method == "add_items":
        await s.add_items([{"role": "user", "content": "three"}])
        expected = ["one", "two", "three"]
    elif method == "pop_item":
        assert await s.pop_item() == {"role": "user", "content": "two"}
        expected = ["one"]
    elif method == "clear_session":
        await s.clear_session()
        expected = []
    else:
        await s._atomic_replace_items([{"role": "user", "content": "summary"}])
        expected = ["summary"]
    assert [i["content"] for i in await s.get_items()] == expected  # type: ignore[index]
    assert upstash.faults.pending() == 0
    await client.close()


async def test_calling_add_items_again_after_unavailable_stores_it_once(
    upstash: Any,
) -> None:
    from rejoin import upstash_client
    from rejoin.errors import StoreUnavailable

    client = upstash_client(upstash.url, upstash.token, timeout=TIMEOUT, retry_interval=0.01)
    for script in scripts(store):
        await client.script_load(script.source)
    s = UpstashSession("store-g", redis=client)
    # GIVEN the first try is applied and its answer lost, and the retry fails
    upstash.faults.lose_response(script=store._ADD.sha)
    upstash.faults.fail(503, script=store._ADD.sha)
    with pytest.raises(StoreUnavailable):
        await s.add_items([{"role": "user", "content": "once"}])
    # WHEN the application calls it again, as the error says it may
    await s.add_items([{"role": "user", "content": "once"}])
    # THEN the item is there once
    assert await s.get_items() == [{"role": "user", "content": "once"}]
    # AND a later, deliberate repeat is a new write
    await s.add_items([{"role": "user", "content": "once"}])
    assert len(await s.get_items()) == 2
    await client.close()


async def test_idempotency_records_never_outlive_the_sessions_ttl(
    upstash: Any, raw_redis: redis.Redis
) -> None:
    from rejoin import upstash_client

    client = upstash_client(upstash.url, upstash.token)
    # GIVEN a session that expires 100 s after its last use
    s = UpstashSession("store-ttl", redis=client, ttl_seconds=100)
    await s.add_items([{"role": "user", "content": "one"}, {"role": "user", "content": "two"}])
    await s.pop_item()  # records its answer too
    # THEN the operation records expire with it, not 15 minutes later
    for key in (s.keys.items, s.keys.ops, s.keys.results):
        assert 0 < raw_redis.pttl(key) <= 100_000, key
    # AND without a TTL they are kept 15 minutes (for a client's retries), no more
    forever = UpstashSession("store-no-ttl", redis=client)
    await forever.add_items([{"role": "user", "content": "one"}])
    assert raw_redis.pttl(forever.keys.items) == -1
    assert 0 < raw_redis.pttl(forever.keys.ops) <= 900_000
