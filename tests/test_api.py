"""The HTTP API (functions/api): the app as Lambda loads it, the real store behind
the Upstash-compatible endpoint, participants joining through the real WebSocket
handlers (the harness ``Stack``), Mangum with HTTP API events, and schemathesis
against the app's own OpenAPI schema.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import json
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import harness
import jwt
import pytest
import redis
import schemathesis
from fastapi.testclient import TestClient
from harness import SECRET, Stack, make_stack, offline_agent
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.routing import Mount

import rejoin.api.routes as api_routes
from rejoin import upstash_client
from rejoin.config import Settings
from rejoin.errors import ConfigError
from rejoin.runtime import set_runtime
from rejoin_local.handlers import load_api_app, load_handler

ADMIN_KEY = "test-admin-key-0123456789-abcdefghijklmnop"
ROOT = Path(__file__).resolve().parents[1]
EVENTS = ROOT / "events"
CONNECTED_AT = 1764103500.0  # events/generate.py's CONNECTED_AT_MS

APP = load_api_app()


def admin(key: str = ADMIN_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_problem(response: Any, status: int, code: str) -> dict[str, Any]:
    """The answer is an RFC 9457 problem with this status and code."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["type"] == f"urn:rejoin:problem:{code}"
    assert body["status"] == status and body["code"] == code
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert "Traceback" not in response.text
    return body


def session_keys(raw_redis: redis.Redis, session: str) -> list[str]:
    return sorted(raw_redis.keys(f"rejoin:{{{session}}}:*"))


@pytest.fixture
def stack(upstash: Any) -> Iterator[Stack]:
    s = make_stack(upstash, admin_key=ADMIN_KEY)
    yield s
    set_runtime(None)


@pytest.fixture
def client(stack: Stack) -> Iterator[TestClient]:
    with TestClient(APP) as c:
        yield c


# --- health -------------------------------------------------------------------------


class TestHealth:
    def test_health_needs_no_credentials_and_no_store(self, client: TestClient, upstash: Any):
        # GIVEN the store's request count
        before = upstash.stats.snapshot()["total_requests"]
        # WHEN /health is called without credentials
        response = client.get("/health")
        # THEN it is ok, and the store was not asked
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}
        assert response.headers["cache-control"] == "no-store"
        assert upstash.stats.snapshot()["total_requests"] == before

    def test_ready_pings_the_store(self, client: TestClient, upstash: Any):
        before = upstash.stats.snapshot()["total_requests"]
        response = client.get("/ready")
        assert response.status_code == 200
        assert response.json() == {"status": "ready"}
        assert upstash.stats.snapshot()["total_requests"] > before

    def test_ready_is_a_503_problem_when_the_store_fails(self, client: TestClient, upstash: Any):
        # GIVEN a store that answers every request with 503
        upstash.faults.fail(503, times=10)
        # WHEN readiness is checked
        response = client.get("/ready")
        # THEN it is a store_unavailable problem
        assert_problem(response, 503, "store_unavailable")


# --- creating sessions ----------------------------------------------------------------


class TestCreate:
    def test_creates_a_session_before_anyone_joins(self, client: TestClient, stack: Stack):
        # WHEN the admin creates a session in meeting mode
        response = client.post(
            "/sessions", json={"session_id": "s-new", "mode": "addressed"}, headers=admin()
        )
        # THEN it is created, waiting one grace period for its first connection
        assert response.status_code == 201, response.text
        body = response.json()
        now_ms = int(stack.clock() * 1000)
        assert body == {
            "session_id": "s-new",
            "epoch": body["epoch"],
            "created": True,
            "mode": "addressed",
            "grace_deadline_ms": now_ms + stack.settings.grace_seconds * 1000,
        }
        # AND the first participant joins that very session (same epoch, its mode)
        _cid, welcome = stack.join("s-new", "ada")
        assert welcome["epoch"] == body["epoch"]
        assert welcome["mode"] == "addressed"

    def test_a_live_session_is_answered_200_and_left_unchanged(
        self, client: TestClient, stack: Stack
    ):
        # GIVEN a session someone is in
        first = client.post("/sessions", json={"session_id": "s-live"}, headers=admin()).json()
        stack.join("s-live", "ada")
        # WHEN it is created again, asking for another mode
        response = client.post(
            "/sessions", json={"session_id": "s-live", "mode": "addressed"}, headers=admin()
        )
        # THEN nothing changes: 200, created false, same epoch and mode, no deadline
        assert response.status_code == 200
        body = response.json()
        assert body["created"] is False
        assert body["epoch"] == first["epoch"]
        assert body["mode"] == stack.settings.reply_mode == "every"
        assert body["grace_deadline_ms"] is None

    def test_without_a_body_an_id_is_generated(self, client: TestClient):
        response = client.post("/sessions", headers=admin())
        assert response.status_code == 201, response.text
        session_id = response.json()["session_id"]
        assert re.fullmatch(r"[A-Za-z0-9_-]{16}", session_id)
        assert client.get(f"/sessions/{session_id}", headers=admin()).json()["state"] == "grace"

    def test_an_expired_session_is_created_afresh(self, client: TestClient, stack: Stack):
        # GIVEN a created session nobody joined within the grace period
        old = client.post("/sessions", json={"session_id": "s-old"}, headers=admin()).json()
        stack.clock.advance(stack.settings.grace_seconds)
        # WHEN it is created again
        response = client.post("/sessions", json={"session_id": "s-old"}, headers=admin())
        # THEN it is a new session
        assert response.status_code == 201
        assert response.json()["epoch"] != old["epoch"]

    @pytest.mark.parametrize("bad_id", ["has space", "x" * 129, "a:b", "{tag}", ""])
    def test_invalid_session_id_is_refused_and_nothing_is_stored(
        self, client: TestClient, raw_redis: redis.Redis, bad_id: str
    ):
        response = client.post("/sessions", json={"session_id": bad_id}, headers=admin())
        body = assert_problem(response, 400, "invalid_session_id")
        assert [e["field"] for e in body["errors"]] == ["body.session_id"]
        assert raw_redis.keys("*") == []

    def test_unknown_fields_and_bad_mode_are_invalid_requests(self, client: TestClient):
        response = client.post(
            "/sessions",
            json={"session": "demo", "participants": [], "mode": "sometimes"},
            headers=admin(),
        )
        body = assert_problem(response, 400, "invalid_request")
        fields = {e["field"] for e in body["errors"]}
        assert fields == {"body.session", "body.participants", "body.mode"}

    def test_malformed_json_is_an_invalid_request(self, client: TestClient):
        response = client.post(
            "/sessions",
            content=b'{"session_id": ',
            headers={**admin(), "content-type": "application/json"},
        )
        assert_problem(response, 400, "invalid_request")


# --- tokens ---------------------------------------------------------------------------


