"""The runtime: clients per event loop, from any thread."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from rejoin.config import Settings
from rejoin.runtime import Runtime


def make() -> tuple[Runtime, list[Any]]:
    built: list[Any] = []

    def factory() -> Any:
        client = object()
        built.append(client)
        return client

    rt = Runtime(Settings(), redis_factory=factory, agent_factory=lambda rt: object())
    return rt, built


def test_a_fresh_thread_without_a_loop_gets_its_clients():
    # GIVEN a worker thread that never ran a loop (the local turn worker's)
    rt, _ = make()
    seen: list[Any] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            from rejoin.turns import agent_for

            seen.append(agent_for(rt))
            seen.append(rt.redis())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    # THEN it works (it used to fail on the first call in a new thread)
    assert errors == [] and len(seen) == 2


def test_one_client_per_event_loop():
    rt, built = make()

    async def get() -> Any:
        return rt.redis()

    first = rt.run(get())
    assert rt.run(get()) is first  # Runtime.run's loop is long-lived: reused
    other = asyncio.run(get())  # another loop on the same thread: a new client
    assert other is not first and len(built) == 2
    assert rt.run(get()) is not other
