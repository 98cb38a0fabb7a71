"""The store's lean HTTP client: upstash-redis over ``rejoin._upstash_http``, not httpx.

Every test goes through the real ``upstash_redis.asyncio.Redis`` that
:func:`rejoin.upstash_client` builds, against the local Upstash-compatible
endpoint in front of real Redis (the ``upstash`` fixture, whose faults lose an
applied request's answer, fail it with a 503 or hang it). What the endpoint
cannot do at the HTTP level (drop the connection once the request was applied,
close idle keep-alive connections, answer a 503 with a JSON error, answer
chunked) a small TCP relay in front of it does (:class:`Relay`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
import redis
from upstash_redis.asyncio import Redis as UpstashAsync

from rejoin import UpstashSession, upstash_client
from rejoin import session as store
from rejoin._lua import Script
from rejoin._upstash_http import UpstashHttp
from rejoin.errors import (
    ConfigError,
    StoreEventLoopError,
    StoreResponseError,
    StoreTimeout,
    StoreUnavailable,
)
from rejoin.rooms import _CREATE, RoomStore

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")

# A script that counts its runs: a retry that applied twice shows.
COUNT = Script("count", "return redis.call('INCR', KEYS[1])")
ECHO = Script("echo", "return ARGV[1]")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy in the environment (one would keep the httpx client)."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


def lean(client: Any) -> UpstashHttp:
    """The running loop's HTTP client, checked to be the lean one."""
    http = client.client._http._client
    assert isinstance(http, UpstashHttp), type(http)
    return http


class Relay:
    """A TCP relay in front of the endpoint that can misbehave, one request at a time.

    Each request read from a client is forwarded on a fresh connection to the
    endpoint and its whole answer relayed back, unless an action is queued:

    - ``drop``: forward it (the endpoint applies it), read the answer, then
      close the client's connection without a byte of it;
    - ``answer``: do not forward; write these bytes instead.
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._idle: set[asyncio.StreamWriter] = set()
        self.actions: list[tuple[str, bytes]] = []
        self.forwarded = 0
        self.connections = 0
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close_idle(self) -> int:
        """Close every client connection waiting for its next request (a keep-alive timeout)."""
        closing = list(self._idle)
        for writer in closing:
            writer.close()
        return len(closing)

    async def stop(self) -> None:
        self.close_idle()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                self._idle.add(writer)
                try:
                    request = await _read_message(reader)
                finally:
                    self._idle.discard(writer)
                if request is None:
                    return
                kind, canned = self.actions.pop(0) if self.actions else ("forward", b"")
                if kind == "answer":
                    writer.write(canned)
                    await writer.drain()
                    continue
                answer = await self._forward(request)
                if kind == "drop":
                    return  # applied upstream; its answer never reaches the client
                writer.write(answer)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def _forward(self, request: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(*self._target)
        try:
            writer.write(request)
            await writer.drain()
            answer = await _read_message(reader)
            assert answer is not None
            self.forwarded += 1
            return answer
        finally:
            writer.close()


async def _read_message(reader: asyncio.StreamReader) -> bytes | None:
    """One HTTP/1.1 message with a Content-Length body; None at a clean EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


def http_answer(status: int, body: bytes, *, content_type: str = "application/json") -> bytes:
    reason = {200: "OK", 503: "Service Unavailable"}.get(status, "Status")
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@pytest_asyncio.fixture
async def relay(upstash: Any) -> AsyncIterator[Relay]:
    """A :class:`Relay` in front of the session's Upstash endpoint."""
    target = httpx.URL(upstash.url)
    r = Relay(target.host, target.port or 80)
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