class TestTokens:
    def test_a_minted_token_joins_its_session(self, client: TestClient, stack: Stack):
        # WHEN the admin mints a token for Ada
        response = client.post(
            "/sessions/s-tok/tokens",
            json={"user_id": "u-ada", "name": "  Ada Lovelace ", "ttl_seconds": 600},
            headers=admin(),
        )
        assert response.status_code == 200, response.text
        body = response.json()
        # THEN it is signed with the configured secret, for this session and user
        claims = jwt.decode(
            body["token"],
            SECRET,
            algorithms=["HS256"],
            audience="rejoin",
            options={"verify_exp": False},
        )
        assert claims["sid"] == "s-tok" and claims["sub"] == "u-ada"
        assert claims["name"] == "Ada Lovelace"
        assert body["expires_at"] == claims["exp"] == int(stack.clock()) + 600
        assert body["connect_url_hint"].startswith("?session=s-tok&token=")
        assert response.headers["cache-control"] == "no-store"
        # AND it connects to that session as Ada
        status, cid = stack.connect("s-tok", "ignored", token=body["token"])
        assert status == 200
        welcome = stack.resume(cid)
        assert welcome["you"]["user"] == "u-ada" and welcome["you"]["name"] == "Ada Lovelace"
        # AND it does not connect to another session
        status, _ = stack.connect("s-other", "ignored", token=body["token"])
        assert status == 403

    def test_the_hint_names_the_websocket_endpoint(self, upstash: Any):
        endpoint = "https://a1b2c3d4e5.execute-api.us-east-1.amazonaws.com/dev"
        make_stack(upstash, admin_key=ADMIN_KEY, ws_endpoint=endpoint)
        try:
            with TestClient(APP) as c:
                response = c.post(
                    "/sessions/s-1/tokens", json={"user_id": "u", "name": "U"}, headers=admin()
                )
            hint = response.json()["connect_url_hint"]
            assert hint.startswith(
                "wss://a1b2c3d4e5.execute-api.us-east-1.amazonaws.com/dev?session=s-1&token=ey"
            )
        finally:
            set_runtime(None)

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ({"user_id": "u", "name": "U", "ttl_seconds": 12 * 3600 + 1}, "body.ttl_seconds"),
            ({"user_id": "u", "name": "U", "ttl_seconds": 0}, "body.ttl_seconds"),
            ({"user_id": "u u", "name": "U"}, "body.user_id"),
            ({"user_id": "u", "name": ""}, "body.name"),
            ({"user_id": "u"}, "body.name"),
        ],
    )
    def test_invalid_requests_name_the_field(
        self, client: TestClient, body: dict[str, Any], field: str
    ):
        response = client.post("/sessions/s-1/tokens", json=body, headers=admin())
        problem = assert_problem(response, 400, "invalid_request")
        assert [e["field"] for e in problem["errors"]] == [field]

    def test_a_name_that_is_not_printable_is_refused(self, client: TestClient):
        response = client.post(
            "/sessions/s-1/tokens", json={"user_id": "u", "name": "A\u0000da"}, headers=admin()
        )
        assert_problem(response, 400, "invalid_request")

    def test_not_minted_when_tokens_come_from_a_jwks_url(self, upstash: Any):
        make_stack(upstash, admin_key=ADMIN_KEY, jwks_url="https://idp.example/jwks.json")
        try:
            with TestClient(APP) as c:
                response = c.post(
                    "/sessions/s-1/tokens", json={"user_id": "u", "name": "U"}, headers=admin()
                )
            assert_problem(response, 409, "tokens_not_minted_here")
        finally:
            set_runtime(None)


# --- status ---------------------------------------------------------------------------


class TestStatus:
    def test_status_shows_presence_of_participants_who_joined(
        self, client: TestClient, stack: Stack
    ):
        # GIVEN Ada and Bob joined through the WebSocket handlers, and Bob dropped
        ada, welcome = stack.join("s-status", "ada")
        bob, _ = stack.join("s-status", "bob")
        stack.say(ada, "hello")
        stack.drop(bob)
        # WHEN the admin, and Ada with her token, read the status
        for headers in (admin(), bearer(stack.token("s-status", "ada"))):
            response = client.get("/sessions/s-status", headers=headers)
            # THEN it is active, Ada is active, Bob away, one connection open
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["session_id"] == "s-status"
            assert body["epoch"] == welcome["epoch"]
            assert body["state"] == "active" and body["connections"] == 1
            assert body["participants"] == [
                {"user": "ada", "name": "Ada", "status": "active"},
                {"user": "bob", "name": "Bob", "status": "away"},
            ]
            assert body["grace_deadline_ms"] is None
            assert body["mode"] == "every"
            # presence ada, presence bob, message, presence bob away
            assert body["seq"] == 4

    def test_when_everyone_is_gone_it_is_in_grace_then_gone(self, client: TestClient, stack: Stack):
        ada, _ = stack.join("s-grace", "ada")
        stack.drop(ada)
        deadline = int(stack.clock() * 1000) + stack.settings.grace_seconds * 1000
        body = client.get("/sessions/s-grace", headers=admin()).json()
        assert body["state"] == "grace" and body["connections"] == 0
        assert body["grace_deadline_ms"] == deadline
        assert body["participants"] == [{"user": "ada", "name": "Ada", "status": "away"}]
        # WHEN the deadline passes (whether or not the cleanup ran)
        stack.clock.advance(stack.settings.grace_seconds)
        # THEN the session is not found, even for its participant
        response = client.get("/sessions/s-grace", headers=bearer(stack.token("s-grace", "ada")))
        assert_problem(response, 404, "session_not_found")

    def test_a_session_that_never_existed_is_not_found(self, client: TestClient):
        assert_problem(client.get("/sessions/nope", headers=admin()), 404, "session_not_found")

    def test_another_sessions_token_is_forbidden(self, client: TestClient, stack: Stack):
        stack.join("s-a", "ada")
        response = client.get("/sessions/s-a", headers=bearer(stack.token("s-b", "mallory")))
        body = assert_problem(response, 403, "forbidden")
        assert "ada" not in json.dumps(body).lower()

    def test_invalid_session_id_in_the_path(self, client: TestClient):
        response = client.get("/sessions/not%20valid", headers=admin())
        body = assert_problem(response, 400, "invalid_session_id")
        assert [e["field"] for e in body["errors"]] == ["path.session_id"]

    def test_a_store_failure_is_a_503_problem(self, client: TestClient, upstash: Any):
        upstash.faults.fail(503, times=10)
        response = client.get("/sessions/s-x", headers=admin())
        body = assert_problem(response, 503, "store_unavailable")
        assert "Upstash" not in body["detail"]


# --- transcript -----------------------------------------------------------------------


