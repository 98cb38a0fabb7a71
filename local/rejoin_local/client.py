"""A terminal client for rejoin: connect, resume, print events, send, reconnect.

::

    python -m rejoin_local.client --session demo --name Ada    # local stack: token minted here
    python -m rejoin_local.client --url wss://.../prod --session s1 --token "$JWT"
    python -m rejoin_local.client --session demo --name Bot --say "hello" --wait-agent

Interactive input: a line is sent as ``say``; ``/ping``, ``/leave`` (say you
left and quit), ``/drop [seconds]`` (close without ``leave``, as a lost
network would, then reconnect and resume), ``/quit``, ``/help``. End of input
quits without ``leave``.

It follows ``docs/protocol.md``: the first frame on each connection is
``resume`` (with the epoch and the highest ``seq`` it has with none missing
below), events are printed once each, in ``seq`` order, and ``part`` frames
are reassembled. Gaps are filled: when an event arrives with a ``seq`` above
a hole (an event stored but never posted to this connection), the client
holds it back for a short grace (``gap_grace``, 1.5 s: concurrent posts may
arrive out of order), then sends ``resume`` with its last contiguous ``seq``
and prints the replayed events, in order; at most one such ``resume`` per
grace, one at a time. An ``ack`` whose ``seq`` the client has not seen (a
resent ``say`` acknowledged as ``duplicate``) is a hole too. When the
socket drops it reconnects with a backoff and resumes. ``--name`` mints a
token locally with ``REJOIN_TOKEN_SECRET`` (default: the local stack's key).
Message text goes to stdout only; nothing is logged.

Nothing is lost silently: messages go out one at a time, in the order given,
and each is sent again (same id, so the server stores it once) until its
``ack`` arrives: after a reconnect, after ``rate_limited`` (once
``retry_after`` has passed) and after ``turn_not_queued``. ``leave`` waits for
the server's ``left`` frame (or its close of the socket). The command exits 0
only when every frame it sent was acknowledged, and non-zero, with the
reason, otherwise; a refused handshake is explained (400/401/403), not only
numbered.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI

__all__ = ["ChatClient", "Refused", "SayRefused", "main"]

DEFAULT_URL = "ws://127.0.0.1:8080/ws"
LOCAL_SIGNING_KEY = "local-dev-signing-key-change-me-0123456789"
LOGGED = frozenset({"message", "presence", "agent_message"})
# Errors after which the same say (same id) is sent again: it is safe, the
# server stores an id once.
RETRIED = frozenset({"rate_limited", "turn_not_queued", "not_joined", "internal"})


def _claims(token: str) -> dict[str, Any]:
    """The token's claims, unverified: only to explain a refusal."""
    try:
        payload = token.split(".")[1]
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def explain_refusal(status: int, session: str, token: str) -> str:
    """Plain words for a refused handshake (API Gateway gives only the status)."""
    claims = _claims(token)
    if status == 400:
        why = (
            "the request is malformed: the session id must be 1-128 letters, digits, _ or -, "
            "and a token must be given"
        )
    elif status == 401:
        why = (
            "the token is not valid: missing, malformed, expired, or signed with another key "
            "(a local token must be signed with the REJOIN_TOKEN_SECRET the server uses)"
        )
    elif status == 403:
        granted = claims.get("sid")
        if isinstance(granted, str) and granted != session:
            why = (
                f"the token is for session {granted!r}, not {session!r}: "
                f"connect with --session {granted}, or get a token for {session}"
            )
        else:
            why = (
                f"the token is not accepted for session {session!r} (it may have been revoked: "
                "the session was ended, or you were removed from it)"
            )
    elif status == 429:
        why = "too many connections: try again shortly"
    elif status >= 500:
        why = "the server failed while accepting the connection (see its log)"
    else:
        why = "the server did not accept the connection"
    return f"the server refused the connection (HTTP {status}): {why}"


