"""Rooms end to end: the real handlers with API Gateway-shaped events, the real
store behind the Upstash-compatible endpoint, an injected clock."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
from harness import Stack, make_stack, offline_agent, scripted_agent
from scripted import call, cut, held

from rejoin.errors import SessionGone
from rejoin.runtime import set_runtime
from rejoin.speakers import parse_spoken


@pytest.fixture(params=["upstash", "tcp"])
def stack(request: pytest.FixtureRequest, upstash: Any, redis_url: str) -> Any:
    """The deployment, its store over Upstash REST or over TCP Redis (same Redis)."""
    tcp = {"store_url": redis_url} if request.param == "tcp" else {}
    s = make_stack(upstash, agent=offline_agent(), **tcp)
    yield s
    set_runtime(None)


def session_keys(raw_redis: redis.Redis, session: str) -> list[str]:
    return sorted(raw_redis.keys(f"rejoin:{{{session}}}:*"))


def texts(events: list[dict[str, Any]]) -> list[str]:
    return [e["text"] for e in events if e["type"] in ("message", "agent_message")]


def history(raw_redis: redis.Redis, session: str) -> list[dict[str, Any]]:
    return [json.loads(i) for i in raw_redis.lrange(f"rejoin:{{{session}}}:items", 0, -1)]


def spoken(raw_redis: redis.Redis, session: str) -> list[tuple[str, str]]:
    """(speaker name, text) of the participant messages in the agent's history."""
    out = []
    for item in history(raw_redis, session):
        said = parse_spoken(item)
        if said is not None:
            out.append((said.name, said.text))
    return out


class TestLifecycle:
    def test_chat_drop_resume_at_119s_then_fresh_at_121s(self, stack: Stack, raw_redis):
        # GIVEN Ada and Bob in a session with the agent
        ada, welcome = stack.join("standup", "ada")
        assert welcome["resumed"] is False and welcome["recovered"] is False
        epoch = welcome["epoch"]
        bob, welcome_b = stack.join("standup", "bob")
        assert welcome_b["epoch"] == epoch and welcome_b["resumed"] is True
        stack.say(ada, "hello everyone")
        stack.run_turns()
        # both saw the message and the agent's streamed then final reply
        for cid in (ada, bob):
            assert "hello everyone" in texts(stack.logged(cid))
            assert stack.frames(cid, "agent_delta")
            final = stack.last(cid, "agent_message")
            assert final["text"].startswith("[offline model]")
        seen_by_bob = max(f["seq"] for f in stack.logged(bob))

        # WHEN Bob drops (Ada sees him away), Ada keeps talking
        stack.drop(bob)
        assert stack.last(ada, "presence")["status"] == "away"
        stack.say(ada, "bob, you missed this")
        stack.run_turns()
        # AND everyone leaves; grace starts at T
        stack.drop(ada)
        stack.clock.advance(119)
        # THEN Bob resumes at T+119 s: same epoch, exactly the missed events
        bob2, welcome = stack.join("standup", "bob", epoch=epoch, last_seq=seen_by_bob)
        assert welcome["epoch"] == epoch and welcome["resumed"] is True
        assert welcome["recovered"] is True
        missed = welcome["events"]
        assert [e["seq"] for e in missed] == list(range(seen_by_bob + 1, welcome["seq"] + 1))
        assert "bob, you missed this" in texts(missed)
        assert missed[-1]["type"] == "presence" and missed[-1]["user"] == "bob"
        assert not any(e["seq"] <= seen_by_bob for e in missed)

        # WHEN everyone leaves again and someone connects 121 s later
        stack.drop(bob2)
        stack.clock.advance(121)
        _ada2, welcome = stack.join("standup", "ada", epoch=epoch, last_seq=99)
        # THEN it is a fresh session: new epoch, empty history, resumed false
        assert welcome["resumed"] is False and welcome["epoch"] != epoch
        assert welcome["recovered"] is False
        assert texts(welcome["transcript"]) == []
        assert raw_redis.llen("rejoin:{standup}:items") == 0

    def test_fresh_from_the_deadline_even_before_cleanup(self, stack: Stack, raw_redis):
        ada, welcome = stack.join("s1", "ada")
        stack.say(ada, "old")
        stack.run_turns()
        stack.drop(ada)
        stack.clock.advance(120)  # exactly the deadline: unreachable from here on
        _, fresh = stack.join("s1", "ada", epoch=welcome["epoch"], last_seq=1)
        assert fresh["epoch"] != welcome["epoch"] and not fresh["resumed"]
        assert "old" not in texts(fresh["transcript"])

    def test_new_client_gets_transcript_and_can_recover_from_zero(self, stack: Stack):
        ada, welcome = stack.join("s2", "ada")
        stack.say(ada, "one")
        stack.say(ada, "two")
        _, late = stack.join("s2", "bob")
        assert late["recovered"] is False
        assert texts(late["transcript"]) == ["one", "two"]
        # a client that knows the epoch but saw nothing recovers everything
        _, zero = stack.join("s2", "cy", epoch=welcome["epoch"], last_seq=0)
        assert zero["recovered"] is True
        assert [e["seq"] for e in zero["events"]] == list(range(1, zero["seq"] + 1))

    def test_position_older_than_the_log_is_not_recovered(self, upstash):
        stack = make_stack(upstash, agent=offline_agent(), event_log_size=10)
        try:
            ada, welcome = stack.join("s3", "ada")
            for n in range(15):
                stack.say(ada, f"m{n}")
            _, w = stack.join("s3", "bob", epoch=welcome["epoch"], last_seq=1)
            assert w["recovered"] is False and len(w["transcript"]) == 10
            _, w2 = stack.join("s3", "cy", epoch="not-the-epoch", last_seq=14)
            assert w2["recovered"] is False
        finally:
            set_runtime(None)

    def test_events_reach_each_connection_exactly_once(self, stack: Stack):
        # GIVEN Bob connected but not yet resumed while Ada talks
        ada, _ = stack.join("s4", "ada")
        status, bob = stack.connect("s4", "bob")
        assert status == 200
        stack.say(ada, "before bob resumed")
        assert stack.sender.frames(bob) == []  # not resumed: nothing is pushed yet
        welcome = stack.resume(bob)
        stack.say(ada, "after bob resumed")
        # THEN the first came in the welcome only, the second live only
        live = texts(stack.logged(bob))
        assert texts(welcome["transcript"]).count("before bob resumed") == 1
        assert "before bob resumed" not in live
        assert live.count("after bob resumed") == 1


