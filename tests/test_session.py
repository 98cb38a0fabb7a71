"""The session store on every transport, against a real Redis.

Each test runs three times (the ``store`` fixture): ``UpstashSession`` with the
real ``upstash-redis`` async client through the Upstash-compatible endpoint;
``RedisSession`` with redis.asyncio over TCP through a RESP proxy (which counts
round trips and injects faults); and ``RedisSession`` on a three-node Redis
Cluster. What is stored is checked directly in Redis with redis-py.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import agents
import pytest
import pytest_asyncio
import redis
from agents.memory import Session, SessionSettings
from agents.testing import ScriptedModel
from scripted import call as tool_call
from scripted import script, words

from rejoin import RedisSession, UpstashSession, upstash_client
from rejoin.errors import (
    ConfigError,
    InvalidSessionId,
    RejoinError,
    StoreResponseError,
    StoreTimeout,
    StoreUnavailable,
)


@pytest_asyncio.fixture
async def client(store: Any) -> AsyncIterator[Any]:
    c = store.client(timeout=2.0)
    yield c
    await c.close()


@pytest.fixture
def raw_redis(store: Any) -> Any:
    """What is stored, read straight from Redis (a cluster-aware client on the cluster)."""
    return store.raw


def session_on(store: Any, client: Any, session_id: Any, **kwargs: Any) -> UpstashSession:
    """The transport's session class: UpstashSession over REST, RedisSession over TCP."""
    if store.name == "upstash":
        return UpstashSession(session_id, redis=client, **kwargs)
    if "ttl_seconds" in kwargs:  # RedisSession takes the SDK's name for it
        kwargs["ttl"] = kwargs.pop("ttl_seconds")
    return RedisSession(session_id, redis_client=client, **kwargs)


_FRESH: Any = object()


@pytest.fixture
def new_session(store: Any, client: Any) -> Callable[..., UpstashSession]:
    def make(session_id: Any = _FRESH, **kwargs: Any) -> UpstashSession:
        sid = f"s-{uuid.uuid4().hex[:12]}" if session_id is _FRESH else session_id
        return session_on(store, client, sid, **kwargs)

    return make


def msg(role: str, text: str) -> dict[str, Any]:
    return {"role": role, "content": text}


def stored(raw_redis: redis.Redis, session: UpstashSession) -> list[Any]:
    return [json.loads(x) for x in raw_redis.lrange(session.keys.items, 0, -1)]


# A realistic mix of everything the Runner writes.
RUNNER_ITEMS: list[dict[str, Any]] = [
    {"role": "user", "content": "Ada: what's 2+2? ✨ 日本語 \U0001f600"},
    {
        "id": "rs_1",
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": "add the numbers"}],
    },
    {
        "type": "function_call",
        "call_id": "call_1",
        "name": "add",
        "arguments": '{"a": 2, "b": 2}',
        "id": "fc_1",
        "status": "completed",
    },
    {"type": "function_call_output", "call_id": "call_1", "output": "4"},
    {
        "type": "function_call",
        "call_id": "call_2",
        "name": "transfer_to_math_agent",
        "arguments": "{}",
        "id": "fc_2",
        "status": "completed",
    },
    {
        "type": "function_call_output",
        "call_id": "call_2",
        "output": '{"assistant": "Math Agent"}',
    },
    {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": "It is 4.", "annotations": []}],
    },
    {"role": "user", "content": "lone surrogate \ud800 and quotes \"'\\ and nul \x00"},
]


