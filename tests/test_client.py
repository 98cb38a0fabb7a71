"""The terminal client (``bash scripts/dev.sh client``), as a user runs it.

Most cases run ``rejoin_local.client.main`` against the real local stack (the
real handlers, gateway and offline model over the test session's Redis); the
few that need the server to misbehave on purpose (an ``ack`` lost with its
connection, a ``leave`` answered with the new ``left`` frame, or never
answered) run against a small protocol stub behind the real gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rejoin.errors import ConnectionGone
from rejoin.tokens import TokenVerifier, mint_token
from rejoin_local import client
from rejoin_local.client import ChatClient
from rejoin_local.gateway import Gateway, RunningServer, serve
from rejoin_local.stack import DEFAULT_SIGNING_KEY, Stack, StackConfig

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# The real stack
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def running_stack(upstash: Any, **env: str) -> Iterator[Stack]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "REJOIN_"))}
    stack = Stack(
        StackConfig(
            port=0,
            upstash_url=upstash.url,
            upstash_token=upstash.token,
            cleanup_interval=60.0,
            turn_backoff=0.1,
            env=base | env,
        )
    )
    with stack.serve_in_thread() as urls:
        stack.urls = urls  # type: ignore[attr-defined]
        yield stack


@pytest.fixture
def stack(upstash: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    # The stack shares this process's stdout with the client under test: keep
    # Powertools' EMF metric lines (printed after each handler call) out of it.
    # A post returns once the frame is queued, as PostToConnection does, so a
    # handler can finish (and print) before the client has written its line.
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "true")
    with running_stack(upstash) as started:
        yield started


def run_client(stack: Any, *argv: str) -> int:
    return client.main(["--url", stack.urls.ws, *argv])


def transcript(stack: Any, session: str) -> list[dict[str, Any]]:
    """Every event stored in the session, read by another participant's welcome."""

    async def read() -> list[dict[str, Any]]:
        token = mint_token(
            secret=DEFAULT_SIGNING_KEY,
            session_id=session,
            user_id="u-reader",
            name="Reader",
            ttl_seconds=600,
        )
        chat = ChatClient(url=stack.urls.ws, session=session, token=token, out=io.StringIO())
        runner = asyncio.create_task(chat.run())
        try:
            await asyncio.wait_for(chat._welcomed.wait(), 10)
            return list(chat.welcomes[-1]["transcript"])
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner

    return asyncio.run(read())


def said(events: list[dict[str, Any]], user: str | None = None) -> list[str]:
    return [
        e["text"] for e in events if e["type"] == "message" and (user is None or e["user"] == user)
    ]


# ---------------------------------------------------------------------------
# Exit 0 only when every frame was acknowledged
# ---------------------------------------------------------------------------