class TestTranscript:
    @pytest.fixture
    def chat(self, upstash: Any) -> Iterator[Stack]:
        """A session where Ada and Bob talked with the (offline) agent."""
        s = make_stack(upstash, admin_key=ADMIN_KEY, agent=offline_agent())
        ada, _ = s.join("s-chat", "ada")
        bob, _ = s.join("s-chat", "bob")
        s.say(ada, "hello agent", msg_id="c-1")
        s.run_turns()
        s.say(bob, "hi all", msg_id="c-2")
        s.drop(bob)
        yield s
        set_runtime(None)

    def test_a_participant_reads_the_transcript_of_their_session(self, chat: Stack):
        with TestClient(APP) as c:
            response = c.get(
                "/sessions/s-chat/transcript", headers=bearer(chat.token("s-chat", "bob"))
            )
        assert response.status_code == 200, response.text
        assert response.headers["cache-control"] == "no-store"
        body = response.json()
        events = body["events"]
        # THEN every logged event of the epoch, in order, with no gaps
        assert [e["seq"] for e in events] == list(range(1, body["seq"] + 1))
        assert body["truncated"] is False
        kinds = [(e["type"], e.get("user"), e.get("status") or e.get("text")) for e in events]
        assert kinds[:4] == [
            ("presence", "ada", "active"),
            ("presence", "bob", "active"),
            ("message", "ada", "hello agent"),
            ("agent_message", None, events[3]["text"]),
        ]
        assert events[3]["turn"] == "3" and events[3]["reply_to"] == 3
        assert events[3]["text"].startswith("[offline model]")
        assert kinds[4:] == [("message", "bob", "hi all"), ("presence", "bob", "away")]

    def test_the_admin_may_read_it_too(self, chat: Stack):
        with TestClient(APP) as c:
            response = c.get("/sessions/s-chat/transcript", headers=admin())
        assert response.status_code == 200
        assert any(e.get("text") == "hi all" for e in response.json()["events"])

    def test_another_sessions_token_is_forbidden_and_sees_nothing(self, chat: Stack):
        # GIVEN Mallory has a valid token, for her own session
        chat.join("s-mallory", "mallory")
        token = chat.token("s-mallory", "mallory")
        with TestClient(APP) as c:
            response = c.get("/sessions/s-chat/transcript", headers=bearer(token))
        body = assert_problem(response, 403, "forbidden")
        assert "hello agent" not in response.text and "events" not in body

    @pytest.mark.parametrize(
        "headers",
        [
            {},
            {"Authorization": "Bearer garbage"},
            {"Authorization": "Bearer a.b.c"},
            {"Authorization": "Basic dXNlcjpwYXNz"},
            {"Authorization": "Bearer"},
            {"Authorization": "Bearer " + "x" * 9000},
        ],
        ids=["none", "garbage", "not-a-jwt", "basic", "empty", "huge"],
    )
    def test_no_or_garbage_credentials_are_unauthorized(self, chat: Stack, headers: dict[str, str]):
        with TestClient(APP) as c:
            response = c.get("/sessions/s-chat/transcript", headers=headers)
        assert_problem(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "hello agent" not in response.text

    def test_forged_and_expired_tokens_are_unauthorized(self, chat: Stack):
        forged = jwt.encode(
            {
                "sub": "eve",
                "name": "Eve",
                "sid": "s-chat",
                "iat": int(chat.clock()),
                "exp": int(chat.clock()) + 60,
                "aud": "rejoin",
            },
            "another-signing-key-0123456789-abcdefghij",
            algorithm="HS256",
        )
        expired = chat.token("s-chat", "ada", ttl=60)
        chat.clock.advance(61)
        with TestClient(APP) as c:
            for token in (forged, expired):
                response = c.get("/sessions/s-chat/transcript", headers=bearer(token))
                assert_problem(response, 401, "unauthorized")

    def test_the_admin_key_of_the_wrong_length_is_not_a_prefix_match(self, chat: Stack):
        with TestClient(APP) as c:
            for key in (ADMIN_KEY[:-1], ADMIN_KEY + "x", ADMIN_KEY.upper()):
                response = c.get("/sessions/s-chat/transcript", headers=admin(key))
                assert_problem(response, 401, "unauthorized")


# --- ending a session -------------------------------------------------------------------


class TestEnd:
    def test_end_tells_and_closes_connections_and_deletes_everything(
        self, client: TestClient, stack: Stack, raw_redis: redis.Redis
    ):
        # GIVEN Ada and Bob in a session, and Carol who connected but never resumed
        ada, _ = stack.join("s-end", "ada")
        bob, _ = stack.join("s-end", "bob")
        _, carol = stack.connect("s-end", "carol")
        stack.say(ada, "hello")
        other, _ = stack.join("s-other", "olga")
        assert session_keys(raw_redis, "s-end")
        # WHEN the admin ends it
        response = client.delete("/sessions/s-end", headers=admin())
        # THEN 204, and every connection got `ended`, then was closed
        assert response.status_code == 204 and response.content == b""
        for cid in (ada, bob, carol):
            assert stack.frames(cid)[-1] == {"type": "ended", "reason": "ended_by_api"}
            assert asyncio.run(stack.sender.exists(cid)) is False
        # AND nothing of the session is left but the record that revokes its tokens
        assert session_keys(raw_redis, "s-end") == ["rejoin:{s-end}:revoked"]
        assert raw_redis.zscore("rejoin:schedule", "s-end") is None
        assert_problem(client.get("/sessions/s-end", headers=admin()), 404, "session_not_found")
        assert_problem(client.delete("/sessions/s-end", headers=admin()), 404, "session_not_found")
        # AND the other session is untouched
        assert {"type": "ended", "reason": "ended_by_api"} not in stack.frames(other)
        assert client.get("/sessions/s-other", headers=admin()).json()["connections"] == 1
        # AND the late $disconnect events bring nothing back
        for cid in (ada, bob, carol):
            stack.drop(cid)
        assert session_keys(raw_redis, "s-end") == ["rejoin:{s-end}:revoked"]

    def test_after_the_end_the_same_id_starts_fresh(self, client: TestClient, stack: Stack):
        old = stack.token("s-again", "ada")
        ada, welcome = stack.join("s-again", "ada")
        stack.say(ada, "before the end")
        client.delete("/sessions/s-again", headers=admin())
        stack.clock.advance(1)
        # the tokens of the ended session are revoked; a new one starts afresh
        assert stack.connect("s-again", "ada", token=old)[0] == 403
        _, fresh = stack.join("s-again", "ada")
        assert fresh["resumed"] is False and fresh["epoch"] != welcome["epoch"]
        texts = [e.get("text") for e in fresh["transcript"]]
        assert "before the end" not in texts

    def test_ending_a_session_that_does_not_exist_is_404(self, client: TestClient):
        assert_problem(client.delete("/sessions/nope", headers=admin()), 404, "session_not_found")


# --- removing a participant ------------------------------------------------------------


class TestRemoveParticipant:
    def test_removed_participant_is_closed_and_their_tokens_refused(
        self, client: TestClient, stack: Stack
    ):
        # GIVEN Ada and Mallory (in two tabs) in a session, and Mallory's token
        old = stack.token("s-kick", "mallory")
        ada, _ = stack.join("s-kick", "ada")
        mal1, _ = stack.join("s-kick", "mallory")
        mal2, _ = stack.join("s-kick", "mallory")
        # WHEN the admin removes Mallory
        response = client.delete("/sessions/s-kick/participants/mallory", headers=admin())
        assert response.status_code == 204, response.text
        # THEN both her connections were told, then closed
        for cid in (mal1, mal2):
            assert stack.frames(cid)[-1] == {"type": "ended", "reason": "removed"}
            assert asyncio.run(stack.sender.exists(cid)) is False
        # AND Ada saw her removed, once
        removed = [p for p in stack.frames(ada, "presence") if p["status"] == "removed"]
        assert [(p["user"]) for p in removed] == ["mallory"]
        # AND her tokens issued until now are refused: to connect and to read
        stack.clock.advance(1)
        assert stack.connect("s-kick", "mallory", token=old)[0] == 403
        got = client.get("/sessions/s-kick/transcript", headers=bearer(old))
        assert_problem(got, 403, "forbidden")
        # AND a token minted for her afterwards works again (the admin let her back)
        assert stack.connect("s-kick", "mallory")[0] == 200
        # AND the session goes on for the others
        assert stack.say(ada, "still here")["type"] == "ack"

    def test_removing_from_a_session_that_does_not_exist_is_404(self, client: TestClient):
        response = client.delete("/sessions/nope/participants/ada", headers=admin())
        assert_problem(response, 404, "session_not_found")

    def test_only_the_admin_removes(self, client: TestClient, stack: Stack):
        stack.join("s-kick2", "ada")
        token = stack.token("s-kick2", "ada")
        response = client.delete("/sessions/s-kick2/participants/ada", headers=bearer(token))
        assert_problem(response, 401, "unauthorized")
        assert client.get("/sessions/s-kick2", headers=admin()).json()["connections"] == 1

    @pytest.mark.parametrize("revoke", ["end", "remove"])
    def test_a_token_minted_in_the_second_of_a_revocation_works(
        self, client: TestClient, stack: Stack, revoke: str
    ):
        """GIVEN a session whose end (or Ada's removal) was recorded at 12.5 s past a second
        WHEN the admin starts it again and mints Ada a token in that same second
        THEN the token the API hands out connects and reads (it is not born revoked),
        while Ada's token from before the revocation stays refused.
        """
        stack.clock.advance(0.5 - stack.clock() % 1)  # half-way through a second
        old = stack.token("s-same-second", "ada")
        stack.join("s-same-second", "ada")
        if revoke == "end":
            assert client.delete("/sessions/s-same-second", headers=admin()).status_code == 204
            created = client.post(
                "/sessions", json={"session_id": "s-same-second"}, headers=admin()
            )
            assert created.status_code == 201, created.text
        else:
            gone = client.delete("/sessions/s-same-second/participants/ada", headers=admin())
            assert gone.status_code == 204
        minted = client.post(
            "/sessions/s-same-second/tokens",
            json={"user_id": "ada", "name": "Ada"},
            headers=admin(),
        )
        assert minted.status_code == 200, minted.text
        fresh = minted.json()["token"]
        got = client.get("/sessions/s-same-second/transcript", headers=bearer(fresh))
        assert got.status_code == 200, got.text
        assert stack.connect("s-same-second", "ada", token=fresh)[0] == 200
        assert stack.connect("s-same-second", "ada", token=old)[0] == 403

    def test_after_the_end_old_tokens_cannot_read_the_next_epoch(
        self, client: TestClient, stack: Stack
    ):
        old = stack.token("s-next", "ada")
        stack.join("s-next", "ada")
        client.delete("/sessions/s-next", headers=admin())
        stack.clock.advance(1)
        bob, _ = stack.join("s-next", "bob")
        stack.say(bob, "the next meeting's secret")
        got = client.get("/sessions/s-next/transcript", headers=bearer(old))
        assert_problem(got, 403, "forbidden")
        assert "secret" not in got.text


# --- the admin credential ---------------------------------------------------------------

ADMIN_ROUTES = [
    ("POST", "/sessions", {"session_id": "s-guarded"}),
    ("DELETE", "/sessions/s-guarded/participants/ada", None),
    ("POST", "/sessions/s-guarded/tokens", {"user_id": "u", "name": "U"}),
    ("DELETE", "/sessions/s-guarded", None),
]


class TestAdminCredential:
    @pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
    def test_admin_routes_refuse_a_missing_or_wrong_key(
        self,
        client: TestClient,
        stack: Stack,
        raw_redis: redis.Redis,
        method: str,
        path: str,
        body: Any,
    ):
        # GIVEN a live session, so a refused DELETE would show
        stack.join("s-guarded", "ada")
        keys = session_keys(raw_redis, "s-guarded")
        participant = stack.token("s-guarded", "ada")
        for headers in ({}, admin("wrong"), bearer(participant), {"Authorization": ADMIN_KEY}):
            response = client.request(method, path, json=body, headers=headers)
            assert_problem(response, 401, "unauthorized")
            assert response.headers["www-authenticate"].startswith("Bearer")
        # THEN nothing was changed
        assert session_keys(raw_redis, "s-guarded") == keys

    @pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
    def test_admin_routes_are_closed_when_no_key_is_configured(
        self, upstash: Any, method: str, path: str, body: Any
    ):
        # GIVEN a deployment without an admin key
        make_stack(upstash, admin_key=None)
        try:
            with TestClient(APP) as c:
                for headers in ({}, admin(""), admin("anything"), admin("None")):
                    response = c.request(method, path, json=body, headers=headers)
                    # THEN admin routes answer 503, never open
                    assert_problem(response, 503, "admin_not_configured")
        finally:
            set_runtime(None)

    def test_participants_still_read_their_session_without_an_admin_key(self, upstash: Any):
        stack = make_stack(upstash, admin_key=None)
        try:
            stack.join("s-1", "ada")
            with TestClient(APP) as c:
                response = c.get("/sessions/s-1", headers=bearer(stack.token("s-1", "ada")))
                assert response.status_code == 200
                assert_problem(c.get("/sessions/s-1"), 401, "unauthorized")
        finally:
            set_runtime(None)


# --- errors -----------------------------------------------------------------------------


class TestErrors:
    def test_unknown_route_and_method_are_problems(self, client: TestClient):
        assert_problem(client.get("/nope"), 404, "not_found")
        assert_problem(client.get("/sessions/"), 404, "not_found")
        response = client.put("/sessions/s-1", headers=admin())
        assert_problem(response, 405, "method_not_allowed")
        assert "GET" in response.headers["allow"]

    def test_an_unexpected_error_is_a_500_problem_that_leaks_nothing(
        self,
        client: TestClient,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ):
        # GIVEN a bug deep in the API
        secret = "secret internals /srv/app.py line 42"

        async def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(secret)

        monkeypatch.setattr(api_routes, "session_status", broken)
        # WHEN a route runs into it
        response = client.get("/sessions/s-1", headers=admin())
        # THEN a 500 problem without the exception's text
        assert_problem(response, 500, "internal")
        assert secret not in response.text
        # AND the error is logged with its type and where, not its message
        [record] = [r for r in caplog.records if r.getMessage() == "unexpected error"]
        assert record.levelname == "ERROR"
        assert record.error == "RuntimeError"  # type: ignore[attr-defined]
        assert record.stack[-1].startswith("test_api.py:")  # type: ignore[attr-defined]
        assert record.stack[-1].endswith(" in broken")  # type: ignore[attr-defined]
        assert secret not in caplog.text and secret not in repr(record.__dict__)

    def test_the_openapi_schema_documents_problems_and_credentials(self):
        schema = APP.openapi()
        assert set(schema["components"]["securitySchemes"]) == {"AdminKey", "ParticipantToken"}
        for path, operations in schema["paths"].items():
            for method, operation in operations.items():
                assert operation.get("summary"), (method, path)
                assert "422" not in operation["responses"]
                for status, answer in operation["responses"].items():
                    if int(status) >= 400:
                        assert list(answer["content"]) == ["application/problem+json"]
        transcript = schema["paths"]["/sessions/{session_id}/transcript"]["get"]
        assert transcript["security"] == [{"AdminKey": []}, {"ParticipantToken": []}]
        assert schema["paths"]["/sessions"]["post"]["security"] == [{"AdminKey": []}]


# --- strict types (issue 9): no bool for an integer, no string for a number ------------


def mint(client: TestClient, body: Any, session: str = "s-1") -> Any:
    return client.post(f"/sessions/{session}/tokens", json=body, headers=admin())


class TestStrictTypes:
    def test_ttl_seconds_true_is_not_a_one_second_token(self, client: TestClient):
        # GIVEN the attack: `"ttl_seconds": true`, as raw JSON
        response = client.post(
            "/sessions/s-1/tokens",
            content=b'{"user_id": "u", "name": "U", "ttl_seconds": true}',
            headers={**admin(), "content-type": "application/json"},
        )
        # THEN a 400 problem naming the field and the boolean, and no token
        problem = assert_problem(response, 400, "invalid_request")
        assert problem["errors"] == [
            {
                "field": "body.ttl_seconds",
                "message": "Input should be a valid integer, not a boolean",
                "type": "int_type",
            }
        ]
        assert "token" not in problem

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ({"user_id": "u", "name": "U", "ttl_seconds": False}, "body.ttl_seconds"),
            ({"user_id": "u", "name": "U", "ttl_seconds": "600"}, "body.ttl_seconds"),
            ({"user_id": "u", "name": "U", "ttl_seconds": "1e3"}, "body.ttl_seconds"),
            ({"user_id": "u", "name": "U", "ttl_seconds": 600.5}, "body.ttl_seconds"),
            ({"user_id": "u", "name": "U", "ttl_seconds": None}, "body.ttl_seconds"),
            ({"user_id": "u", "name": "U", "ttl_seconds": [600]}, "body.ttl_seconds"),
            ({"user_id": "u", "name": "U", "ttl_seconds": {"s": 600}}, "body.ttl_seconds"),
            ({"user_id": 42, "name": "U"}, "body.user_id"),
            ({"user_id": True, "name": "U"}, "body.user_id"),
            ({"user_id": "u", "name": 42}, "body.name"),
            ({"user_id": "u", "name": False}, "body.name"),
            ({"user_id": "u", "name": None}, "body.name"),
        ],
    )
    def test_a_token_request_takes_exact_json_types(
        self, client: TestClient, body: dict[str, Any], field: str
    ):
        # GIVEN a body with one field of the wrong JSON type / WHEN minting
        response = mint(client, body)
        # THEN 400 invalid_request naming exactly that field, and no token
        problem = assert_problem(response, 400, "invalid_request")
        assert [e["field"] for e in problem["errors"]] == [field]
        assert "token" not in problem and "eyJ" not in response.text

    def test_an_integral_number_is_an_integer(self, client: TestClient, stack: Stack):
        # GIVEN 600.0: a JSON number without a fraction is an integer (JSON Schema's rule)
        response = mint(client, {"user_id": "u", "name": "U", "ttl_seconds": 600.0})
        # THEN it is taken as 600 seconds
        assert response.status_code == 200, response.text
        assert response.json()["expires_at"] == int(stack.clock()) + 600

    @pytest.mark.parametrize(
        ("body", "code", "field"),
        [
            ({"session_id": 42}, "invalid_session_id", "body.session_id"),
            ({"session_id": True}, "invalid_session_id", "body.session_id"),
            ({"session_id": "s-1", "mode": True}, "invalid_request", "body.mode"),
            ({"session_id": "s-1", "mode": 1}, "invalid_request", "body.mode"),
        ],
    )
    def test_a_session_request_takes_exact_json_types(
        self,
        client: TestClient,
        raw_redis: redis.Redis,
        body: dict[str, Any],
        code: str,
        field: str,
    ):
        # GIVEN a number or a bool where a string is expected / WHEN creating a session
        response = client.post("/sessions", json=body, headers=admin())
        # THEN a 400 naming the field, and nothing is stored
        problem = assert_problem(response, 400, code)
        assert [e["field"] for e in problem["errors"]] == [field]
        assert raw_redis.keys("*") == []