class TestProtocol:
    async def test_is_an_agents_sdk_session(self, new_session: Callable[..., UpstashSession]):
        # GIVEN a session (UpstashSession or RedisSession)
        session = new_session()
        # THEN the SDK's runtime-checkable protocol accepts it
        assert isinstance(session, Session)
        # and its settings default as the SDK's own sessions' do
        assert session.session_settings == SessionSettings()

    async def test_add_and_get_keep_order(self, new_session, raw_redis):
        # GIVEN a session with two batches added
        session = new_session()
        await session.add_items([msg("user", "one"), msg("assistant", "two")])
        await session.add_items([msg("user", "three")])
        # WHEN reading everything
        items = await session.get_items()
        # THEN the order is chronological, and Redis holds exactly that
        assert [i["content"] for i in items] == ["one", "two", "three"]
        assert stored(raw_redis, session) == items

    async def test_limit_returns_latest_in_order(self, new_session):
        session = new_session()
        await session.add_items([msg("user", str(n)) for n in range(10)])
        assert [i["content"] for i in await session.get_items(limit=3)] == ["7", "8", "9"]
        assert [i["content"] for i in await session.get_items(limit=1)] == ["9"]
        assert len(await session.get_items(limit=100)) == 10
        assert await session.get_items(limit=0) == []
        assert await session.get_items(limit=-5) == []

    async def test_explicit_limit_beats_settings(self, new_session):
        # GIVEN settings with limit 2
        session = new_session(session_settings=SessionSettings(limit=2))
        await session.add_items([msg("user", str(n)) for n in range(5)])
        # THEN no limit uses the settings, an explicit limit overrides them
        assert [i["content"] for i in await session.get_items()] == ["3", "4"]
        assert [i["content"] for i in await session.get_items(limit=4)] == ["1", "2", "3", "4"]

    async def test_settings_as_dict(self, new_session):
        session = new_session(session_settings={"limit": 1})
        assert isinstance(session.session_settings, SessionSettings)
        await session.add_items([msg("user", "a"), msg("user", "b")])
        assert [i["content"] for i in await session.get_items()] == ["b"]

    async def test_empty_add_sends_nothing(self, new_session, store):
        store.require("stats")
        session = new_session()
        store.stats.reset()
        await session.add_items([])
        assert store.stats.snapshot()["total_requests"] == 0

    async def test_pop_returns_latest_then_none(self, new_session, raw_redis):
        session = new_session()
        await session.add_items([msg("user", "a"), msg("assistant", "b")])
        assert (await session.pop_item()) == msg("assistant", "b")
        assert stored(raw_redis, session) == [msg("user", "a")]
        assert (await session.pop_item()) == msg("user", "a")
        assert await session.pop_item() is None
        assert await session.get_items() == []

    async def test_clear(self, new_session, raw_redis):
        session = new_session()
        await session.add_items([msg("user", "a")])
        await session.clear_session()
        assert await session.get_items() == []
        assert not raw_redis.exists(session.keys.items)
        # and the session is usable afterwards
        await session.add_items([msg("user", "b")])
        assert await session.get_items() == [msg("user", "b")]

    async def test_every_runner_item_kind_round_trips(self, new_session):
        session = new_session()
        await session.add_items(RUNNER_ITEMS)
        assert await session.get_items() == RUNNER_ITEMS
        assert await session.get_items(limit=3) == RUNNER_ITEMS[-3:]
        assert await session.pop_item() == RUNNER_ITEMS[-1]

    async def test_large_items_round_trip(self, new_session):
        # GIVEN items of several hundred KB, ASCII and not
        big = [msg("assistant", "x" * 400_000), msg("user", "é😀" * 60_000)]
        session = new_session()
        await session.add_items(big)
        assert await session.get_items() == big
        assert await session.get_items(limit=1) == big[-1:]

    async def test_keys_share_one_hash_tag(self, new_session, raw_redis):
        session = new_session("tagged_1")
        await session.add_items([msg("user", "a")])
        keys = {k for k in raw_redis.keys("rejoin:{tagged_1}:*")}
        assert "rejoin:{tagged_1}:items" in keys
        assert all(k.startswith("rejoin:{tagged_1}:") for k in keys)

    async def test_key_prefix(self, new_session, raw_redis):
        session = new_session("p1", key_prefix="myapp")
        await session.add_items([msg("user", "a")])
        assert raw_redis.exists("myapp:{p1}:items")