class Refused(Exception):
    """The handshake was refused with an HTTP status.

    Attributes:
        status: the HTTP status.
    """

    def __init__(self, status: int, explanation: str | None = None) -> None:
        super().__init__(explanation or f"the server refused the connection: HTTP {status}")
        self.status = status


class SayRefused(Exception):
    """The server answered a ``say`` with an error: the message was not stored.

    Attributes:
        frame: the ``error`` frame.
    """

    def __init__(self, frame: dict[str, Any]) -> None:
        super().__init__(f"{frame.get('code')}: {frame.get('message')}")
        self.frame = frame


@dataclass
class ChatClient:
    """One participant's connection, kept alive across drops.

    Attributes:
        url: the WebSocket URL without query (``ws://127.0.0.1:8080/ws``).
        session: the session id.
        token: the participant's token.
        out: where events are printed.
        show_deltas: print ``agent_delta`` pieces as they stream (the final
            message is then not printed again).
        raw: print every frame as JSON instead of readable lines.
        remint: returns a fresh token (when minted locally), tried after a 401/403.
        gap_grace: seconds a hole below a received ``seq`` may stay open before
            the client asks for it with ``resume``.
        gap_fills: how many such ``resume`` frames were sent.
    """

    url: str
    session: str
    token: str
    out: TextIO = field(default_factory=lambda: sys.stdout)  # the current stdout, not import time's
    show_deltas: bool = True
    raw: bool = False
    remint: Callable[[], str] | None = None
    gap_grace: float = 1.5
    gap_fills: int = 0
    epoch: str | None = None
    last_seq: int = 0
    user: str | None = None
    agent_name: str = "agent"
    mode: str | None = None
    seen: set[int] = field(default_factory=set)
    agent_replies: dict[str, str] = field(default_factory=dict)
    replies_to: dict[int, str] = field(default_factory=dict)
    acked: dict[str, int] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    welcomes: list[dict[str, Any]] = field(default_factory=list)
    left: bool = False
    _ws: ClientConnection | None = None
    _welcomed: asyncio.Event = field(default_factory=asyncio.Event)
    _early: list[dict[str, Any]] = field(default_factory=list)
    _parts: dict[str, dict[int, str]] = field(default_factory=dict)
    _streaming: str | None = None
    _streamed: dict[str, dict[int, str]] = field(default_factory=dict)
    _leaving: bool = False
    _ended: bool = False
    _drop_for: float | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _background: set[asyncio.Task[None]] = field(default_factory=set)
    # Gap filling: every seq <= _floor has been printed (or lies before the
    # log); _held keeps events above a hole until it is filled.
    _floor: int = 0
    _held: dict[int, dict[str, Any]] = field(default_factory=dict)
    _ack_top: int = 0
    _backlog_seq: int | None = None  # a welcome's seq while its replay pages come
    _backlogs: int = 0  # complete backlogs received (welcome and its pages)
    _gap_task: asyncio.Task[None] | None = None
    _gap_asked: bool = False
    _gap_limited: float | None = None

    # ---------------------------------------------------------------- output

    def _line(self, text: str) -> None:
        if self._streaming is not None:
            self.out.write("\n")
            self._streaming = None
        self.out.write(text + "\n")
        self.out.flush()

    @staticmethod
    def _time(ts: Any) -> str:
        if isinstance(ts, (int, float)):
            return time.strftime("%H:%M:%S", time.localtime(ts / 1000))
        return time.strftime("%H:%M:%S")

    def _print_event(self, e: dict[str, Any]) -> None:
        if self.raw:
            self._line(json.dumps(e, ensure_ascii=False))
            return
        stamp, seq = self._time(e.get("ts")), e.get("seq")
        if e["type"] == "message":
            self._line(f"[{stamp}] #{seq} {e.get('name') or e.get('user')}: {e.get('text')}")
        elif e["type"] == "presence":
            verb = {"active": "is here", "away": "is away", "left": "left"}.get(
                str(e.get("status")), str(e.get("status"))
            )
            self._line(f"[{stamp}] #{seq} * {e.get('name') or e.get('user')} {verb}")
        elif e["type"] == "agent_message":
            turn = str(e.get("turn"))
            pieces = self._streamed.pop(turn, None)
            streamed = "".join(pieces[i] for i in sorted(pieces)) if pieces else None
            if self._streaming == turn and streamed == e.get("text"):
                # The reply is on screen already, as it streamed: close its line.
                self.out.write(f"  (#{seq})\n")
                self.out.flush()
                self._streaming = None
                return
            self._line(f"[{stamp}] #{seq} {self.agent_name}: {e.get('text')}")

    def _delta(self, f: dict[str, Any]) -> None:
        turn = str(f.get("turn"))
        if turn in self.agent_replies:
            return  # the final message is in: a late piece changes nothing
        pieces = self._streamed.setdefault(turn, {})
        index = f.get("index")
        key = index if isinstance(index, int) else len(pieces)
        if key in pieces:
            return
        pieces[key] = str(f.get("text", ""))
        if self._streaming != turn:
            if self._streaming is not None:
                self.out.write("\n")
            self.out.write(f"[{self._time(None)}] {self.agent_name}: ")
            self._streaming = turn
        self.out.write(pieces[key])
        self.out.flush()

    # --------------------------------------------------------------- frames

    async def _handle_text(self, text: str) -> None:
        try:
            frame = json.loads(text)
        except ValueError:
            self._line(f"! the server sent a frame that is not JSON: {text[:80]!r}")
            return
        if isinstance(frame, dict):
            await self._handle(frame)

    async def _handle(self, f: dict[str, Any]) -> None:
        kind = f.get("type")
        if kind == "part":
            parts = self._parts.setdefault(str(f.get("id")), {})
            parts[int(f.get("index", 0))] = str(f.get("data", ""))
            count = int(f.get("count", 0))
            if count and len(parts) == count:
                del self._parts[str(f.get("id"))]
                await self._handle_text("".join(parts[i] for i in range(count)))
            return
        if kind == "welcome":
            self._welcome(f)
            for early in sorted(self._early, key=lambda e: e.get("seq") or 0):
                await self._handle(early)
            self._early.clear()
        elif kind == "replay":  # the rest of a backlog too large for one welcome
            for e in sorted(f.get("events") or [], key=lambda e: e.get("seq") or 0):
                self._event(e)
            if not f.get("more"):
                self._backlog_done()
        elif not self._welcomed.is_set() and (kind in LOGGED or kind == "agent_delta"):
            self._early.append(f)  # overtook the welcome: printed after it, in order
            return
        elif kind in LOGGED:
            self._event(f)
        elif kind == "agent_delta":
            if self.raw:
                self._line(json.dumps(f, ensure_ascii=False))
            elif self.show_deltas:
                self._delta(f)
        elif kind == "ack":
            self.acked[str(f.get("id"))] = int(f.get("seq") or 0)
            # The acknowledged message is logged at this seq: if it never came
            # as a `message` (a resent say acknowledged as duplicate), it is a hole.
            self._ack_top = max(self._ack_top, int(f.get("seq") or 0))
            if self.raw:
                self._line(json.dumps(f))
            else:
                dup = " (duplicate)" if f.get("duplicate") else ""
                self._line(f"  sent {f.get('id')} as #{f.get('seq')}{dup}")
        elif kind == "pong":
            self._line(json.dumps(f) if self.raw else "  pong")
        elif kind == "left":
            self.left = True
            if self.raw:
                self._line(json.dumps(f))
        elif kind == "ended":
            self._ended = True
            self._line(f"* the session was ended ({f.get('reason')})")
        elif kind == "error":
            self.errors.append(f)
            where = f" [{f['id']}]" if f.get("id") else ""
            extra = f" (retry in {f['retry_after']} s)" if f.get("retry_after") else ""
            self._line(f"! {f.get('code')}: {f.get('message')}{where}{extra}")
            if f.get("code") == "not_joined":
                await self._send({"action": "resume", **self._position()})
            elif (
                f.get("code") == "rate_limited" and not f.get("id") and not self._welcomed.is_set()
            ):
                # Our resume was over budget: ask again once the limit allows.
                wait = f.get("retry_after")
                delay = float(wait) if isinstance(wait, (int, float)) else 1.0
                task = asyncio.create_task(self._resume_later(delay))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            elif f.get("code") == "rate_limited" and not f.get("id") and self._gap_asked:
                wait = f.get("retry_after")  # the gap fill's resume: ask again later
                self._gap_limited = float(wait) if isinstance(wait, (int, float)) else 1.0
        elif "message" in f and "connectionId" in f:
            self._line(f"! gateway: {f['message']}")
        else:
            self._line(f"? {json.dumps(f)[:200]}")
        self._check_gap()
        async with self._changed:
            self._changed.notify_all()

    def _welcome(self, w: dict[str, Any]) -> None:
        fresh = self.epoch is not None and w.get("epoch") != self.epoch
        if fresh:
            self.seen.clear()
            self.last_seq = 0
            self._held.clear()
            self._floor = self._ack_top = 0
            self._line(
                "* the session ended while you were away (its grace period passed): "
                "this is a fresh session with an empty history"
            )
        self.epoch = str(w.get("epoch"))
        you = w.get("you") or {}
        self.user = you.get("user", self.user)
        agent = w.get("agent") or {}
        if isinstance(agent.get("name"), str) and agent["name"]:
            self.agent_name = agent["name"]
        self.mode = w.get("mode") or self.mode
        self.welcomes.append(w)
        refill, self._gap_asked = self._gap_asked and not fresh, False
        if self.raw:
            self._line(json.dumps(w, ensure_ascii=False))
        elif not refill:  # a gap fill's welcome: only its missing events are shown
            people = ", ".join(
                f"{p.get('name')} ({p.get('status')})" for p in w.get("participants") or []
            )
            model = "offline stand-in model" if agent.get("offline") else agent.get("model", "?")
            self._line(
                f"* joined {w.get('session')} as {you.get('name')}: epoch {self.epoch}, "
                f"resumed={'yes' if w.get('resumed') else 'no'}, "
                f"recovered={'yes' if w.get('recovered') else 'no'}, seq {w.get('seq')}; "
                f"agent: {self.agent_name} ({model})"
            )
            self._line(f"* people: {people or '-'}")
        replay = w.get("events") if w.get("recovered") else (w.get("transcript") or [])
        for e in sorted(replay or [], key=lambda e: e.get("seq") or 0):
            self._event(e)
        if isinstance(w.get("seq"), int):
            self.last_seq = max(self.last_seq, w["seq"])
            self._backlog_seq = w["seq"]
        self._welcomed.set()
        if not w.get("more"):
            self._backlog_done()

    def _backlog_done(self) -> None:
        # The welcome and its pages held every event up to the welcome's seq
        # (from the log's start when not recovered): nothing below it is missing.
        if self._backlog_seq is not None:
            self._floor = max(self._floor, self._backlog_seq)
        self._backlog_seq = None
        self._backlogs += 1
        self._release()

    def _event(self, e: dict[str, Any]) -> None:
        seq = e.get("seq")
        if not isinstance(seq, int) or seq in self.seen or seq in self._held:
            return
        self.last_seq = max(self.last_seq, seq)
        self._held[seq] = e
        self._release()

    def _release(self, force: bool = False) -> None:
        """Print held events in seq order up to the first hole (past it when ``force``)."""
        while self._held:
            low = min(self._held)
            if low > self._floor + 1 and not force:
                return
            self._show(self._held.pop(low))
            while self._floor + 1 in self.seen:
                self._floor += 1

    def _show(self, e: dict[str, Any]) -> None:
        self.seen.add(e["seq"])
        if e.get("type") == "agent_message":
            text = str(e.get("text"))
            self.agent_replies[str(e.get("turn"))] = text
            if isinstance(e.get("reply_to"), int):
                self.replies_to[e["reply_to"]] = text
        self._print_event(e)

    async def _resume_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if not self._welcomed.is_set():
            await self._send({"action": "resume", **self._position()})

    def _position(self) -> dict[str, Any]:
        # The last contiguous seq: the replay then fills any hole above it.
        return {"epoch": self.epoch, "last_seq": self._floor} if self.epoch else {}

    # ------------------------------------------------------------- gap fill

    def _top(self) -> int:
        return max(self.last_seq, self._ack_top)

    def _check_gap(self) -> None:
        """Start the gap fill when a seq above a hole is known (one at a time)."""
        if (
            self._gap_task is not None
            or not self._welcomed.is_set()
            or self._backlog_seq is not None
            or self._top() <= self._floor
        ):
            return
        self._gap_task = asyncio.create_task(self._fill_gaps())

    async def _fill_gaps(self) -> None:
        try:
            while self._top() > self._floor:
                target = self._top()
                # A grace for out-of-order posts; so at most one resume per grace too.
                await asyncio.sleep(self.gap_grace)
                ws = self._ws
                if self._floor >= target:
                    continue  # filled by a late post; a newer hole gets its own grace
                if ws is None or not self._welcomed.is_set() or self._backlog_seq is not None:
                    return  # reconnecting: that resume asks from the last contiguous seq
                backlogs = self._backlogs
                self._gap_asked, self._gap_limited = True, None
                self.gap_fills += 1
                if not await self._send({"action": "resume", **self._position()}):
                    return
                try:
                    async with asyncio.timeout(max(5.0, 4 * self.gap_grace)), self._changed:
                        await self._changed.wait_for(
                            lambda backlogs=backlogs, ws=ws: (  # type: ignore[misc]
                                self._backlogs > backlogs
                                or self._gap_limited is not None
                                or self._ws is not ws
                            )
                        )
                except TimeoutError:
                    # No answer: show what is held rather than hide it; a later
                    # event (or the reconnect's resume) asks again.
                    self._gap_asked = False
                    self._release(force=True)
                    return
                if self._gap_limited is not None:
                    self._gap_asked = False
                    await asyncio.sleep(self._gap_limited)
        finally:
            self._gap_task = None

    # ------------------------------------------------------------ connection

    def _full_url(self) -> str:
        parts = urlsplit(self.url)
        query = urlencode({"session": self.session, "token": self.token})
        return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", query, ""))

    async def _send(self, frame: dict[str, Any]) -> bool:
        ws = self._ws
        if ws is None:
            return False
        try:
            await ws.send(json.dumps(frame))
            return True
        except ConnectionClosed:
            return False

    async def say(self, text: str, message_id: str | None = None) -> str:
        """Send ``text`` once (after the welcome); return its client message id.

        This does not wait for the ``ack``: :meth:`send` does.
        """
        message_id = message_id or f"c-{secrets.token_hex(6)}"
        await self._welcomed.wait()
        while not await self._send({"action": "say", "id": message_id, "text": text}):
            await asyncio.sleep(0.2)  # reconnecting: the id makes the retry safe
            await self._welcomed.wait()
        return message_id

    async def send(self, text: str, seconds: float, message_id: str | None = None) -> int:
        """Send ``text`` and wait for its ``ack``, sending it again when that is safe.

        Sent again (same id) after a reconnect, after ``rate_limited`` once
        ``retry_after`` has passed, and after ``turn_not_queued``.

        Returns:
            The message's ``seq``.

        Raises:
            SayRefused: the server refused it (bad text, ...); it was not stored.
            TimeoutError: no ``ack`` within ``seconds``.
        """
        message_id = message_id or f"c-{secrets.token_hex(6)}"
        async with asyncio.timeout(seconds):
            while True:
                errors = len(self.errors)
                await self.say(text, message_id)
                sent_on = self._ws
                async with self._changed:
                    await self._changed.wait_for(
                        lambda errors=errors, sent_on=sent_on: (  # type: ignore[misc]
                            message_id in self.acked
                            or self._ws is not sent_on
                            or any(e.get("id") == message_id for e in self.errors[errors:])
                        )
                    )
                if message_id in self.acked:
                    return self.acked[message_id]
                refusal = next((e for e in self.errors[errors:] if e.get("id") == message_id), None)
                if refusal is None:
                    continue  # the connection dropped before the ack: send it again
                if refusal.get("code") not in RETRIED:
                    raise SayRefused(refusal)
                wait = refusal.get("retry_after")
                await asyncio.sleep(float(wait) if isinstance(wait, (int, float)) else 0.2)

    async def ping(self) -> None:
        """Send ``ping``."""
        await self._send({"action": "ping"})

    async def leave(self, seconds: float = 10.0) -> bool:
        """Send ``leave`` and wait for the server's ``left`` (or its close); then close.

        Returns:
            True when the server confirmed (``left`` or its close of the socket).
        """
        self._leaving = True
        ws = self._ws
        if ws is None or not await self._send({"action": "leave"}):
            return False
        confirmed = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds), self._changed:
                await self._changed.wait_for(lambda: self.left or self._ws is not ws)
            confirmed = True
        await ws.close()
        return confirmed

    async def drop(self, seconds: float = 1.0) -> None:
        """Close without ``leave`` (a lost network); reconnect after ``seconds``."""
        self._drop_for = seconds
        if self._ws is not None:
            await self._ws.close(4000, "client drop")

    def reply_to(self, message_id: str, seq: int | None = None) -> str | None:
        """The agent's reply to the message, once it is in (by ``reply_to``, else ``turn``)."""
        if seq is not None and seq in self.replies_to:
            return self.replies_to[seq]
        return self.agent_replies.get(message_id)

    async def wait_for_agent(self, turn: str, seconds: float, seq: int | None = None) -> str:
        """Wait up to ``seconds`` for the agent's reply to message ``turn`` (its id).

        Raises:
            TimeoutError: it did not come in time.
        """
        async with asyncio.timeout(seconds), self._changed:
            await self._changed.wait_for(lambda: self.reply_to(turn, seq) is not None)
        reply = self.reply_to(turn, seq)
        assert reply is not None
        return reply

    async def run(self) -> None:
        """Connect, resume and read until ``leave``/``ended``; reconnect after drops."""
        attempt = 0
        refusals = 0
        while not self._leaving and not self._ended:
            self._welcomed.clear()
            self._early.clear()
            try:
                ws = await connect(
                    self._full_url(),
                    max_size=None,
                    open_timeout=10,
                    ping_interval=None,
                    compression=None,
                )
            except InvalidStatus as exc:
                status = exc.response.status_code
                refusals += 1
                if status in (401, 403) and self.remint is not None and refusals <= 2:
                    self.token = self.remint()
                    continue
                if attempt == 0 or status in (400, 401, 403):
                    raise Refused(
                        status, explain_refusal(status, self.session, self.token)
                    ) from None
                self._line(f"! reconnect refused (HTTP {status}); retrying")
                ws = None
            except (OSError, TimeoutError) as exc:
                if attempt == 0:
                    raise
                self._line(f"! reconnect failed ({type(exc).__name__}); retrying")
                ws = None
            if ws is not None:
                self._ws = ws
                refusals = 0
                await self._send({"action": "resume", **self._position()})
                try:
                    async for message in ws:
                        if isinstance(message, str):
                            await self._handle_text(message)
                except ConnectionClosed:
                    pass
                self._ws = None
                # Nothing stays hidden while reconnecting: the resume fills the holes.
                self._gap_asked, self._backlog_seq = False, None
                self._release(force=True)
                async with self._changed:
                    self._changed.notify_all()
                code = ws.close_code
                if self._leaving or self._ended:
                    break
                self._line(f"* disconnected (code {code}); reconnecting...")
                attempt = 0
            attempt += 1
            delay = self._drop_for if self._drop_for is not None else min(10.0, 0.25 * 2**attempt)
            self._drop_for = None
            await asyncio.sleep(delay)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _stdin_lines(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None]) -> None:
    for line in sys.stdin:
        loop.call_soon_threadsafe(queue.put_nowait, line.rstrip("\n"))
    loop.call_soon_threadsafe(queue.put_nowait, None)


