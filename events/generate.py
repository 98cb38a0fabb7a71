"""Write the sample events in events/ for ``sam local invoke`` and the built-artefact tests.

Run ``.venv/bin/python events/generate.py`` after changing anything below (or the turn
message format in ``rejoin.queue``); ``tests/test_built_artifacts.py`` fails while the
JSON files differ from what this script writes.

Every event is shaped exactly as the service sends it to Lambda: API Gateway WebSocket
(``$connect``, messages, ``$disconnect``), SQS FIFO (the turn batch), EventBridge
(the one-minute schedule) and API Gateway HTTP API payload format 2.0 (the HTTP API).
They all belong to one story: the authorizer admits Ada (``u-ada``) to
``demo-session``; she connects on connection ``L0SM9cOFvHcCIhw=``, resumes, says
hello (her message gets seq 3 and becomes turn ``3``), pings, asks the agent to
stop, leaves and disconnects; the cleanup runs; an admin uses the HTTP API. Every
event after the authorizer's carries its context in ``requestContext.authorizer``,
as API Gateway passes it on.

The participant token is a real HS256 JWT signed with the documented local key
(``LOCAL_SIGNING_KEY``, also in ``events/env.local.json``) that expires in 2100, so
``sam local invoke AuthorizeFunction -e events/authorize.json --env-vars
events/env.local.json`` passes authentication (``env.local.json`` raises the maximum
token lifetime, ``REJOIN_TOKEN_MAX_TTL_SECONDS``, for it). Never use that key anywhere
else.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

EVENTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(EVENTS_DIR.parent / "shared"))

from rejoin.queue import TurnRequest, dedup_id  # noqa: E402
from rejoin.tokens import mint_token  # noqa: E402

# --- the story's constants -------------------------------------------------------------

LOCAL_SIGNING_KEY = "local-dev-signing-key-change-me-0123456789"
LOCAL_ADMIN_KEY = "local-dev-admin-key"
SESSION = "demo-session"
USER, NAME = "u-ada", "Ada"
ACCOUNT = "123456789012"
REGION = "us-east-1"
STAGE = "dev"
WS_API_ID = "a1b2c3d4e5"
WS_DOMAIN = f"{WS_API_ID}.execute-api.{REGION}.amazonaws.com"
HTTP_API_ID = "f6g7h8i9j0"
HTTP_DOMAIN = f"{HTTP_API_ID}.execute-api.{REGION}.amazonaws.com"
CONNECTION_ID = "L0SM9cOFvHcCIhw="
SOURCE_IP = "203.0.113.10"
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0"
CONNECTED_AT_MS = 1764103500000  # 2025-11-25T20:45:00Z
TOKEN_ISSUED_AT = 1764103440  # one minute before the connect
TOKEN_EXPIRES_AT = 4102444800  # 2100-01-01T00:00:00Z
EPOCH = "e1"
TURN_QUEUE_NAME = "rejoin-TurnQueue-Q1w2E3r4T5y6.fifo"

TOKEN = mint_token(
    secret=LOCAL_SIGNING_KEY,
    session_id=SESSION,
    user_id=USER,
    name=NAME,
    ttl_seconds=TOKEN_EXPIRES_AT - TOKEN_ISSUED_AT,
    now=TOKEN_ISSUED_AT,
    # Far beyond the deployed maximum lifetime (12 h): this local-only token is
    # accepted because events/env.local.json raises REJOIN_TOKEN_MAX_TTL_SECONDS.
    max_ttl_seconds=TOKEN_EXPIRES_AT - TOKEN_ISSUED_AT,
)


def _clf_time(ms: int) -> str:
    """API Gateway's requestTime: 25/Nov/2025:20:45:00 +0000."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%d/%b/%Y:%H:%M:%S +0000")


def _request_id(n: int) -> str:
    """A stable, API-Gateway-looking extended request id."""
    return "V" + hashlib.sha256(f"req-{n}".encode()).hexdigest()[:15].upper() + "="


def _uuid(n: int) -> str:
    h = hashlib.sha256(f"uuid-{n}".encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:32]}"


# What the authorizer answered, as API Gateway passes it to every later event of
# the connection (its context, and the principal).
AUTHORIZER = {
    "session": SESSION,
    "user": USER,
    "name": NAME,
    "iat": TOKEN_ISSUED_AT,
    "exp": TOKEN_EXPIRES_AT,
    "principalId": USER,
    "integrationLatency": 0,
}