class TestOneRequestPerMethod:
    async def test_each_method_is_one_request(self, new_session, store):
        # One HTTP request to Upstash, one command on the TCP connection (a
        # warm connection: no set-up commands, so the pool reused it).
        store.require("stats")
        session = new_session()
        await session.add_items([msg("user", "warm")])  # caches the scripts
        await session.get_items(limit=1)
        await session.pop_item()
        await session.clear_session()
        await session.get_items()
        calls: list[tuple[str, Any]] = [
            ("add_items", session.add_items([msg("user", "a"), msg("user", "b")])),
            ("get_items", session.get_items()),
            ("get_items(limit)", session.get_items(limit=1)),
            ("pop_item", session.pop_item()),
            ("clear_session", session.clear_session()),
        ]
        for name, call in calls:
            store.stats.reset()
            await call
            snap = store.stats.snapshot()
            assert snap["total_requests"] == 1, name
            assert snap["commands"] == {"EVALSHA": 1}, name

    async def test_first_call_falls_back_to_eval(self, new_session, store, raw_redis):
        store.require("stats")
        session = new_session()
        await session.get_items()  # the connection is open (TCP)
        # GIVEN Redis forgot every script (a new database, a failover, say)
        raw_redis.script_flush()
        store.stats.reset()
        await session.add_items([msg("user", "a")])
        # THEN EVALSHA missed and EVAL ran it, once
        assert store.stats.snapshot()["commands"] == {"EVALSHA": 1, "EVAL": 1}
        assert await session.get_items() == [msg("user", "a")]


class TestCorruptEntries:
    async def test_corrupt_entries_are_skipped(self, new_session, raw_redis):
        # GIVEN valid items with corrupt entries among the newest
        session = new_session()
        await session.add_items([msg("user", "a"), msg("user", "b")])
        raw_redis.rpush(session.keys.items, "{not json", "also not")
        await session.add_items([msg("user", "c")])
        raw_redis.rpush(session.keys.items, "}}")
        # THEN reads skip them, and limit counts valid items only
        assert [i["content"] for i in await session.get_items()] == ["a", "b", "c"]
        assert [i["content"] for i in await session.get_items(limit=2)] == ["b", "c"]
        assert [i["content"] for i in await session.get_items(limit=10)] == ["a", "b", "c"]

    async def test_pop_drops_corrupt_and_returns_valid(self, new_session, raw_redis):
        session = new_session()
        await session.add_items([msg("user", "a")])
        raw_redis.rpush(session.keys.items, "garbage")
        assert await session.pop_item() == msg("user", "a")
        assert raw_redis.llen(session.keys.items) == 0

    async def test_only_corrupt_entries(self, new_session, raw_redis):
        session = new_session()
        raw_redis.rpush(session.keys.items, "x", "y")
        assert await session.get_items(limit=1) == []
        assert await session.pop_item() is None


class TestSessionIds:
    @pytest.mark.parametrize(
        "bad",
        ["", "a" * 129, "a}b", "a{b", "a:b", "a b", "é", "a/b", "a\nb", None, 42],
    )
    async def test_bad_ids_refused_before_any_request(self, bad, new_session, store):
        if store.stats is not None:
            store.stats.reset()
        with pytest.raises(InvalidSessionId) as err:
            new_session(bad)
        assert "session id" in str(err.value)
        assert isinstance(err.value, ValueError) and isinstance(err.value, RejoinError)
        if store.stats is not None:
            assert store.stats.snapshot()["total_requests"] == 0

    async def test_longest_valid_id(self, new_session):
        session = new_session("A-z_0" * 25 + "abc")  # 128 characters
        await session.add_items([msg("user", "ok")])
        assert await session.get_items() == [msg("user", "ok")]