HELP = "commands: /ping, /leave, /drop [seconds], /quit, /help; any other line is sent"


def _fail(message: str) -> int:
    print(f"! {message}", file=sys.stderr)
    return 1


async def _outbox(client: ChatClient, texts: asyncio.Queue[str | None], seconds: float) -> int:
    """Send typed lines one at a time, in order, each until acknowledged; count failures."""
    failures = 0
    while (text := await texts.get()) is not None:
        try:
            await client.send(text, seconds)
        except SayRefused as exc:
            failures += 1
            client._line(f"! not sent: {exc}")
        except TimeoutError:
            failures += 1
            client._line(f"! not acknowledged within {seconds:g} s: {text[:40]!r}")
    return failures


async def _interactive(client: ChatClient, runner: asyncio.Task[None], seconds: float) -> int:
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    texts: asyncio.Queue[str | None] = asyncio.Queue()
    sender = asyncio.create_task(_outbox(client, texts, seconds))
    threading.Thread(target=_stdin_lines, args=(loop, lines), daemon=True).start()
    leave = False
    while not runner.done():
        getter = asyncio.ensure_future(lines.get())
        done, _ = await asyncio.wait({getter, runner}, return_when=asyncio.FIRST_COMPLETED)
        if getter not in done:
            getter.cancel()
            break
        line = getter.result()
        if line is None or line.strip() == "/quit":
            break
        text = line.strip()
        if not text:
            continue
        if text == "/help":
            client._line(HELP)
        elif text == "/ping":
            await client.ping()
        elif text == "/leave":
            leave = True
            break
        elif text.startswith("/drop"):
            arg = text[5:].strip()
            try:
                seconds = float(arg) if arg else 1.0
            except ValueError:
                client._line("usage: /drop [seconds]")
                continue
            await client.drop(seconds)
        elif text.startswith("/") and not text.startswith("//"):
            client._line(f"unknown command {text.split()[0]}; {HELP}")
        else:
            texts.put_nowait(text[1:] if text.startswith("//") else text)
    # Everything typed goes out (and is acknowledged) before leaving or quitting.
    texts.put_nowait(None)
    if runner.done():
        sender.cancel()
        pending = texts.qsize()
        return _fail(f"the connection ended; {pending} message(s) not sent") if pending else 0
    failures = await sender
    if leave and not await client.leave(seconds):
        return _fail("the server did not confirm leave")
    return 1 if failures else 0