class TestPresence:
    def test_presence_active_away_left(self, stack: Stack):
        ada, _ = stack.join("p1", "ada")
        bob, _ = stack.join("p1", "bob")
        joined = stack.last(ada, "presence")
        assert (joined["user"], joined["name"], joined["status"]) == ("bob", "Bob", "active")
        stack.drop(bob)
        assert stack.last(ada, "presence")["status"] == "away"
        cy, _ = stack.join("p1", "cy")
        stack.send(cy, {"action": "leave"})
        assert stack.last(ada, "presence")["status"] == "left"
        # the server closed the connection that left
        assert not stack.rt.run(stack.sender.exists(cy))
        status = stack.rt.run(_status(stack, "p1"))
        users = {p["user"]: p["status"] for p in status["participants"]}
        assert users == {"ada": "active", "bob": "away", "cy": "left"}

    def test_two_tabs_one_participant(self, stack: Stack):
        ada1, _ = stack.join("p2", "ada")
        ada2, _ = stack.join("p2", "ada")
        bob, _ = stack.join("p2", "bob")
        stack.drop(ada1)
        # Ada still has a connection: she stays active
        assert all(f["user"] != "ada" for f in stack.frames(bob, "presence"))
        stack.drop(ada2)
        gone = stack.last(bob, "presence")
        assert (gone["user"], gone["status"]) == ("ada", "away")


async def _status(stack: Stack, session: str) -> Any:
    return await stack.rt.rooms().status(session)