class TestTtl:
    async def test_ttl_slides_on_every_call(self, new_session, raw_redis):
        # GIVEN a session with a 100 s TTL
        session = new_session(ttl_seconds=100)
        await session.add_items([msg("user", "a")])
        assert 99_000 < raw_redis.pttl(session.keys.items) <= 100_000
        # WHEN the expiry has run down and the session is read
        raw_redis.pexpire(session.keys.items, 5_000)
        await session.get_items(limit=1)
        # THEN it is pushed back out
        assert raw_redis.pttl(session.keys.items) > 99_000

    async def test_no_ttl_by_default(self, new_session, raw_redis):
        session = new_session()
        await session.add_items([msg("user", "a")])
        assert raw_redis.pttl(session.keys.items) == -1

    def test_ttl_must_be_positive(self, new_session):
        with pytest.raises(ValueError, match="positive"):
            new_session("x", ttl_seconds=0)


class TestIdempotentWrites:
    async def test_lost_response_retry_does_not_append_twice(self, new_session, store, raw_redis):
        store.require("faults")
        session = new_session()
        await session.add_items([msg("user", "before")])
        # GIVEN the store applies the next script but its answer is lost
        # (Upstash: a 502; TCP: the connection closes before the reply)
        store.faults.lose_response(command="EVALSHA")
        store.stats.reset()
        # WHEN adding (the client retries the same request)
        await session.add_items([msg("user", "once"), msg("assistant", "only once")])
        # THEN the request ran twice and the items are stored once
        assert store.stats.snapshot()["commands"]["EVALSHA"] == 2
        assert [i["content"] for i in stored(raw_redis, session)] == [
            "before",
            "once",
            "only once",
        ]

    async def test_lost_response_on_pop_pops_once(self, new_session, store, raw_redis):
        store.require("faults")
        session = new_session()
        await session.add_items([msg("user", "a"), msg("user", "b")])
        store.faults.lose_response(command="EVALSHA")
        # WHEN the pop's answer is lost and retried, THEN the retry gets the same item
        assert await session.pop_item() == msg("user", "b")
        assert stored(raw_redis, session) == [msg("user", "a")]

    async def test_lost_response_on_replace_and_clear(self, new_session, store, raw_redis):
        store.require("faults")
        session = new_session()
        await session.add_items([msg("user", "a")])
        store.faults.lose_response(command="EVALSHA")
        await session._atomic_replace_items([msg("user", "x"), msg("user", "y")])
        assert stored(raw_redis, session) == [msg("user", "x"), msg("user", "y")]
        store.faults.lose_response(command="EVALSHA")
        await session.clear_session()
        assert stored(raw_redis, session) == []

    async def test_concurrent_writers_lose_nothing(self, new_session, raw_redis):
        # GIVEN 50 writers adding 3-item batches to one session at once
        session = new_session()
        batches = [[msg("user", f"{w}:{n}") for n in range(3)] for w in range(50)]
        await asyncio.gather(*(session.add_items(b) for b in batches))
        # THEN all 150 items are there, each batch contiguous and in order
        contents = [i["content"] for i in stored(raw_redis, session)]
        assert len(contents) == 150
        for w in range(50):
            start = contents.index(f"{w}:0")
            assert contents[start : start + 3] == [f"{w}:0", f"{w}:1", f"{w}:2"]


