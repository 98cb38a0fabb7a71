"""A whole rejoin deployment in one test process: the real handlers, the real
store (through the Upstash-compatible endpoint), an in-memory sender and turn
queue, an injected clock, and API Gateway-shaped events.

Handlers are synchronous (as Lambda calls them), so tests that use this
harness are plain ``def`` tests.
"""

from __future__ import annotations

import itertools
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from rejoin import upstash_client
from rejoin.config import Settings
from rejoin.queue import InMemoryTurnQueue, TurnRequest, sqs_event
from rejoin.runtime import Runtime, set_runtime
from rejoin.sender import InMemorySender
from rejoin.tokens import mint_token
from rejoin_local.handlers import load_handler

SECRET = "test-signing-key-0123456789-abcdefghij"
LOGGED = ("message", "presence", "agent_message")
START = 1_764_000_000.0
_ids = itertools.count(1)


class ManualClock:
    """A clock tests move by hand."""

    def __init__(self, t: float = START) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def new_connection_id() -> str:
    return f"C{next(_ids):07d}{secrets.token_hex(3)}="


def request_context(connection_id: str, route: str, event_type: str) -> dict[str, Any]:
    return {
        "routeKey": route,
        "eventType": event_type,
        "messageDirection": "IN",
        "extendedRequestId": secrets.token_hex(8),
        "requestTime": "25/Nov/2026:20:00:00 +0000",
        "stage": "dev",
        "connectedAt": 1764000000000,
        "requestTimeEpoch": 1764000000000,
        "identity": {"sourceIp": "127.0.0.1"},
        "requestId": secrets.token_hex(8),
        "domainName": "abc123.execute-api.us-east-1.amazonaws.com",
        "connectionId": connection_id,
        "apiId": "abc123",
    }


def authorize_event(connection_id: str, query: dict[str, str]) -> dict[str, Any]:
    event = connect_event(connection_id, query)
    return {
        "type": "REQUEST",
        "methodArn": "arn:aws:execute-api:us-east-1:123456789012:abc123/dev/$connect",
        "headers": event["headers"],
        "multiValueHeaders": event["multiValueHeaders"],
        "queryStringParameters": event["queryStringParameters"],
        "multiValueQueryStringParameters": event["multiValueQueryStringParameters"],
        "stageVariables": {},
        "requestContext": event["requestContext"],
    }


def authorize(connection_id: str, query: dict[str, str]) -> tuple[int, dict[str, Any] | None]:
    """Run the authorizer as API Gateway does: (status, the context handed on)."""
    if not query.get("session") or not query.get("token"):
        return 401, None
    try:
        policy = load_handler("authorize")(authorize_event(connection_id, query), None)
    except Exception as exc:
        if str(exc) == "Unauthorized":
            return 401, None
        raise
    if policy["policyDocument"]["Statement"][0]["Effect"] != "Allow":
        return 403, None
    return 200, {**policy["context"], "principalId": policy["principalId"]}


def connect_event(
    connection_id: str, query: dict[str, str], authorizer: dict[str, Any] | None = None
) -> dict[str, Any]:
    ctx = request_context(connection_id, "$connect", "CONNECT")
    if authorizer is not None:
        ctx["authorizer"] = authorizer
    return {
        "headers": {"Host": "abc123.execute-api.us-east-1.amazonaws.com"},
        "multiValueHeaders": {"Host": ["abc123.execute-api.us-east-1.amazonaws.com"]},
        "queryStringParameters": query or None,
        "multiValueQueryStringParameters": {k: [v] for k, v in query.items()} or None,
        "requestContext": ctx,
        "isBase64Encoded": False,
    }


def message_event(
    connection_id: str, body: str, authorizer: dict[str, Any] | None = None
) -> dict[str, Any]:
    try:
        action = json.loads(body).get("action")
    except (ValueError, AttributeError, RecursionError):
        action = None
    route = action if action in ("say", "resume", "ping", "leave", "stop") else "$default"
    ctx = request_context(connection_id, route, "MESSAGE")
    ctx["messageId"] = secrets.token_hex(8)
    if authorizer is not None:
        ctx["authorizer"] = authorizer
    return {"requestContext": ctx, "body": body, "isBase64Encoded": False}


def disconnect_event(
    connection_id: str, authorizer: dict[str, Any] | None = None
) -> dict[str, Any]:
    ctx = request_context(connection_id, "$disconnect", "DISCONNECT")
    if authorizer is not None:
        ctx["authorizer"] = authorizer
    ctx["disconnectStatusCode"] = 1001
    ctx["disconnectReason"] = "Going away"
    headers = {"Host": "abc123.execute-api.us-east-1.amazonaws.com", "x-api-key": ""}
    return {
        "headers": headers,
        "multiValueHeaders": {k: [v] for k, v in headers.items()},
        "requestContext": ctx,
        "isBase64Encoded": False,
    }


