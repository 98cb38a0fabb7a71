"""The local Upstash REST endpoint, driven by the real upstash-redis clients.

Everything runs against the session's real Redis (see conftest), except the
tests of the embedded fakeredis mode. Keys carry a per-test prefix so the
suite also runs against a shared ``REJOIN_TEST_REDIS_URL``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import redis
from upstash_redis import Redis as UpstashSync
from upstash_redis.asyncio import Redis as UpstashAsync
from upstash_redis.errors import UpstashError

from rejoin_local.upstash_rest import Endpoint, create_app, serve

if TYPE_CHECKING:
    from tests.conftest import RedisServer, UpstashEndpoint

# Clients retry a lost response after this long instead of upstash-redis' 3 s.
TEST_RETRY_INTERVAL = 0.01

LOCKING_HEADER = "#!lua flags=allow-key-locking\n"
SCRIPT = LOCKING_HEADER + "redis.call('SET', KEYS[1], ARGV[1])\nreturn redis.call('GET', KEYS[1])"


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


@pytest.fixture
def key() -> str:
    """A key prefix of its own for each test."""
    return f"test:{uuid.uuid4().hex}:"


def post(
    upstash: UpstashEndpoint,
    body: Any,
    path: str = "/",
    *,
    b64: bool = False,
    token: str | None = None,
    raw: bytes | None = None,
    timeout: float = 10.0,
) -> httpx.Response:
    """A raw request to the endpoint, as the client would send it."""
    headers = {"Authorization": f"Bearer {upstash.token if token is None else token}"}
    if b64:
        headers["Upstash-Encoding"] = "base64"
    if raw is not None:
        return httpx.post(upstash.url + path, content=raw, headers=headers, timeout=timeout)
    return httpx.post(upstash.url + path, json=body, headers=headers, timeout=timeout)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- round trips ---------------------------------------------------------------


def test_sync_client_round_trips_strings_lists_hashes_and_sorted_sets(
    upstash_sync: UpstashSync, key: str
) -> None:
    # GIVEN the sync client (base64 encoding, the default)
    # WHEN values of each type are written and read back
    assert upstash_sync.set(key + "s", "héllo wörld ☃ 🎉") is True
    upstash_sync.rpush(key + "l", "a", "ü", "🎉")
    upstash_sync.hset(key + "h", values={"f1": "v1", "f2": "ß"})
    upstash_sync.zadd(key + "z", {"low": 1, "high": 2.5})

    # THEN they come back exactly, unicode included
    assert upstash_sync.get(key + "s") == "héllo wörld ☃ 🎉"
    assert upstash_sync.lrange(key + "l", 0, -1) == ["a", "ü", "🎉"]
    assert upstash_sync.hgetall(key + "h") == {"f1": "v1", "f2": "ß"}
    assert upstash_sync.zrange(key + "z", 0, -1, withscores=True) == [("low", 1.0), ("high", 2.5)]
    assert upstash_sync.get(key + "missing") is None
    assert upstash_sync.ping() == "PONG"


async def test_async_client_round_trips_and_a_500_kb_value(
    upstash_async: UpstashAsync, raw_redis: redis.Redis, key: str
) -> None:
    # GIVEN the async client and a 500 KB non-ASCII value
    big = ("ünïcødé-" * 64_000)[:500_000]

    # WHEN it is written and read through the endpoint
    assert await upstash_async.set(key + "big", big) is True
    assert await upstash_async.lpush(key + "l", "x", "y") == 2
    assert await upstash_async.hset(key + "h", "f", "v") == 1
    assert await upstash_async.zadd(key + "z", {"m": 3}) == 1

    # THEN the client reads it back intact and Redis holds the same bytes
    assert await upstash_async.get(key + "big") == big
    assert raw_redis.get(key + "big") == big
    assert await upstash_async.lrange(key + "l", 0, -1) == ["y", "x"]
    assert await upstash_async.hget(key + "h", "f") == "v"
    assert await upstash_async.zscore(key + "z", "m") == 3.0


def test_values_of_several_megabytes_round_trip(upstash_sync: UpstashSync, key: str) -> None:
    # GIVEN a 6 MB value (under the 10 MB request limit)
    value = "v" * 6_000_000
    # WHEN it is written and read back
    upstash_sync.set(key, value)
    # THEN it comes back whole
    assert upstash_sync.get(key) == value


# -- encoding --------------------------------------------------------------------


def test_client_without_base64_encoding_round_trips(upstash: UpstashEndpoint, key: str) -> None:
    # GIVEN a client that asks for plain JSON strings
    client = UpstashSync(
        upstash.url, upstash.token, rest_encoding=None, rest_retry_interval=TEST_RETRY_INTERVAL
    )
    try:
        # WHEN it writes and reads
        assert client.set(key, "plain ☃") is True
        # THEN results are plain text
        assert client.get(key) == "plain ☃"
        assert client.ping() == "PONG"
        assert client.lrange(key + "missing", 0, -1) == []
    finally:
        client.close()


def test_base64_header_encodes_bulk_and_status_replies_but_not_ok(
    upstash: UpstashEndpoint, key: str
) -> None:
    # GIVEN a stored value
    assert post(upstash, ["SET", key, "é"], b64=True).json() == {"result": "OK"}

    # WHEN it is read with and without Upstash-Encoding: base64
    # THEN bulk strings and statuses other than OK are base64, OK and integers are not
    assert post(upstash, ["GET", key], b64=True).json() == {"result": b64("é")}
    assert post(upstash, ["GET", key]).json() == {"result": "é"}
    assert post(upstash, ["PING"], b64=True).json() == {"result": b64("PONG")}
    assert post(upstash, ["PING"]).json() == {"result": "PONG"}
    assert post(upstash, ["STRLEN", key], b64=True).json() == {"result": 2}
    assert post(upstash, ["GET", key + "none"], b64=True).json() == {"result": None}


def test_nested_replies_keep_types_nils_and_errors(upstash: UpstashEndpoint) -> None:
    # GIVEN a script returning nested arrays, a nil, a status and an error inside an array
    script = (
        "return {1, {'a', false, {'deep'}}, redis.status_reply('FINE'),"
        " redis.error_reply('ERR nested')}"
    )
    # WHEN it runs with and without base64
    plain = post(upstash, ["EVAL", script, 0]).json()
    encoded = post(upstash, ["EVAL", script, 0], b64=True).json()
    # THEN integers, nils and nesting survive, strings are encoded, errors are not
    assert plain == {"result": [1, ["a", None, ["deep"]], "FINE", "ERR nested"]}
    assert encoded == {"result": [1, [b64("a"), None, [b64("deep")]], b64("FINE"), "ERR nested"]}


def test_non_utf8_bytes_are_escaped_in_text_mode_and_exact_in_base64(
    upstash: UpstashEndpoint, redis_url: str, key: str
) -> None:
    # GIVEN bytes that are not UTF-8, stored directly
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(key, b"ok\xff\xfe")
    finally:
        client.close()
    # WHEN they are read through the endpoint
    # THEN text mode escapes them and base64 mode returns them exactly
    assert post(upstash, ["GET", key]).json() == {"result": "ok\\xff\\xfe"}
    assert base64.b64decode(post(upstash, ["GET", key], b64=True).json()["result"]) == b"ok\xff\xfe"


def test_numbers_are_stringified_and_other_argument_types_refused(
    upstash: UpstashEndpoint, raw_redis: redis.Redis, key: str
) -> None:
    # GIVEN commands with integer and float arguments
    assert post(upstash, ["SET", key + "i", 5]).json() == {"result": "OK"}
    assert post(upstash, ["SET", key + "f", 2.5]).json() == {"result": "OK"}
    # THEN they are stored as their text
    assert raw_redis.mget(key + "i", key + "f") == ["5", "2.5"]
    # AND booleans, objects and nulls are refused
    for bad in (True, {"a": 1}, None, [1]):
        response = post(upstash, ["SET", key, bad])
        assert response.status_code == 400
        assert "must be strings or numbers" in response.json()["error"]


# -- pipelines and transactions ------------------------------------------------------


def test_pipeline_runs_each_command_and_reports_errors_per_item(
    upstash: UpstashEndpoint, upstash_sync: UpstashSync, raw_redis: redis.Redis, key: str
) -> None:
    # GIVEN a pipeline whose second command fails and whose third is refused
    body = [["SET", key, "x"], ["INCR", key], ["BLPOP", key, 1], ["GET", key]]
    # WHEN it is sent
    response = post(upstash, body, "/pipeline", b64=True)
    # THEN every item has its own result or error, and the others still ran
    assert response.status_code == 200
    items = response.json()
    assert items[0] == {"result": "OK"}
    assert items[1]["error"].startswith("ERR value is not an integer")
    assert items[2] == {"error": "ERR Command is not allowed: BLPOP"}
    assert items[3] == {"result": b64("x")}

    # AND the client's pipeline returns the results in order
    pipe = upstash_sync.pipeline()
    pipe.set(key + "p", "1")
    pipe.incr(key + "p")
    pipe.get(key + "p")
    assert pipe.exec() == [True, 2, "2"]

    # AND a failing item makes the client raise, though the other commands were applied
    pipe = upstash_sync.pipeline()
    pipe.set(key + "q", "v")
    pipe.lpush(key + "q", "x")
    with pytest.raises(UpstashError, match=r"^WRONGTYPE Operation against a key"):
        pipe.exec()
    assert raw_redis.get(key + "q") == "v"


async def test_multi_exec_is_one_transaction(
    upstash: UpstashEndpoint, upstash_async: UpstashAsync, raw_redis: redis.Redis, key: str
) -> None:
    # GIVEN a transaction through the async client
    tx = upstash_async.multi()
    tx.set(key, "1")
    tx.incrby(key, 41)
    tx.get(key)
    # WHEN it runs
    # THEN each command's result comes back
    assert await tx.exec() == [True, 42, "42"]

    # AND an error at run time is reported for its item only
    items = post(upstash, [["SET", key + "s", "v"], ["INCR", key + "s"]], "/multi-exec").json()
    assert items[0] == {"result": "OK"}
    assert items[1]["error"].startswith("ERR value is not an integer")


def test_multi_exec_refused_at_queue_time_applies_nothing(
    upstash: UpstashEndpoint, raw_redis: redis.Redis, key: str
) -> None:
    # GIVEN transactions with a command Redis refuses when queuing, and one we refuse
    wrong_arity = [["SET", key, "v"], ["GET"]]
    refused = [["SET", key, "v"], ["WATCH", key]]
    # WHEN they are sent
    first = post(upstash, wrong_arity, "/multi-exec")
    second = post(upstash, refused, "/multi-exec")
    # THEN the whole transaction fails with an error and nothing is written
    assert first.status_code == 400
    assert "wrong number of arguments" in first.json()["error"]
    assert second.status_code == 400
    assert second.json() == {"error": "ERR Command is not allowed: WATCH"}
    assert raw_redis.exists(key) == 0


# -- refusals and errors -----------------------------------------------------------


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_missing_or_wrong_token_is_unauthorized(
    upstash: UpstashEndpoint, token: str | None
) -> None:
    # GIVEN a request without a token or with a wrong one
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    # WHEN it reaches any route
    for path in ("/", "/pipeline", "/multi-exec"):
        response = httpx.post(upstash.url + path, json=[["PING"]], headers=headers)
        # THEN it is refused with 401
        assert response.status_code == 401
        assert response.json() == {"error": "Unauthorized"}
    assert httpx.get(upstash.url + "/_rejoin/stats", headers=headers).status_code == 401


def test_upstash_client_with_wrong_token_raises(upstash: UpstashEndpoint) -> None:
    client = UpstashSync(upstash.url, "nope", rest_retry_interval=TEST_RETRY_INTERVAL)
    try:
        with pytest.raises(UpstashError, match="Unauthorized"):
            client.ping()
    finally:
        client.close()


def test_redis_error_is_http_400_with_the_message(
    upstash: UpstashEndpoint, upstash_sync: UpstashSync, key: str
) -> None:
    # GIVEN a string key
    upstash_sync.set(key, "text")
    # WHEN a command fails in Redis
    response = post(upstash, ["INCR", key])
    # THEN the endpoint answers 400 with Redis' error, and the client raises it
    assert response.status_code == 400
    assert response.json()["error"].startswith("ERR value is not an integer")
    with pytest.raises(UpstashError, match="not an integer"):
        upstash_sync.incr(key)


@pytest.mark.parametrize(
    "command",
    [
        ["BLPOP", "k", 1],
        ["WATCH", "k"],
        ["SUBSCRIBE", "chan"],
        ["MULTI"],
        ["select", 1],
        ["XREAD", "BLOCK", 100, "STREAMS", "k", "$"],
        ["XREADGROUP", "GROUP", "g", "c", "BLOCK", 1, "STREAMS", "k", ">"],
    ],
)
def test_unsupported_commands_are_refused_before_redis(
    upstash: UpstashEndpoint, command: list[Any]
) -> None:
    # WHEN a command Upstash does not allow over REST is sent
    response = post(upstash, command)
    # THEN it is refused by name with a 400
    assert response.status_code == 400
    assert response.json() == {"error": f"ERR Command is not allowed: {command[0].upper()}"}


def test_xread_without_block_is_allowed(upstash: UpstashEndpoint, key: str) -> None:
    # GIVEN a stream whose key is literally named "block"
    post(upstash, ["XADD", key + "block", "*", "f", "v"])
    # WHEN it is read without BLOCK
    response = post(upstash, ["XREAD", "COUNT", 1, "STREAMS", key + "block", "0"])
    # THEN the read runs
    assert response.status_code == 200
    assert response.json()["result"][0][0] == key + "block"


@pytest.mark.parametrize(
    ("raw", "path", "message"),
    [
        (b"{not json", "/", "malformed JSON"),
        (b'{"a": 1}', "/", "non-empty JSON array"),
        (b"[]", "/", "non-empty JSON array"),
        (b"[]", "/pipeline", "non-empty JSON array of commands"),
        (b'["PING"]', "/pipeline", "non-empty JSON array"),
        (b"[[]]", "/multi-exec", "non-empty JSON array"),
    ],
)
def test_malformed_bodies_get_a_clear_400(
    upstash: UpstashEndpoint, raw: bytes, path: str, message: str
) -> None:
    response = post(upstash, None, path, raw=raw)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_body_over_10_mb_is_refused(
    upstash: UpstashEndpoint, raw_redis: redis.Redis, key: str
) -> None:
    # GIVEN a SET whose body is just over Upstash's 10 MB limit
    body = json.dumps(["SET", key, "x" * (10 * 1024 * 1024)]).encode()
    # WHEN it is sent
    response = post(upstash, None, raw=body)
    # THEN it is refused and nothing is stored
    assert response.status_code == 400
    assert response.json() == {"error": "ERR max request size exceeded"}
    assert raw_redis.exists(key) == 0


def test_sync_token_header_increases(upstash: UpstashEndpoint) -> None:
    # WHEN two requests are made (the second one echoing the token, as clients do)
    first = post(upstash, ["PING"])
    second = httpx.post(
        upstash.url,
        json=["PING"],
        headers={
            "Authorization": f"Bearer {upstash.token}",
            "Upstash-Sync-Token": first.headers["Upstash-Sync-Token"],
        },
    )
    # THEN both carry an Upstash-Sync-Token, increasing
    assert int(second.headers["Upstash-Sync-Token"]) > int(first.headers["Upstash-Sync-Token"])
    # AND error responses carry one too
    assert "Upstash-Sync-Token" in post(upstash, ["BLPOP", "k", 0]).headers


def test_health_needs_no_token(upstash: UpstashEndpoint) -> None:
    assert httpx.get(upstash.url + "/").json() == {"result": "OK"}


# -- Lua ---------------------------------------------------------------------


def test_eval_with_locking_header_then_evalsha_of_full_text(
    upstash_sync: UpstashSync, raw_redis: redis.Redis, key: str
) -> None:
    # GIVEN a script starting with Upstash's allow-key-locking line, which Redis rejects
    # WHEN it runs with EVAL
    assert upstash_sync.eval(SCRIPT, [key], ["v1"]) == "v1"
    # THEN EVALSHA with the sha1 of the FULL text finds it (no NOSCRIPT)
    assert upstash_sync.evalsha(sha1(SCRIPT), [key], ["v2"]) == "v2"
    assert raw_redis.get(key) == "v2"
    # AND SCRIPT EXISTS answers for that sha
    assert upstash_sync.script_exists(sha1(SCRIPT)) == [True]


async def test_script_load_returns_the_full_text_sha(upstash_async: UpstashAsync, key: str) -> None:
    # GIVEN a script not run before
    script = LOCKING_HEADER + f"-- {key}\nreturn ARGV[1]"
    # WHEN it is loaded
    sha = await upstash_async.script_load(script)
    # THEN the sha is the full text's, and EVALSHA/EVALSHA_RO with it run the script
    assert sha == sha1(script)
    assert await upstash_async.evalsha(sha, args=["hi"]) == "hi"
    assert await upstash_async.evalsha_ro(sha, args=["ro"]) == "ro"


async def test_unknown_evalsha_is_noscript_then_eval_fallback_works(
    upstash_async: UpstashAsync, key: str
) -> None:
    # GIVEN a script this endpoint has never seen
    script = LOCKING_HEADER + f"-- {key}\nreturn 7"
    # WHEN EVALSHA is tried first
    # THEN Redis answers NOSCRIPT
    with pytest.raises(UpstashError, match="NOSCRIPT"):
        await upstash_async.evalsha(sha1(script))
    # AND after the EVAL fallback the same EVALSHA works
    assert await upstash_async.eval(script) == 7
    assert await upstash_async.evalsha(sha1(script)) == 7


def test_script_without_header_and_other_shebang_flags_pass_through(
    upstash_sync: UpstashSync, key: str
) -> None:
    # GIVEN a plain script and one whose flags mix allow-key-locking with a Redis flag
    plain = f"-- {key}\nreturn 1"
    mixed = f"#!lua flags=allow-key-locking,no-writes\n-- {key}\nreturn 2"
    # WHEN they run
    # THEN plain scripts are untouched and only the Upstash flag is removed
    assert upstash_sync.eval(plain) == 1
    assert upstash_sync.evalsha(sha1(plain)) == 1
    assert upstash_sync.eval_ro(mixed) == 2
    assert upstash_sync.evalsha_ro(sha1(mixed)) == 2


def test_lua_error_line_numbers_match_the_callers_source(upstash: UpstashEndpoint) -> None:
    # GIVEN a script failing on its third line (counting the header)
    script = LOCKING_HEADER + "local x = 1\nerror('boom')"
    # WHEN it runs
    response = post(upstash, ["EVAL", script, 0])
    # THEN the error names line 3, as in the caller's text
    assert response.status_code == 400
    assert ":3:" in response.json()["error"]


# -- stats ---------------------------------------------------------------------


def test_stats_count_requests_per_path_and_commands_per_name(
    upstash: UpstashEndpoint, upstash_sync: UpstashSync, key: str
) -> None:
    # GIVEN zeroed stats
    assert post(upstash, None, "/_rejoin/stats/reset").json() == {"result": "OK"}
    # WHEN two single commands and a three-command pipeline are sent
    upstash_sync.set(key, "1")
    upstash_sync.get(key)
    pipe = upstash_sync.pipeline()
    pipe.get(key)
    pipe.incr(key)
    pipe.evalsha("0" * 40)
    with pytest.raises(UpstashError):
        pipe.exec()
    # THEN the pipeline counts once as a request and per command
    snapshot = upstash.stats.snapshot()
    assert snapshot["requests"] == {"/": 2, "/pipeline": 1}
    assert snapshot["commands"] == {"SET": 1, "GET": 2, "INCR": 1, "EVALSHA": 1}
    assert snapshot["total_requests"] == 3
    assert snapshot["total_commands"] == 5
    # AND the HTTP route serves the same snapshot, without counting itself
    response = httpx.get(
        upstash.url + "/_rejoin/stats", headers={"Authorization": f"Bearer {upstash.token}"}
    )
    assert response.json() == snapshot
    upstash.stats.reset()
    assert upstash.stats.snapshot()["total_requests"] == 0


# -- faults --------------------------------------------------------------------


def test_lost_response_is_retried_by_the_client_and_applied_twice(
    upstash: UpstashEndpoint, upstash_sync: UpstashSync, raw_redis: redis.Redis, key: str
) -> None:
    # GIVEN the next INCR's response will be lost after it is applied
    upstash.faults.lose_response(command="incr")
    # WHEN the client sends one INCR
    result = upstash_sync.incr(key)
    # THEN the client retried on its own, so a non-idempotent write ran twice
    assert result == 2
    assert raw_redis.get(key) == "2"
    assert upstash.faults.pending() == 0


def test_lost_response_without_retries_raises_but_the_write_landed(
    upstash: UpstashEndpoint, raw_redis: redis.Redis, key: str
) -> None:
    # GIVEN a client that does not retry, and a lost response
    client = UpstashSync(upstash.url, upstash.token, rest_retries=0)
    upstash.faults.lose_response()
    try:
        # WHEN it writes
        # THEN it sees a failure (a 502 that is not JSON) ...
        with pytest.raises(json.JSONDecodeError):
            client.incr(key)
    finally:
        client.close()
    # ... although the write was applied once
    assert raw_redis.get(key) == "1"


def test_failure_is_not_applied_and_the_retry_succeeds(
    upstash: UpstashEndpoint, upstash_sync: UpstashSync, raw_redis: redis.Redis, key: str
) -> None:
    # GIVEN the next request fails with a 503 before reaching Redis
    upstash.faults.fail()
    # WHEN the client increments
    # THEN its retry is the only one applied
    assert upstash_sync.incr(key) == 1
    assert raw_redis.get(key) == "1"

    # AND when both tries fail, the client raises and nothing is applied
    upstash.faults.fail(status=500, times=2)
    with pytest.raises(json.JSONDecodeError):
        upstash_sync.incr(key)
    assert raw_redis.get(key) == "1"


def test_faults_match_by_first_command_and_skip_stats_routes(
    upstash: UpstashEndpoint, upstash_sync: UpstashSync, key: str
) -> None:
    # GIVEN a fault for EVAL only
    upstash.faults.fail(command="EVAL")
    # WHEN other requests come first
    upstash_sync.set(key, "v")
    assert httpx.get(
        upstash.url + "/_rejoin/stats", headers={"Authorization": f"Bearer {upstash.token}"}
    ).is_success
    # THEN the fault is still pending, and the EVAL consumes it
    assert upstash.faults.pending() == 1
    assert post(upstash, ["EVAL", "return 1", 0]).status_code == 503
    assert upstash.faults.pending() == 0
    assert post(upstash, ["EVAL", "return 1", 0]).json() == {"result": 1}


async def test_hang_delays_then_applies(
    upstash: UpstashEndpoint, upstash_async: UpstashAsync, raw_redis: redis.Redis, key: str
) -> None:
    # GIVEN the next request hangs for 0.3 s
    upstash.faults.hang(0.3)
    # WHEN the client writes
    started = time.monotonic()
    assert await upstash_async.set(key, "late") is True
    # THEN the answer was delayed, and the write applied
    assert time.monotonic() - started >= 0.3
    assert raw_redis.get(key) == "late"


def test_hang_outlives_a_client_timeout_and_clear_releases_it(
    upstash: UpstashEndpoint, raw_redis: redis.Redis, key: str
) -> None:
    # GIVEN a long hang and a client that gives up after 0.2 s
    upstash.faults.hang(30)
    with pytest.raises(httpx.ReadTimeout):
        post(upstash, ["SET", key, "v"], timeout=0.2)
    # WHEN the faults are cleared
    assert raw_redis.get(key) is None
    upstash.faults.clear()
    # THEN the hung request goes on and is applied (the client never learns it)
    deadline = time.monotonic() + 5
    while raw_redis.get(key) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert raw_redis.get(key) == "v"


# -- Redis URL, embedded mode, CLI -------------------------------------------------------


def test_redis_url_database_number_is_selected(redis_server: RedisServer, key: str) -> None:
    # GIVEN our own Redis (a given one is not ours to write other databases of)
    if not redis_server.owned:
        pytest.skip("needs the session's own Redis")
    url = redis_server.url.rsplit("/", 1)[0] + "/5"
    app = create_app(redis_url=url, token="t")
    db5 = redis.Redis.from_url(url, decode_responses=True)
    try:
        with serve(app) as running:
            # WHEN the endpoint fronts database 5
            client = UpstashSync(running.url, "t")
            try:
                client.set(key, "in-5")
            finally:
                client.close()
        # THEN the write landed in database 5
        assert db5.get(key) == "in-5"
    finally:
        db5.flushdb()
        db5.close()


@pytest.fixture
def embedded() -> Iterator[tuple[str, Endpoint]]:
    app = create_app(redis_url=None, token="tok")
    endpoint: Endpoint = app.state.endpoint
    with serve(app) as running:
        yield running.url, endpoint
    # The embedded store stops with the app.
    assert endpoint.redis_url is None


async def test_embedded_store_runs_scripts_and_transactions(
    embedded: tuple[str, Endpoint],
) -> None:
    # GIVEN the endpoint with no Redis URL (embedded fakeredis over TCP)
    url, endpoint = embedded
    assert endpoint.embedded
    client = UpstashAsync(url, "tok", rest_retry_interval=TEST_RETRY_INTERVAL)
    try:
        # WHEN a header-carrying script runs by EVAL, then EVALSHA of the full text
        assert await client.eval(SCRIPT, ["k"], ["v1"]) == "v1"
        assert await client.evalsha(sha1(SCRIPT), ["k"], ["v2"]) == "v2"
        assert await client.script_load(SCRIPT) == sha1(SCRIPT)
        # AND a transaction and a pipeline run
        tx = client.multi()
        tx.incr("n")
        tx.incr("n")
        tx.get("k")
        assert await tx.exec() == [1, 2, "v2"]
        pipe = client.pipeline()
        pipe.rpush("l", "a", "b")
        pipe.lrange("l", 0, -1)
        assert await pipe.exec() == [2, ["a", "b"]]
        # AND an error inside a pipeline or transaction is reported like Redis does
        headers = {"Authorization": "Bearer tok"}
        async with httpx.AsyncClient(base_url=url, headers=headers) as http:
            items = (
                await http.post(
                    "/pipeline", json=[["INCR", "k"], ["LPUSH", "k", "x"], ["GET", "k"]]
                )
            ).json()
            assert items == [
                {"error": "ERR value is not an integer or out of range"},
                {"error": "WRONGTYPE Operation against a key holding the wrong kind of value"},
                {"result": "v2"},
            ]
            queued = await http.post("/multi-exec", json=[["SET", "k", "no"], ["GET"]])
            assert queued.status_code == 400
            assert "wrong number of arguments" in queued.json()["error"]
            assert (await http.post("/", json=["GET", "k"])).json() == {"result": "v2"}
        # AND a several-MB value and the fault hooks work as with Redis
        big = "z" * 3_000_000
        assert await client.set("big", big) is True
        assert await client.get("big") == big
        endpoint.faults.lose_response(command="INCR")
        assert await client.incr("n") == 4
    finally:
        await client.close()
    # THEN the store is reachable over RESP as well
    assert endpoint.redis_url is not None
    direct = redis.Redis.from_url(endpoint.redis_url, decode_responses=True)
    try:
        assert direct.get("k") == "v2"
    finally:
        direct.close()


def test_cli_prints_the_url_and_token_and_exits_cleanly_on_ctrl_c() -> None:
    # GIVEN the endpoint started from the command line on a free port, embedded
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL",)}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "local")
    env["UPSTASH_REDIS_REST_TOKEN"] = "cli-token"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rejoin_local.upstash_rest", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = ""
        while "UPSTASH_REDIS_REST_URL=" not in line:
            line = proc.stdout.readline()
            assert line, "the CLI exited before printing its URL"
        settings = dict(part.split("=", 1) for part in line.split())
        assert settings["UPSTASH_REDIS_REST_TOKEN"] == "cli-token"
        # WHEN a client uses the printed settings
        client = UpstashSync(settings["UPSTASH_REDIS_REST_URL"], "cli-token")
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert client.ping() == "PONG"
                    break
                except httpx.ConnectError:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
        finally:
            client.close()
    finally:
        # THEN Ctrl-C stops it with status 0 and no traceback
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