@pytest.fixture
def free_port() -> Iterator[int]:
    """A local port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield port


# --- round trips ---------------------------------------------------------------------


async def test_commands_and_scripts_round_trip_through_the_lean_client(
    upstash: Any, raw_redis: redis.Redis
) -> None:
    """GIVEN a store client built by rejoin.upstash_client
    WHEN it runs commands, EVAL, EVALSHA and rejoin's script runner
    THEN upstash-redis sends them with the lean client (base64 answers) and every
    answer is right."""
    client = upstash_client(upstash.url, upstash.token, timeout=2)
    http = lean(client)
    assert client.client._headers.get("Upstash-Encoding") == "base64"
    assert await client.set("lean:k", "v") is True
    assert await client.get("lean:k") == "v"
    assert await client.incr("lean:n") == 1
    assert await client.hset("lean:h", values={"a": "1", "ü": "ß"}) == 2
    assert await client.hgetall("lean:h") == {"a": "1", "ü": "ß"}
    assert await client.eval("return {KEYS[1], ARGV[1]}", ["lean:k"], ["é"]) == ["lean:k", "é"]
    sha = await client.script_load("return redis.call('GET', KEYS[1])")
    assert await client.evalsha(sha, ["lean:k"]) == "v"
    assert await ECHO(client, ["lean:e"], ["héllo ☃ 🎉"]) == "héllo ☃ 🎉"
    assert await COUNT(client, ["lean:c"], []) == 1
    assert raw_redis.get("lean:c") == "1"
    assert await client.get("lean:missing") is None
    pipe = client.pipeline()
    pipe.set("lean:p", "1")
    pipe.incr("lean:p")
    assert await pipe.exec() == [True, 2]
    assert "UpstashHttp" in repr(http)
    await client.close()


async def test_a_large_non_ascii_answer_of_several_mb_round_trips(
    upstash: Any, raw_redis: redis.Redis
) -> None:
    """GIVEN a value of about 3 MB of non-ASCII text (4+ MB as base64 in the answer)
    WHEN it is written, read back, and returned by a script
    THEN every copy is whole: the store client's answer limit is not the
    management API's 1 MiB."""
    client = upstash_client(upstash.url, upstash.token, timeout=5)
    value = "".join(f"{i:06d} ünïcødé ☃ 🎉 " for i in range(110_000))
    assert len(value.encode()) > 3_000_000
    assert await client.set("lean:big", value) is True
    assert raw_redis.strlen("lean:big") == len(value.encode())
    assert await client.get("lean:big") == value
    assert await client.eval("return redis.call('GET', KEYS[1])", ["lean:big"]) == value
    await client.close()


async def test_a_chunked_answer_is_read_whole(relay: Relay, upstash: Any) -> None:
    """GIVEN an answer sent chunked, in many small chunks and a 2 MB one
    WHEN the client reads it
    THEN the body is joined whole, and the connection serves the next request."""
    value = "chunk ✓ " * 250_000
    body = json.dumps({"result": base64.b64encode(value.encode()).decode()}).encode()
    pieces = [body[:10], body[10:20], body[20:-5], body[-5:]]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    relay.actions.append(("answer", head + b"\r\n" + chunked))
    client = upstash_client(relay.url, upstash.token, timeout=2, retries=0)
    assert await client.get("anything") == value
    assert await client.set("lean:after", "1") is True
    assert relay.connections == 1
    await client.close()


async def test_an_answer_over_the_limit_fails_and_the_next_request_succeeds(
    upstash: Any,
) -> None:
    """GIVEN a lean client whose answer limit is 1,000 bytes
    WHEN an answer is larger
    THEN the request fails as a transport error (its connection dropped), and
    the next, small one succeeds."""
    client = UpstashAsync(upstash.url, upstash.token, rest_retries=0)
    client._http._client = UpstashHttp(upstash.url, timeout=2, max_answer_bytes=1000)  # type: ignore[assignment]
    await client.set("lean:big", "x" * 5000)
    with pytest.raises(httpx.RemoteProtocolError, match="too large"):
        await client.get("lean:big")
    assert await client.set("lean:small", "y") is True
    await client.close()


# --- timeouts --------------------------------------------------------------------------


