"""Client frames in, server frames out (see ``docs/protocol.md``).

:func:`parse_frame` turns a WebSocket body into one of four frozen models or
raises :class:`~rejoin.errors.FrameError` with a stable code and a message
that names the field and the rule. Types are strict: ``true`` is not an
integer, ``3.0`` is not an integer, and nothing is coerced. Unknown fields are
ignored so older servers accept newer clients.

The builders return server frames as plain dicts, shaped exactly as the
protocol shows; :func:`encode_frame` turns one into the bytes to post.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, NoReturn

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from .errors import FrameError

__all__ = [
    "ClientFrame",
    "Leave",
    "Ping",
    "Resume",
    "Say",
    "Stop",
    "ack_frame",
    "agent_delta_frame",
    "encode_frame",
    "ended_frame",
    "error_frame",
    "left_frame",
    "parse_frame",
    "pong_frame",
    "replay_frame",
    "stopping_frame",
]

DEFAULT_MAX_TEXT = 4000
DEFAULT_MAX_BYTES = 32 * 1024
# JavaScript clients cannot hold larger integers exactly.
MAX_SEQ = 2**53 - 1

_CLIENT_ID = re.compile(r"[A-Za-z0-9_:.-]{1,64}")
_ACTIONS = ("resume", "say", "ping", "leave", "stop")

# defer_build: the handlers that never parse a frame (connect, disconnect) do
# not pay for building these schemas at a cold start.
_MODEL_CONFIG = ConfigDict(strict=True, extra="ignore", frozen=True, defer_build=True)

Epoch = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
ClientId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_:.-]{1,64}$")]


class Resume(BaseModel):
    """``resume``: join, or come back after a drop.

    Attributes:
        epoch: the epoch of the session the client was in, if any.
        last_seq: the highest ``seq`` the client has seen in that epoch.
    """

    model_config = _MODEL_CONFIG

    action: Literal["resume"] = "resume"
    epoch: Epoch | None = None
    last_seq: Annotated[int, Field(ge=0, le=MAX_SEQ)] = 0


class Say(BaseModel):
    """``say``: send a message.

    Validate with ``context={"max_text": n}`` to change the text limit
    (default 4,000 characters).

    Attributes:
        id: the client's message id; resending it is a no-op.
        text: the message, not only whitespace.
    """

    model_config = _MODEL_CONFIG

    action: Literal["say"] = "say"
    id: ClientId
    text: str

    @field_validator("text")
    @classmethod
    def _check_text(cls, text: str, info: ValidationInfo) -> str:
        context = info.context if isinstance(info.context, Mapping) else {}
        max_text = context.get("max_text", DEFAULT_MAX_TEXT)
        if not 1 <= len(text) <= max_text or text.isspace():
            raise ValueError(_text_rule(max_text))
        try:
            # JSON escapes can smuggle in lone surrogates, which cannot be
            # stored or sent back as UTF-8.
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode") from None
        return text


class Ping(BaseModel):
    """``ping``: keep the connection alive; answered with ``pong``."""

    model_config = _MODEL_CONFIG

    action: Literal["ping"] = "ping"


class Leave(BaseModel):
    """``leave``: the participant leaves for good (shows as ``left``)."""

    model_config = _MODEL_CONFIG

    action: Literal["leave"] = "leave"


class Stop(BaseModel):
    """``stop``: interrupt the agent's running turn.

    Attributes:
        turn: the turn to stop (``agent_delta.turn``); any running turn when absent.
    """

    model_config = _MODEL_CONFIG

    action: Literal["stop"] = "stop"
    turn: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_:.-]{1,64}$")] | None = None


ClientFrame = Resume | Say | Ping | Leave | Stop

_MODELS: dict[str, type[BaseModel]] = {
    "resume": Resume,
    "say": Say,
    "ping": Ping,
    "leave": Leave,
    "stop": Stop,
}


def _text_rule(max_text: int) -> str:
    return f"text must be 1-{max_text} characters, not only whitespace"


def _rules(max_text: int) -> dict[tuple[str, str], str]:
    return {
        ("resume", "epoch"): "epoch must be null or 1-64 characters of A-Za-z0-9_-",
        ("resume", "last_seq"): f"last_seq must be an integer from 0 to {MAX_SEQ}",
        ("say", "id"): "id must be a string of 1-64 characters of A-Za-z0-9_-:.",
        ("say", "text"): _text_rule(max_text),
        ("stop", "turn"): "turn must be null or 1-64 characters of A-Za-z0-9_-:.",
    }


def parse_frame(
    body: str | bytes | None,
    *,
    max_text: int = DEFAULT_MAX_TEXT,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> ClientFrame:
    """Parse one client frame.

    Args:
        body: the WebSocket message body, as text or UTF-8 bytes.
        max_text: the most characters a ``say`` text may have.
        max_bytes: the most bytes (UTF-8) a frame may have.

    Returns:
        The frame, as a :class:`Resume`, :class:`Say`, :class:`Ping`,
        :class:`Leave` or :class:`Stop`.

    Raises:
        FrameError: with code ``too_large`` (over ``max_bytes``, checked
            before parsing), ``bad_json`` (not UTF-8, not JSON, or not an
            object), ``unknown_action`` (``action`` missing, not a string or
            unknown) or ``invalid_field`` (a field missing, of the wrong type
            or out of range; for ``say``, ``client_id`` is the frame's ``id``
            when that is valid).
    """
    text = _decode_body(body, max_bytes)
    try:
        # NaN and Infinity are not JSON; Python accepts them unless told not to.
        data = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise FrameError("bad_json", "the frame is not valid JSON") from None
    if not isinstance(data, dict):
        raise FrameError("bad_json", "the frame must be a JSON object")
    action = data.get("action")
    if not isinstance(action, str) or action not in _MODELS:
        raise FrameError("unknown_action", _unknown_action_message(data))
    model = _MODELS[action]
    try:
        frame = model.model_validate(data, context={"max_text": max_text})
    except ValidationError as exc:
        _raise_invalid(action, data, exc, max_text)
    assert isinstance(frame, Resume | Say | Ping | Leave | Stop)
    return frame


def _decode_body(body: str | bytes | None, max_bytes: int) -> str:
    if body is None:
        raise FrameError("bad_json", "the frame is empty; send a JSON object")
    if isinstance(body, bytes | bytearray | memoryview):
        raw = bytes(body)
        if len(raw) > max_bytes:
            raise _too_large(max_bytes)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError("bad_json", "the frame is not UTF-8 text") from None
    if not isinstance(body, str):
        raise FrameError("bad_json", "the frame must be text")
    # Every character is at least one byte: skip encoding an obviously huge frame.
    if len(body) > max_bytes:
        raise _too_large(max_bytes)
    try:
        size = len(body.encode("utf-8"))
    except UnicodeEncodeError:
        raise FrameError("bad_json", "the frame is not valid UTF-8 text") from None
    if size > max_bytes:
        raise _too_large(max_bytes)
    return body


def _too_large(max_bytes: int) -> FrameError:
    return FrameError("too_large", f"the frame is over {max_bytes} bytes")


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _unknown_action_message(data: dict[str, Any]) -> str:
    allowed = ", ".join(_ACTIONS)
    if "action" not in data:
        return f"the frame has no action; use one of {allowed}"
    action = data["action"]
    if not isinstance(action, str):
        return f"action must be a string, one of {allowed}"
    shown = action if len(action) <= 32 else action[:32] + "..."
    return f"unknown action {shown!r}; use one of {allowed}"


def _raise_invalid(
    action: str, data: dict[str, Any], exc: ValidationError, max_text: int
) -> NoReturn:
    error = exc.errors(include_url=False, include_input=False)[0]
    field = str(error["loc"][0]) if error["loc"] else "frame"
    rule = _rules(max_text).get((action, field), f"{field} is invalid")
    if error["type"] == "missing":
        message = f"{field} is required; {rule}"
    elif error["type"] == "value_error":
        # Raised by our own validators, whose message already states the rule.
        message = str(error.get("ctx", {}).get("error", rule))
    else:
        message = rule
    client_id = None
    if action == "say":
        candidate = data.get("id")
        if isinstance(candidate, str) and _CLIENT_ID.fullmatch(candidate):
            client_id = candidate
    raise FrameError("invalid_field", message, client_id=client_id) from None


# --- server frames ----------------------------------------------------------


def error_frame(
    code: str, message: str, *, client_id: str | None = None, **extra: Any
) -> dict[str, Any]:
    """Build an ``error`` frame.

    Args:
        code: the stable error code (see the protocol's table).
        message: a human-readable explanation.
        client_id: the client message id, when the error answers a ``say``.
        **extra: more fields, e.g. ``retry_after`` for ``rate_limited`` or
            ``turn`` for ``turn_failed``.

    Raises:
        ValueError: ``extra`` names ``type`` or ``id``.
    """
    reserved = {"type", "id"} & extra.keys()
    if reserved:
        raise ValueError(f"error_frame: {sorted(reserved)} cannot be extra fields")
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if client_id is not None:
        frame["id"] = client_id
    frame.update(extra)
    return frame


def pong_frame(ts_ms: int) -> dict[str, Any]:
    """Build a ``pong`` frame; ``ts_ms`` is the server time in milliseconds."""
    return {"type": "pong", "ts": ts_ms}


def ack_frame(client_id: str, seq: int, duplicate: bool) -> dict[str, Any]:
    """Build an ``ack`` frame for the ``say`` whose id is ``client_id``, logged at ``seq``."""
    return {"type": "ack", "id": client_id, "seq": seq, "duplicate": duplicate}


def agent_delta_frame(turn: str, index: int, text: str, reply_to: int) -> dict[str, Any]:
    """Build an ``agent_delta`` frame: piece ``index`` (from 0) of turn ``turn``'s reply."""
    return {"type": "agent_delta", "turn": turn, "reply_to": reply_to, "index": index, "text": text}


def left_frame(seq: int | None) -> dict[str, Any]:
    """Build a ``left`` frame: the ``leave`` was applied (``seq`` of its presence event)."""
    return {"type": "left", "seq": seq}


def replay_frame(events: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    """Build a ``replay`` frame: the next page of a ``welcome``'s backlog."""
    return {"type": "replay", "events": events, "more": more}


def stopping_frame(turn: str | None, running: bool) -> dict[str, Any]:
    """Build a ``stopping`` frame: the answer to ``stop``."""
    return {"type": "stopping", "turn": turn, "running": running}


def ended_frame(reason: str) -> dict[str, Any]:
    """Build an ``ended`` frame (e.g. ``reason="ended_by_api"``)."""
    return {"type": "ended", "reason": reason}


def encode_frame(frame: Mapping[str, Any]) -> bytes:
    """Encode a server frame as compact UTF-8 JSON.

    Raises:
        ValueError: the frame holds NaN or infinity, or text that is not
            valid Unicode.
        TypeError: the frame holds a value JSON cannot represent.
    """
    text = json.dumps(frame, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8")