# --- token lifetime (issue 9): bounded by the deployment's maximum ----------------------


class TestTokenLifetime:
    def test_the_default_maximum_is_twelve_hours(self, client: TestClient, stack: Stack):
        # GIVEN a deployment with the default maximum lifetime
        assert stack.settings.token_max_ttl_seconds == 12 * 3600
        # WHEN a token for exactly 12 h is minted / THEN it is issued and connects
        response = mint(client, {"user_id": "u-ada", "name": "Ada", "ttl_seconds": 12 * 3600})
        assert response.status_code == 200, response.text
        assert response.json()["expires_at"] == int(stack.clock()) + 12 * 3600
        status, _ = stack.connect("s-1", "ignored", token=response.json()["token"])
        assert status == 200
        # AND one second more, or a hundred years, is a 400 naming the maximum
        for ttl in (12 * 3600 + 1, 100 * 365 * 24 * 3600):
            problem = assert_problem(
                mint(client, {"user_id": "u", "name": "U", "ttl_seconds": ttl}),
                400,
                "invalid_request",
            )
            assert problem["errors"][0]["field"] == "body.ttl_seconds"
            assert (
                "43200" in problem["detail"] and "REJOIN_TOKEN_MAX_TTL_SECONDS" in problem["detail"]
            )

    def test_a_lower_maximum_bounds_the_default_and_the_request(self, upstash: Any):
        # GIVEN a deployment whose tokens live at most 10 minutes
        stack = make_stack(upstash, admin_key=ADMIN_KEY, token_max_ttl_seconds=600)
        try:
            with TestClient(APP) as c:
                # WHEN a token is minted without a ttl / THEN it lives the maximum, not 1 h
                body = mint(c, {"user_id": "u", "name": "U"}).json()
                claims = jwt.decode(
                    body["token"], SECRET, algorithms=["HS256"], audience="rejoin",
                    options={"verify_exp": False},
                )  # fmt: skip
                assert claims["exp"] - claims["iat"] == 600
                assert claims["iat"] == int(stack.clock())
                # AND 601 s is refused, 600 s is issued
                assert_problem(
                    mint(c, {"user_id": "u", "name": "U", "ttl_seconds": 601}),
                    400,
                    "invalid_request",
                )
                assert mint(c, {"user_id": "u", "name": "U", "ttl_seconds": 600}).status_code == 200
        finally:
            set_runtime(None)

    def test_long_lived_and_future_tokens_are_refused_at_connect(
        self, stack: Stack, raw_redis: redis.Redis
    ):
        # GIVEN the two tokens, signed with the deployment's own key: valid for a
        # hundred years, and issued ten years from now
        now = int(stack.clock())
        century, decade = 100 * 365 * 24 * 3600, 10 * 365 * 24 * 3600
        for iat, exp in ((now, now + century), (now + decade, now + decade + 600)):
            claims = {"sub": "eve", "name": "Eve", "sid": "s-1", "iat": iat, "exp": exp}
            token = jwt.encode({**claims, "aud": "rejoin"}, SECRET, algorithm="HS256")
            # WHEN $connect is called with it
            status, _ = stack.connect("s-1", "eve", token=token)
            # THEN 401, and nothing is stored
            assert status == 401
            assert raw_redis.keys("rejoin:*") == []

    def test_a_hundred_year_token_reads_nothing(self, client: TestClient, stack: Stack):
        # GIVEN a live session, and tokens signed with the deployment's own key that
        # live a hundred years, or were issued ten years from now
        stack.join("s-1", "ada")
        now = int(stack.clock())
        century = 100 * 365 * 24 * 3600
        decade = 10 * 365 * 24 * 3600
        for iat, exp, reason in (
            (now, now + century, "maximum"),
            (now + decade, now + decade + 600, "issued in the future"),
        ):
            claims = {"sub": "ada", "name": "Ada", "sid": "s-1", "iat": iat, "exp": exp}
            token = jwt.encode({**claims, "aud": "rejoin"}, SECRET, algorithm="HS256")
            # WHEN it reads the transcript / THEN 401, saying why, and nothing of the session
            response = client.get("/sessions/s-1/transcript", headers=bearer(token))
            problem = assert_problem(response, 401, "unauthorized")
            assert reason in problem["detail"] and token not in response.text
            assert "events" not in problem