async def test_a_hang_is_a_store_timeout_and_the_next_request_gets_its_own_answer(
    upstash: Any, raw_redis: redis.Redis
) -> None:
    """GIVEN a client with a 0.3 s timeout and no retry, and a script the endpoint holds 0.8 s
    WHEN the script runs
    THEN it fails with StoreTimeout after about 0.3 s, not 0.8 s
    AND the next requests on the same client get their own answers, before and
    after the held request was applied and answered (to a closed connection)."""
    client = upstash_client(upstash.url, upstash.token, timeout=0.3, retries=0)
    await client.script_load(COUNT.source)
    upstash.faults.hang(0.8, script=COUNT.sha)
    started = time.monotonic()
    with pytest.raises(StoreTimeout):
        await COUNT(client, ["lean:hung"], [])
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 0.6, elapsed
    assert await ECHO(client, ["lean:e"], ["first"]) == "first"
    await asyncio.sleep(0.7)  # the held request is applied and answered now
    assert raw_redis.get("lean:hung") == "1"
    assert await ECHO(client, ["lean:e"], ["second"]) == "second"
    assert await COUNT(client, ["lean:hung"], []) == 2
    await client.close()


async def test_a_hang_on_every_try_is_one_store_timeout_bounded_by_the_tries(
    upstash: Any,
) -> None:
    """GIVEN a client with a 0.3 s timeout and one retry, and a script held on both tries
    WHEN it runs
    THEN it fails with StoreTimeout after about two timeouts."""
    client = upstash_client(upstash.url, upstash.token, timeout=0.3, retry_interval=0.01)
    await client.script_load(ECHO.source)
    upstash.faults.hang(2.0, times=2, script=ECHO.sha)
    started = time.monotonic()
    with pytest.raises(StoreTimeout):
        await ECHO(client, ["lean:e"], ["x"])
    assert 0.55 <= time.monotonic() - started < 1.1
    upstash.faults.clear()
    await client.close()


# --- error answers -------------------------------------------------------------------


async def test_a_503_with_a_non_json_body_is_retried_then_unavailable(upstash: Any) -> None:
    """GIVEN 503 answers with a plain-text body (not applied)
    WHEN a script meets one
    THEN upstash-redis retries and the script succeeds once
    AND when every try meets one, the error is StoreUnavailable."""
    client = upstash_client(upstash.url, upstash.token, timeout=2, retry_interval=0.01)
    await client.script_load(COUNT.source)
    upstash.faults.fail(503, script=COUNT.sha)
    assert await COUNT(client, ["lean:n"], []) == 1
    upstash.faults.fail(503, times=2, script=COUNT.sha)
    with pytest.raises(StoreUnavailable, match="server error"):
        await COUNT(client, ["lean:n"], [])
    assert await COUNT(client, ["lean:n"], []) == 2
    await client.close()


@pytest.mark.parametrize("which", ["lean", "httpx"])
async def test_a_503_with_a_json_error_is_the_same_error_as_with_httpx(
    relay: Relay, upstash: Any, which: str
) -> None:
    """GIVEN a 503 whose body is an Upstash JSON error
    WHEN a script meets it, through the lean client and through plain upstash-redis (httpx)
    THEN both give StoreResponseError with the server's message (a JSON answer
    is an answer: upstash-redis does not retry it), and the lean client's
    connection serves the next request."""
    error = json.dumps({"error": "ERR max concurrent connections exceeded"}).encode()
    relay.actions.append(("answer", http_answer(503, error)))
    if which == "lean":
        client: Any = upstash_client(relay.url, upstash.token, timeout=2, retry_interval=0.01)
        lean(client)
    else:
        client = UpstashAsync(relay.url, upstash.token, rest_retry_interval=0.01)
        assert isinstance(client._http._client, httpx.AsyncClient)
    with pytest.raises(StoreResponseError, match="max concurrent connections"):
        await ECHO(client, ["lean:e"], ["x"])
    assert await ECHO(client, ["lean:e"], ["next"]) == "next"
    await client.close()