def _ws_context(n: int, route: str, event_type: str, at_ms: int, **extra: Any) -> dict[str, Any]:
    ctx: dict[str, Any] = {"routeKey": route, "authorizer": AUTHORIZER}
    if event_type == "MESSAGE":
        ctx["messageId"] = "bWVzc2FnZS" + hashlib.sha256(f"m-{n}".encode()).hexdigest()[:6] + "="
    ctx.update(extra)
    ctx.update(
        {
            "eventType": event_type,
            "extendedRequestId": _request_id(n),
            "requestTime": _clf_time(at_ms),
            "messageDirection": "IN",
            "stage": STAGE,
            "connectedAt": CONNECTED_AT_MS,
            "requestTimeEpoch": at_ms,
            "identity": {"userAgent": USER_AGENT, "sourceIp": SOURCE_IP},
            "requestId": _request_id(n),
            "domainName": WS_DOMAIN,
            "connectionId": CONNECTION_ID,
            "apiId": WS_API_ID,
        }
    )
    return ctx


def connect_event() -> dict[str, Any]:
    headers = {
        "Host": WS_DOMAIN,
        "Origin": "https://app.example.com",
        "Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
        "User-Agent": USER_AGENT,
        "X-Amzn-Trace-Id": "Root=1-6926149c-0f1e2d3c4b5a69788796a5b4",
        "X-Forwarded-For": SOURCE_IP,
        "X-Forwarded-Port": "443",
        "X-Forwarded-Proto": "https",
    }
    query = {"session": SESSION, "token": TOKEN}
    return {
        "headers": headers,
        "multiValueHeaders": {k: [v] for k, v in headers.items()},
        "queryStringParameters": query,
        "multiValueQueryStringParameters": {k: [v] for k, v in query.items()},
        "requestContext": _ws_context(1, "$connect", "CONNECT", CONNECTED_AT_MS),
        "isBase64Encoded": False,
    }


def authorize_event() -> dict[str, Any]:
    """The REQUEST authorizer's input on $connect (its context has no authorizer yet)."""
    event = connect_event()
    event["requestContext"].pop("authorizer")
    return {
        "type": "REQUEST",
        "methodArn": f"arn:aws:execute-api:{REGION}:{ACCOUNT}:{WS_API_ID}/{STAGE}/$connect",
        "headers": event["headers"],
        "multiValueHeaders": event["multiValueHeaders"],
        "queryStringParameters": event["queryStringParameters"],
        "multiValueQueryStringParameters": event["multiValueQueryStringParameters"],
        "stageVariables": {},
        "requestContext": event["requestContext"],
    }


def message_event(n: int, route: str, body: str, at_ms: int) -> dict[str, Any]:
    """A frame on a message route: API Gateway sends no headers, the body as a string."""
    return {
        "requestContext": _ws_context(n, route, "MESSAGE", at_ms),
        "body": body,
        "isBase64Encoded": False,
    }


def _frame(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))


def disconnect_event() -> dict[str, Any]:
    at_ms = CONNECTED_AT_MS + 60_000
    headers = {
        "Host": WS_DOMAIN,
        "x-api-key": "",
        "X-Forwarded-For": "",
        "x-restapi": "",
    }
    return {
        "headers": headers,
        "multiValueHeaders": {k: [v] for k, v in headers.items()},
        "requestContext": _ws_context(
            7,
            "$disconnect",
            "DISCONNECT",
            at_ms,
            disconnectStatusCode=1001,
            disconnectReason="Going away",
        ),
        "isBase64Encoded": False,
    }


TURN = TurnRequest(session_id=SESSION, epoch=EPOCH, turn_id="3", reply_to=3)


def turn_event() -> dict[str, Any]:
    """One SQS FIFO record, as the event source mapping delivers it (a batch of 1..10)."""
    body = TURN.to_json()
    sent_ms = CONNECTED_AT_MS + 20_100
    return {
        "Records": [
            {
                "messageId": _uuid(1),
                "receiptHandle": "AQEB"
                + base64.b64encode(hashlib.sha512(b"rh-1").digest() * 2).decode(),
                "body": body,
                "attributes": {
                    "ApproximateReceiveCount": "1",
                    "SentTimestamp": str(sent_ms),
                    "SequenceNumber": "18890143651240017408",
                    "MessageGroupId": TURN.session_id,
                    "SenderId": "AROAEXAMPLEROLEID123:rejoin-MessageFunction-Ab12Cd34Ef56",
                    "MessageDeduplicationId": dedup_id(TURN.session_id, TURN.epoch, TURN.turn_id),
                    "ApproximateFirstReceiveTimestamp": str(sent_ms + 15),
                },
                "messageAttributes": {},
                "md5OfBody": hashlib.md5(body.encode()).hexdigest(),
                "eventSource": "aws:sqs",
                "eventSourceARN": f"arn:aws:sqs:{REGION}:{ACCOUNT}:{TURN_QUEUE_NAME}",
                "awsRegion": REGION,
            }
        ]
    }