class TestAuth:
    @pytest.mark.parametrize(
        "case, status",
        [
            ("missing", 401),
            ("expired", 401),
            ("forged", 401),
            ("garbage", 401),
            ("other_session", 403),
            # API Gateway: a Deny policy is 403; a missing identity source 401.
            ("bad_session_id", 403),
            ("no_query", 401),
        ],
    )
    def test_refused_and_nothing_stored(self, stack: Stack, raw_redis, case, status):
        from rejoin.tokens import mint_token

        session = "auth-1"
        query: dict[str, str] = {"session": session}
        if case == "expired":
            query["token"] = stack.token(session, "ada", ttl=60)
            stack.clock.advance(61)
        elif case == "forged":
            query["token"] = mint_token(
                secret="another-secret-0123456789-abcdefghijkl",
                session_id=session,
                user_id="ada",
                name="Ada",
                now=stack.clock(),
            )
        elif case == "garbage":
            query["token"] = "not.a.jwt"
        elif case == "other_session":
            query["token"] = stack.token("other", "ada")
        elif case == "bad_session_id":
            query = {"session": "a}b", "token": stack.token(session, "ada")}
        elif case == "no_query":
            query = {}
        got, cid = stack.connect(session, "ada", query=query)
        assert got == status
        assert raw_redis.keys("rejoin:*") == []
        # and that connection can do nothing
        stack.sender.open(cid)
        stack.send(cid, {"action": "say", "id": "x1", "text": "hi"})
        assert stack.last(cid, "error")["code"] == "session_gone"
        assert raw_redis.keys("rejoin:*") == []


class TestFrames:
    BAD = [
        ("not json {", "bad_json"),
        ("[1, 2]", "bad_json"),
        ("42", "bad_json"),
        ('{"text": "no action"}', "unknown_action"),
        ('{"action": "dance"}', "unknown_action"),
        ('{"action": 7}', "unknown_action"),
        ('{"action": "say", "id": "m1"}', "invalid_field"),
        ('{"action": "say", "id": "m1", "text": 5}', "invalid_field"),
        ('{"action": "say", "id": "m1", "text": "   "}', "invalid_field"),
        ('{"action": "say", "id": "bad id!", "text": "x"}', "invalid_field"),
        ('{"action": "say", "id": "m1", "text": "' + "x" * 4001 + '"}', "invalid_field"),
        ('{"action": "resume", "last_seq": true}', "invalid_field"),
        ('{"action": "resume", "last_seq": -1}', "invalid_field"),
        ('{"action": "resume", "epoch": 5}', "invalid_field"),
        ('{"action": "say", "id": "m1", "text": "' + "y" * 40_000 + '"}', "too_large"),
        ("", "bad_json"),
    ]

    @pytest.mark.parametrize("body, code", BAD)
    def test_bad_frame_gets_error_and_changes_nothing(self, stack: Stack, raw_redis, body, code):
        ada, _welcome = stack.join("f1", "ada")
        before = {k: raw_redis.dump(k) for k in session_keys(raw_redis, "f1")}
        answer = stack.send(ada, body)
        assert answer["statusCode"] == 200
        err = stack.last(ada, "error")
        assert err["code"] == code and err["message"]
        after = {k: raw_redis.dump(k) for k in session_keys(raw_redis, "f1")}
        # the frame cost rate-limit budget and marked the connection active;
        # nothing else of the session changed
        changing = {f"rejoin:{{f1}}:{k}" for k in ("conns", "rate", "ops", "results")}
        assert {k: v for k, v in before.items() if k not in changing} == {
            k: v for k, v in after.items() if k not in changing
        }
        assert stack.queue.pending() == []
        # the connection stays usable
        assert stack.say(ada, "still here")["type"] == "ack"

    def test_say_before_resume(self, stack: Stack):
        status, cid = stack.connect("f2", "ada")
        assert status == 200
        stack.send(cid, {"action": "say", "id": "m1", "text": "hi"})
        assert stack.last(cid, "error")["code"] == "not_joined"
        assert stack.queue.pending() == []

    def test_frames_after_the_session_ended_get_session_gone(self, stack: Stack, raw_redis):
        ada, _ = stack.join("f5", "ada")
        # GIVEN the session was ended (its keys deleted) while Ada's socket lingers
        assert stack.rt.run(stack.rt.rooms().end("f5")) == [ada]
        for frame in ({"action": "say", "id": "x1", "text": "hi"}, {"action": "resume"}):
            stack.send(ada, frame)
            assert stack.last(ada, "error")["code"] == "session_gone"
        # THEN nothing brought the session back (only the revocation record is there)
        assert session_keys(raw_redis, "f5") == ["rejoin:{f5}:revoked"]

    def test_ping(self, stack: Stack):
        ada, _ = stack.join("f3", "ada")
        stack.send(ada, {"action": "ping"})
        assert stack.last(ada, "pong")["ts"] == int(stack.clock() * 1000)

    def test_repeated_message_id_is_a_no_op(self, stack: Stack):
        ada, _ = stack.join("f4", "ada")
        bob, _ = stack.join("f4", "bob")
        first = stack.say(ada, "once", msg_id="same-1")
        again = stack.say(ada, "once", msg_id="same-1")
        assert first["duplicate"] is False and again["duplicate"] is True
        assert again["seq"] == first["seq"]
        assert texts(stack.logged(bob)).count("once") == 1
        assert len(stack.queue.pending()) == 1
        stack.run_turns()
        assert len(stack.frames(bob, "agent_message")) == 1


