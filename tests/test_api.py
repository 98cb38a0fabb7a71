"""The HTTP API (functions/api): the app as Lambda loads it, the real store behind
the Upstash-compatible endpoint, participants joining through the real WebSocket
handlers (the harness ``Stack``), Mangum with HTTP API events, and schemathesis
against the app's own OpenAPI schema.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import harness
import jwt
import pytest
import redis
import schemathesis
from fastapi.testclient import TestClient
from harness import SECRET, Stack, make_stack, offline_agent
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import rejoin.api as api_module
from rejoin import upstash_client
from rejoin.runtime import set_runtime
from rejoin_local.handlers import load_api_app, load_handler

ADMIN_KEY = "test-admin-key-0123456789-abcdefghijklmnop"
EVENTS = Path(__file__).resolve().parents[1] / "events"

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
            ({"user_id": "u", "name": "U", "ttl_seconds": 24 * 3600 + 1}, "body.ttl_seconds"),
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


# --- the admin credential ---------------------------------------------------------------

ADMIN_ROUTES = [
    ("POST", "/sessions", {"session_id": "s-guarded"}),
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

        monkeypatch.setattr(api_module, "session_status", broken)
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

    def test_the_openapi_schema_documents_problems_and_credentials(self, client: TestClient):
        schema = client.get("/openapi.json").json()
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
        upstash, admin_key=env["REJOIN_ADMIN_KEY"], token_secret=env["REJOIN_TOKEN_SECRET"]
    )
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

    def test_status_event_without_the_admin_key_is_refused(self, lambda_stack: Stack):
        event = load_event("api-status.json")
        event["headers"]["authorization"] = "Bearer not-the-key"
        status, headers, body = invoke(event)
        assert status == 401 and body["code"] == "unauthorized"
        assert headers["www-authenticate"].startswith("Bearer")


# --- schemathesis: every route against the app's own OpenAPI schema ---------------------

# Loaded from the app itself, in process (no network). Eager: schemathesis' lazy
# fixture loader does not work with this pytest.
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
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