async def _scripted(client: ChatClient, args: argparse.Namespace) -> int:
    last: tuple[str, int] | None = None
    for text in args.say:
        message_id = f"c-{secrets.token_hex(6)}"
        try:
            seq = await client.send(text, args.timeout, message_id)
        except SayRefused as exc:
            return _fail(f"the server refused the message, it was not stored: {exc}")
        except TimeoutError:
            return _fail(f"the message was not acknowledged within {args.timeout:g} s")
        last = (message_id, seq)
    if args.wait_agent and last is not None:
        try:
            await client.wait_for_agent(last[0], args.timeout, seq=last[1])
        except TimeoutError:
            hint = (
                " (the session is in 'addressed' mode: the agent answers only messages "
                f"that address it, e.g. '@{client.agent_name} ...')"
                if client.mode == "addressed"
                else ""
            )
            return _fail(f"no agent reply within {args.timeout:g} s{hint}")
    if args.leave and not await client.leave(args.timeout):
        return _fail("the server did not confirm leave")
    return 0


async def _amain(args: argparse.Namespace, token: str, remint: Callable[[], str] | None) -> int:
    client = ChatClient(
        url=args.url,
        session=args.session,
        token=token,
        show_deltas=not args.no_deltas,
        raw=args.json,
        remint=remint,
    )
    runner = asyncio.create_task(client.run())
    welcomed = asyncio.ensure_future(client._welcomed.wait())
    await asyncio.wait({welcomed, runner}, timeout=args.timeout, return_when="FIRST_COMPLETED")
    if runner.done():
        welcomed.cancel()
        exc = runner.exception()
        if isinstance(exc, Refused):
            return _fail(str(exc))
        if isinstance(exc, (OSError, TimeoutError, InvalidURI)):
            return _fail(f"cannot connect to {args.url}: {exc} (is the server running?)")
        if exc is not None:
            raise exc
        return _fail("the connection ended before the welcome")
    if not welcomed.done():
        welcomed.cancel()
        runner.cancel()
        return _fail(f"no welcome within {args.timeout:g} s")
    try:
        if args.say or args.leave:
            return await _scripted(client, args)
        return await _interactive(client, runner, args.timeout)
    finally:
        client._leaving = True
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await runner
        if client._ws is not None:
            with contextlib.suppress(Exception):
                await client._ws.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rejoin_local.client``."""
    p = argparse.ArgumentParser(
        prog="python -m rejoin_local.client",
        description="Chat in a rejoin session from the terminal. " + HELP,
    )
    p.add_argument(
        "--url",
        default=os.environ.get("REJOIN_WS_URL", DEFAULT_URL),
        help=f"the WebSocket URL (env REJOIN_WS_URL, default {DEFAULT_URL})",
    )
    p.add_argument("--session", required=True, help="the session id")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--token", help="a participant token (JWT)")
    who.add_argument("--name", help="mint a local token for this display name")
    p.add_argument("--user", help="the user id to mint for (default: from the name)")
    p.add_argument(
        "--say",
        action="append",
        default=[],
        metavar="TEXT",
        help="send TEXT, wait for its acknowledgement, and exit (repeatable; sent in order) "
        "instead of reading stdin",
    )
    p.add_argument(
        "--wait-agent",
        action="store_true",
        help="with --say: exit after the agent's reply to the last message",
    )
    p.add_argument(
        "--leave",
        action="store_true",
        help="send leave (and wait for its confirmation) before exiting",
    )
    p.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for each answer (default 60)"
    )
    p.add_argument(
        "--no-deltas",
        action="store_true",
        help="print only the agent's final message, not the stream",
    )
    p.add_argument("--json", action="store_true", help="print frames as JSON")
    args = p.parse_args(argv)
    if args.wait_agent and not args.say:
        p.error("--wait-agent needs --say")

    remint: Callable[[], str] | None = None
    if args.token:
        token = args.token
    else:
        try:
            from rejoin.tokens import mint_token
        except ImportError:  # shared/ not on the path: run from the repository
            from .handlers import ensure_shared_on_path

            ensure_shared_on_path()
            from rejoin.tokens import mint_token

        secret = os.environ.get("REJOIN_TOKEN_SECRET") or LOCAL_SIGNING_KEY
        slug = re.sub(r"[^a-z0-9]+", "-", args.name.lower()).strip("-")[:24] or "user"
        user = args.user or f"u-{slug}"

        def remint() -> str:
            return mint_token(
                secret=secret,
                session_id=args.session,
                user_id=user,
                name=args.name,
                ttl_seconds=12 * 3600,
            )

        try:
            token = remint()
        except Exception as exc:
            print(f"! cannot mint a token: {exc}", file=sys.stderr)
            return 2
    try:
        return asyncio.run(_amain(args, token, remint))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
