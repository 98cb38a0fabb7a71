"""Client frames are parsed strictly; server frames are built as the protocol shows."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from rejoin.errors import FrameError
from rejoin.frames import (
    Leave,
    Ping,
    Resume,
    Say,
    ack_frame,
    agent_delta_frame,
    encode_frame,
    ended_frame,
    error_frame,
    left_frame,
    parse_frame,
    pong_frame,
    replay_frame,
    stopping_frame,
)


def _code(body: str | bytes | None, **kwargs: Any) -> FrameError:
    with pytest.raises(FrameError) as info:
        parse_frame(body, **kwargs)
    return info.value


# --- valid frames -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('{"action": "resume"}', Resume(epoch=None, last_seq=0)),
        (
            '{"action": "resume", "epoch": "k3f9x2a1", "last_seq": 41}',
            Resume(epoch="k3f9x2a1", last_seq=41),
        ),
        ('{"action": "resume", "epoch": null, "last_seq": 0}', Resume()),
        (
            '{"action": "say", "id": "c-7f1d2a", "text": "@agent what did we decide?"}',
            Say(id="c-7f1d2a", text="@agent what did we decide?"),
        ),
        ('{"action": "say", "id": "a:b.c_d-e", "text": " x "}', Say(id="a:b.c_d-e", text=" x ")),
        ('{"action": "ping"}', Ping()),
        ('{"action": "leave"}', Leave()),
        # unknown fields are ignored
        ('{"action": "ping", "future": [1, 2]}', Ping()),
    ],
)
def test_valid_frames(body: str, expected: Resume | Say | Ping | Leave) -> None:
    # GIVEN a well-formed client frame / WHEN parsed / THEN the matching model
    frame = parse_frame(body)
    assert frame == expected
    assert type(frame) is type(expected)


def test_bytes_and_unicode_bodies() -> None:
    # GIVEN a UTF-8 body with non-ASCII text, as bytes and as str
    body = '{"action": "say", "id": "c1", "text": "héllo 👋 «»"}'
    # WHEN parsed either way / THEN the text survives intact
    for form in (body, body.encode("utf-8")):
        frame = parse_frame(form)
        assert isinstance(frame, Say)
        assert frame.text == "héllo 👋 «»"


def test_text_limit_is_configurable_and_inclusive() -> None:
    # GIVEN texts of exactly the limit and one over
    at_limit = json.dumps({"action": "say", "id": "c1", "text": "é" * 10})
    over = json.dumps({"action": "say", "id": "c1", "text": "é" * 11})
    # WHEN parsed with max_text=10
    frame = parse_frame(at_limit, max_text=10)
    # THEN the limit counts characters (not bytes) and is inclusive
    assert isinstance(frame, Say) and len(frame.text) == 10
    err = _code(over, max_text=10)
    assert (err.code, err.message) == (
        "invalid_field",
        "text must be 1-10 characters, not only whitespace",
    )


def test_default_text_limit_is_4000() -> None:
    # GIVEN a text of 4,000 and of 4,001 characters
    ok = json.dumps({"action": "say", "id": "c1", "text": "a" * 4000})
    too_long = json.dumps({"action": "say", "id": "c1", "text": "a" * 4001})
    # WHEN parsed with the defaults / THEN 4,000 passes and 4,001 does not
    assert isinstance(parse_frame(ok), Say)
    assert _code(too_long).code == "invalid_field"


def test_models_are_frozen() -> None:
    # GIVEN a parsed frame / WHEN a field is assigned / THEN it is refused
    frame = parse_frame('{"action": "resume", "last_seq": 3}')
    with pytest.raises(ValidationError):
        frame.last_seq = 4  # type: ignore[union-attr]


# --- refused frames ---------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        None,
        "",
        "not json",
        "{",
        '{"action": "ping"} trailing',
        '{"action": NaN}',
        '{"action": "resume", "last_seq": Infinity}',
        "[]",
        '[{"action": "ping"}]',
        "42",
        '"ping"',
        "null",
        b'{"action": "say", "id": "c1", "text": "\xff\xfe"}',
        b"\xc3\x28",
        '{"action": "say", "id": "c1", "text": "\ud800"}',
        "[" * 5_000 + "]" * 5_000,  # nesting deeper than the recursion limit
    ],
)
def test_bad_json(body: str | bytes | None) -> None:
    # GIVEN a body that is not a UTF-8 JSON object / WHEN parsed / THEN bad_json
    err = _code(body)
    assert err.code == "bad_json"
    assert err.client_id is None


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ("{}", "no action"),
        ('{"text": "hi"}', "no action"),
        ('{"action": "shout"}', "unknown action 'shout'"),
        ('{"action": "Say"}', "unknown action"),
        ('{"action": 1}', "must be a string"),
        ('{"action": null}', "must be a string"),
        ('{"action": ["say"]}', "must be a string"),
        ('{"action": true}', "must be a string"),
    ],
)
def test_unknown_action(body: str, says: str) -> None:
    # GIVEN an object whose action is missing, unknown or not a string
    err = _code(body)
    # THEN unknown_action, with a message that lists the valid actions
    assert err.code == "unknown_action"
    assert says in err.message
    assert "resume, say, ping, leave" in err.message


def test_unknown_action_message_is_bounded() -> None:
    # GIVEN a very long unknown action / WHEN parsed
    err = _code(json.dumps({"action": "x" * 5000}))
    # THEN the message does not echo all of it
    assert err.code == "unknown_action"
    assert len(err.message) < 200


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        ({"action": "resume", "last_seq": True}, "last_seq"),
        ({"action": "resume", "last_seq": False}, "last_seq"),
        ({"action": "resume", "last_seq": 3.0}, "last_seq"),
        ({"action": "resume", "last_seq": "3"}, "last_seq"),
        ({"action": "resume", "last_seq": -1}, "last_seq"),
        ({"action": "resume", "last_seq": 2**53}, "last_seq"),
        ({"action": "resume", "last_seq": None}, "last_seq"),
        ({"action": "resume", "epoch": 7}, "epoch"),
        ({"action": "resume", "epoch": ""}, "epoch"),
        ({"action": "resume", "epoch": "a" * 65}, "epoch"),
        ({"action": "resume", "epoch": "bad epoch"}, "epoch"),
        ({"action": "resume", "epoch": "k3f9:x"}, "epoch"),
        ({"action": "say", "text": "hi"}, "id"),
        ({"action": "say", "id": "", "text": "hi"}, "id"),
        ({"action": "say", "id": "a" * 65, "text": "hi"}, "id"),
        ({"action": "say", "id": "c 1", "text": "hi"}, "id"),
        ({"action": "say", "id": "c1\n", "text": "hi"}, "id"),
        ({"action": "say", "id": "c/1", "text": "hi"}, "id"),
        ({"action": "say", "id": 17, "text": "hi"}, "id"),
    ],
)
def test_invalid_fields(frame: dict[str, Any], field: str) -> None:
    # GIVEN a known action with a field of the wrong type or out of range
    err = _code(json.dumps(frame))
    # THEN invalid_field, naming the field and its rule
    assert err.code == "invalid_field"
    assert err.message.startswith(field)
    assert "must be" in err.message
    # and no client id: these frames carry no valid one
    assert err.client_id is None


def test_missing_field_says_it_is_required() -> None:
    # GIVEN a say without text / WHEN parsed
    err = _code('{"action": "say", "id": "c-1"}')
    # THEN the message says text is required and what it must be
    assert err.code == "invalid_field"
    assert err.message == "text is required; text must be 1-4000 characters, not only whitespace"


@pytest.mark.parametrize(
    "text",
    ["", " ", "\n\t  ", "a" * 4001, 42, None, ["hi"], {"t": "hi"}, "\ud800"],
)
def test_bad_say_text_carries_the_client_id(text: Any) -> None:
    # GIVEN a say with a valid id and a bad text
    body = json.dumps({"action": "say", "id": "c-7f1d2a", "text": text})
    # WHEN parsed
    err = _code(body)
    # THEN invalid_field about text, carrying the client id for the error frame
    assert err.code == "invalid_field"
    assert err.message.startswith("text")
    assert err.client_id == "c-7f1d2a"


def test_bad_say_with_bad_id_has_no_client_id() -> None:
    # GIVEN a say whose id itself is invalid (too long)
    err = _code(json.dumps({"action": "say", "id": "x" * 100, "text": ""}))
    # THEN the error does not echo the invalid id back as a client id
    assert err.client_id is None


@pytest.mark.parametrize("form", ["str", "bytes"])
def test_too_large_is_checked_on_raw_size_before_json(form: str) -> None:
    # GIVEN a frame of 32 KB + 1 byte of UTF-8 that is not even valid JSON
    # (3-byte characters: the character count is under the limit)
    body = "{" + "€" * ((32 * 1024) // 3) + "x" * 2
    assert len(body.encode()) == 32 * 1024 + 1 and len(body) < 32 * 1024
    raw: str | bytes = body if form == "str" else body.encode()
    # WHEN parsed / THEN too_large, not bad_json: size is checked first
    assert _code(raw).code == "too_large"


def test_size_limit_is_inclusive_and_configurable() -> None:
    # GIVEN a valid frame of exactly N bytes
    body = json.dumps({"action": "say", "id": "c1", "text": "a" * 100})
    size = len(body.encode())
    # WHEN parsed with max_bytes=N and N-1 / THEN the first passes, the second is too_large
    assert isinstance(parse_frame(body, max_bytes=size), Say)
    assert _code(body, max_bytes=size - 1).code == "too_large"


# --- server frames ------------------------------------------------------------------


def test_server_frames_match_the_protocol() -> None:
    # GIVEN the builders / WHEN called with the protocol's examples
    # THEN they produce exactly the protocol's frames, keys in order
    cases = [
        (
            error_frame("invalid_field", "text must be 1-4000 characters", client_id="c-7f1d2a"),
            '{"type":"error","code":"invalid_field",'
            '"message":"text must be 1-4000 characters","id":"c-7f1d2a"}',
        ),
        (
            error_frame("rate_limited", "slow down", retry_after=1.5),
            '{"type":"error","code":"rate_limited","message":"slow down","retry_after":1.5}',
        ),
        (pong_frame(1764100010000), '{"type":"pong","ts":1764100010000}'),
        (
            ack_frame("c-7f1d2a", 45, False),
            '{"type":"ack","id":"c-7f1d2a","seq":45,"duplicate":false}',
        ),
        (
            agent_delta_frame("45", 0, "We decided to ", 45),
            '{"type":"agent_delta","turn":"45","reply_to":45,"index":0,"text":"We decided to "}',
        ),
        (ended_frame("ended_by_api"), '{"type":"ended","reason":"ended_by_api"}'),
        (left_frame(46), '{"type":"left","seq":46}'),
        (
            replay_frame([{"type": "presence", "seq": 3}], more=False),
            '{"type":"replay","events":[{"type":"presence","seq":3}],"more":false}',
        ),
        (stopping_frame("45", True), '{"type":"stopping","turn":"45","running":true}'),
    ]
    for frame, wire in cases:
        assert encode_frame(frame) == wire.encode()


def test_error_frame_refuses_reserved_extra_fields() -> None:
    # GIVEN extra fields that would overwrite the frame's type or id
    # WHEN building / THEN refused
    with pytest.raises(ValueError, match="type"):
        error_frame("internal", "x", type="pong")
    with pytest.raises(ValueError, match="id"):
        error_frame("internal", "x", id="c-1")


def test_encode_frame_is_compact_utf8() -> None:
    # GIVEN a frame with non-ASCII text, quotes and a newline
    frame = {"type": "message", "text": 'héllo "👋"\n'}
    # WHEN encoded
    data = encode_frame(frame)
    # THEN it is compact UTF-8 (not \\u escapes) and round-trips
    assert data == '{"type":"message","text":"héllo \\"👋\\"\\n"}'.encode()
    assert json.loads(data) == frame


def test_encode_frame_refuses_nan() -> None:
    # GIVEN a frame holding NaN / WHEN encoded / THEN refused (NaN is not JSON)
    with pytest.raises(ValueError):
        encode_frame({"type": "pong", "ts": float("nan")})