def cleanup_event() -> dict[str, Any]:
    """EventBridge's "Scheduled Event" for the rate(1 minute) rule."""
    return {
        "version": "0",
        "id": _uuid(2),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": ACCOUNT,
        "time": "2025-11-25T20:48:00Z",
        "region": REGION,
        "resources": [
            f"arn:aws:events:{REGION}:{ACCOUNT}:rule/rejoin-CleanupFunctionEveryMinute-1A2B3C4D5E6F"
        ],
        "detail": {},
    }


# --- HTTP API (payload format 2.0) -------------------------------------------------------
# (file name, method, path, authorization header or None, JSON body or None)
# Keep in step with rejoin.api's routes (admin key or participant token as Bearer).
API_REQUESTS: list[tuple[str, str, str, str | None, dict[str, Any] | None]] = [
    ("api-health.json", "GET", "/health", None, None),
    (
        "api-create-session.json",
        "POST",
        "/sessions",
        f"Bearer {LOCAL_ADMIN_KEY}",
        {"session_id": SESSION, "mode": "every"},
    ),
    (
        "api-mint-token.json",
        "POST",
        f"/sessions/{SESSION}/tokens",
        f"Bearer {LOCAL_ADMIN_KEY}",
        {"user_id": USER, "name": NAME, "ttl_seconds": 3600},
    ),
    ("api-status.json", "GET", f"/sessions/{SESSION}", f"Bearer {LOCAL_ADMIN_KEY}", None),
    ("api-transcript.json", "GET", f"/sessions/{SESSION}/transcript", f"Bearer {TOKEN}", None),
    ("api-end.json", "DELETE", f"/sessions/{SESSION}", f"Bearer {LOCAL_ADMIN_KEY}", None),
]


def http_event(
    n: int, method: str, path: str, auth: str | None, body: dict[str, Any] | None
) -> dict[str, Any]:
    at_ms = CONNECTED_AT_MS + 30_000 + n * 1000
    raw_body = json.dumps(body, separators=(",", ":")) if body is not None else None
    headers = {
        "accept": "application/json",
        "accept-encoding": "gzip, deflate, br",
        "content-length": str(len(raw_body.encode())) if raw_body else "0",
        "host": HTTP_DOMAIN,
        "user-agent": "curl/8.5.0",
        "x-amzn-trace-id": f"Root=1-6926149c-{hashlib.sha256(path.encode()).hexdigest()[:24]}",
        "x-forwarded-for": SOURCE_IP,
        "x-forwarded-port": "443",
        "x-forwarded-proto": "https",
    }
    if raw_body is not None:
        headers["content-type"] = "application/json"
    if auth is not None:
        headers["authorization"] = auth
    route_key = "ANY /" if path == "/" else "ANY /{proxy+}"
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": route_key,
        "rawPath": path,
        "rawQueryString": "",
        "headers": dict(sorted(headers.items())),
        "requestContext": {
            "accountId": ACCOUNT,
            "apiId": HTTP_API_ID,
            "domainName": HTTP_DOMAIN,
            "domainPrefix": HTTP_API_ID,
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": SOURCE_IP,
                "userAgent": "curl/8.5.0",
            },
            "requestId": _request_id(100 + n)[:-1].lower() + "=",
            "routeKey": route_key,
            "stage": "$default",
            "time": _clf_time(at_ms),
            "timeEpoch": at_ms,
        },
        "isBase64Encoded": False,
    }
    if path != "/":
        event["pathParameters"] = {"proxy": path.lstrip("/")}
    if raw_body is not None:
        event["body"] = raw_body
    return event


def all_events() -> dict[str, Any]:
    """Every sample event, by file name."""
    t = CONNECTED_AT_MS
    events: dict[str, Any] = {
        "authorize.json": authorize_event(),
        "connect.json": connect_event(),
        "message-resume.json": message_event(
            2, "resume", _frame({"action": "resume", "last_seq": 0}), t + 800
        ),
        "message-say.json": message_event(
            3, "say", _frame({"action": "say", "id": "c-1", "text": "Hello agent"}), t + 20_000
        ),
        "message-ping.json": message_event(4, "ping", _frame({"action": "ping"}), t + 40_000),
        "message-stop.json": message_event(8, "stop", _frame({"action": "stop"}), t + 45_000),
        "message-leave.json": message_event(5, "leave", _frame({"action": "leave"}), t + 59_000),
        # Not JSON: API Gateway cannot select a route and sends it to $default.
        "message-bad.json": message_event(6, "$default", '{"action": "say", "text": ', t + 50_000),
        "disconnect.json": disconnect_event(),
        "turn.json": turn_event(),
        "cleanup.json": cleanup_event(),
    }
    for n, (name, method, path, auth, body) in enumerate(API_REQUESTS):
        events[name] = http_event(n, method, path, auth, body)
    return events


def render(event: Any) -> str:
    return json.dumps(event, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    for name, event in all_events().items():
        path = EVENTS_DIR / name
        text = render(event)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(EVENTS_DIR.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
