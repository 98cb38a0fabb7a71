"""One session, many event loops and threads: the warm-Lambda ``asyncio.run`` pattern.

A Lambda handler that calls ``asyncio.run`` per invocation runs each on a new
event loop; ``Runner.run_sync`` does the same; a threaded server calls from
several threads. The HTTP connections of an Upstash client belong to the loop
that opened them, so a client built by :func:`rejoin.upstash_client` keeps
one per loop. A client built directly belongs to its first loop: used from
another, it fails with a typed error (or, shared by two live loops at once,
can hang: do not share one).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from rejoin import UpstashSession, upstash_client
from rejoin.errors import StoreEventLoopError


def test_one_session_across_asyncio_run_calls(upstash: Any) -> None:
    # GIVEN one session (and its client), built once, as a handler module would
    session = UpstashSession("loops-1", redis=upstash_client(upstash.url, upstash.token))
    # WHEN three "invocations" each run on a new event loop
    for n in range(3):
        asyncio.run(session.add_items([{"role": "user", "content": f"call {n}"}]))
    # THEN every one worked, in order
    items = asyncio.run(session.get_items())
    assert [i["content"] for i in items] == ["call 0", "call 1", "call 2"]  # type: ignore[index]


def test_one_session_from_many_threads_loses_nothing(upstash: Any) -> None:
    # GIVEN one session shared by eight threads, each with its own event loop
    session = UpstashSession("loops-2", redis=upstash_client(upstash.url, upstash.token))
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        async def go() -> None:
            for k in range(10):
                await session.add_items([{"role": "user", "content": f"{n}-{k}"}])

        try:
            asyncio.run(go())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # THEN no error, and all 80 messages are there, each once
    assert errors == []
    got = [i["content"] for i in asyncio.run(session.get_items())]  # type: ignore[index]
    assert sorted(got) == sorted(f"{n}-{k}" for n in range(8) for k in range(10))
    # and each thread's own messages kept their order
    for n in range(8):
        mine = [c for c in got if c.startswith(f"{n}-")]
        assert mine == [f"{n}-{k}" for k in range(10)]


async def test_the_error_for_a_foreign_loop_is_typed() -> None:
    from rejoin.session import _ADD

    class ClosedLoopClient:
        """What httpx raises when a pooled connection's loop has closed."""

        async def evalsha(self, *args: Any) -> Any:
            raise RuntimeError("Event loop is closed")

        async def eval(self, *args: Any) -> Any:
            raise RuntimeError("Event loop is closed")

    with pytest.raises(StoreEventLoopError, match="another event loop"):
        await _ADD(ClosedLoopClient(), ["k1", "k2", "k3", "k4"], ["", 0, 0, "op", "{}"])


def test_the_upstash_client_still_answers_every_command(upstash: Any) -> None:
    client = upstash_client(upstash.url, upstash.token)

    async def use() -> Any:
        await client.set("rejoin-test:plain", "v")
        return await client.get("rejoin-test:plain")

    assert asyncio.run(use()) == "v"
    assert asyncio.run(use()) == "v"  # another loop, another connection pool


def test_the_client_built_to_check_the_configuration_serves_the_first_loop(
    upstash: Any,
) -> None:
    """GIVEN a client from upstash_client (it builds one upstash-redis client up front)
    WHEN two event loops use it in turn
    THEN the first loop gets that client and only the second builds another."""
    built: list[Any] = []
    client = upstash_client(upstash.url, upstash.token)
    first = client._spare
    factory = client._factory
    client._factory = lambda: built.append(factory()) or built[-1]

    async def use() -> Any:
        await client.set("rejoin-test:spare", "v")
        return client.client

    assert asyncio.run(use()) is first
    second = asyncio.run(use())
    assert second is not first and built == [second]
