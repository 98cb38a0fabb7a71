"""The HTTP API's request and response bodies (pydantic models, so FastAPI
validates them and documents them in the OpenAPI schema).

Request bodies are strict: a field takes exactly its JSON type (no ``true``
for an integer, no ``"600"`` for a number, no number for a string) and no
unknown fields.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Path
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints
from pydantic_core import PydanticCustomError

from ..tokens import DEFAULT_MAX_TTL_SECONDS

__all__ = [
    "AgentMessageEvent",
    "CreateSessionRequest",
    "Health",
    "JsonInt",
    "MessageEvent",
    "ParticipantState",
    "PresenceEvent",
    "Ready",
    "SessionCreated",
    "SessionIdPath",
    "SessionStatus",
    "TokenIssued",
    "TokenRequest",
    "Transcript",
    "TranscriptEvent",
    "UserIdPath",
]

SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
USER_ID_PATTERN = r"^[A-Za-z0-9_.@:-]{1,128}$"
# The default token lifetime when the request names none (capped by the
# deployment's maximum lifetime when that is shorter).
DEFAULT_TOKEN_TTL_SECONDS = 3600

_JSON_KINDS: dict[type, str] = {
    bool: "a boolean",
    str: "a string",
    type(None): "null",
    list: "an array",
    dict: "an object",
}


def _json_integer(value: object) -> object:
    """Take a JSON integer: an int, or a number with no fraction (``600.0``; JSON
    Schema counts it as an integer); never a bool or a string, which pydantic's
    lax mode would convert (``true`` to 1, ``"600"`` to 600).

    Raises:
        PydanticCustomError: anything else (a 400 ``invalid_request`` naming the field).
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        kind = _JSON_KINDS.get(type(value), "another type")
        raise PydanticCustomError(
            "int_type", "Input should be a valid integer, not {kind}", {"kind": kind}
        )
    if isinstance(value, float):
        if not value.is_integer():
            raise PydanticCustomError(
                "int_from_float", "Input should be a valid integer, got a number with a fraction"
            )
        return int(value)
    return value


# Request integers: strict about the JSON type (see _json_integer).
JsonInt = Annotated[int, BeforeValidator(_json_integer)]

SessionIdPath = Annotated[
    str,
    Path(
        pattern=SESSION_ID_PATTERN,
        min_length=1,
        max_length=128,
        description="The session id: 1-128 of `A-Za-z0-9_-`.",
        examples=["standup-42"],
    ),
]

UserIdPath = Annotated[
    str,
    Path(
        pattern=USER_ID_PATTERN,
        min_length=1,
        max_length=128,
        description="A participant's user id: 1-128 of `A-Za-z0-9_.@:-`.",
        examples=["u-ada"],
    ),
]

ReplyMode = Literal["every", "addressed"]
SessionId = Annotated[str, StringConstraints(pattern=SESSION_ID_PATTERN)]


class Health(BaseModel):
    """The function is up."""

    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    """The function is up and the store answers."""

    status: Literal["ready"] = "ready"


class CreateSessionRequest(BaseModel):
    """What session to create."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"session_id": "standup-42", "mode": "addressed"}]},
    )

    session_id: SessionId | None = Field(
        default=None,
        description="1-128 of `A-Za-z0-9_-`; a random id is generated when missing.",
    )
    mode: ReplyMode | None = Field(
        default=None,
        description="`every`: the agent answers every message; `addressed`: only messages "
        "that address it. Default: the deployment's `REJOIN_REPLY_MODE`.",
    )


class SessionCreated(BaseModel):
    """The session, created now or found live."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "session_id": "standup-42",
                    "epoch": "k3f9x2a1Qw7Z",
                    "created": True,
                    "mode": "addressed",
                    "grace_deadline_ms": 1764100120000,
                }
            ]
        }
    )

    session_id: str
    epoch: str = Field(description="The session's epoch (changes when the id is reused).")
    created: bool = Field(description="False: the session already existed and is unchanged.")
    mode: ReplyMode = Field(description="The session's reply mode (a live one keeps its own).")
    grace_deadline_ms: int | None = Field(
        description="Milliseconds since the epoch until which the session waits for a "
        "connection; null while someone is connected."
    )


