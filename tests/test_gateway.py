"""The local WebSocket gateway, against stub handlers written here.

The stubs record every event they get, so the tests check the event shapes
(with Powertools' own API Gateway models), refusal statuses, route selection,
size limits, ``$disconnect``, the management API (410 after close, with the
real boto3 client too) and the idle timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import httpx
import pytest
from aws_lambda_powertools.utilities.parser.models import (
    APIGatewayWebSocketConnectEventModel,
    APIGatewayWebSocketDisconnectEventModel,
    APIGatewayWebSocketMessageEventModel,
)
from botocore.config import Config
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from rejoin.errors import ConnectionGone, PayloadTooLarge
from rejoin_local.gateway import MESSAGE_LIMIT, Gateway, GatewayConfig, RunningServer, serve

CONNECTION_ID = re.compile(r"^[A-Za-z0-9_-]{15}=$")


class Stubs:
    """Stub connect/message/disconnect handlers that record their events."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[dict[str, Any]] = []
        self.connect_answer: Callable[[dict[str, Any]], Any] = lambda e: {"statusCode": 200}
        self.message_action: Callable[[dict[str, Any]], Any] = lambda e: {"statusCode": 200}
        self.opened: list[str] = []
        self.closed: list[str] = []
        self.gateway: Gateway | None = None

    def _record(self, event: dict[str, Any], context: Any) -> None:
        assert context.function_name.startswith("rejoin-")
        assert context.get_remaining_time_in_millis() > 0
        with self.lock:
            self.events.append(event)

    def connect(self, event: dict[str, Any], context: Any) -> Any:
        # Handlers run in worker threads, never on the gateway's loop.
        assert threading.current_thread() is not threading.main_thread()
        self._record(event, context)
        return self.connect_answer(event)

    def message(self, event: dict[str, Any], context: Any) -> Any:
        self._record(event, context)
        return self.message_action(event)

    def disconnect(self, event: dict[str, Any], context: Any) -> Any:
        self._record(event, context)
        return {"statusCode": 200}

    def of(self, route_key: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.events if e["requestContext"]["routeKey"] == route_key]

    def wait_for(
        self, route_key: str, count: int = 1, timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.of(route_key)
            if len(found) >= count:
                return found
            time.sleep(0.01)
        raise AssertionError(f"expected {count} {route_key} events, got {self.of(route_key)}")


@pytest.fixture
def stubs() -> Stubs:
    return Stubs()


def _start(
    stubs: Stubs, config: GatewayConfig | None = None
) -> Iterator[tuple[Gateway, RunningServer]]:
    gateway = Gateway(
        connect=stubs.connect,
        message=stubs.message,
        disconnect=stubs.disconnect,
        config=config,
        on_open=stubs.opened.append,
        on_close=stubs.closed.append,
    )
    stubs.gateway = gateway
    with serve(gateway.app(), gateway) as running:
        yield gateway, running


@pytest.fixture
def server(stubs: Stubs) -> Iterator[tuple[Gateway, RunningServer]]:
    yield from _start(stubs)


async def _open(running: RunningServer, query: str = "session=s1&token=t1") -> ClientConnection:
    return await connect(f"{running.ws_url}/ws?{query}", max_size=None, open_timeout=5)


async def _async_wait_for(
    stubs: Stubs, route_key: str, count: int = 1, seconds: float = 5.0
) -> list[dict[str, Any]]:
    return await asyncio.to_thread(stubs.wait_for, route_key, count, seconds)


async def _until(check: Callable[[], Any], seconds: float = 10.0) -> None:
    """Poll ``check`` (state changed by other threads) until it is true."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_connect_event_has_api_gateway_shape(
    server: tuple[Gateway, RunningServer], stubs: Stubs
) -> None:
    gateway, running = server
    ws = await _open(running, "session=standup-42&token=abc.def.ghi&x=1&x=2")
    try:
        (event,) = stubs.of("$connect")
        APIGatewayWebSocketConnectEventModel.model_validate(event)
        ctx = event["requestContext"]
        assert ctx["routeKey"] == "$connect"
        assert ctx["eventType"] == "CONNECT"
        assert ctx["messageDirection"] == "IN"
        assert CONNECTION_ID.match(ctx["connectionId"])
        assert ctx["stage"] == "local" and ctx["apiId"] == "local"
        assert ctx["domainName"] == f"127.0.0.1:{running.port}"
        assert ctx["identity"]["sourceIp"] == "127.0.0.1"
        assert isinstance(ctx["connectedAt"], int) and isinstance(ctx["requestTimeEpoch"], int)
        assert abs(ctx["requestTimeEpoch"] / 1000 - time.time()) < 10
        assert re.match(r"\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000", ctx["requestTime"])
        assert event["queryStringParameters"] == {
            "session": "standup-42",
            "token": "abc.def.ghi",
            "x": "2",
        }
        assert event["multiValueQueryStringParameters"]["x"] == ["1", "2"]
        assert event["headers"]["Host"] == f"127.0.0.1:{running.port}"
        assert event["headers"]["Sec-WebSocket-Version"] == "13"
        assert event["multiValueHeaders"]["Host"] == [event["headers"]["Host"]]
        assert event["isBase64Encoded"] is False
        assert "body" not in event
        # Accepted: opened in the sender hook, listed by the gateway (just after the
        # handshake's answer went out, so possibly a moment after the client saw it).
        await _until(lambda: stubs.opened == [ctx["connectionId"]])
        assert ctx["connectionId"] in gateway.connections
    finally:
        await ws.close()


async def test_connect_without_query_string_omits_parameters(
    server: tuple[Gateway, RunningServer], stubs: Stubs
) -> None:
    _, running = server
    ws = await connect(f"{running.ws_url}/ws", open_timeout=5)
    await ws.close()
    (event,) = stubs.of("$connect")
    assert "queryStringParameters" not in event


@pytest.mark.parametrize("status", [400, 401, 403, 429])
async def test_refusal_status_propagates(
    server: tuple[Gateway, RunningServer], stubs: Stubs, status: int
) -> None:
    gateway, running = server
    stubs.connect_answer = lambda e: {"statusCode": status, "body": "no"}
    server_errors: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: server_errors.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("uvicorn.error").addHandler(handler)
    try:
        with pytest.raises(InvalidStatus) as caught:
            await _open(running)
        await asyncio.sleep(0.1)
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    assert caught.value.response.status_code == status
    assert [m for m in server_errors if "handshake" in m] == []
    assert stubs.opened == [] and gateway.connections == {}
    await asyncio.sleep(0.1)
    assert stubs.of("$disconnect") == []  # a refused connection never disconnects


async def test_connect_handler_that_raises_refuses_with_500(
    server: tuple[Gateway, RunningServer], stubs: Stubs
) -> None:
    _, running = server

    def boom(event: dict[str, Any]) -> Any:
        raise RuntimeError("bug in the handler")

    stubs.connect_answer = boom
    with pytest.raises(InvalidStatus) as caught:
        await _open(running)
    assert caught.value.response.status_code == 500


async def test_posting_during_connect_is_gone(
    server: tuple[Gateway, RunningServer], stubs: Stubs
) -> None:
    gateway, running = server
    outcome: list[str] = []

    def post_during_connect(event: dict[str, Any]) -> Any:
        cid = event["requestContext"]["connectionId"]
        try:
            asyncio.run(gateway.deliver(cid, b'{"type":"hello"}'))
            outcome.append("delivered")
        except ConnectionGone:
            outcome.append("gone")
        return {"statusCode": 200}

    stubs.connect_answer = post_during_connect
    ws = await _open(running)
    await ws.close()
    assert outcome == ["gone"]


async def test_route_selection_by_action(
    server: tuple[Gateway, RunningServer], stubs: Stubs
) -> None:
    _, running = server
    frames = [
        ('{"action": "say", "id": "c-1", "text": "hi"}', "say"),
        ('{"action": "resume", "epoch": "e", "last_seq": 3}', "resume"),
        ('{"action": "ping"}', "ping"),
        ('{"action": "leave"}', "leave"),
        ('{"action": "dance"}', "$default"),
        ('{"action": 5}', "$default"),
        ('{"text": "no action"}', "$default"),
        ('["action", "say"]', "$default"),
        ("not json at all", "$default"),
        ("", "$default"),
    ]
    ws = await _open(running)
    try:
        for body, _ in frames:
            await ws.send(body)
        await _async_wait_for(stubs, "$default", 6)
        await _async_wait_for(stubs, "leave", 1)
    finally:
        await ws.close()
    connect_id = stubs.of("$connect")[0]["requestContext"]["connectionId"]
    messages = [e for e in stubs.events if e["requestContext"]["eventType"] == "MESSAGE"]
    assert len(messages) == len(frames)
    seen = {(e["body"], e["requestContext"]["routeKey"]) for e in messages}
    assert seen == set(frames)
    message_ids = set()
    for event in messages:
        APIGatewayWebSocketMessageEventModel.model_validate(event)
        ctx = event["requestContext"]
        assert ctx["connectionId"] == connect_id
        assert ctx["messageDirection"] == "IN"
        assert CONNECTION_ID.match(ctx["messageId"])
        assert event["isBase64Encoded"] is False
        assert set(event) == {"requestContext", "body", "isBase64Encoded"}
        message_ids.add(ctx["messageId"])
    assert len(message_ids) == len(frames)


async def test_handler_error_answers_like_api_gateway(
    server: tuple[Gateway, RunningServer], stubs: Stubs
) -> None:
    _, running = server

    def boom(event: dict[str, Any]) -> Any:
        raise RuntimeError("bug")

    stubs.message_action = boom
    ws = await _open(running)
    try:
        await ws.send('{"action": "ping"}')
        frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert frame["message"] == "Internal server error"
        assert CONNECTION_ID.match(frame["connectionId"])
        # The connection stays usable.
        stubs.message_action = lambda e: {"statusCode": 200}
        await ws.send('{"action": "ping"}')
        await _async_wait_for(stubs, "ping", 2)
    finally:
        await ws.close()


async def test_message_handler_posts_back_from_its_thread(
    server: tuple[Gateway, RunningServer], stubs: Stubs
) -> None:
    gateway, running = server

    def echo(event: dict[str, Any]) -> Any:
        # As the real handlers do: their own event loop, in a worker thread.
        cid = event["requestContext"]["connectionId"]
        asyncio.run(
            gateway.deliver(cid, json.dumps({"type": "pong", "echo": event["body"]}).encode())
        )
        return {"statusCode": 200}

    stubs.message_action = echo
    ws = await _open(running)
    try:
        await ws.send('{"action": "ping"}')
        frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert frame == {"type": "pong", "echo": '{"action": "ping"}'}
    finally:
        await ws.close()


async def test_frame_over_32_kb_closes_with_1009(
    server: tuple[Gateway, RunningServer], stubs: Stubs
) -> None:
    _, running = server
    ws = await _open(running)
    body = json.dumps({"action": "say", "id": "c-big", "text": "x" * (32 * 1024)})
    await ws.send(body)
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1009
    (event,) = await _async_wait_for(stubs, "$disconnect")
    APIGatewayWebSocketDisconnectEventModel.model_validate(event)
    assert event["requestContext"]["disconnectStatusCode"] == 1009
    # The oversized frame never reached a handler.
    assert [e for e in stubs.events if e["requestContext"]["eventType"] == "MESSAGE"] == []


async def test_fragmented_message_within_limits_is_one_message(
    server: tuple[Gateway, RunningServer], stubs: Stubs
) -> None:
    _, running = server
    ws = await _open(running)
    try:
        chunks = ['{"action": "say", "text": "'] + ["y" * 30_000] * 4 + ['"}']
        await ws.send(chunks)  # fragments of at most 30 KB, 120 KB in all
        (event,) = await _async_wait_for(stubs, "say")
        assert event["body"] == "".join(chunks)
    finally:
        await ws.close()


async def test_message_over_128_kb_closes_with_1009(
    server: tuple[Gateway, RunningServer], stubs: Stubs
) -> None:
    _, running = server
    ws = await _open(running)
    await ws.send(["z" * 30_000] * 5)  # 150 KB in 30 KB frames
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1009
    (event,) = await _async_wait_for(stubs, "$disconnect")
    assert event["requestContext"]["disconnectStatusCode"] == 1009
    assert stubs.of("$default") == []


async def test_disconnect_on_close(server: tuple[Gateway, RunningServer], stubs: Stubs) -> None:
    gateway, running = server
    ws = await _open(running)
    cid = stubs.of("$connect")[0]["requestContext"]["connectionId"]
    await ws.close(code=1000)
    (event,) = await _async_wait_for(stubs, "$disconnect")
    APIGatewayWebSocketDisconnectEventModel.model_validate(event)
    ctx = event["requestContext"]
    assert ctx["connectionId"] == cid
    assert ctx["eventType"] == "DISCONNECT"
    assert ctx["disconnectStatusCode"] == 1000
    assert isinstance(ctx["disconnectReason"], str)
    assert set(event["headers"]) == {"Host", "x-api-key", "X-Forwarded-For", "x-restapi"}
    assert stubs.closed == [cid]
    assert cid not in gateway.connections


async def test_close_without_status_reports_1005(
    server: tuple[Gateway, RunningServer], stubs: Stubs
) -> None:
    _, running = server
    ws = await _open(running)
    async with ws.send_context():  # a close frame without a status code
        ws.protocol.send_close()
    await asyncio.wait_for(ws.wait_closed(), 5)
    (event,) = await _async_wait_for(stubs, "$disconnect")
    assert event["requestContext"]["disconnectStatusCode"] == 1005
    assert event["requestContext"]["disconnectReason"] == "Client-side close frame status not set"


async def test_lost_disconnect(server: tuple[Gateway, RunningServer], stubs: Stubs) -> None:
    gateway, running = server
    ws = await _open(running)
    cid = stubs.of("$connect")[0]["requestContext"]["connectionId"]
    await asyncio.wrap_future(gateway.drop(cid))
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    await asyncio.sleep(0.2)
    assert stubs.of("$disconnect") == []  # lost, as API Gateway may lose it
    assert stubs.closed == [cid]  # but the socket is gone: posts get 410
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{running.url}/@connections/{cid}", content=b"{}")
    assert r.status_code == 410


async def test_management_api_and_410_after_close(
    server: tuple[Gateway, RunningServer], stubs: Stubs
) -> None:
    _, running = server
    ws = await _open(running)
    cid = stubs.of("$connect")[0]["requestContext"]["connectionId"]
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{running.url}/@connections/{cid}", content=b'{"type":"pong","ts":1}')
        assert r.status_code == 200
        assert json.loads(await asyncio.wait_for(ws.recv(), 5)) == {"type": "pong", "ts": 1}
        # The stage-prefixed path, as boto3 builds it from an endpoint with a stage.
        r = await http.post(f"{running.url}/local/@connections/{cid}", content=b'{"n":2}')
        assert r.status_code == 200
        assert json.loads(await asyncio.wait_for(ws.recv(), 5)) == {"n": 2}
        r = await http.get(f"{running.url}/@connections/{cid}")
        assert r.status_code == 200
        info = r.json()
        assert info["identity"]["sourceIp"] == "127.0.0.1"
        assert info["connectedAt"].endswith("Z") and info["lastActiveAt"].endswith("Z")
        r = await http.post(f"{running.url}/@connections/{cid}", content=b"x" * (128 * 1024 + 1))
        assert r.status_code == 413
        await ws.close()
        await _async_wait_for(stubs, "$disconnect")
        for method in ("POST", "GET", "DELETE"):
            r = await http.request(method, f"{running.url}/@connections/{cid}", content=b"{}")
            assert r.status_code == 410
            assert r.headers["x-amzn-ErrorType"] == "GoneException"
        r = await http.post(f"{running.url}/@connections/never-existed=", content=b"{}")
        assert r.status_code == 410


async def test_delete_connection_closes_the_socket(
    server: tuple[Gateway, RunningServer], stubs: Stubs
) -> None:
    _, running = server
    ws = await _open(running)
    cid = stubs.of("$connect")[0]["requestContext"]["connectionId"]
    async with httpx.AsyncClient() as http:
        r = await http.delete(f"{running.url}/@connections/{cid}")
    assert r.status_code == 204
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    (event,) = await _async_wait_for(stubs, "$disconnect")
    assert event["requestContext"]["connectionId"] == cid


def test_boto3_management_client(server: tuple[Gateway, RunningServer], stubs: Stubs) -> None:
    _, running = server
    received: list[str] = []
    opened = threading.Event()
    done = threading.Event()

    async def client() -> None:
        ws = await _open(running)
        opened.set()
        received.append(await asyncio.wait_for(ws.recv(), 5))
        await asyncio.to_thread(done.wait, 5)
        await ws.close()

    thread = threading.Thread(target=lambda: asyncio.run(client()))
    thread.start()
    assert opened.wait(5)
    cid = stubs.of("$connect")[0]["requestContext"]["connectionId"]
    api = boto3.client(
        "apigatewaymanagementapi",
        endpoint_url=f"{running.url}/local",
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
        config=Config(retries={"total_max_attempts": 1}),
    )
    api.post_to_connection(ConnectionId=cid, Data=b'{"type":"pong","ts":7}')
    info = api.get_connection(ConnectionId=cid)
    assert info["Identity"]["SourceIp"] == "127.0.0.1"
    assert info["ConnectedAt"] <= info["LastActiveAt"]
    done.set()
    thread.join(5)
    assert json.loads(received[0]) == {"type": "pong", "ts": 7}
    stubs.wait_for("$disconnect")
    with pytest.raises(api.exceptions.GoneException):
        api.post_to_connection(ConnectionId=cid, Data=b"{}")
    with pytest.raises(api.exceptions.GoneException):
        api.get_connection(ConnectionId=cid)


async def test_deliver_after_close_is_gone(
    server: tuple[Gateway, RunningServer], stubs: Stubs
) -> None:
    gateway, running = server
    ws = await _open(running)
    cid = stubs.of("$connect")[0]["requestContext"]["connectionId"]
    await ws.close()
    await _async_wait_for(stubs, "$disconnect")
    with pytest.raises(ConnectionGone):
        await asyncio.to_thread(asyncio.run, gateway.deliver(cid, b"{}"))


async def test_posts_from_many_threads_arrive_once_each_in_each_threads_order(
    server: tuple[Gateway, RunningServer], stubs: Stubs
) -> None:
    """GIVEN two open sockets
    WHEN 8 threads each post 50 numbered frames to both at once (PostToConnection
    from handler threads, batched onto the gateway's loop)
    THEN each socket gets all 400 frames exactly once, each thread's in the order
    that thread posted them."""
    gateway, running = server
    first, second = await _open(running), await _open(running)
    ids = [e["requestContext"]["connectionId"] for e in stubs.of("$connect")]
    # The client may see the handshake done a moment before the gateway has
    # registered the socket: wait for both.
    await _until(lambda: all(i in gateway.connections for i in ids))
    threads, per_thread = 8, 50

    def poster(worker: int) -> None:
        for n in range(per_thread):
            for cid in ids:
                gateway.post(cid, json.dumps({"worker": worker, "n": n}).encode())

    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            await asyncio.gather(
                *(asyncio.wrap_future(pool.submit(poster, w)) for w in range(threads))
            )
        for ws in (first, second):
            seen: dict[int, list[int]] = {w: [] for w in range(threads)}
            for _ in range(threads * per_thread):
                frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                seen[frame["worker"]].append(frame["n"])
            assert all(got == list(range(per_thread)) for got in seen.values()), seen
    finally:
        await first.close()
        await second.close()


async def test_post_checks_size_and_connection_at_once(
    server: tuple[Gateway, RunningServer], stubs: Stubs
) -> None:
    """GIVEN an open socket, and a connection id that never existed
    WHEN a frame over the 128 KB message limit, or a frame to the unknown id, is posted
    THEN the post raises PayloadTooLarge / ConnectionGone itself (nothing is queued),
    and a frame at the limit still arrives whole."""
    gateway, running = server
    ws = await _open(running)
    cid = stubs.of("$connect")[0]["requestContext"]["connectionId"]
    await _until(lambda: cid in gateway.connections)
    try:
        with pytest.raises(PayloadTooLarge):
            gateway.post(cid, b"x" * (MESSAGE_LIMIT + 1))
        with pytest.raises(ConnectionGone):
            gateway.post("AAAAAAAAAAAAAAA=", b"{}")
        await asyncio.to_thread(gateway.post, cid, b"y" * MESSAGE_LIMIT)
        assert await asyncio.wait_for(ws.recv(), 10) == "y" * MESSAGE_LIMIT
    finally:
        await ws.close()


async def test_frames_queued_for_a_socket_that_closes_are_dropped_then_gone(
    server: tuple[Gateway, RunningServer], stubs: Stubs
) -> None:
    """GIVEN a socket with frames posted to it from a thread
    WHEN the client closes it
    THEN the gateway runs $disconnect and does not fail on what was still queued, and
    later posts raise ConnectionGone (the sender's 410)."""
    gateway, running = server
    ws = await _open(running)
    cid = stubs.of("$connect")[0]["requestContext"]["connectionId"]

    def flood() -> None:
        with contextlib.suppress(ConnectionGone):
            for n in range(2000):
                gateway.post(cid, json.dumps({"n": n}).encode())

    posting = asyncio.create_task(asyncio.to_thread(flood))
    await ws.close()
    await posting
    await _async_wait_for(stubs, "$disconnect")
    with pytest.raises(ConnectionGone):
        await asyncio.to_thread(gateway.post, cid, b"{}")
    assert cid not in gateway.connections


@pytest.fixture
def short_idle(stubs: Stubs) -> Iterator[tuple[Gateway, RunningServer]]:
    yield from _start(stubs, GatewayConfig(idle_timeout=0.6, sweep_interval=0.05))


async def test_idle_timeout_closes_idle_sockets(
    short_idle: tuple[Gateway, RunningServer], stubs: Stubs
) -> None:
    _, running = server = short_idle
    idle = await _open(running)
    busy = await _open(running)
    busy_id = stubs.of("$connect")[1]["requestContext"]["connectionId"]
    started = time.monotonic()
    # The busy socket sends a ping every 0.2 s; the idle one says nothing.
    for _ in range(6):
        await busy.send('{"action": "ping"}')
        await asyncio.sleep(0.2)
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(idle.recv(), 5)
    assert idle.close_code == 1001
    assert time.monotonic() - started >= 0.5
    (event,) = await _async_wait_for(stubs, "$disconnect")
    assert event["requestContext"]["disconnectStatusCode"] == 1001
    assert event["requestContext"]["disconnectReason"] == "Going away"
    assert event["requestContext"]["connectionId"] != busy_id
    assert busy.state.name == "OPEN"
    await busy.close()
    assert server[0].stats["connects"] == 2


async def test_max_duration_closes_busy_sockets(stubs: Stubs) -> None:
    config = GatewayConfig(max_duration=0.5, sweep_interval=0.05)
    for gateway, running in _start(stubs, config):
        ws = await _open(running)
        with pytest.raises(ConnectionClosed):
            for _ in range(50):
                await ws.send('{"action": "ping"}')
                await asyncio.sleep(0.05)
        assert ws.close_code == 1001
        await _async_wait_for(stubs, "$disconnect")
        assert gateway.connections == {}


# ---------------------------------------------------------------------------
# The local stack's turn worker (per-session FIFO in front of the turn handler)
# ---------------------------------------------------------------------------


def _turn(session: str, turn_id: str) -> Any:
    from rejoin.queue import TurnRequest

    return TurnRequest(session_id=session, epoch="e1", turn_id=turn_id, reply_to=1)


class TurnHandlerStub:
    """A turn handler run in threads, recording batches; fails turns on demand."""

    def __init__(self, fail: Callable[[str, int], bool] | None = None, delay: float = 0.05):
        self.fail = fail or (lambda turn, attempt: False)
        self.delay = delay
        self.lock = threading.Lock()
        self.calls: list[tuple[str, list[str], int, float, float]] = []

    def __call__(self, event: dict[str, Any]) -> dict[str, Any]:
        from rejoin.queue import TurnRequest

        start = time.monotonic()
        time.sleep(self.delay)
        failures = []
        turns = []
        failed_one = False
        for record in event["Records"]:
            turn = TurnRequest.from_json(record["body"])
            turns.append(turn.turn_id)
            attempt = int(record["attributes"]["ApproximateReceiveCount"])
            # Like SqsFifoPartialProcessor: after a failure, the rest of the group fails too.
            if failed_one or self.fail(turn.turn_id, attempt):
                failed_one = True
                failures.append({"itemIdentifier": record["messageId"]})
        session = TurnRequest.from_json(event["Records"][0]["body"]).session_id
        attempt = int(event["Records"][0]["attributes"]["ApproximateReceiveCount"])
        with self.lock:
            self.calls.append((session, turns, attempt, start, time.monotonic()))
        return {"batchItemFailures": failures}


async def _run_worker(stub: TurnHandlerStub, turns: list[Any], **options: Any) -> Any:
    from rejoin.queue import InMemoryTurnQueue
    from rejoin_local.stack import TurnWorker

    queue = InMemoryTurnQueue()

    async def invoke(event: dict[str, Any]) -> Any:
        return await asyncio.to_thread(stub, event)

    worker = TurnWorker(queue, invoke, **({"backoff": 0.01} | options))
    queue.on_enqueue = worker.notify
    worker.start()

    async def enqueue(turn: Any) -> None:
        # As the message handler does: from its own thread and event loop.
        await asyncio.to_thread(asyncio.run, queue.enqueue(turn))

    await asyncio.gather(*(enqueue(t) for t in turns[: len(turns) // 2]))
    for turn in turns[len(turns) // 2 :]:
        await enqueue(turn)
    await _until(lambda: not (queue.pending() or worker._tasks))
    await worker.stop()
    return worker


async def test_turn_worker_serialises_each_session_and_runs_sessions_in_parallel() -> None:
    stub = TurnHandlerStub(delay=0.1)
    turns = [_turn(s, f"{s}-t{i}") for i in range(6) for s in ("s1", "s2")]
    worker = await _run_worker(stub, turns)
    assert worker.processed == 12 and worker.dead_letters == []
    for session in ("s1", "s2"):
        calls = [c for c in stub.calls if c[0] == session]
        done = [t for c in calls for t in c[1]]
        assert sorted(done) == sorted(f"{session}-t{i}" for i in range(6))
        # One batch at a time per session: no two batches overlap.
        spans = sorted((c[3], c[4]) for c in calls)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))
    # The two sessions did run at the same time at least once.
    s1 = [(c[3], c[4]) for c in stub.calls if c[0] == "s1"]
    s2 = [(c[3], c[4]) for c in stub.calls if c[0] == "s2"]
    assert any(a < d and c < b for a, b in s1 for c, d in s2)


async def test_turn_worker_keeps_order_within_a_session() -> None:
    stub = TurnHandlerStub(delay=0.02)
    turns = [_turn("s1", f"t{i:02d}") for i in range(15)]
    from rejoin.queue import InMemoryTurnQueue
    from rejoin_local.stack import TurnWorker

    queue = InMemoryTurnQueue()

    async def invoke(event: dict[str, Any]) -> Any:
        return await asyncio.to_thread(stub, event)

    worker = TurnWorker(queue, invoke, backoff=0.01)
    queue.on_enqueue = worker.notify
    worker.start()
    for turn in turns:  # in order, from one sender
        await asyncio.to_thread(asyncio.run, queue.enqueue(turn))
    await _until(lambda: not (queue.pending() or worker._tasks))
    await worker.stop()
    assert [t for c in stub.calls for t in c[1]] == [t.turn_id for t in turns]


async def test_failed_turns_are_retried_first_then_dead_lettered() -> None:
    # t1 fails once (then succeeds); t3 always fails.
    stub = TurnHandlerStub(
        fail=lambda turn, attempt: (turn == "t1" and attempt == 1) or turn == "t3"
    )
    from rejoin.queue import InMemoryTurnQueue
    from rejoin_local.stack import TurnWorker

    queue = InMemoryTurnQueue()

    async def invoke(event: dict[str, Any]) -> Any:
        return await asyncio.to_thread(stub, event)

    worker = TurnWorker(queue, invoke, backoff=0.01, max_attempts=3)
    queue.on_enqueue = worker.notify
    for i in range(5):  # queued before the worker starts: one batch of five
        await queue.enqueue(_turn("s1", f"t{i}"))
    worker.start()
    await _until(lambda: not (queue.pending() or worker._tasks))
    await worker.stop()
    batches = [(c[1], c[2]) for c in stub.calls]
    assert batches[0] == (["t0", "t1", "t2", "t3", "t4"], 1)
    # The failed turn and everything after it come back first, before anything else.
    assert batches[1] == (["t1", "t2", "t3", "t4"], 2)
    assert batches[2] == (["t3", "t4"], 3)
    assert [t.turn_id for t in worker.dead_letters] == ["t3", "t4"]
    assert worker.processed == 3


async def test_turn_handler_that_raises_fails_the_whole_batch() -> None:
    from rejoin.queue import InMemoryTurnQueue
    from rejoin_local.stack import TurnWorker

    calls: list[int] = []

    def flaky(event: dict[str, Any]) -> dict[str, Any]:
        calls.append(len(event["Records"]))
        if len(calls) == 1:
            raise RuntimeError("cold start failed")
        return {"batchItemFailures": []}

    queue = InMemoryTurnQueue()

    async def invoke(event: dict[str, Any]) -> Any:
        return await asyncio.to_thread(flaky, event)

    worker = TurnWorker(queue, invoke, backoff=0.01)
    await queue.enqueue(_turn("s1", "a"))
    await queue.enqueue(_turn("s1", "b"))
    worker.start()
    await _until(lambda: not (queue.pending() or worker._tasks))
    await worker.stop()
    assert calls == [2, 2] and worker.processed == 2 and worker.dead_letters == []


# ---------------------------------------------------------------------------
# Handshake size, nested JSON, and the management API's credential
# ---------------------------------------------------------------------------


def _raw_handshake(
    running: RunningServer,
    path: str = "/ws?session=s1&token=t1",
    headers: list[tuple[str, str]] | None = None,
    *,
    chunk: int | None = None,
) -> bytes:
    """Send a WebSocket handshake over a plain socket; return the first bytes of the answer."""
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {running.host}:{running.port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers or []),
    ]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    with socket.create_connection((running.host, running.port), timeout=5) as sock:
        if chunk is None:
            sock.sendall(request)
        else:  # a head that arrives in pieces, as over a slow network
            for start in range(0, len(request), chunk):
                sock.sendall(request[start : start + chunk])
        return sock.recv(4096)


@pytest.mark.parametrize(
    ("what", "path", "headers", "chunk"),
    [
        ("a 9,000-character token", "/ws?session=s1&token=" + "a" * 9000, None, None),
        ("a 70,000-character token", "/ws?session=s1&token=" + "a" * 70000, None, None),
        ("the same, arriving in pieces", "/ws?session=s1&token=" + "a" * 20000, None, 1000),
        (
            "9 KB of headers",
            "/ws?session=s1&token=t",
            [(f"X-Pad-{i}", "p" * 900) for i in range(10)],
            None,
        ),
        ("200 headers", "/ws?session=s1&token=t", [(f"X-N-{i}", "1") for i in range(200)], None),
    ],
)
def test_oversized_handshake_is_answered_431(
    server: tuple[Gateway, RunningServer],
    stubs: Stubs,
    what: str,
    path: str,
    headers: list[tuple[str, str]] | None,
    chunk: int | None,
) -> None:
    # GIVEN the gateway, WHEN a handshake over its 8 KB limit arrives (what)
    _, running = server
    answer = _raw_handshake(running, path, headers, chunk=chunk)
    # THEN it is answered at once with 431, and no handler ran
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), (what, answer)
    assert stubs.of("$connect") == []


def test_handshake_the_parser_cannot_read_is_answered_400(
    server: tuple[Gateway, RunningServer], stubs: Stubs
) -> None:
    # A header value with a control character: the WebSocket parser refuses it.
    _, running = server
    answer = _raw_handshake(running, headers=[("X-Bad", "a\x01b")])
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert stubs.of("$connect") == []


async def test_handshake_within_the_limit_is_accepted(
    server: tuple[Gateway, RunningServer], stubs: Stubs
) -> None:
    # A token of 8,000 characters still fits: the connect handler sees all of it.
    _, running = server
    token = "t" * 8000
    ws = await _open(running, f"session=s1&token={token}")
    await ws.close()
    (event,) = stubs.of("$connect")
    assert event["queryStringParameters"]["token"] == token
    # And a real client over the limit gets the status, not a hang.
    with pytest.raises(InvalidStatus) as refused:
        await _open(running, "session=s1&token=" + "t" * 9000)
    assert refused.value.response.status_code == 431


async def test_deeply_nested_frame_goes_to_default(
    server: tuple[Gateway, RunningServer], stubs: Stubs
) -> None:
    # GIVEN 10,000 nested arrays in 20 KB (deeper than json.loads can go)
    _, running = server
    nested = "[" * 10_000 + "]" * 10_000
    ws = await _open(running)
    try:
        # WHEN it is sent, THEN route selection survives and hands it to $default
        await ws.send(nested)
        await ws.send('{"action": "ping"}')  # and the connection still works
        (event,) = await _async_wait_for(stubs, "$default")
        await _async_wait_for(stubs, "ping")
    finally:
        await ws.close()
    assert event["body"] == nested


@pytest.fixture
def keyed(stubs: Stubs) -> Iterator[tuple[Gateway, RunningServer]]:
    yield from _start(stubs, GatewayConfig(management_key="the-local-admin-key"))


def _management_client(running: RunningServer, secret: str) -> Any:
    return boto3.client(
        "apigatewaymanagementapi",
        endpoint_url=f"{running.url}/local",
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key=secret,
        config=Config(retries={"total_max_attempts": 1}),
    )


async def test_management_api_needs_the_key(
    keyed: tuple[Gateway, RunningServer], stubs: Stubs
) -> None:
    _, running = keyed
    ws = await _open(running)
    cid = stubs.of("$connect")[0]["requestContext"]["connectionId"]
    url = f"{running.url}/@connections/{cid}"
    try:
        async with httpx.AsyncClient() as http:
            # No credential, a wrong one, a signature made with another secret: refused.
            r = await http.post(url, content=b'{"n":1}')
            assert r.status_code == 403
            assert r.headers["x-amzn-ErrorType"] == "MissingAuthenticationTokenException"
            r = await http.post(url, content=b'{"n":2}', headers={"Authorization": "Bearer nope"})
            assert r.status_code == 403
            for method in ("GET", "DELETE"):
                r = await http.request(method, url)
                assert r.status_code == 403
            # The key: delivered (and the refused DELETE did not close the socket).
            r = await http.post(
                url, content=b'{"n":3}', headers={"Authorization": "Bearer the-local-admin-key"}
            )
            assert r.status_code == 200
        assert json.loads(await asyncio.wait_for(ws.recv(), 5)) == {"n": 3}
    finally:
        await ws.close()


def test_management_api_checks_boto3_signatures(
    keyed: tuple[Gateway, RunningServer], stubs: Stubs
) -> None:
    from botocore.exceptions import ClientError

    gateway, running = keyed
    received: list[str] = []
    opened, done = threading.Event(), threading.Event()

    async def client() -> None:
        ws = await _open(running)
        opened.set()
        received.append(await asyncio.wait_for(ws.recv(), 5))
        await asyncio.to_thread(done.wait, 5)
        await ws.close()

    thread = threading.Thread(target=lambda: asyncio.run(client()))
    thread.start()
    try:
        assert opened.wait(5)
        cid = stubs.of("$connect")[0]["requestContext"]["connectionId"]
        # WHEN boto3 signs with another secret THEN 403 InvalidSignatureException
        with pytest.raises(ClientError) as wrong:
            _management_client(running, "another-secret").post_to_connection(
                ConnectionId=cid, Data=b'{"n":"wrong"}'
            )
        assert wrong.value.response["Error"]["Code"] == "InvalidSignatureException"
        # WHEN the gateway's clock is 20 minutes past the signature THEN refused (no replay)
        real_clock = gateway._clock
        gateway._clock = lambda: real_clock() + 20 * 60
        with pytest.raises(ClientError):
            _management_client(running, "the-local-admin-key").post_to_connection(
                ConnectionId=cid, Data=b'{"n":"late"}'
            )
        gateway._clock = real_clock
        # WHEN boto3 signs with the key as its secret access key THEN it works, as with IAM
        api = _management_client(running, "the-local-admin-key")
        api.post_to_connection(ConnectionId=cid, Data=b'{"n":"signed"}')
        assert api.get_connection(ConnectionId=cid)["Identity"]["SourceIp"] == "127.0.0.1"
    finally:
        done.set()
        thread.join(5)
    assert [json.loads(r) for r in received] == [{"n": "signed"}]


async def test_a_signed_request_with_a_changed_body_is_refused(
    keyed: tuple[Gateway, RunningServer], stubs: Stubs
) -> None:
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    _, running = keyed
    ws = await _open(running)
    cid = stubs.of("$connect")[0]["requestContext"]["connectionId"]
    url = f"{running.url}/@connections/{cid.replace('=', '%3D')}"
    signed = AWSRequest(method="POST", url=url, data=b'{"n":"original"}')
    SigV4Auth(Credentials("local", "the-local-admin-key"), "execute-api", "us-east-1").add_auth(
        signed
    )
    headers = dict(signed.headers.items())
    try:
        async with httpx.AsyncClient() as http:
            r = await http.post(url, content=b'{"n":"changed"}', headers=headers)
            assert r.status_code == 403
            r = await http.post(url, content=b'{"n":"original"}', headers=headers)
            assert r.status_code == 200
        assert json.loads(await asyncio.wait_for(ws.recv(), 5)) == {"n": "original"}
    finally:
        await ws.close()