# --- the docs (issue 9): off unless turned on, and then without a CDN --------------------

DOCS_PATHS = [
    "/docs",
    "/redoc",
    "/openapi.json",
    "/docs/oauth2-redirect",
    "/docs/assets/swagger-ui-bundle.js",
    "/docs/assets/swagger-init.js",
]


def deployed_api_env() -> dict[str, str]:
    """The ApiFunction's environment as template.yaml sets it with default parameters
    (values that need AWS, such as ARNs and URLs of created resources, left out)."""
    from test_template import env_of, load_template

    t = load_template()
    env: dict[str, str] = {}
    for var, value in env_of(t, "ApiFunction").items():
        if isinstance(value, str):
            env[var] = value
        elif isinstance(value, dict) and set(value) == {"Ref"}:
            default = t["Parameters"].get(value["Ref"], {}).get("Default")
            if default is not None:
                env[var] = str(default)
    return env


class _Links(HTMLParser):
    """Every URL a page loads or links to (src, href), and its inline scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        for name in ("src", "href", "spec-url", "data-openapi-url"):
            if found.get(name):
                self.urls.append(str(found[name]))
        if tag == "script" and not found.get("src"):
            self.inline_scripts += 1


class TestDocs:
    def test_the_deployed_default_is_off(self):
        # GIVEN the ApiFunction's environment as the template sets it by default
        env = deployed_api_env()
        # THEN the docs are off there
        assert env["REJOIN_API_DOCS"] == "false"
        assert Settings.from_env(env).api_docs is False

    @pytest.mark.parametrize("path", DOCS_PATHS)
    def test_off_every_docs_path_is_an_unknown_route(self, client: TestClient, path: str):
        # GIVEN a deployment with the docs off (the default) / WHEN any method asks for them
        unknown = client.get("/no-such-route").json()
        for method in ("GET", "HEAD", "POST", "PUT", "DELETE"):
            response = client.request(method, path, headers=admin())
            # THEN the same 404 as a path the API never had, even with the admin key
            assert response.status_code == 404, (method, response.text)
            if method != "HEAD":
                body = assert_problem(response, 404, "not_found")
                assert body == {**unknown, "detail": f"no route {path!r}"}
            assert "<html" not in response.text.lower() and '"paths"' not in response.text

    @pytest.mark.parametrize(
        ("value", "on"),
        [("1", True), ("true", True), ("YES", True), ("on", True), ("0", False),
         ("false", False), ("", False), ("off", False)],
    )  # fmt: skip
    def test_rejoin_api_docs_turns_them_on(self, value: str, on: bool):
        assert Settings.from_env({"REJOIN_API_DOCS": value}).api_docs is on

    def test_a_malformed_rejoin_api_docs_is_a_config_error(self):
        with pytest.raises(ConfigError, match="REJOIN_API_DOCS"):
            Settings.from_env({"REJOIN_API_DOCS": "maybe"})

    @pytest.fixture
    def docs(self, upstash: Any) -> Iterator[TestClient]:
        make_stack(upstash, admin_key=ADMIN_KEY, api_docs=True, token_max_ttl_seconds=7200)
        with TestClient(APP) as c:
            yield c
        set_runtime(None)

    def test_on_the_page_loads_only_packaged_assets(self, docs: TestClient):
        # WHEN the docs page is fetched with the docs on
        page = "/docs"
        response = docs.get(page)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        # THEN it names no URL outside this API: no scheme, no host, no CDN
        for marker in ("http:", "https:", "//", "cdn", "jsdelivr", "unpkg", "googleapis"):
            assert marker not in response.text.lower(), marker
        # AND it runs no inline script, under a policy that allows this origin only
        links = _Links()
        links.feed(response.text)
        assert links.inline_scripts == 0
        policy = response.headers["content-security-policy"]
        assert "script-src 'self';" in policy and "connect-src 'self';" in policy
        assert "default-src 'none'" in policy
        # AND every URL it loads is served here, with the right type
        kinds = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
        assert links.urls
        for url in links.urls:
            assert not urlsplit(url).scheme and not urlsplit(url).netloc, url
            asset = docs.get(urljoin(f"http://testserver{page}", url))
            assert asset.status_code == 200, url
            suffix = Path(urlsplit(url).path).suffix
            expected = kinds.get(suffix, "application/json")
            assert asset.headers["content-type"].startswith(expected), url

    def test_on_swagger_ui_is_the_packaged_bundle_without_the_validator(self, docs: TestClient):
        # GIVEN the package pinned in functions/api/requirements.txt
        pinned = (ROOT / "functions" / "api" / "requirements.txt").read_text()
        assert "fastapi-offline==" in pinned
        spec = importlib.util.find_spec("fastapi_offline")
        assert spec and spec.submodule_search_locations
        static = Path(next(iter(spec.submodule_search_locations))) / "static"
        # WHEN the bundle and the start-up script are fetched
        bundle = docs.get("/docs/assets/swagger-ui-bundle.js")
        init = docs.get("/docs/assets/swagger-init.js").text
        # THEN the bundle is the package's file, and the badge that would send the
        # schema's URL to validator.swagger.io is off
        assert bundle.content == (static / "swagger-ui-bundle.js").read_bytes()
        assert "validatorUrl: null" in init and "http" not in init
        assert "persistAuthorization: false" in init

    def test_on_the_schema_is_the_apps_with_the_deployments_maximum(self, docs: TestClient):
        # WHEN the schema is fetched from a deployment allowing 2-hour tokens
        served = docs.get("/openapi.json")
        assert served.status_code == 200
        schema = served.json()
        # THEN it is the app's schema, with that maximum for ttl_seconds
        ttl = schema["components"]["schemas"]["TokenRequest"]["properties"]["ttl_seconds"]
        assert ttl["maximum"] == 7200 and ttl["type"] == "integer"
        expected = APP.openapi()
        assert schema["paths"] == expected["paths"]
        # AND the app's own copy is untouched (other deployments' defaults)
        original = expected["components"]["schemas"]["TokenRequest"]["properties"]
        assert original["ttl_seconds"]["maximum"] == 12 * 3600

    @pytest.mark.parametrize(
        "path",
        [
            "/docs/assets/nope.js",
            "/docs/assets/swagger-ui-bundle.js.map",
            "/docs/assets/../app.py",
            "/docs/assets/%2e%2e/%2e%2e/requirements.txt",
            "/docs/assets/",
            "/docs/assets/redoc.standalone.js",
            "/docs/",
            "/redoc",
        ],
    )
    def test_on_nothing_else_is_served(self, docs: TestClient, path: str):
        assert_problem(docs.get(path), 404, "not_found")

    def test_on_where_the_app_is_mounted_the_links_follow(self, upstash: Any):
        # GIVEN the app mounted at /api (as the local stack mounts it), docs on
        make_stack(upstash, admin_key=ADMIN_KEY, api_docs=True)
        outer = Starlette(routes=[Mount("/api", app=APP)])
        try:
            with TestClient(outer) as c:
                # WHEN the page and the schema are fetched under /api
                page = c.get("/api/docs")
                schema = c.get("/api/openapi.json").json()
                links = _Links()
                links.feed(page.text)
                # THEN the page's assets resolve under /api, and "Try it out" calls /api
                for url in links.urls:
                    assert c.get(urljoin("http://testserver/api/docs", url)).status_code == 200
                assert schema["servers"] == [{"url": "/api"}]
        finally:
            set_runtime(None)

    def test_the_local_stack_turns_them_on(self, upstash: Any):
        # GIVEN the local stack's configuration (what `make dev` runs), and the README
        from rejoin_local.stack import StackConfig

        config = StackConfig(upstash_url=upstash.url, upstash_token=upstash.token, env={})
        # THEN its settings have the docs on, where the README says they are
        assert config.settings(upstash.url).api_docs is True
        assert "/api/docs" in (ROOT / "README.md").read_text()
        # AND an explicit REJOIN_API_DOCS=0 turns them off there too
        off = StackConfig(env={"REJOIN_API_DOCS": "0"}).settings(upstash.url)
        assert off.api_docs is False


# --- Lambda: Mangum with API Gateway HTTP API (payload 2.0) events ----------------------


def load_event(name: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((EVENTS / name).read_text())
    return event


def invoke(name_or_event: str | dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    """Call the API function's handler as Lambda does; (status, headers, JSON body)."""
    event = load_event(name_or_event) if isinstance(name_or_event, str) else name_or_event
    answer = load_handler("api")(event, None)
    assert answer["isBase64Encoded"] is False  # JSON and problem+json are text
    body = json.loads(answer["body"]) if answer.get("body") else None
    return answer["statusCode"], answer["headers"], body


