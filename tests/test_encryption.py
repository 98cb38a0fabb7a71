"""Encryption at rest: the agent's history and the room's message texts, off by default.

With keys configured, nothing a participant or the agent said is readable in
the store (checked on the raw Redis), while everyone sees the conversation as
before; the SDK's own ``EncryptedSession`` reads what rejoin's turns wrote;
keys rotate without losing what was written under the old one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import agents
import pytest
import redis
from agents.extensions.memory import EncryptedSession
from cryptography.fernet import Fernet
from harness import Stack, make_stack, offline_agent
from scripted import script

from rejoin import UpstashSession, upstash_client
from rejoin.encryption import TEXT_PREFIX, parse_keys
from rejoin.errors import ConfigError
from rejoin.runtime import set_runtime

KEY = Fernet.generate_key().decode()
SECRET_WORDS = "the launch code is zebra-quartz"


@pytest.fixture
def stack(upstash: Any) -> Iterator[Stack]:
    s = make_stack(upstash, agent=offline_agent(), encryption_keys=(KEY,))
    yield s
    set_runtime(None)


def raw_dump(raw_redis: redis.Redis, session: str) -> str:
    out = []
    for key in raw_redis.keys(f"rejoin:{{{session}}}:*"):
        kind = raw_redis.type(key)
        if kind == "list":
            out += raw_redis.lrange(key, 0, -1)
        elif kind == "hash":
            out += [f"{k}={v}" for k, v in raw_redis.hgetall(key).items()]
    return "\n".join(out)


def test_nothing_said_is_readable_in_the_store_yet_everyone_sees_it(
    stack: Stack, raw_redis: redis.Redis
) -> None:
    ada, welcome = stack.join("enc", "ada")
    bob, _ = stack.join("enc", "bob")
    stack.say(ada, SECRET_WORDS)
    stack.run_turns()
    # THEN the participants saw the message and the agent's answer in plain text
    assert SECRET_WORDS in [f["text"] for f in stack.logged(bob) if f["type"] == "message"]
    answer = stack.last(bob, "agent_message")["text"]
    assert "zebra-quartz" in answer  # the offline model echoes what was said
    # AND in the store neither the message nor the answer is readable
    stored = raw_dump(raw_redis, "enc")
    assert "zebra" not in stored and "launch" not in stored
    assert TEXT_PREFIX in stored and '"__enc__":1' in stored
    # AND a reconnect's replay, and the HTTP API's transcript, are decrypted
    stack.drop(bob)
    _, back = stack.join("enc", "bob", epoch=welcome["epoch"], last_seq=0)
    assert SECRET_WORDS in [e.get("text") for e in back["events"]]
    state = stack.rt.run(stack.rt.rooms().status("enc", with_events=True))
    assert SECRET_WORDS in [e.get("text") for e in state["events"]]


def test_the_sdks_encrypted_session_reads_what_a_turn_wrote(stack: Stack, upstash: Any) -> None:
    ada, _ = stack.join("enc2", "ada")
    stack.say(ada, SECRET_WORDS)
    stack.run_turns()
    reader = EncryptedSession(
        session_id="enc2",
        underlying_session=UpstashSession(  # type: ignore[arg-type]
            "enc2", redis=upstash_client(upstash.url, upstash.token)
        ),
        encryption_key=KEY,
        ttl=3600,
    )
    items = stack.rt.run(reader.get_items())
    assert len(items) == 2 and SECRET_WORDS in items[0]["content"]  # type: ignore[index]
    assert items[1]["role"] == "assistant"  # type: ignore[index]
    # and get_items(limit) works through it too
    assert stack.rt.run(reader.get_items(limit=1)) == items[1:]


def test_keys_rotate_without_losing_what_the_old_key_wrote(
    upstash: Any, raw_redis: redis.Redis
) -> None:
    old = make_stack(upstash, agent=offline_agent(), encryption_keys=(KEY,))
    ada, welcome = old.join("rot", "ada")
    old.say(ada, "said under the old key")
    old.drop(ada)
    set_runtime(None)
    # WHEN a new key is put first, the old one kept
    new_key = Fernet.generate_key().decode()
    new = make_stack(upstash, agent=offline_agent(), encryption_keys=(new_key, KEY))
    try:
        new.clock.t = old.clock.t + 10
        _, back = new.join("rot", "ada", epoch=welcome["epoch"], last_seq=0)
        assert "said under the old key" in [e.get("text") for e in back["events"]]
        # new writes use the new key: the old key alone cannot read them
        ada2 = next(iter(new.identities))
        new.say(ada2, "said under the new key")
        only_old = make_stack(upstash, agent=offline_agent(), encryption_keys=(KEY,))
        with pytest.raises(ConfigError, match="not configured"):
            only_old.rt.run(only_old.rt.rooms().status("rot", with_events=True))
    finally:
        set_runtime(None)


def test_the_sdks_compaction_hook_writes_envelopes_through_rejoins_session(
    upstash: Any, raw_redis: redis.Redis
) -> None:
    # GIVEN the SDK's documented nesting: EncryptedSession over a session
    # whose _atomic_replace_items the compaction path calls
    from agents.memory import OpenAIResponsesCompactionSession

    from rejoin_local.openai_stub import serve

    client = upstash_client(upstash.url, upstash.token)
    with serve() as stub:
        from openai import AsyncOpenAI

        compaction = OpenAIResponsesCompactionSession(
            session_id="enc3",
            underlying_session=UpstashSession("enc3", redis=client),
            client=AsyncOpenAI(api_key="x", base_url=stub.base_url),
            model="gpt-test",
            compaction_mode="input",  # (the stub keeps no responses to point at)
            should_trigger_compaction=lambda context: True,
        )
        session = EncryptedSession(
            session_id="enc3", underlying_session=compaction, encryption_key=KEY, ttl=3600
        )
        agent = agents.Agent(name="a", model=script(["noted", "noted again"]))

        async def run() -> list[Any]:
            await agents.Runner.run(agent, SECRET_WORDS, session=session)
            await agents.Runner.run(agent, "and another thing", session=session)
            return await session.get_items()

        import asyncio

        items = asyncio.run(run())
    # THEN what compaction stored is encrypted, and reads back through the wrapper
    stored = raw_redis.lrange("rejoin:{enc3}:items", 0, -1)
    assert stored and all(json.loads(s).get("__enc__") == 1 for s in stored)
    assert "zebra" not in "".join(stored)
    assert any(SECRET_WORDS in json.dumps(i) for i in items)


def test_keys_must_be_fernet_keys() -> None:
    assert parse_keys(f"{KEY}, {KEY}") == (KEY, KEY)
    assert parse_keys({"keys": [KEY]}) == (KEY,)
    assert parse_keys("") == ()
    for bad in ("short", {"keys": "not-a-list"}, {"keys": []}):
        with pytest.raises(ConfigError):
            parse_keys(bad)  # type: ignore[arg-type]


def test_off_by_default(upstash: Any, raw_redis: redis.Redis) -> None:
    plain = make_stack(upstash, agent=offline_agent())
    try:
        ada, _ = plain.join("plain", "ada")
        plain.say(ada, SECRET_WORDS)
        assert "zebra" in raw_dump(raw_redis, "plain")
    finally:
        set_runtime(None)