class TokenRequest(BaseModel):
    """Who the token is for."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [{"user_id": "u-ada", "name": "Ada Lovelace", "ttl_seconds": 3600}]
        },
    )

    user_id: Annotated[str, StringConstraints(pattern=USER_ID_PATTERN)] = Field(
        description="The participant's user id (the JWT's `sub`): 1-128 of `A-Za-z0-9_.@:-`."
    )
    name: Annotated[str, StringConstraints(min_length=1, max_length=80)] = Field(
        description="The display name: 1-80 printable characters, surrounding spaces "
        "stripped (no control, format or unassigned characters).",
        # JSON Schema cannot say "printable": a format names the rule for tools.
        json_schema_extra={"format": "display-name"},
    )
    ttl_seconds: JsonInt = Field(
        default=DEFAULT_TOKEN_TTL_SECONDS,
        ge=1,
        description="Seconds until the token expires: a JSON integer (not `true`, not "
        '`"600"`), at most the deployment\'s maximum token lifetime '
        "(`REJOIN_TOKEN_MAX_TTL_SECONDS`, 12 h unless changed). Default: 1 hour, or that "
        "maximum when it is shorter.",
        # The deployment's maximum: the default here; the served /openapi.json
        # shows the deployment's own (the route checks it, see routes._token_ttl).
        json_schema_extra={"maximum": DEFAULT_MAX_TTL_SECONDS},
    )


class TokenIssued(BaseModel):
    """A participant token for one session."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "token": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOi...",
                    "expires_at": 1764103600,
                    "connect_url_hint": "wss://a1b2c3d4e5.execute-api.us-east-1.amazonaws.com"
                    "/dev?session=standup-42&token=eyJhbGciOi...",
                }
            ]
        }
    )

    token: str = Field(description="The JWT (HS256): `sub`, `name`, `sid`, `iat`, `exp`, `aud`.")
    expires_at: int = Field(description="When it expires, in seconds since the epoch (`exp`).")
    connect_url_hint: str = Field(
        description="The WebSocket URL to connect with it; only its query "
        "(`?session=..&token=..`) when this function does not know the WebSocket endpoint."
    )


class ParticipantState(BaseModel):
    """A participant and their presence."""

    user: str
    name: str
    status: Literal["active", "away", "left"] = Field(
        description="`active`: connected; `away`: dropped, may come back; `left`: sent `leave`."
    )


class SessionStatus(BaseModel):
    """A live session's state."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "session_id": "standup-42",
                    "epoch": "k3f9x2a1Qw7Z",
                    "state": "active",
                    "mode": "every",
                    "seq": 44,
                    "connections": 1,
                    "participants": [
                        {"user": "u-ada", "name": "Ada", "status": "active"},
                        {"user": "u-bob", "name": "Bob", "status": "away"},
                    ],
                    "grace_deadline_ms": None,
                    "created_ms": 1764100000000,
                }
            ]
        }
    )

    session_id: str
    epoch: str
    state: Literal["active", "grace"] = Field(
        description="`active`: someone is connected; `grace`: nobody is, and the session "
        "is deleted at `grace_deadline_ms` unless someone connects before."
    )
    mode: ReplyMode
    seq: int = Field(description="The latest event's sequence number.")
    connections: int = Field(description="Open connections.")
    participants: list[ParticipantState]
    grace_deadline_ms: int | None
    created_ms: int


class MessageEvent(BaseModel):
    """A participant's message."""

    type: Literal["message"]
    seq: int
    id: str = Field(description="The sender's message id (unique per sender).")
    user: str
    name: str
    text: str
    ts: int = Field(description="Milliseconds since the epoch.")


class PresenceEvent(BaseModel):
    """A participant became active, away, left, or was removed."""

    type: Literal["presence"]
    seq: int
    user: str
    name: str
    status: Literal["active", "away", "left", "removed"]
    ts: int


class AgentMessageEvent(BaseModel):
    """The agent's reply to the message whose seq is ``reply_to``."""

    type: Literal["agent_message"]
    seq: int
    turn: str = Field(description="The turn's id, unique in the epoch.")
    reply_to: int = Field(description="The seq of the message answered.")
    text: str
    stopped: bool = Field(
        default=False, description="A participant stopped the agent; `text` is partial."
    )
    ts: int


TranscriptEvent = Annotated[
    MessageEvent | PresenceEvent | AgentMessageEvent, Field(discriminator="type")
]
EVENT_TYPES = frozenset({"message", "presence", "agent_message"})


class Transcript(BaseModel):
    """The logged events of the session's current epoch, oldest first."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "session_id": "standup-42",
                    "epoch": "k3f9x2a1Qw7Z",
                    "seq": 3,
                    "truncated": False,
                    "events": [
                        {
                            "type": "presence",
                            "seq": 1,
                            "user": "u-ada",
                            "name": "Ada",
                            "status": "active",
                            "ts": 1764100000000,
                        },
                        {
                            "type": "message",
                            "seq": 2,
                            "id": "c-1",
                            "user": "u-ada",
                            "name": "Ada",
                            "text": "@agent what did we decide?",
                            "ts": 1764100003000,
                        },
                        {
                            "type": "agent_message",
                            "seq": 3,
                            "turn": "c-1",
                            "text": "To ship on Friday.",
                            "ts": 1764100009000,
                        },
                    ],
                }
            ]
        }
    )

    session_id: str
    epoch: str
    seq: int
    truncated: bool = Field(
        description="True when the oldest events were dropped by the event log's cap "
        "(`REJOIN_EVENT_LOG_SIZE`): `events` does not start at seq 1."
    )
    events: list[TranscriptEvent]