# --- answers lost after the request was applied ------------------------------------------


async def test_add_items_whose_answer_was_lost_is_stored_exactly_once(
    relay: Relay, upstash: Any, raw_redis: redis.Redis
) -> None:
    """GIVEN add_items applied and then its answer lost, by the endpoint (a 502
    with no JSON) and by a dropped connection (no byte of an answer)
    WHEN upstash-redis retries each
    THEN every item is stored once, in order."""
    client = upstash_client(relay.url, upstash.token, timeout=2, retry_interval=0.01)
    await client.script_load(store._ADD.source)
    s = UpstashSession("lean-lost", redis=client)
    await s.add_items([{"role": "user", "content": "one"}])
    upstash.faults.lose_response(script=store._ADD.sha)
    await s.add_items([{"role": "user", "content": "two"}])
    relay.actions.append(("drop", b""))
    await s.add_items([{"role": "user", "content": "three"}, {"role": "user", "content": "four"}])
    assert [i["content"] for i in await s.get_items()] == ["one", "two", "three", "four"]  # type: ignore[index]
    assert raw_redis.llen(s.keys.items) == 4
    assert upstash.faults.pending() == 0 and relay.actions == []
    await client.close()


async def test_a_dropped_answer_is_an_error_never_a_silent_resend(
    relay: Relay, upstash: Any, raw_redis: redis.Redis
) -> None:
    """GIVEN a client without retries, and a script whose connection is dropped
    once the script was applied
    WHEN it runs
    THEN the caller gets StoreUnavailable (the outcome is unknown): the lean
    client did not send it again by itself (applied once)
    AND add_items called again after that stores its items once."""
    client = upstash_client(relay.url, upstash.token, timeout=2, retries=0)
    await client.script_load(COUNT.source)
    assert await COUNT(client, ["lean:n"], []) == 1
    relay.actions.append(("drop", b""))
    with pytest.raises(StoreUnavailable, match="RemoteProtocolError"):
        await COUNT(client, ["lean:n"], [])
    assert raw_redis.get("lean:n") == "2"
    assert await COUNT(client, ["lean:n"], []) == 3
    s = UpstashSession("lean-drop", redis=client)
    relay.actions.append(("drop", b""))
    with pytest.raises(StoreUnavailable):
        await s.add_items([{"role": "user", "content": "once"}])
    await s.add_items([{"role": "user", "content": "once"}])
    assert await s.get_items() == [{"role": "user", "content": "once"}]
    await client.close()


async def test_a_room_created_whose_answer_was_lost_says_created(
    relay: Relay, upstash: Any
) -> None:
    """GIVEN a room script (create) applied and its answer lost, by the endpoint
    and by a dropped connection
    WHEN upstash-redis retries it
    THEN the retry answers as the first try would have: created, same epoch."""
    client = upstash_client(relay.url, upstash.token, timeout=2, retry_interval=0.01)
    await client.script_load(_CREATE.source)
    rooms = RoomStore(client)
    upstash.faults.lose_response(script=_CREATE.sha)
    epoch, created = await rooms.create("lean-room-a", mode="every")
    assert created is True
    assert (await rooms.status("lean-room-a") or {})["epoch"] == epoch
    relay.actions.append(("drop", b""))
    epoch, created = await rooms.create("lean-room-b", mode="every")
    assert created is True
    assert (await rooms.status("lean-room-b") or {})["epoch"] == epoch
    assert relay.actions == []
    await client.close()


# --- connections -----------------------------------------------------------------------


async def test_idle_connections_closed_by_the_server_are_replaced(
    relay: Relay, upstash: Any
) -> None:
    """GIVEN a client without retries whose keep-alive connections the server closed while idle
    WHEN the next requests are sent
    THEN they succeed on a new connection, with no error for a retry to absorb."""
    client = upstash_client(relay.url, upstash.token, timeout=2, retries=0)
    await asyncio.gather(*(client.set(f"lean:{n}", n) for n in range(3)))
    assert relay.connections == 3
    for round_, idle in enumerate([3, 1]):
        assert relay.close_idle() == idle
        await asyncio.sleep(0.05)
        assert await client.incr("lean:idle") == round_ + 1
    assert relay.connections == 5
    await client.close()