@pytest.fixture
def lambda_stack(upstash: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    """A deployment configured as events/env.local.json configures `sam local invoke`."""
    env = json.loads((EVENTS / "env.local.json").read_text())["Parameters"]
    # No client retries: a client used on a loop it is not bound to fails loudly
    # instead of being retried quietly.
    monkeypatch.setattr(harness, "upstash_client", functools.partial(upstash_client, retries=0))
    s = make_stack(
        upstash,
        admin_key=env["REJOIN_ADMIN_KEY"],
        token_secret=env["REJOIN_TOKEN_SECRET"],
        # The sample token lives until 2100: only the local env's raised maximum takes it.
        token_max_ttl_seconds=int(env["REJOIN_TOKEN_MAX_TTL_SECONDS"]),
    )
    # The events' story happens at their connect time (the sample token is issued a
    # minute before it: earlier, it would be a token from the future).
    s.clock.t = CONNECTED_AT
    # Mangum runs the app on this thread's current event loop, while the
    # WebSocket handlers the harness calls run Runtime.run's loop on the same
    # thread: the API must not reuse a client bound to the other loop.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield s
    asyncio.set_event_loop(None)
    loop.close()
    set_runtime(None)


class TestLambda:
    def test_health_event(self, lambda_stack: Stack):
        status, headers, body = invoke("api-health.json")
        assert status == 200 and body == {"status": "ok"}
        assert headers["content-type"] == "application/json"

    def test_every_api_event_in_the_story_of_a_session(self, lambda_stack: Stack):
        # WHEN the admin creates demo-session and mints Ada's token (events/ as they are)
        status, _, created = invoke("api-create-session.json")
        assert status == 201 and created["session_id"] == "demo-session", created
        status, _, minted = invoke("api-mint-token.json")
        assert status == 200, minted
        # AND Ada connects with it
        code, cid = lambda_stack.connect("demo-session", "u-ada", token=minted["token"])
        assert code == 200
        assert lambda_stack.resume(cid)["epoch"] == created["epoch"]
        # THEN the status event shows her active
        status, _, body = invoke("api-status.json")
        assert status == 200, body
        assert body["state"] == "active" and body["epoch"] == created["epoch"]
        assert body["participants"] == [{"user": "u-ada", "name": "Ada", "status": "active"}]
        # AND the transcript event (Ada's token from events/) reads her session
        status, _, body = invoke("api-transcript.json")
        assert status == 200, body
        assert body["events"][0] == {**body["events"][0], "type": "presence", "user": "u-ada"}
        # AND the end event ends it: Ada is told, and her connection is closed
        status, _, body = invoke("api-end.json")
        assert status == 204 and body is None
        assert lambda_stack.frames(cid)[-1] == {"type": "ended", "reason": "ended_by_api"}
        status, headers, body = invoke("api-status.json")
        assert status == 404 and body["code"] == "session_not_found"
        assert headers["content-type"] == "application/problem+json"

    def test_ttl_seconds_true_is_refused_through_lambda(self, lambda_stack: Stack):
        # GIVEN the sample mint event with the attack in its body
        event = load_event("api-mint-token.json")
        event["body"] = json.dumps({"user_id": "u-ada", "name": "Ada", "ttl_seconds": True})
        event["headers"]["content-length"] = str(len(event["body"]))
        # WHEN the function handles it / THEN a 400 problem, no token
        status, headers, body = invoke(event)
        assert status == 400 and body["code"] == "invalid_request", body
        assert body["errors"][0]["field"] == "body.ttl_seconds"
        assert "token" not in body and headers["content-type"] == "application/problem+json"

    @pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/redoc"])
    def test_docs_are_off_through_lambda_as_deployed(self, lambda_stack: Stack, path: str):
        # GIVEN the function configured as the template deploys it (ApiDocs default)
        assert lambda_stack.settings.api_docs is Settings.from_env(deployed_api_env()).api_docs
        assert lambda_stack.settings.api_docs is False
        # WHEN an HTTP API event asks for the docs
        event = load_event("api-health.json")
        event["rawPath"] = event["requestContext"]["http"]["path"] = path
        event["pathParameters"] = {"proxy": path.lstrip("/")}
        status, headers, body = invoke(event)
        # THEN the same 404 as any unknown path, nothing of the schema
        assert status == 404 and body["code"] == "not_found", body
        assert headers["content-type"] == "application/problem+json"
        assert "paths" not in body

    def test_status_event_without_the_admin_key_is_refused(self, lambda_stack: Stack):
        event = load_event("api-status.json")
        event["headers"]["authorization"] = "Bearer not-the-key"
        status, headers, body = invoke(event)
        assert status == 401 and body["code"] == "unauthorized"
        assert headers["www-authenticate"].startswith("Bearer")


# --- schemathesis: every route against the app's own OpenAPI schema ---------------------

# Built by the app itself, in process (no network; /openapi.json is off by default).
# Eager: schemathesis' lazy fixture loader does not work with this pytest.
schema = schemathesis.openapi.from_dict(json.loads(json.dumps(APP.openapi())))
schema.app = APP
# The schema's `display-name` format: printable characters, not only spaces.
schemathesis.openapi.format(
    "display-name",
    st.text(
        st.characters(codec="utf-8", categories=["L", "M", "N", "P", "S"]) | st.just(" "),
        min_size=1,
        max_size=80,
    ).filter(lambda name: name.strip() != ""),
)


@pytest.fixture
def example_session(stack: Stack) -> Stack:
    """The deployment, with the session id the schema's examples use live."""
    stack.join("standup-42", "ada")
    return stack


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_openapi_conformance(case: Any, example_session: Stack) -> None:
    # WHEN schemathesis calls a route with data from its schema, with the admin key
    # THEN no 5xx, and every answer (status, content type, body, headers) is as documented
    case.call_and_validate(headers=admin())


# --- the docs in a real browser, offline (issue 9) ---------------------------------------

CHROMIUM = "/usr/bin/chromium"  # Debian's; `make test` installs it (scripts/ensure-chromium.sh)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update"]  # fmt: skip


@pytest.fixture
def local_stack(upstash: Any) -> Iterator[Any]:
    """The stack `make dev` runs (its own settings: docs on), on a free port."""
    import os

    from rejoin_local.stack import Stack as LocalStack
    from rejoin_local.stack import StackConfig

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "REJOIN_"))}
    config = StackConfig(port=0, upstash_url=upstash.url, upstash_token=upstash.token, env=env)
    stack = LocalStack(config)
    with stack.serve_in_thread() as urls:
        yield urls
    set_runtime(None)