class TestFaults:
    async def test_server_error_is_clear_and_writes_nothing(self, new_session, store, raw_redis):
        store.require("faults")
        session = new_session()
        await session.add_items([msg("user", "a")])
        # GIVEN the store fails the first try and the retry before applying
        # (Upstash: 503; TCP: the connection closes before Redis sees the command)
        store.faults.fail(status=503, times=2)
        with pytest.raises(StoreUnavailable) as err:
            await session.add_items([msg("user", "b")])
        assert "add_items" in str(err.value)
        assert stored(raw_redis, session) == [msg("user", "a")]

    async def test_hang_times_out_and_nothing_half_written(self, store, raw_redis):
        store.require("faults")
        # GIVEN a client with a 0.3 s timeout and a store that hangs 2 s
        c = store.client(timeout=0.3)
        session = session_on(store, c, f"h-{uuid.uuid4().hex[:8]}")
        await session.add_items([msg("user", "a")])
        store.faults.hang(2.0, times=2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(StoreTimeout):
            await session.add_items([msg("user", "b"), msg("user", "c")])
        # THEN the caller hears about it within the timeouts (two tries)
        assert loop.time() - started < 1.5
        await asyncio.sleep(2.2)  # let the hung requests finish on the server
        # AND the batch landed whole exactly once, or not at all
        contents = [i["content"] for i in stored(raw_redis, session)]
        assert contents in (["a"], ["a", "b", "c"])
        await c.close()

    async def test_errors_never_contain_the_token(self, upstash):
        c = upstash_client(upstash.url, "wrong-token-s3cret", timeout=1, retry_interval=0.01)
        session = UpstashSession("t1", redis=c)
        with pytest.raises(StoreResponseError) as err:
            await session.get_items()
        assert "s3cret" not in str(err.value) and "s3cret" not in repr(err.value)
        assert "s3cret" not in repr(session)
        await c.close()

    def test_config_errors(self, monkeypatch):
        monkeypatch.delenv("UPSTASH_REDIS_REST_URL", raising=False)
        with pytest.raises(ConfigError):
            UpstashSession.from_env("x")
        with pytest.raises(ConfigError):
            upstash_client("ftp://x", "t")
        with pytest.raises(ConfigError):
            upstash_client("https://x", "")

    async def test_from_env(self, upstash, monkeypatch):
        monkeypatch.setenv("UPSTASH_REDIS_REST_URL", upstash.url)
        monkeypatch.setenv("UPSTASH_REDIS_REST_TOKEN", upstash.token)
        session = UpstashSession.from_env("env_1", timeout=3)
        await session.add_items([msg("user", "hi")])
        assert await session.get_items() == [msg("user", "hi")]
        await session.close()


class TestAtomicReplace:
    async def test_replace_is_one_atomic_request(self, new_session, store, raw_redis):
        store.require("stats")
        session = new_session()
        await session.add_items([msg("user", str(n)) for n in range(5)])
        store.stats.reset()
        assert await session._atomic_replace_items([msg("assistant", "summary")]) is True
        assert store.stats.snapshot()["total_requests"] == 1
        assert stored(raw_redis, session) == [msg("assistant", "summary")]

    async def test_compaction_session_uses_the_atomic_hook(self, new_session, store):
        store.require("stats")
        # GIVEN the SDK's compaction session wrapping a rejoin session
        from agents.memory import OpenAIResponsesCompactionSession

        session = new_session()
        before = [msg("user", str(n)) for n in range(4)]
        await session.add_items(before)
        compacting = OpenAIResponsesCompactionSession(
            session_id=session.session_id, underlying_session=session, client=object()
        )
        store.stats.reset()
        # WHEN it replaces the history after compaction
        await compacting._replace_underlying_session_items(
            output_items=[msg("assistant", "compacted")], previous_items=before
        )
        # THEN it went through our one-request atomic replacement, not clear+add
        assert store.stats.snapshot()["total_requests"] == 1
        assert await session.get_items() == [msg("assistant", "compacted")]


class TestIsolation:
    async def test_thousand_sessions_concurrently(self, new_session, raw_redis):
        # GIVEN 1,000 sessions written concurrently, each with its own items
        sessions = [new_session(f"iso-{n}") for n in range(1000)]
        sem = asyncio.Semaphore(64)

        async def write(n: int, s: UpstashSession) -> None:
            async with sem:
                await s.add_items([msg("user", f"{n}-a"), msg("assistant", f"{n}-b")])
                await s.add_items([msg("user", f"{n}-c")])

        await asyncio.gather(*(write(n, s) for n, s in enumerate(sessions)))

        # WHEN each reads back
        async def read(s: UpstashSession) -> list[Any]:
            async with sem:
                return await s.get_items()

        results = await asyncio.gather(*(read(s) for s in sessions))
        # THEN each has exactly its own items and nothing else
        for n, items in enumerate(results):
            assert [i["content"] for i in items] == [f"{n}-a", f"{n}-b", f"{n}-c"]
        assert len(raw_redis.keys("rejoin:{iso-*}:items")) == 1000


class TestRunner:
    """The real Agents SDK Runner, with a scripted model and a real tool."""

    @pytest.fixture(autouse=True)
    def _no_tracing(self):
        agents.set_tracing_disabled(True)

    def make_agent(self, steps: list[Any], calls: list[dict[str, int]]) -> agents.Agent[Any]:
        @agents.function_tool
        def add(a: int, b: int) -> int:
            """Add two numbers."""
            calls.append({"a": a, "b": b})
            return a + b

        return agents.Agent(name="calc", model=script(steps), tools=[add])

    async def test_run_with_tool_over_several_turns(self, new_session, raw_redis):
        tool_calls: list[dict[str, int]] = []
        agent = self.make_agent(
            [
                tool_call("add", {"a": 2, "b": 3}, call_id="call_a"),
                "2 + 3 = 5",
                "You asked about 2 + 3.",
            ],
            tool_calls,
        )
        session = new_session()
        # Turn 1: a tool call, its output, the answer
        result = await agents.Runner.run(agent, "Ada: what is 2+3?", session=session)
        assert result.final_output == "2 + 3 = 5"
        assert tool_calls == [{"a": 2, "b": 3}]
        kinds = [i.get("type", "message") for i in stored(raw_redis, session)]
        assert kinds == ["message", "function_call", "function_call_output", "message"]
        assert stored(raw_redis, session)[2]["output"] == "5"
        # Turn 2: the model sees the whole history from Upstash
        result = await agents.Runner.run(agent, "Bob: what did Ada ask?", session=session)
        assert result.final_output == "You asked about 2 + 3."
        model = agent.model
        assert isinstance(model, ScriptedModel)
        second_input = model.calls[-1].input
        assert isinstance(second_input, list)
        assert second_input[0] == {"content": "Ada: what is 2+3?", "role": "user"}
        assert len(stored(raw_redis, session)) == 6

    def test_run_sync(self, store, raw_redis):
        agent = self.make_agent(["hello", "again"], [])

        async def make() -> UpstashSession:
            return session_on(store, store.client(), f"sync-{uuid.uuid4().hex[:8]}")

        # Each run_sync runs on an event loop of its own.
        session = asyncio.run(make())
        assert agents.Runner.run_sync(agent, "hi", session=session).final_output == "hello"
        assert agents.Runner.run_sync(agent, "hi2", session=session).final_output == "again"
        assert [i.get("content") for i in stored(raw_redis, session)][::2] == ["hi", "hi2"]

    async def test_run_streamed(self, new_session, raw_redis):
        tool_calls: list[dict[str, int]] = []
        agent = self.make_agent(
            [
                tool_call("add", {"a": 1, "b": 1}),
                words("one and one make two"),
            ],
            tool_calls,
        )
        session = new_session()
        result = agents.Runner.run_streamed(agent, "Ada: 1+1?", session=session)
        deltas = [
            e.data.delta
            async for e in result.stream_events()
            if e.type == "raw_response_event" and e.data.type == "response.output_text.delta"
        ]
        assert len(deltas) > 1 and "".join(deltas) == "one and one make two"
        assert tool_calls == [{"a": 1, "b": 1}]
        items = stored(raw_redis, session)
        assert [i.get("type", "message") for i in items] == [
            "message",
            "function_call",
            "function_call_output",
            "message",
        ]
        assert items[-1]["content"][0]["text"] == "one and one make two"