class TestRateLimit:
    def test_over_the_limit_is_refused_and_not_stored(self, upstash, raw_redis):
        stack = make_stack(upstash, agent=offline_agent(), rate_limit=4, rate_window_seconds=60)
        try:
            ada, _ = stack.join("rl-1", "ada")  # resume costs one of the four
            acks = [stack.say(ada, f"m{n}") for n in range(5)]
            assert [a["type"] for a in acks] == ["ack", "ack", "ack", "error", "error"]
            assert acks[3]["code"] == "rate_limited" and acks[3]["retry_after"] > 0
            assert len(raw_redis.lrange("rejoin:{rl-1}:events", 0, -1)) == 1 + 3
            # another participant has their own allowance
            bob, _ = stack.join("rl-1", "bob")
            assert stack.say(bob, "hi")["type"] == "ack"
        finally:
            set_runtime(None)

    def test_store_down_during_the_check_is_a_clear_error(self, upstash, raw_redis):
        stack = make_stack(upstash, agent=offline_agent(), rate_limit=5)
        try:
            ada, _ = stack.join("rl-2", "ada")
            before = raw_redis.llen("rejoin:{rl-2}:events")
            # GIVEN Upstash fails the say script (first try and the client's retry)
            upstash.faults.fail(status=503, times=2, command="EVALSHA")
            reply = stack.say(ada, "lost?")
            # THEN the sender is told, nothing is stored or queued
            assert reply["type"] == "error" and reply["code"] == "internal"
            assert raw_redis.llen("rejoin:{rl-2}:events") == before
            assert stack.queue.pending() == []
            # and once Upstash is back the same message goes through
            assert stack.say(ada, "lost?")["type"] == "ack"
        finally:
            set_runtime(None)


class TestMeetingMode:
    def test_agent_answers_only_when_addressed(self, upstash, raw_redis):
        stack = make_stack(upstash, agent=offline_agent(), reply_mode="addressed")
        try:
            ada, _ = stack.join("mm", "ada")
            stack.say(ada, "notes: budget approved")
            stack.say(ada, "@agent summarise please")
            stack.say(ada, "thanks all")
            stack.run_turns()
            replies = stack.frames(ada, "agent_message")
            assert len(replies) == 1
            # every message reached the agent's history, in order, without a turn
            assert spoken(raw_redis, "mm") == [
                ("Ada", "notes: budget approved"),
                ("Ada", "@agent summarise please"),
                ("Ada", "thanks all"),
            ]
            assert "This conversation has" in replies[0]["text"]
        finally:
            set_runtime(None)