@pytest.mark.browser
def test_the_local_docs_work_offline_in_chromium(local_stack: Any):
    """Everything the page asks for outside the stack is refused and recorded."""
    import os

    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("Chromium is not installed (scripts/ensure-chromium.sh installs it)")
    playwright = pytest.importorskip("playwright.sync_api")
    base = urlsplit(local_stack.http)
    outside: list[str] = []
    problems: list[str] = []

    def route(r: Any) -> None:
        if urlsplit(r.request.url).netloc == base.netloc:
            r.continue_()
        else:  # a CDN, a validator, a font service: the offline machine has none
            outside.append(r.request.url)
            r.abort()

    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context()
            context.set_default_timeout(15_000)
            context.route("**/*", route)
            tab = context.new_page()
            tab.on("console", lambda m: m.type == "error" and problems.append(m.text))
            tab.on("pageerror", lambda exc: problems.append(str(exc)))
            # WHEN the README's /api/docs is opened
            tab.goto(f"{local_stack.api}/docs")
            # THEN the page renders the API from packaged assets only
            tab.wait_for_selector(".swagger-ui .info .title:has-text('rejoin HTTP API')")
            tab.get_by_text("/sessions/{session_id}/tokens").first.wait_for()
            # AND "Try it out" reaches the API where the stack mounts it
            health = "#operations-health-get_health_health_get"
            tab.click(f"{health} .opblock-summary")
            tab.click(f"{health} button.try-out__btn")
            tab.click(f"{health} button.execute")
            tab.wait_for_selector(
                f"{health} .live-responses-table .response-col_status:has-text('200')"
            )
        finally:
            browser.close()
    # AND nothing was fetched from elsewhere, and no script or policy error happened
    assert outside == []
    assert problems == []
