"""Posting to connections: API Gateway mapping, the in-memory sender, retries, splitting."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from rejoin.errors import (
    ConfigError,
    ConnectionGone,
    PayloadTooLarge,
    SendError,
    SenderThrottled,
)
from rejoin.frames import encode_frame
from rejoin.sender import (
    ApiGatewaySender,
    BroadcastResult,
    InMemorySender,
    broadcast,
    send,
    split_frame,
)

ROOT = Path(__file__).resolve().parents[1]
ENDPOINT = "https://abc123.execute-api.us-east-1.amazonaws.com/prod"
KB = 1024
MOTO_ACCOUNT = "123456789012"  # moto's default account id


class FakeSleep:
    """Records backoff delays instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def _reassemble(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a client does: join parts by id, in index order, and parse them."""
    out: list[dict[str, Any]] = []
    pending: dict[str, list[dict[str, Any]]] = {}
    for frame in frames:
        if frame["type"] != "part":
            out.append(frame)
            continue
        parts = pending.setdefault(frame["id"], [])
        parts.append(frame)
        if len(parts) == frame["count"]:
            parts.sort(key=lambda p: p["index"])
            out.append(json.loads("".join(p["data"] for p in parts)))
            del pending[frame["id"]]
    assert not pending, "incomplete part sets"
    return out


# --- API Gateway ------------------------------------------------------------------


@pytest.fixture
def stubbed() -> Iterator[tuple[ApiGatewaySender, Stubber]]:
    client = boto3.client(
        "apigatewaymanagementapi",
        region_name="us-east-1",
        endpoint_url=ENDPOINT,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    with Stubber(client) as stubber:
        yield ApiGatewaySender(ENDPOINT, client=client), stubber
        stubber.assert_no_pending_responses()


async def test_post_200(stubbed: tuple[ApiGatewaySender, Stubber]) -> None:
    # GIVEN API Gateway answering 200 for exactly this connection and data
    sender, stubber = stubbed
    stubber.add_response("post_to_connection", {}, {"ConnectionId": "c1", "Data": b'{"a":1}'})
    # WHEN posting / THEN no error (and the stub saw the expected parameters)
    await sender.post("c1", b'{"a":1}')


@pytest.mark.parametrize(
    ("code", "status", "error"),
    [
        ("GoneException", 410, ConnectionGone),
        ("LimitExceededException", 429, SenderThrottled),
        ("TooManyRequestsException", 429, SenderThrottled),
        ("PayloadTooLargeException", 413, PayloadTooLarge),
        ("ForbiddenException", 403, SendError),
        ("InternalServerError", 500, SendError),
    ],
)
async def test_post_errors_are_mapped(
    stubbed: tuple[ApiGatewaySender, Stubber], code: str, status: int, error: type[Exception]
) -> None:
    # GIVEN API Gateway answering with an error
    sender, stubber = stubbed
    stubber.add_client_error("post_to_connection", code, http_status_code=status)
    # WHEN posting
    with pytest.raises(SendError) as info:
        await sender.post("c1", b"{}")
    # THEN exactly the mapped rejoin error, with the code named for unmapped ones
    assert type(info.value) is error
    if error is SendError:
        assert code in str(info.value)


async def test_exists_and_close(stubbed: tuple[ApiGatewaySender, Stubber]) -> None:
    # GIVEN one live connection and one gone, for GetConnection and DeleteConnection
    sender, stubber = stubbed
    stubber.add_response("get_connection", {}, {"ConnectionId": "live"})
    stubber.add_client_error("get_connection", "GoneException", http_status_code=410)
    stubber.add_client_error("get_connection", "LimitExceededException", http_status_code=429)
    stubber.add_response("delete_connection", {}, {"ConnectionId": "live"})
    stubber.add_client_error("delete_connection", "GoneException", http_status_code=410)
    # WHEN checked and closed
    # THEN exists() is True then False, throttling is not "gone", and closing
    # a gone connection is not an error
    assert await sender.exists("live") is True
    assert await sender.exists("dead") is False
    with pytest.raises(SenderThrottled):
        await sender.exists("busy")
    await sender.close("live")
    await sender.close("dead")


async def test_posts_run_in_parallel_threads() -> None:
    # GIVEN a client whose calls block for 0.2 s each
    class SlowClient:
        def __init__(self) -> None:
            self.threads: set[int] = set()

        def post_to_connection(self, **kwargs: Any) -> None:
            self.threads.add(threading.get_ident())
            threading.Event().wait(0.2)

    client = SlowClient()
    sender = ApiGatewaySender(ENDPOINT, client=client)
    loop = asyncio.get_running_loop()
    # WHEN 8 posts are made at once
    started = loop.time()
    await asyncio.gather(*(sender.post(f"c{i}", b"{}") for i in range(8)))
    elapsed = loop.time() - started
    # THEN they overlap (far less than 8 x 0.2 s) on several threads, off the loop
    assert elapsed < 1.0
    assert len(client.threads) > 1
    assert threading.get_ident() not in client.threads


async def test_lazily_built_client_posts_through_boto3(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN dummy credentials, no region in the environment, and moto standing in for AWS
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        from moto.apigatewaymanagementapi.models import apigatewaymanagementapi_backends

        sender = ApiGatewaySender(ENDPOINT)
        # WHEN a frame is posted (the client is built on this first use)
        await sender.post("c1", b'{"type":"pong","ts":1}')
        # THEN it reached the connection, in the region read from the host name
        backend = apigatewaymanagementapi_backends[MOTO_ACCOUNT]["us-east-1"]
        assert backend.connections["c1"].data == b'{"type":"pong","ts":1}'
        # and botocore makes a single attempt, so 429s reach rejoin's backoff
        client = sender._get_client()
        assert client.meta.config.retries["total_max_attempts"] == 1
        assert client.meta.region_name == "us-east-1"


def test_endpoint_must_be_http() -> None:
    # GIVEN a wss:// URL (the client's, not the management API's) / THEN ConfigError
    with pytest.raises(ConfigError):
        ApiGatewaySender("wss://abc123.execute-api.us-east-1.amazonaws.com/prod")


def test_importing_the_modules_does_not_import_boto3_or_agents() -> None:
    # GIVEN a fresh interpreter / WHEN the three modules are imported
    code = (
        "import sys, rejoin.sender, rejoin.frames, rejoin.tokens; "
        "print(sorted(m for m in ('boto3', 'botocore', 'agents') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "shared")}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    # THEN neither boto3 nor the Agents SDK was loaded
    assert done.stdout.strip() == "[]"


# --- the in-memory sender -----------------------------------------------------------


async def test_in_memory_records_frames_in_order() -> None:
    # GIVEN an open connection
    sender = InMemorySender()
    sender.open("c1")
    # WHEN two frames are posted
    await sender.post("c1", b'{"n":1}')
    await sender.post("c1", b'{"n":2}')
    # THEN both are recorded in order, raw and decoded, and counted
    assert sender.raw("c1") == [b'{"n":1}', b'{"n":2}']
    assert sender.frames("c1") == [{"n": 1}, {"n": 2}]
    assert sender.posts == 2
    assert await sender.exists("c1") is True


async def test_in_memory_gone_throttle_and_close() -> None:
    # GIVEN a connection closed by its client, one never opened, and one throttled once
    sender = InMemorySender()
    for cid in ("closed", "busy"):
        sender.open(cid)
    sender.close_socket("closed")
    sender.throttle("busy", 1)
    # WHEN posting to each
    # THEN gone connections raise ConnectionGone; the throttled one raises once, then delivers
    with pytest.raises(ConnectionGone):
        await sender.post("closed", b"{}")
    with pytest.raises(ConnectionGone):
        await sender.post("never", b"{}")
    with pytest.raises(SenderThrottled):
        await sender.post("busy", b'{"n":1}')
    await sender.post("busy", b'{"n":2}')
    assert sender.frames("busy") == [{"n": 2}]
    assert await sender.exists("closed") is False
    # and close() (DeleteConnection) ends a connection, twice without error
    await sender.close("busy")
    await sender.close("busy")
    with pytest.raises(ConnectionGone):
        await sender.post("busy", b"{}")
    assert sender.posts == 5


async def test_in_memory_refuses_frames_over_the_frame_limit() -> None:
    # GIVEN an open connection / WHEN a 32 KB + 1 frame is posted directly
    sender = InMemorySender()
    sender.open("c1")
    with pytest.raises(PayloadTooLarge):
        await sender.post("c1", b"x" * (32 * KB + 1))
    # THEN it is refused, as code that skips split_frame should be
    assert sender.raw("c1") == []


async def test_in_memory_on_deliver_hook_sync_and_async() -> None:
    # GIVEN a sync and an async delivery hook
    seen: list[tuple[str, bytes]] = []

    async def push(cid: str, data: bytes) -> None:
        await asyncio.sleep(0)
        seen.append((cid, data))

    for hook in (push, lambda cid, data: seen.append((cid, data))):
        sender = InMemorySender(on_deliver=hook)
        sender.open("c1")
        # WHEN a frame is delivered
        await sender.post("c1", b'{"x":1}')
    # THEN each hook saw it
    assert seen == [("c1", b'{"x":1}'), ("c1", b'{"x":1}')]


async def test_in_memory_latency_is_awaited() -> None:
    # GIVEN 50 ms latency per post
    sender = InMemorySender(latency=0.05)
    sender.open("c1")
    loop = asyncio.get_running_loop()
    started = loop.time()
    # WHEN 10 posts run concurrently
    await asyncio.gather(*(sender.post("c1", b"{}") for _ in range(10)))
    # THEN each waited, but concurrently (not 10 x 50 ms)
    elapsed = loop.time() - started
    assert 0.05 <= elapsed < 0.4


def test_in_memory_is_usable_from_several_threads() -> None:
    # GIVEN one sender shared by 8 threads, each running its own event loop
    sender = InMemorySender()
    for t in range(8):
        sender.open(f"c{t}")

    def run(t: int) -> None:
        async def main() -> None:
            for n in range(200):
                await sender.post(f"c{t}", json.dumps({"n": n}).encode())

        asyncio.run(main())

    threads = [threading.Thread(target=run, args=(t,)) for t in range(8)]
    # WHEN they all post at once
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # THEN nothing is lost or reordered
    assert sender.posts == 1600
    for t in range(8):
        assert [f["n"] for f in sender.frames(f"c{t}")] == list(range(200))


# --- broadcast and send ---------------------------------------------------------------


async def test_broadcast_to_100_with_3_gone() -> None:
    # GIVEN 100 connections of which 3 have gone away
    sender = InMemorySender()
    ids = [f"c{i:03d}" for i in range(100)]
    for cid in ids:
        sender.open(cid)
    closed = {"c007", "c050", "c099"}
    for cid in closed:
        sender.close_socket(cid)
    frame = {"type": "message", "seq": 1, "text": "hi"}
    # WHEN one frame is broadcast to all
    result = await broadcast(sender, ids, frame)
    # THEN 97 got it exactly once, the 3 are reported gone, nothing failed
    assert sorted(result.gone) == sorted(closed)
    assert result.delivered == [c for c in ids if c not in closed]
    assert result.failed == {}
    for cid in ids:
        assert sender.frames(cid) == ([] if cid in closed else [frame])


async def test_broadcast_is_parallel_and_bounded() -> None:
    # GIVEN 40 connections with 50 ms latency each, and a sender that tracks concurrency
    class Counting(InMemorySender):
        def __init__(self) -> None:
            super().__init__(latency=0.05)
            self.now = self.peak = 0

        async def post(self, connection_id: str, data: bytes) -> None:
            self.now += 1
            self.peak = max(self.peak, self.now)
            try:
                await super().post(connection_id, data)
            finally:
                self.now -= 1

    sender = Counting()
    for i in range(40):
        sender.open(f"c{i}")
    # WHEN broadcasting with max_parallel=10
    result = await broadcast(sender, [f"c{i}" for i in range(40)], {"type": "x"}, max_parallel=10)
    # THEN all are delivered, never more than 10 at once, but 10 at once indeed
    assert len(result.delivered) == 40
    assert sender.peak == 10


async def test_broadcast_retries_throttling_with_growing_backoff() -> None:
    # GIVEN a connection throttled twice, then open, and a fake sleep
    sender = InMemorySender()
    sender.open("c1")
    sender.open("c2")
    sender.throttle("c1", 2)
    sleep = FakeSleep()
    # WHEN broadcasting (jitter pinned to its maximum)
    result = await broadcast(
        sender, ["c1", "c2"], {"type": "x"}, sleep=sleep, rand=lambda: 1.0, base_delay=0.05
    )
    # THEN both are delivered; c1 after two backoffs that doubled
    assert result == BroadcastResult(delivered=["c1", "c2"], gone=[], failed={})
    assert sleep.delays == pytest.approx([0.05, 0.1])
    assert sender.frames("c1") == [{"type": "x"}]
    assert sender.posts == 4


async def test_backoff_has_full_jitter_and_a_cap() -> None:
    # GIVEN a connection throttled 6 times, a cap of 0.3 s, and a fixed jitter of 0.5
    sender = InMemorySender()
    sender.open("c1")
    sender.throttle("c1", 6)
    sleep = FakeSleep()
    # WHEN sending with 7 attempts
    await send(
        sender,
        "c1",
        {"type": "x"},
        max_attempts=7,
        base_delay=0.05,
        max_delay=0.3,
        sleep=sleep,
        rand=lambda: 0.5,
    )
    # THEN each delay is the jitter times min(cap, base * 2^n)
    assert sleep.delays == pytest.approx([0.025, 0.05, 0.1, 0.15, 0.15, 0.15])


async def test_throttled_forever_fails_after_max_attempts() -> None:
    # GIVEN one connection throttled forever and one healthy
    sender = InMemorySender()
    sender.open("stuck")
    sender.open("ok")
    sender.throttle("stuck", 10_000)
    sleep = FakeSleep()
    # WHEN broadcasting with 4 attempts
    result = await broadcast(sender, ["stuck", "ok"], {"type": "x"}, max_attempts=4, sleep=sleep)
    # THEN the stuck one failed after exactly 4 posts (3 backoffs); the other was delivered
    assert result.delivered == ["ok"]
    assert list(result.failed) == ["stuck"]
    assert "throttled 4 times" in result.failed["stuck"]
    assert sender.posts == 5
    assert len(sleep.delays) == 3
    # and send() raises SenderThrottled for the same situation
    with pytest.raises(SenderThrottled):
        await send(sender, "stuck", {"type": "x"}, max_attempts=2, sleep=sleep)


async def test_send_raises_gone_without_retrying() -> None:
    # GIVEN a closed connection / WHEN sending
    sender = InMemorySender()
    sleep = FakeSleep()
    with pytest.raises(ConnectionGone):
        await send(sender, "c1", {"type": "x"}, sleep=sleep)
    # THEN one post, no backoff
    assert sender.posts == 1
    assert sleep.delays == []


async def test_broadcast_reports_other_send_errors_as_failed() -> None:
    # GIVEN a sender that fails one connection with a non-throttling error
    class Flaky(InMemorySender):
        async def post(self, connection_id: str, data: bytes) -> None:
            if connection_id == "bad":
                raise SendError("PostToConnection for bad failed: ForbiddenException (HTTP 403)")
            await super().post(connection_id, data)

    sender = Flaky()
    sender.open("good")
    # WHEN broadcasting / THEN the error is reported for that one only
    result = await broadcast(sender, ["bad", "good", "good"], {"type": "x"})
    assert result.delivered == ["good"]
    assert "ForbiddenException" in result.failed["bad"]
    # and a connection listed twice got the frame once
    assert len(sender.raw("good")) == 1


async def test_broadcast_to_nobody() -> None:
    # GIVEN no connections / WHEN broadcasting / THEN an empty result, no posts
    sender = InMemorySender()
    assert await broadcast(sender, [], {"type": "x"}) == BroadcastResult()
    assert sender.posts == 0


# --- splitting ---------------------------------------------------------------------------


def _big_frame(target_bytes: int) -> dict[str, Any]:
    """A frame of exactly ``target_bytes`` with multi-byte characters, quotes, escapes."""
    unit = 'é"\\ 👋 «q» \n\t\x01 日本 '
    frame: dict[str, Any] = {"type": "welcome", "session": "s", "transcript": [], "pad": ""}
    while len(encode_frame(frame)) < target_bytes - 2000:
        seq = len(frame["transcript"])
        frame["transcript"].append({"type": "message", "seq": seq, "text": unit * 20})
    frame["pad"] = "a" * (target_bytes - len(encode_frame(frame)))
    return frame


@pytest.mark.parametrize("size_kb", [31, 33, 100, 128])
def test_split_frame_round_trip(size_kb: int) -> None:
    # GIVEN a frame of the given size full of unicode, quotes and escapes
    frame = _big_frame(size_kb * KB)
    original = encode_frame(frame)
    # WHEN split
    parts = split_frame(frame)
    # THEN every part fits in a 32 KB frame
    assert all(len(p) <= 32 * KB for p in parts)
    if len(original) <= 32 * KB:
        # a frame that fits is sent as is
        assert parts == [original]
        return
    decoded = [json.loads(p) for p in parts]
    # and the parts share one id, count up from 0, and say how many there are
    assert {d["type"] for d in decoded} == {"part"}
    assert len({d["id"] for d in decoded}) == 1
    assert [d["index"] for d in decoded] == list(range(len(parts)))
    assert {d["count"] for d in decoded} == {len(parts)}
    # and their data concatenated is the original JSON exactly
    assert "".join(d["data"] for d in decoded).encode() == original
    assert _reassemble(decoded) == [frame]
    # and the split is not wasteful: parts are filled close to the limit
    assert len(parts) <= len(original) * 2 // (32 * KB) + 1


def test_split_frame_exact_boundary() -> None:
    # GIVEN frames of exactly 32 KB and one byte more
    at_limit = _big_frame(32 * KB)
    over = _big_frame(32 * KB + 1)
    assert len(encode_frame(at_limit)) == 32 * KB
    # WHEN split / THEN the first is sent whole and the second in parts
    assert split_frame(at_limit) == [encode_frame(at_limit)]
    assert len(split_frame(over)) == 2


def test_split_frame_worst_case_escaping() -> None:
    # GIVEN a frame whose text is all characters that escape to 6 bytes
    # (control characters already escaped once in the JSON, escaped again in parts)
    frame = {"type": "message", "text": "\x01" * 15_000}
    parts = split_frame(frame)
    # WHEN reassembled / THEN parts fit and the frame comes back intact
    assert all(len(p) <= 32 * KB for p in parts)
    assert _reassemble([json.loads(p) for p in parts]) == [frame]


def test_split_frame_with_small_limits() -> None:
    # GIVEN custom limits / WHEN splitting / THEN each part respects them
    frame = {"type": "message", "text": '"quoted" 👋 ' * 100}
    parts = split_frame(frame, frame_limit=200, message_limit=10_000)
    assert len(parts) > 5
    assert all(len(p) <= 200 for p in parts)
    assert _reassemble([json.loads(p) for p in parts]) == [frame]


def test_split_frame_refuses_over_128_kb() -> None:
    # GIVEN a frame just over 128 KB / WHEN split / THEN PayloadTooLarge, naming the sizes
    frame = _big_frame(128 * KB + 1)
    with pytest.raises(PayloadTooLarge, match=str(128 * KB)):
        split_frame(frame)


async def test_broadcast_and_send_split_large_frames() -> None:
    # GIVEN two connections and a 70 KB frame
    sender = InMemorySender()
    sender.open("a")
    sender.open("b")
    frame = _big_frame(70 * KB)
    # WHEN broadcast to one and sent to the other
    result = await broadcast(sender, ["a"], frame)
    await send(sender, "b", frame)
    # THEN both receive parts (each under 32 KB) that reassemble to the frame
    assert result.delivered == ["a"]
    for cid in ("a", "b"):
        assert len(sender.raw(cid)) == 3
        assert _reassemble(sender.frames(cid)) == [frame]


async def test_broadcast_refuses_oversize_before_posting() -> None:
    # GIVEN a frame over 128 KB / WHEN broadcast / THEN refused and nothing posted
    sender = InMemorySender()
    sender.open("a")
    with pytest.raises(PayloadTooLarge):
        await broadcast(sender, ["a"], _big_frame(129 * KB))
    assert sender.posts == 0