class TestTurns:
    def test_failed_turn_writes_nothing_and_retry_is_clean(self, upstash, raw_redis):
        import agents

        calls: list[str] = []

        @agents.function_tool
        def lookup(q: str) -> str:
            """Look something up."""
            calls.append(q)
            return f"found {q}"

        # GIVEN a model that calls a tool, then fails on its answer
        agent = scripted_agent(
            [
                call("lookup", {"q": "x"}),
                cut("partial answer here", RuntimeError("boom")),
                call("lookup", {"q": "x"}),
                "the answer",
            ],
            [lookup],
        )
        stack = make_stack(upstash, agent=agent)
        try:
            ada, _ = stack.join("t1", "ada")
            stack.say(ada, "question")
            batch = stack.queue.take("t1")
            # WHEN the turn fails
            result = stack.deliver(batch)
            assert len(result["batchItemFailures"]) == 1
            failed = stack.last(ada, "error")
            assert failed["code"] == "turn_failed" and failed["turn"] == batch[0].turn_id
            # and the queue was asked to redeliver it in seconds, not minutes
            assert stack.queue.retries == [("rh-" + batch[0].turn_id, 5)]
            # THEN the history holds only the message: no tool call without output
            assert [i.get("type", "message") for i in history(raw_redis, "t1")] == ["message"]
            # WHEN the queue redelivers it
            result = stack.deliver(batch)
            assert result["batchItemFailures"] == []
            items = history(raw_redis, "t1")
            kinds = [i.get("type", "message") for i in items]
            assert kinds == ["message", "function_call", "function_call_output", "message"]
            assert items[1]["call_id"] == items[2]["call_id"]
            assert spoken(raw_redis, "t1") == [("Ada", "question")]
            final = stack.last(ada, "agent_message")
            assert final["text"] == "the answer" and final["reply_to"] == batch[0].reply_to
            # AND a third delivery (a duplicate) changes nothing
            stack.deliver(batch)
            assert len(history(raw_redis, "t1")) == 4
            assert len(stack.frames(ada, "agent_message")) == 1
        finally:
            set_runtime(None)

    def test_failing_to_shorten_the_retry_delay_still_reports_the_failure(self, upstash):
        agent = scripted_agent([RuntimeError("model down")])
        stack = make_stack(upstash, agent=agent)
        try:
            ada, _ = stack.join("t6", "ada")
            stack.say(ada, "hello")

            async def sqs_down(deliveries: Any) -> None:
                raise ConnectionError("sqs unreachable")

            stack.queue.retry_later = sqs_down  # type: ignore[method-assign]
            # WHEN the turn fails and so does the visibility change
            result = stack.deliver(stack.queue.take("t6"))
            # THEN the handler still answers with the failed record (SQS retries it)
            assert len(result["batchItemFailures"]) == 1
        finally:
            set_runtime(None)

    def test_a_crashed_worker_blocks_only_until_its_lease_ends(self, stack: Stack, raw_redis):
        ada, _ = stack.join("t2", "ada")
        stack.say(ada, "hi")
        turn = stack.queue.pending("t2")[0]
        rooms = stack.rt.rooms()
        # GIVEN a worker took the lease and died (it wrote nothing: writes wait for the commit)
        start = stack.rt.run(rooms.begin_turn("t2", turn.epoch, turn.turn_id, "dead", 30))
        assert start.state == "started"
        # WHILE its lease holds, the turn is busy (and nothing interleaves)
        assert stack.run_turns()[0]["batchItemFailures"]
        stack.queue._queues["t2"] = [turn]
        stack.clock.advance(31)
        # THEN after it, the next attempt answers once
        assert stack.run_turns()[0]["batchItemFailures"] == []
        assert spoken(raw_redis, "t2") == [("Ada", "hi")]
        assert [i.get("role") for i in history(raw_redis, "t2")] == ["user", "assistant"]
        # AND the dead worker cannot commit afterwards
        with pytest.raises(SessionGone, match=r"lease lost|deleted or replaced"):
            stack.rt.run(
                rooms.commit_turn(
                    "t2",
                    turn.epoch,
                    turn.turn_id + "x",
                    "dead",
                    items=[],
                    reply_text="late",
                    reply_to=turn.reply_to,
                )
            )

    def test_turn_finishing_after_everyone_left_reaches_the_resumer(self, stack: Stack):
        ada, welcome = stack.join("t3", "ada")
        stack.say(ada, "answer me later")
        seen = max(f["seq"] for f in stack.logged(ada))
        stack.drop(ada)
        stack.clock.advance(30)
        stack.run_turns()  # finishes while nobody is connected
        stack.clock.advance(30)
        _, back = stack.join("t3", "ada", epoch=welcome["epoch"], last_seq=seen)
        assert back["recovered"] is True
        assert [e["type"] for e in back["events"]] == ["presence", "agent_message", "presence"]

    def test_turn_for_a_deleted_session_writes_nothing(self, stack: Stack, raw_redis):
        ada, _ = stack.join("t4", "ada")
        stack.say(ada, "hello?")
        stack.drop(ada)
        stack.clock.advance(123)  # deadline + the cleanup's clock-skew margin
        report = stack.cleanup()
        assert report["expired"] == ["t4"]
        assert session_keys(raw_redis, "t4") == []
        results = stack.run_turns()
        assert results[0]["batchItemFailures"] == []
        assert session_keys(raw_redis, "t4") == []

    def test_turns_of_one_session_never_interleave(self, stack: Stack, raw_redis):
        import asyncio

        from rejoin.turns import run_turn

        ada, _ = stack.join("t5", "ada")
        for n in range(4):
            stack.say(ada, f"q{n}")
        turns = stack.queue.take("t5")

        # WHEN a second worker runs another turn of the session while the first
        # worker's turn is under way (its model holds the answer until released)
        async def both() -> list[Any]:
            entered, release = asyncio.Event(), asyncio.Event()
            slow = scripted_agent([held("a0", entered, release)])
            first = asyncio.ensure_future(run_turn(stack.rt, turns[0], agent=slow))
            await asyncio.wait_for(entered.wait(), 10)
            (second,) = await asyncio.gather(
                run_turn(stack.rt, turns[1], agent=stack.agent), return_exceptions=True
            )
            release.set()
            return [await first, second]

        outcomes = stack.rt.run(both())
        # THEN the second was refused (busy) and the first ran whole, never mixed
        assert [type(o).__name__ for o in outcomes] == ["str", "TurnBusy"]
        ran = 0
        rest = [t for n, t in enumerate(turns) if n != ran]
        stack.queue._queues["t5"] = rest
        stack.run_turns()
        # the messages are in the room's order; each answer follows whole
        assert spoken(raw_redis, "t5") == [("Ada", f"q{n}") for n in range(4)]
        roles = [i.get("role") for i in history(raw_redis, "t5")]
        assert roles == ["user"] * 4 + ["assistant"] * 4
        replies = [f["reply_to"] for f in stack.frames(ada, "agent_message")]
        assert replies == [t.reply_to for t in (turns[ran], *rest)]