def test_say_and_leave_exit_zero_only_once_stored(
    stack: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    session = "cli-" + secrets.token_hex(4)
    # WHEN the client is run four times with --say and --leave (the 3-in-4 loss)
    codes = [
        run_client(stack, "--session", session, "--name", "Ada", "--say", f"hi {i}", "--leave")
        for i in range(4)
    ]
    # THEN each exit 0 stands for a stored message and a recorded leave
    assert codes == [0, 0, 0, 0]
    events = transcript(stack, session)
    assert said(events) == ["hi 0", "hi 1", "hi 2", "hi 3"]
    lefts = [e for e in events if e["type"] == "presence" and e["status"] == "left"]
    assert [e["user"] for e in lefts] == ["u-ada"] * 4
    # AND several --say in one run are stored in the order given
    assert (
        run_client(
            stack,
            "--session",
            session,
            "--name",
            "Ada",
            *[arg for i in range(5) for arg in ("--say", f"m{i}")],
        )
        == 0
    )
    assert said(transcript(stack, session))[-5:] == ["m0", "m1", "m2", "m3", "m4"]
    assert "sent " in capsys.readouterr().out


def test_rate_limited_messages_are_sent_again_in_order(
    upstash: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a stack that allows 2 messages a second
    with running_stack(
        upstash,
        REJOIN_RATE_LIMIT="2",
        REJOIN_RATE_WINDOW_SECONDS="1",
        REJOIN_REPLY_MODE="addressed",
    ) as limited:
        session = "rate-" + secrets.token_hex(4)
        texts = [f"n{i}" for i in range(6)]
        # WHEN six messages are given at once
        args = [arg for t in texts for arg in ("--say", t)]
        code = run_client(limited, "--session", session, "--name", "Ada", *args, "--timeout", "20")
        # THEN the client waited out the limit and every message is stored, in order
        assert code == 0
        assert "rate_limited" in capsys.readouterr().out
        assert said(transcript(limited, session)) == texts


def test_refused_say_fails_at_once_even_with_wait_agent(
    stack: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    session = "refused-" + secrets.token_hex(4)
    started = time.monotonic()
    # WHEN the server refuses the message (over the 4,000-character limit)
    code = run_client(
        stack, "--session", session, "--name", "Ada", "--say", "x" * 4001, "--wait-agent",
        "--timeout", "30",
    )  # fmt: skip
    # THEN the client says why and exits non-zero without waiting for a reply that cannot come
    assert code == 1
    assert time.monotonic() - started < 15
    err = capsys.readouterr().err
    assert "it was not stored" in err and "text must be 1-4000 characters" in err
    assert said(transcript(stack, session)) == []


def test_streamed_reply_is_printed_once(stack: Any, capsys: pytest.CaptureFixture[str]) -> None:
    session = "stream-" + secrets.token_hex(4)
    for extra in ([], ["--no-deltas"]):
        code = run_client(
            stack, "--session", session, "--name", "Ada", "--say", f"hello {extra}", "--wait-agent",
            *extra,
        )  # fmt: skip
        assert code == 0
        out = capsys.readouterr().out
        reply = f'you said: "hello {extra}"'
        assert out.count(reply) == 1, out
        line = next(line for line in out.splitlines() if reply in line)
        if extra:  # only the final message
            assert re.match(r"\[\d\d:\d\d:\d\d\] #\d+ agent: ", line), line
        else:  # the stream, closed with the final message's seq
            assert re.match(r"\[\d\d:\d\d:\d\d\] agent: .*  \(#\d+\)$", line), line


# ---------------------------------------------------------------------------
# Refusals in plain words
# ---------------------------------------------------------------------------


def test_token_for_another_session_is_explained(
    stack: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    token = mint_token(
        secret=DEFAULT_SIGNING_KEY, session_id="other", user_id="u1", name="Ada", ttl_seconds=60
    )
    assert run_client(stack, "--session", "demo-x", "--token", token, "--say", "hi") == 1
    err = capsys.readouterr().err
    assert "HTTP 403" in err
    assert "the token is for session 'other', not 'demo-x'" in err


def test_token_signed_with_another_key_is_explained(
    stack: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    token = mint_token(
        secret="another-key-" + "k" * 32, session_id="s", user_id="u1", name="A", ttl_seconds=60
    )
    assert run_client(stack, "--session", "s", "--token", token, "--say", "hi") == 1
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "signed with another key" in err


def test_no_server_is_told_apart(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = client.main(
        ["--url", f"ws://127.0.0.1:{port}/ws", "--session", "s", "--name", "A", "--say", "hi"]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "cannot connect" in err and "is the server running?" in err and "HTTP" not in err


def test_make_token_prints_the_token_alone() -> None:
    # WHEN a user captures `make token` in a shell variable
    script = 'TOKEN=$(make token ARGS="--session demo --user u1 --name Ada"); printf %s "$TOKEN"'
    # (in a user's shell: not inside `make test`, whose sub-makes announce their directory)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    # THEN the variable holds exactly one line: a token for that session and user
    assert "\n" not in result.stdout
    grant = TokenVerifier(secret=DEFAULT_SIGNING_KEY).verify(result.stdout, session_id="demo")
    assert grant.participant.user_id == "u1"


# ---------------------------------------------------------------------------
# Against a protocol stub behind the real gateway
# ---------------------------------------------------------------------------


class FakeRoom:
    """Just enough of docs/protocol.md for the client: resume, say, ping, leave.

    Attributes:
        drop_first_say: close the connection on the first ``say`` without storing
            it (its ``ack`` is lost with the connection).
        on_leave: ``"close"`` (today's server), ``"left"`` (the ``left`` frame,
            the socket left open for the client to close) or ``"ignore"``.
    """

    def __init__(self) -> None:
        self.gateway: Gateway | None = None
        self.lock = threading.Lock()
        self.log: list[dict[str, Any]] = []
        self.members: set[str] = set()
        self.resumes: list[dict[str, Any]] = []
        self.says: list[str] = []
        self.drop_first_say = False
        self.on_leave = "close"

    def _post(self, cid: str, frame: dict[str, Any]) -> None:
        assert self.gateway is not None
        with contextlib.suppress(ConnectionGone):
            asyncio.run(self.gateway.deliver(cid, json.dumps(frame).encode()))

    def _publish(self, frame: dict[str, Any]) -> None:
        with self.lock:
            frame["seq"] = len(self.log) + 1
            self.log.append(frame)
            members = list(self.members)
        for cid in members:
            self._post(cid, frame)

    def message(self, event: dict[str, Any], context: Any) -> Any:
        assert self.gateway is not None
        cid = event["requestContext"]["connectionId"]
        body = json.loads(event["body"])
        if body["action"] == "resume":
            self._resume(cid, body)
        elif body["action"] == "say":
            self.says.append(body["id"])
            if self.drop_first_say and len(self.says) == 1:
                self.gateway.drop(cid, lose_disconnect=False).result(5)
                return {"statusCode": 200}
            self._say(cid, body)
        elif body["action"] == "ping":
            self._post(cid, {"type": "pong", "ts": 3})
        elif body["action"] == "leave" and self.on_leave != "ignore":
            self._publish({"type": "presence", "user": "u-ada", "name": "Ada", "status": "left"})
            if self.on_leave == "left":
                self._post(cid, {"type": "left", "seq": len(self.log)})
            else:
                self.gateway.close_connection(cid).result(5)
        return {"statusCode": 200}

    def _resume(self, cid: str, body: dict[str, Any]) -> None:
        self.resumes.append(body)
        with self.lock:
            self.members.add(cid)
            after = int(body.get("last_seq", 0))
            recovered = body.get("epoch") == "ep1"
            events = [e for e in self.log if e["seq"] > after] if recovered else []
            welcome = {
                "type": "welcome",
                "session": "s1",
                "epoch": "ep1",
                "resumed": bool(self.log),
                "recovered": recovered,
                "seq": len(self.log),
                "you": {"user": "u-ada", "name": "Ada", "connection": cid},
                "participants": [{"user": "u-ada", "name": "Ada", "status": "active"}],
                "mode": "every",
                "grace_seconds": 120,
                "events": events,
                "transcript": None if recovered else list(self.log),
                "agent": {"name": "Juniper", "offline": True, "model": "offline-stand-in"},
            }
        # Split like the real sender does for big frames, to exercise reassembly.
        data = json.dumps(welcome)
        parts = [data[i : i + 100] for i in range(0, len(data), 100)]
        for index, part in enumerate(parts):
            frame = {"type": "part", "id": "p-1", "index": index, "count": len(parts)}
            self._post(cid, frame | {"data": part})

    def _say(self, cid: str, body: dict[str, Any]) -> None:
        if any(e.get("id") == body["id"] for e in self.log):
            seq = next(e["seq"] for e in self.log if e.get("id") == body["id"])
            self._post(cid, {"type": "ack", "id": body["id"], "seq": seq, "duplicate": True})
            return
        message = {"type": "message", "id": body["id"], "user": "u-ada", "name": "Ada"}
        self._publish(message | {"text": body["text"], "ts": 1})
        seq = len(self.log)
        self._post(cid, {"type": "ack", "id": body["id"], "seq": seq, "duplicate": False})
        for index, piece in enumerate(["You ", "said ", body["text"]]):
            for member in list(self.members):
                delta = {"type": "agent_delta", "turn": body["id"], "index": index}
                self._post(member, delta | {"text": piece, "reply_to": seq})
        reply = {"type": "agent_message", "turn": body["id"], "reply_to": seq}
        self._publish(reply | {"text": "You said " + body["text"], "ts": 2})

    def disconnect(self, event: dict[str, Any], context: Any) -> Any:
        with self.lock:
            self.members.discard(event["requestContext"]["connectionId"])
        return {"statusCode": 200}


@pytest.fixture
def fake_room() -> Iterator[tuple[FakeRoom, Gateway, RunningServer]]:
    room = FakeRoom()
    gateway = Gateway(
        connect=lambda e, c: {"statusCode": 200},
        message=room.message,
        disconnect=room.disconnect,
    )
    room.gateway = gateway
    with serve(gateway.app(), gateway) as running:
        yield room, gateway, running


def _stub_args(running: RunningServer, *extra: str) -> list[str]:
    return ["--url", f"{running.ws_url}/ws", "--session", "s1", "--name", "Ada", *extra]


def test_says_and_waits_for_the_agent(
    fake_room: tuple[FakeRoom, Gateway, RunningServer], capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, running = fake_room
    assert (
        client.main(_stub_args(running, "--say", "hello", "--wait-agent", "--timeout", "10")) == 0
    )
    out = capsys.readouterr().out
    assert "joined s1 as Ada" in out and "agent: Juniper (offline stand-in model)" in out
    assert "#1 Ada: hello" in out
    # Streamed under the agent's name, then closed with the final message's seq.
    assert re.search(r"\] Juniper: You said hello  \(#2\)\n", out), out


def test_an_ack_lost_with_its_connection_is_sent_again(
    fake_room: tuple[FakeRoom, Gateway, RunningServer],
) -> None:
    # GIVEN a server that drops the connection on the first say, before storing it
    room, _, running = fake_room
    room.drop_first_say = True
    # WHEN the client sends one message
    code = client.main(_stub_args(running, "--say", "keep me", "--timeout", "10"))
    # THEN it reconnected, sent it again with the same id, and exits 0 once stored
    assert code == 0
    assert len(room.says) == 2 and room.says[0] == room.says[1]
    assert [e["text"] for e in room.log if e["type"] == "message"] == ["keep me"]


@pytest.mark.parametrize("answer", ["left", "close"])
def test_leave_waits_for_the_server(
    fake_room: tuple[FakeRoom, Gateway, RunningServer], answer: str
) -> None:
    # GIVEN a server that confirms leave with the `left` frame, or by closing
    room, _, running = fake_room
    room.on_leave = answer
    # WHEN the client leaves, THEN it exits 0 and the leave was recorded
    assert client.main(_stub_args(running, "--leave", "--timeout", "10")) == 0
    assert [e["status"] for e in room.log if e["type"] == "presence"] == ["left"]


def test_unconfirmed_leave_fails(
    fake_room: tuple[FakeRoom, Gateway, RunningServer], capsys: pytest.CaptureFixture[str]
) -> None:
    room, _, running = fake_room
    room.on_leave = "ignore"
    assert client.main(_stub_args(running, "--leave", "--timeout", "1")) == 1
    assert "did not confirm leave" in capsys.readouterr().err


async def _until(check: Callable[[], Any], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_resumes_from_the_last_seq_after_a_drop(
    fake_room: tuple[FakeRoom, Gateway, RunningServer],
) -> None:
    room, gateway, running = fake_room
    out = io.StringIO()
    chat = ChatClient(url=f"{running.ws_url}/ws", session="s1", token="t", out=out)
    runner = asyncio.create_task(chat.run())
    try:
        await asyncio.wait_for(chat._welcomed.wait(), 5)
        first = await chat.send("one", 5)
        await chat.wait_for_agent("unused", 5, seq=first)
        assert chat.last_seq == 2
        # The network drops (and the gateway loses the $disconnect); messages go on.
        (cid,) = list(gateway.connections)
        await asyncio.wrap_future(gateway.drop(cid, lose_disconnect=False))
        # From a thread, as a handler would (posting runs its own event loop).
        away = {"type": "message", "id": "x-1", "user": "u-bob", "name": "Bob"}
        await asyncio.to_thread(room._publish, away | {"text": "while you were away", "ts": 4})
        await _until(lambda: len(room.resumes) >= 2)
        assert room.resumes[-1] == {"action": "resume", "epoch": "ep1", "last_seq": 2}
        await _until(lambda: chat.last_seq >= 3)
        second = await chat.send("two", 5)
        await chat.wait_for_agent("unused", 5, seq=second)
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
    lines = out.getvalue().splitlines()
    # Every event printed once, in seq order, across the drop.
    printed = [int(m.group(1)) for m in (re.search(r"#(\d+)\)?", line) for line in lines) if m]
    assert printed == [1, 1, 2, 3, 4, 4, 5], lines  # "sent .. as #1" follows "#1 Ada: one"
    assert any("while you were away" in line for line in lines)
    assert any("reconnecting" in line for line in lines)


# ---------------------------------------------------------------------------
# Gap filling: an event stored but never posted is fetched at the next one
# ---------------------------------------------------------------------------

EVENT_LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] #(\d+) ")


def _printed(out: io.StringIO) -> list[int]:
    """The seqs of the events printed, in the order printed."""
    return [int(m.group(1)) for m in map(EVENT_LINE.match, out.getvalue().splitlines()) if m]


async def _joined(url: str, session: str, user: str, name: str, grace: float) -> ChatClient:
    token = mint_token(
        secret=DEFAULT_SIGNING_KEY, session_id=session, user_id=user, name=name, ttl_seconds=600
    )
    chat = ChatClient(
        url=url, session=session, token=token, out=io.StringIO(), show_deltas=False,
        gap_grace=grace,
    )  # fmt: skip
    task = asyncio.create_task(chat.run())
    chat._background.add(task)  # type: ignore[arg-type]
    await asyncio.wait_for(chat._welcomed.wait(), 10)
    return chat


async def _stop(*chats: ChatClient) -> None:
    for chat in chats:
        chat._leaving = True
        for task in list(chat._background):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if chat._ws is not None:
            await chat._ws.close()


async def test_a_message_stored_but_never_posted_is_filled_at_the_next_event(stack: Any) -> None:
    """GIVEN Ada and Bob in a session (real stack, gap grace 0.3 s), and a say of
    Bob's stored in the room's log without any post (its request timed out: the
    room store's ``say`` called directly, as the handler's first try landed)
    WHEN Bob sends it again (same id: acknowledged as duplicate, no broadcast)
    and then a normal message
    THEN each client sent one gap-filling resume and printed the hidden message
    exactly once, in seq order before the next one.
    """
    session = "gap-" + secrets.token_hex(4)
    url = stack.urls.ws
    ada = await _joined(url, session, "u-ada", "Ada", 0.3)
    bob = await _joined(url, session, "u-bob", "Bob", 0.3)
    try:
        await _until(lambda: len(_printed(ada.out)) >= 2)  # both joined (presence)  # type: ignore[arg-type]
        rt = stack.runtime
        bob_cid = bob.welcomes[-1]["you"]["connection"]
        hidden = await asyncio.to_thread(
            rt.run,
            rt.rooms().say(
                session, bob_cid, "m-hidden", "stored, never posted",
                speaker=("u-bob", "Bob"), addressed=False,
            ),
        )  # fmt: skip
        assert not hidden.duplicate
        # Bob resends it: the duplicate ack names a seq Bob never received.
        assert await bob.send("stored, never posted", 10, "m-hidden") == hidden.seq
        await _until(lambda: hidden.seq in bob.seen)
        assert hidden.seq not in ada.seen  # nothing told Ada yet
        after = await bob.send("the next message", 10)
        await _until(lambda: after in ada.seen and hidden.seq in ada.seen)
        await asyncio.sleep(0.5)  # room for a (wrong) second resume
    finally:
        await _stop(ada, bob)
    for chat in (ada, bob):
        text = chat.out.getvalue()  # type: ignore[attr-defined]
        printed = _printed(chat.out)  # type: ignore[arg-type]
        assert text.count("Bob: stored, never posted") == 1, text
        assert printed == sorted(set(printed)), text  # each once, in seq order
        assert hidden.seq in printed
        assert chat.gap_fills == 1, text
        assert chat.welcomes[-1]["events"][0]["seq"] == hidden.seq
        assert text.count("* joined") == 1, text  # the fill is not shown as a new join
    assert _printed(ada.out).index(hidden.seq) < _printed(ada.out).index(after)  # type: ignore[arg-type]


async def test_events_arriving_out_of_order_within_the_grace_ask_nothing(
    fake_room: tuple[FakeRoom, Gateway, RunningServer],
) -> None:
    """GIVEN a client (gap grace 0.3 s) in a room
    WHEN two logged events are posted out of order (seq n+2 before n+1), as
    concurrent Lambdas may post them
    THEN the client sends no resume, and prints both once, in seq order.
    """
    room, _, running = fake_room
    out = io.StringIO()
    chat = ChatClient(
        url=f"{running.ws_url}/ws",
        session="s1",
        token="t",
        out=out,
        gap_grace=0.3,
        show_deltas=False,
    )
    runner = asyncio.create_task(chat.run())
    try:
        await asyncio.wait_for(chat._welcomed.wait(), 5)
        first = await chat.send("one", 5)
        await chat.wait_for_agent("unused", 5, seq=first)
        (cid,) = list(room.members)
        base = {"type": "message", "user": "u-bob", "name": "Bob", "ts": 5}
        with room.lock:
            n = len(room.log)
            early, late = base | {"seq": n + 1, "id": "b-1", "text": "first"}, base | {
                "seq": n + 2, "id": "b-2", "text": "second",
            }  # fmt: skip
            room.log += [early, late]
        await asyncio.to_thread(room._post, cid, late)
        await _until(lambda: chat.last_seq == n + 2)
        await asyncio.sleep(0.05)
        await asyncio.to_thread(room._post, cid, early)
        await _until(lambda: n + 1 in chat.seen)
        await asyncio.sleep(0.9)  # three graces
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
    assert len(room.resumes) == 1 and chat.gap_fills == 0
    assert _printed(out) == [1, 2, n + 1, n + 2], out.getvalue()
