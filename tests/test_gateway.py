"""The local WebSocket gateway, against stub handlers written here.

The stubs record every event they get, so the tests check the event shapes
(with Powertools' own API Gateway models), refusal statuses, route selection,
size limits, ``$disconnect``, the management API (410 after close, with the
real boto3 client too) and the idle timeout.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
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

from rejoin.errors import ConnectionGone
from rejoin_local.gateway import Gateway, GatewayConfig, RunningServer, serve

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
    stubs: Stubs, route_key: str, count: int = 1, timeout: float = 5.0
) -> list[dict[str, Any]]:
    return await asyncio.to_thread(stubs.wait_for, route_key, count, timeout)


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
        # Accepted: opened in the sender hook, listed by the gateway.
        assert stubs.opened == [ctx["connectionId"]]
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
    with pytest.raises(InvalidStatus) as caught:
        await _open(running)
    assert caught.value.response.status_code == status
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