async def test_connection_refused_is_unavailable_at_once(upstash: Any, free_port: int) -> None:
    """GIVEN nothing listening at the store's address
    WHEN a script runs (with one retry)
    THEN it fails with StoreUnavailable within a fraction of the timeout."""
    client = upstash_client(f"http://127.0.0.1:{free_port}", "t", timeout=2, retry_interval=0.01)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="ConnectError"):
        await ECHO(client, ["lean:e"], ["x"])
    assert time.monotonic() - started < 0.5
    await client.close()


# --- configuration -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["HTTPS_PROXY", "http_proxy", "ALL_PROXY"])
def test_a_proxy_in_the_environment_keeps_the_httpx_client(
    upstash: Any, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """GIVEN a proxy named in the environment
    WHEN a store client is built
    THEN upstash-redis keeps its httpx client (which honours the proxy), with the timeout set."""
    monkeypatch.setenv(name, "http://127.0.0.1:9")
    client = upstash_client(upstash.url, upstash.token, timeout=1.5)
    http = client.client._http._client
    assert isinstance(http, httpx.AsyncClient)
    assert http.timeout == httpx.Timeout(1.5)


@pytest.mark.parametrize("token", ["abc\r\nX-Injected: 1", "abc\n", "abc\x00", "tökén"])
def test_a_token_that_would_break_the_headers_is_refused(token: str) -> None:
    """GIVEN a token with a line break, another control character or non-ASCII text
    WHEN a store client is built
    THEN ConfigError, before anything is sent."""
    with pytest.raises(ConfigError, match="token"):
        upstash_client("https://example.upstash.io", token)


def test_each_event_loop_gets_its_own_client_and_connections(upstash: Any) -> None:
    """GIVEN one store client
    WHEN it is used from two event loops in turn (asyncio.run twice)
    THEN each loop has its own lean client and connections, and both work
    AND an upstash-redis client taken for one loop, used from another, fails
    with StoreEventLoopError."""
    client = upstash_client(upstash.url, upstash.token, timeout=2)
    seen: list[UpstashHttp] = []

    async def use(n: int) -> Any:
        seen.append(lean(client))
        assert await client.set("lean:loops", n) is True
        return await ECHO(client, ["lean:e"], [f"loop {n}"])

    assert asyncio.run(use(1)) == "loop 1"
    assert asyncio.run(use(2)) == "loop 2"
    assert seen[0] is not seen[1]

    one = client.client  # outside any loop: a new upstash-redis client

    async def run() -> Any:
        return await ECHO(one, ["lean:e"], ["x"])

    assert asyncio.run(run()) == "x"
    with pytest.raises(StoreEventLoopError):
        asyncio.run(run())


async def test_a_connect_that_hangs_is_a_store_timeout_within_the_timeout(upstash: Any) -> None:
    """GIVEN a server whose accept queue is full (connecting hangs)
    WHEN a script runs with a 0.3 s timeout and no retry
    THEN it fails with StoreTimeout (httpx.ConnectTimeout) after about 0.3 s."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        fillers = []
        for _ in range(4):  # fill the queue; later connects wait for a SYN-ACK
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        await asyncio.sleep(0.05)
        client = upstash_client(f"http://127.0.0.1:{port}", "t", timeout=0.3, retries=0)
        started = time.monotonic()
        try:
            with pytest.raises(StoreTimeout) as caught:
                await ECHO(client, ["lean:e"], ["x"])
        finally:
            for filler in fillers:
                filler.close()
        assert isinstance(caught.value.__cause__, httpx.ConnectTimeout)
        assert 0.25 <= time.monotonic() - started < 0.6
        await client.close()