@dataclass
class Stack:
    """One deployment under test."""

    upstash_url: str
    upstash_token: str
    settings: Settings
    clock: ManualClock = field(default_factory=ManualClock)
    sender: InMemorySender = field(default_factory=InMemorySender)
    queue: InMemoryTurnQueue = field(default_factory=InMemoryTurnQueue)
    agent: Any = None
    rt: Runtime = field(init=False)
    identities: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def redis() -> Any:
            if self.settings.store_url:  # Redis over TCP, as a deployment configures it
                from rejoin import redis_client

                return redis_client(
                    self.settings.store_url,
                    timeout=self.settings.upstash_timeout,
                    retry_interval=0.01,
                )
            return upstash_client(
                self.upstash_url,
                self.upstash_token,
                timeout=self.settings.upstash_timeout,
                retry_interval=0.01,
            )

        self.rt = Runtime(
            self.settings,
            clock=self.clock,
            sender=self.sender,
            queue=self.queue,
            redis_factory=redis,
            agent_factory=lambda rt: self.agent,
        )
        set_runtime(self.rt)

    # --- tokens and connections ---------------------------------------------

    def token(self, session: str, user: str, name: str | None = None, ttl: int = 3600) -> str:
        return mint_token(
            secret=SECRET,
            session_id=session,
            user_id=user,
            name=name or user.title(),
            ttl_seconds=ttl,
            now=self.clock(),
        )

    def connect(
        self,
        session: str,
        user: str,
        *,
        token: str | None = None,
        query: dict[str, str] | None = None,
        connection_id: str | None = None,
    ) -> tuple[int, str]:
        cid = connection_id or new_connection_id()
        if query is None:
            query = {"session": session, "token": token or self.token(session, user)}
        status, authorizer = authorize(cid, query)
        if authorizer is None:
            return status, cid
        self.sender.open(cid)
        answer = load_handler("connect")(connect_event(cid, query, authorizer), None)
        if answer["statusCode"] != 200:
            self.sender.close_socket(cid)
        else:
            self.identities[cid] = authorizer
        return answer["statusCode"], cid

    def send(self, cid: str, frame: dict[str, Any] | str) -> dict[str, Any]:
        body = frame if isinstance(frame, str) else json.dumps(frame)
        event = message_event(cid, body, self.identities.get(cid))
        result: dict[str, Any] = load_handler("message")(event, None)
        return result

    def join(self, session: str, user: str, **resume: Any) -> tuple[str, dict[str, Any]]:
        """Connect and send resume; returns (connection id, welcome)."""
        status, cid = self.connect(session, user)
        assert status == 200, status
        return cid, self.resume(cid, **resume)

    def resume(self, cid: str, **fields: Any) -> dict[str, Any]:
        self.send(cid, {"action": "resume", **fields})
        return self.last(cid, "welcome")

    def say(self, cid: str, text: str, msg_id: str | None = None) -> dict[str, Any]:
        mid = msg_id or f"m-{next(_ids)}"
        self.send(cid, {"action": "say", "id": mid, "text": text})
        return self.last(cid, "ack", "error")

    def drop(self, cid: str, *, lose_disconnect: bool = False) -> None:
        self.sender.close_socket(cid)
        if not lose_disconnect:
            load_handler("disconnect")(disconnect_event(cid, self.identities.get(cid)), None)

    def cleanup(self) -> dict[str, Any]:
        result: dict[str, Any] = load_handler("cleanup")({"source": "aws.events"}, None)
        return result

    # --- turns ----------------------------------------------------------------

    def run_turns(self, max_rounds: int = 50) -> list[dict[str, Any]]:
        """Deliver queued turns to the turn handler, per session, until none are left."""
        results = []
        for _ in range(max_rounds):
            sessions = self.queue.sessions()
            if not sessions:
                break
            for sid in sessions:
                batch = self.queue.take(sid)
                results.append(self.deliver(batch))
        return results

    def deliver(self, batch: list[TurnRequest]) -> dict[str, Any]:
        result: dict[str, Any] = load_handler("turn")(sqs_event(batch), None)
        return result

    # --- what clients saw -------------------------------------------------------

    def frames(self, cid: str, *types: str) -> list[dict[str, Any]]:
        """Frames the connection received, ``part`` frames put back together."""
        frames: list[dict[str, Any]] = []
        parts: dict[str, list[dict[str, Any]]] = {}
        for f in self.sender.frames(cid):
            if f["type"] == "part":
                got = parts.setdefault(f["id"], [])
                got.append(f)
                if len(got) == f["count"]:
                    got.sort(key=lambda p: p["index"])
                    frames.append(json.loads("".join(p["data"] for p in got)))
                continue
            frames.append(f)
        return [f for f in frames if not types or f["type"] in types]

    def last(self, cid: str, *types: str) -> dict[str, Any]:
        found = self.frames(cid, *types)
        assert found, f"no {types} frame for {cid}: {self.sender.frames(cid)}"
        return found[-1]

    def logged(self, cid: str) -> list[dict[str, Any]]:
        """Events with a seq this connection received live, in order."""
        return [f for f in self.frames(cid) if f["type"] in LOGGED]


def make_stack(
    upstash: Any, agent: Any = None, *, sender: InMemorySender | None = None, **overrides: Any
) -> Stack:
    """A Stack on an Upstash-compatible endpoint (``.url``, ``.token``).

    Rate limiting is off unless ``rate_limit`` is given; ``overrides`` are
    :class:`Settings` fields (``store_url="redis://..."`` puts the store on
    TCP Redis instead).
    """
    settings = replace(
        Settings(
            upstash_url=upstash.url,
            upstash_token=upstash.token,
            token_secret=SECRET,
            rate_limit=0,
        ),
        **overrides,
    )
    return Stack(
        upstash.url, upstash.token, settings, sender=sender or InMemorySender(), agent=agent
    )


def offline_agent() -> Any:
    import agents

    from rejoin.models import OfflineModel, make_current_time_tool

    return agents.Agent(
        name="agent",
        instructions="test",
        model=OfflineModel(delay=0),
        tools=[make_current_time_tool()],
    )


def scripted_agent(steps: list[Any], tools: list[Any] | None = None) -> Any:
    """An agent on the SDK's ScriptedModel (see tests/scripted.py; a string step is a message)."""
    import agents
    from scripted import script

    return agents.Agent(name="agent", model=script(steps), tools=tools or [])


Factory = Callable[..., Stack]