class TestCleanup:
    def test_lost_disconnect_is_detected_and_the_session_expires(self, stack: Stack, raw_redis):
        ada, _ = stack.join("c1", "ada")
        bob, _ = stack.join("c1", "bob")
        # GIVEN Ada's socket died and its $disconnect never came
        stack.drop(ada, lose_disconnect=True)
        stack.clock.advance(300)
        stack.send(bob, {"action": "ping"})  # Bob is active
        stack.clock.advance(400)  # Ada idle 700 s > 600 s + margin
        report = stack.cleanup()
        assert report["stale_connections"] == [ada]
        assert stack.last(bob, "presence")["status"] == "away"
        # Bob's socket is alive but idle too long: confirmed with GetConnection, kept
        stack.clock.advance(700)
        report = stack.cleanup()
        assert report["live_idle_connections"] == 1 and report["expired"] == []
        # WHEN Bob's disconnect is lost too, the session still cannot live forever
        stack.drop(bob, lose_disconnect=True)
        stack.clock.advance(700)
        assert stack.cleanup()["stale_connections"] == [bob]
        stack.clock.advance(123)
        assert stack.cleanup()["expired"] == ["c1"]
        assert session_keys(raw_redis, "c1") == []

    def test_after_the_cleanup_no_key_of_the_session_remains(self, upstash, raw_redis):
        """GIVEN a session with the rate limiter on (a window long enough that its
        key outlives the grace), messages, an agent turn, a stop, a leave and a
        $disconnect (so the rate, departed, ops and results keys all exist)
        WHEN the last participant has gone and the cleanup deletes the session
        THEN no key of the session remains, the rate limiter's included."""
        stack = make_stack(upstash, agent=offline_agent(), rate_limit=50, rate_window_seconds=3600)
        try:
            ada, _ = stack.join("c9", "ada")
            bob, _ = stack.join("c9", "bob")
            stack.say(ada, "hello")
            stack.run_turns()
            stack.send(ada, {"action": "stop"})
            stack.drop(bob)
            stack.send(bob, {"action": "leave"})  # after its own $disconnect
            assert "rejoin:{c9}:rate" in session_keys(raw_redis, "c9")
            stack.drop(ada)
            stack.clock.advance(123)
            assert stack.cleanup()["expired"] == ["c9"]
            assert session_keys(raw_redis, "c9") == []
        finally:
            set_runtime(None)

    def test_cleanup_is_idempotent_and_reports(self, stack: Stack):
        for n in range(3):
            cid, _ = stack.join(f"c2-{n}", "ada")
            stack.drop(cid)
        stack.clock.advance(123)
        first = stack.cleanup()
        assert sorted(first["expired"]) == ["c2-0", "c2-1", "c2-2"]
        assert stack.cleanup()["expired"] == []

    def test_gone_connection_found_while_broadcasting(self, stack: Stack):
        ada, _ = stack.join("c4", "ada")
        bob, _ = stack.join("c4", "bob")
        stack.sender.close_socket(bob)  # 410 from now on; no $disconnect
        stack.say(ada, "anyone?")
        assert stack.last(ada, "presence")["status"] == "away"
        assert stack.rt.run(_status(stack, "c4"))["connections"] == 1

    def test_a_reply_over_32_kb_arrives_in_parts(self, upstash):
        long_reply = "word " * 9000  # 45 KB: over API Gateway's 32 KB frame limit
        stack = make_stack(upstash, agent=scripted_agent([long_reply]))
        try:
            ada, _ = stack.join("c6", "ada")
            stack.say(ada, "tell me everything")
            stack.run_turns()
            parts = [f for f in stack.sender.frames(ada) if f["type"] == "part"]
            assert parts
            # every post fit in a frame, and the parts rebuild the final message
            assert all(len(raw) <= 32 * 1024 for raw in stack.sender.raw(ada))
            whole = json.loads("".join(p["data"] for p in parts if p["id"] == parts[-1]["id"]))
            assert whole["type"] == "agent_message" and whole["text"] == long_reply
        finally:
            set_runtime(None)

    def test_throttled_post_is_retried(self, stack: Stack):
        ada, _ = stack.join("c5", "ada")
        bob, _ = stack.join("c5", "bob")
        stack.sender.throttle(bob, 2)
        stack.say(ada, "through the throttle")
        assert "through the throttle" in texts(stack.logged(bob))


class TestIsolation:
    def test_200_sessions_never_see_each_other(self, stack: Stack, raw_redis):
        conns: dict[str, list[str]] = {}
        for n in range(200):
            sid = f"iso-{n}"
            a, _ = stack.join(sid, "ada")
            b, _ = stack.join(sid, "bob")
            conns[sid] = [a, b]
            stack.say(a, f"secret of {sid}")
        stack.run_turns()
        for sid, (a, b) in conns.items():
            for cid in (a, b):
                frames = stack.sender.frames(cid)
                blob = json.dumps(frames)
                assert f"secret of {sid}" in blob
                others = [f for f in frames if "text" in f and sid not in f["text"]]
                # agent replies quote the message; any other text is a leak
                assert not [f for f in others if "secret of" in f["text"]], sid
            items = raw_redis.lrange(f"rejoin:{{{sid}}}:items", 0, -1)
            assert all(f"secret of {sid}" in i or '"assistant"' in i for i in items)
            assert not any(
                f"secret of iso-{m}" in "".join(items) for m in (0, 199) if m != int(sid[4:])
            )
