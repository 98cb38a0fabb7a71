"""Posting to connections: API Gateway mapping, the in-memory sender, retries, splitting."""

from __future__ import annotations

import asyncio
import calendar
import datetime
import http.server
import json
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import boto3
import pytest

import rejoin._http1
from bench._connections import ConnectionsApi, StandInCredentials, botocore_authorization
from rejoin._sigv4 import EMPTY_SHA256, Credentials, Signer
from rejoin.errors import (
    ConfigError,
    ConnectionGone,
    PayloadTooLarge,
    SendError,
    SenderThrottled,
)
from rejoin.frames import encode_frame
from rejoin.sender import (
    ApiGatewaySender,
    BroadcastResult,
    InMemorySender,
    broadcast,
    send,
    split_frame,
)

ROOT = Path(__file__).resolve().parents[1]
KB = 1024


class FakeSleep:
    """Records backoff delays instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def _reassemble(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a client does: join parts by id, in index order, and parse them."""
    out: list[dict[str, Any]] = []
    pending: dict[str, list[dict[str, Any]]] = {}
    for frame in frames:
        if frame["type"] != "part":
            out.append(frame)
            continue
        parts = pending.setdefault(frame["id"], [])
        parts.append(frame)
        if len(parts) == frame["count"]:
            parts.sort(key=lambda p: p["index"])
            out.append(json.loads("".join(p["data"] for p in parts)))
            del pending[frame["id"]]
    assert not pending, "incomplete part sets"
    return out


# --- API Gateway, against a stand-in of @connections over real HTTP --------------------
#
# bench/_connections.py answers as API Gateway does (statuses, x-amzn-ErrorType,
# {"message": ...} bodies) and, given credentials, recomputes every request's
# SigV4 signature with botocore's own signer, refusing a wrong one with 403.

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
TOKEN = "IQoJb3JpZ2luX2VjE//session+token/with=chars=="
LAMBDA = StandInCredentials("ASIAEXAMPLELAMBDA000", SECRET, TOKEN)


def _set_credentials(monkeypatch: pytest.MonkeyPatch, creds: StandInCredentials) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", creds.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", creds.secret_key)
    if creds.token:
        monkeypatch.setenv("AWS_SESSION_TOKEN", creds.token)
    else:
        monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


@pytest.fixture
def lambda_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment Lambda gives a function: its role's credentials and its region."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    _set_credentials(monkeypatch, LAMBDA)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")


@pytest.fixture
def api(lambda_env: None) -> Iterator[ConnectionsApi]:
    with ConnectionsApi(region="eu-west-3", credentials=(LAMBDA,)) as api:
        yield api


@pytest.fixture
async def sender(api: ConnectionsApi) -> AsyncIterator[ApiGatewaySender]:
    sender = ApiGatewaySender(api.url, timeout=5.0)
    yield sender
    await sender.aclose()


async def test_post_is_signed_as_botocore_signs_it(
    api: ConnectionsApi, sender: ApiGatewaySender
) -> None:
    # GIVEN Lambda's credentials (with a session token) and region in the environment
    api.open("c1")
    # WHEN a frame is posted
    await sender.post("c1", b'{"type":"pong","ts":1}')
    # THEN the stand-in accepted botocore's signature for it, and delivered it
    assert api.delivered("c1") == [b'{"type":"pong","ts":1}']
    [request] = api.received()
    assert request.signature == "ok"
    # and, recomputed here too: the Authorization is exactly botocore's, for the
    # region from AWS_REGION and the execute-api service, with the session token
    # sent and signed
    expected = botocore_authorization(
        "POST", request.path, request.headers, request.body, LAMBDA, "eu-west-3"
    )
    assert request.headers["authorization"] == expected
    assert request.headers["x-amz-security-token"] == TOKEN
    assert "/eu-west-3/execute-api/aws4_request" in expected
    assert "SignedHeaders=host;x-amz-date;x-amz-security-token," in expected
    assert request.method == "POST" and request.path == "/prod/@connections/c1"


async def test_signature_without_a_session_token(
    monkeypatch: pytest.MonkeyPatch, api: ConnectionsApi
) -> None:
    # GIVEN long-term keys (no session token), as on a developer's machine
    keys = StandInCredentials("AKIDEXAMPLE", SECRET)
    _set_credentials(monkeypatch, keys)
    api.accept(keys)
    api.open("c1")
    sender = ApiGatewaySender(api.url)
    # WHEN posting / THEN botocore's signature matches and no token header is sent
    await sender.post("c1", b"{}")
    [request] = api.received()
    assert request.signature == "ok"
    assert "x-amz-security-token" not in request.headers
    await sender.aclose()


async def test_a_wrong_secret_is_refused_with_a_clear_error_that_hides_credentials(
    monkeypatch: pytest.MonkeyPatch, api: ConnectionsApi
) -> None:
    # GIVEN the right access key and token but a wrong secret (the stand-in is no rubber stamp)
    _set_credentials(monkeypatch, StandInCredentials(LAMBDA.access_key, "not-the-secret", TOKEN))
    api.open("c1")
    sender = ApiGatewaySender(api.url)
    # WHEN posting
    with pytest.raises(SendError) as info:
        await sender.post("c1", b"{}")
    # THEN a plain SendError (403 is not "gone"), naming the operation, the
    # error and what to check, and never a secret, even though API Gateway's
    # message quotes the canonical request with the token in it
    message = str(info.value)
    assert type(info.value) is SendError
    assert "PostToConnection for c1 was refused: InvalidSignatureException (HTTP 403)" in message
    assert "execute-api:ManageConnections" in message
    for secret in (TOKEN, "not-the-secret", SECRET):
        assert secret not in message
    assert api.delivered("c1") == []
    await sender.aclose()


def test_signer_matches_the_published_sigv4_test_vectors() -> None:
    # GIVEN AWS's published examples: the signing key for 20120215/us-east-1/iam,
    # and the "get-vanilla" request of the SigV4 test suite
    signer = Signer("us-east-1", "iam")
    key = signer.signing_key(SECRET, "20120215")
    assert key.hex() == "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"
    vanilla = Signer("us-east-1", "service")
    when = calendar.timegm((2015, 8, 30, 12, 36, 0))
    # WHEN signed
    headers = dict(
        vanilla.sign(
            "GET",
            "example.amazonaws.com",
            "/",
            EMPTY_SHA256,
            Credentials("AKIDEXAMPLE", SECRET),
            when,
        )
    )
    # THEN the signature is the published one
    assert headers["X-Amz-Date"] == "20150830T123600Z"
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        "SignedHeaders=host;x-amz-date, "
        "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
    )


async def test_signing_key_follows_the_day(api: ConnectionsApi) -> None:
    # GIVEN a sender whose clock is one second before midnight UTC
    now = [calendar.timegm((2026, 3, 1, 23, 59, 59))]
    sender = ApiGatewaySender(api.url, clock=lambda: now[0])
    api.open("c1")
    # WHEN it posts, then posts again after midnight
    await sender.post("c1", b"1")
    now[0] += 2
    await sender.post("c1", b"2")
    # THEN both verify, each with its own day in the credential scope
    first, second = api.received()
    assert (first.signature, second.signature) == ("ok", "ok")
    assert "/20260301/eu-west-3/" in first.headers["authorization"]
    assert "/20260302/eu-west-3/" in second.headers["authorization"]
    await sender.aclose()


async def test_credentials_rotated_in_the_environment_are_picked_up(
    monkeypatch: pytest.MonkeyPatch, api: ConnectionsApi
) -> None:
    # GIVEN a sender that has posted with the first credentials
    clock = [1000.0]
    sender = ApiGatewaySender(api.url, clock=lambda: clock[0])
    api.open("c1")
    await sender.post("c1", b"1")
    # WHEN the environment's credentials change and the stand-in accepts only the new ones
    rotated = StandInCredentials("ASIAROTATED000000000", "rotated/secret", "rotated-token")
    _set_credentials(monkeypatch, rotated)
    api.accept(rotated)
    # THEN within the same second the sender still signs with what it read (one read
    # of the environment per second) and is refused...
    with pytest.raises(SendError, match="UnrecognizedClientException"):
        await sender.post("c1", b"2")
    # ...and a second later it reads the new ones and is accepted
    clock[0] += 1.0
    await sender.post("c1", b"3")
    assert api.delivered("c1") == [b"1", b"3"]
    assert (
        api.received()[-1]
        .headers["authorization"]
        .startswith("AWS4-HMAC-SHA256 Credential=ASIAROTATED000000000/")
    )
    await sender.aclose()


class _ContainerCredentials:
    """Lambda's container credentials endpoint (what SnapStart functions get)."""

    def __init__(self, sets: list[tuple[StandInCredentials, datetime.datetime]]) -> None:
        self.sets = sets
        self.calls: list[str | None] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.calls.append(self.headers.get("Authorization"))
                creds, expires = outer.sets[min(len(outer.calls), len(outer.sets)) - 1]
                body = json.dumps(
                    {
                        "AccessKeyId": creds.access_key,
                        "SecretAccessKey": creds.secret_key,
                        "Token": creds.token,
                        "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/credentials"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_container_credentials_are_refreshed_before_they_expire(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # GIVEN no keys in the environment but a container credentials endpoint (as on
    # SnapStart) whose first two sets expire in 5 minutes (inside botocore's
    # refresh window) and whose third lasts an hour
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "BOTO_CONFIG"):
        monkeypatch.setenv(name, str(tmp_path / "absent"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    now = datetime.datetime.now(datetime.UTC)
    soon, later = now + datetime.timedelta(minutes=5), now + datetime.timedelta(hours=1)
    sets = [
        StandInCredentials(f"ASIACONTAINER000000{n}", f"secret/{n}", f"token-{n}") for n in range(3)
    ]
    endpoint = _ContainerCredentials([(sets[0], soon), (sets[1], soon), (sets[2], later)])
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", endpoint.url)
    monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", "container-auth")
    try:
        with ConnectionsApi(region="eu-west-3", credentials=tuple(sets)) as api:
            api.open("c1")
            sender = ApiGatewaySender(api.url)
            # WHEN three frames are posted
            for n in range(3):
                await sender.post("c1", str(n).encode())
            await sender.aclose()
            received = api.received()
    finally:
        endpoint.close()
    # THEN every post verified, and each asked for fresh credentials while the ones
    # it had were about to expire: the first set was never used, the last one kept
    assert [r.signature for r in received] == ["ok", "ok", "ok"]
    keys = [r.headers["authorization"].split("Credential=")[1].split("/")[0] for r in received]
    assert keys == [sets[1].access_key, sets[2].access_key, sets[2].access_key]
    assert endpoint.calls == ["container-auth"] * 3


async def test_no_credentials_anywhere_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # GIVEN no keys in the environment, no profile, no container or instance credentials
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "BOTO_CONFIG"):
        monkeypatch.setenv(name, str(tmp_path / "absent"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    with ConnectionsApi(region="eu-west-3", credentials=(LAMBDA,)) as api:
        api.open("c1")
        sender = ApiGatewaySender(api.url)
        # WHEN posting / THEN ConfigError saying where credentials come from, and no request
        with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID"):
            await sender.post("c1", b"{}")
        assert api.received() == []


def test_no_region_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a custom domain (no region in the host) and no AWS_REGION
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    _set_credentials(monkeypatch, LAMBDA)
    sender = ApiGatewaySender("https://ws.example.com/live")
    # WHEN posting / THEN ConfigError, saying what to set
    with pytest.raises(ConfigError, match="AWS_REGION"):
        asyncio.run(sender.post("c1", b"{}"))


def test_region_is_read_from_an_execute_api_host() -> None:
    # GIVEN an execute-api endpoint / WHEN a sender is built / THEN its region is the host's
    sender = ApiGatewaySender("https://abc123.execute-api.ap-south-2.amazonaws.com/prod")
    assert sender._get_signer().region == "ap-south-2"


@pytest.mark.parametrize(
    ("status", "error_type", "error"),
    [
        (410, "GoneException", ConnectionGone),
        (429, "LimitExceededException", SenderThrottled),
        (429, "TooManyRequestsException", SenderThrottled),
        (413, "PayloadTooLargeException", PayloadTooLarge),
        (403, "ForbiddenException", SendError),
        (500, "InternalServerErrorException", SendError),
    ],
)
async def test_error_answers_are_mapped(
    api: ConnectionsApi,
    sender: ApiGatewaySender,
    status: int,
    error_type: str,
    error: type[Exception],
) -> None:
    # GIVEN API Gateway answering with an error (its status, x-amzn-ErrorType and message)
    api.fail("c1", status, error_type, "something went wrong")
    # WHEN posting
    with pytest.raises(SendError) as info:
        await sender.post("c1", b"{}")
    # THEN exactly the mapped rejoin error; unmapped ones name the error and the status
    assert type(info.value) is error
    if error is SendError:
        assert f"{error_type} (HTTP {status}): something went wrong" in str(info.value)


@pytest.mark.parametrize("body", [b'{"message":null}', b""], ids=["null-message", "empty-body"])
async def test_broadcast_prunes_gone_connections(lambda_env: None, body: bytes) -> None:
    # GIVEN 10 connections of which 3 have gone away; API Gateway answers those
    # with 410 GoneException (and a body SDKs have seen: a null message, or none)
    with ConnectionsApi(region="eu-west-3", credentials=(LAMBDA,), gone_body=body) as api:
        ids = [f"c{i}" for i in range(10)]
        api.open(*ids)
        for cid in ("c2", "c5", "c9"):
            api.close_socket(cid)
        sender = ApiGatewaySender(api.url)
        # WHEN one frame is broadcast to all
        result = await broadcast(sender, ids, {"type": "x"})
        await sender.aclose()
        # THEN the 3 are reported gone (for the caller to prune), the rest got it once
        assert result.gone == ["c2", "c5", "c9"]
        assert result.delivered == [c for c in ids if c not in result.gone]
        assert result.failed == {}
        for cid in result.delivered:
            assert api.delivered(cid) == [b'{"type":"x"}']
        # and a gone connection was tried once (410 is not retried)
        assert [r.connection_id for r in api.received()].count("c5") == 1


async def test_broadcast_backs_off_on_429_then_delivers(
    api: ConnectionsApi, sender: ApiGatewaySender
) -> None:
    # GIVEN a connection API Gateway throttles twice (429 LimitExceededException)
    api.open("c1", "c2")
    api.throttle("c1", 2)
    sleep = FakeSleep()
    # WHEN broadcasting (jitter pinned to its maximum, sleep faked)
    result = await broadcast(
        sender, ["c1", "c2"], {"type": "x"}, sleep=sleep, rand=lambda: 1.0, base_delay=0.05
    )
    # THEN both are delivered once; c1 after two backoffs that doubled, three requests
    assert result == BroadcastResult(delivered=["c1", "c2"], gone=[], failed={})
    assert sleep.delays == pytest.approx([0.05, 0.1])
    assert api.delivered("c1") == [b'{"type":"x"}']
    assert [r.connection_id for r in api.received()].count("c1") == 3


async def test_throttled_past_the_retries_is_reported_failed(
    api: ConnectionsApi, sender: ApiGatewaySender
) -> None:
    # GIVEN a connection throttled more times than the attempts allowed
    api.open("busy", "ok")
    api.throttle("busy", 10)
    sleep = FakeSleep()
    # WHEN broadcasting with 3 attempts
    result = await broadcast(sender, ["busy", "ok"], {"type": "x"}, max_attempts=3, sleep=sleep)
    # THEN it is reported failed after 3 requests; the other was delivered
    assert result.delivered == ["ok"]
    assert "throttled 3 times" in result.failed["busy"]
    assert len(sleep.delays) == 2


async def test_exists_and_close(api: ConnectionsApi, sender: ApiGatewaySender) -> None:
    # GIVEN one live connection, one gone, one throttled
    api.open("live", "busy")
    api.throttle("busy", 1)
    # WHEN checked (GetConnection) and closed (DeleteConnection)
    # THEN exists() is True then False, throttling is not "gone", and closing
    # a gone connection is not an error
    assert await sender.exists("live") is True
    assert await sender.exists("dead") is False
    with pytest.raises(SenderThrottled):
        await sender.exists("busy")
    await sender.close("live")
    assert await sender.exists("live") is False
    await sender.close("live")
    methods = [(r.method, r.connection_id, r.signature) for r in api.received()]
    assert methods[:4] == [
        ("GET", "live", "ok"),
        ("GET", "dead", "ok"),
        ("GET", "busy", "ok"),
        ("DELETE", "live", "ok"),
    ]


async def test_a_frame_over_the_gateway_limit_is_payload_too_large(
    api: ConnectionsApi, sender: ApiGatewaySender
) -> None:
    # GIVEN an open connection / WHEN a body over API Gateway's 128 KB is posted
    api.open("c1")
    with pytest.raises(PayloadTooLarge):
        await sender.post("c1", b"x" * (128 * KB + 1))
    # THEN nothing was delivered
    assert api.delivered("c1") == []


async def test_a_hang_fails_clearly_within_the_timeout(api: ConnectionsApi) -> None:
    # GIVEN a connection whose requests API Gateway never answers, and a 0.3 s timeout
    api.open("stuck", "ok")
    api.hang("stuck")
    sender = ApiGatewaySender(api.url, timeout=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    # WHEN posting to it / THEN a SendError that says so, after the timeout
    with pytest.raises(
        SendError, match=r"PostToConnection for stuck failed: no answer within 0.3 s"
    ):
        await sender.post("stuck", b"{}")
    assert loop.time() - started < 3
    # and in a broadcast the hung connection fails alone
    result = await broadcast(sender, ["stuck", "ok"], {"type": "x"})
    assert result.delivered == ["ok"]
    assert "no answer within 0.3 s" in result.failed["stuck"]
    await sender.aclose()


@pytest.mark.parametrize(
    "connection_id",
    ["L0SM9cOFvHcCIhw=", "a+b/c=", "x y%z", "ünï-cødé", "~tilde_.-", ".."],
)
async def test_connection_ids_are_quoted_as_boto3_quotes_them(
    api: ConnectionsApi, sender: ApiGatewaySender, connection_id: str
) -> None:
    # GIVEN a connection id with URL-special characters
    api.open(connection_id)
    # WHEN rejoin posts to it, and boto3's own client posts to it too
    await sender.post(connection_id, b"rejoin")
    client = boto3.client("apigatewaymanagementapi", endpoint_url=api.url, region_name="eu-west-3")
    client.post_to_connection(ConnectionId=connection_id, Data=b"boto3")
    ours, boto3s = api.received()
    # THEN both requests went to the same path, the id percent-encoded in one segment,
    # and both signatures verify
    assert ours.path == boto3s.path == "/prod/@connections/" + quote(connection_id, safe="")
    assert (ours.signature, boto3s.signature) == ("ok", "ok")
    assert api.delivered(connection_id) == [b"rejoin", b"boto3"]


async def test_connections_are_kept_alive_and_dropped_ones_are_replaced(
    api: ConnectionsApi, sender: ApiGatewaySender
) -> None:
    # GIVEN ten posts one after the other
    api.open("c1", "c2", "c3")
    for n in range(10):
        await sender.post("c1", str(n).encode())
    # THEN they all went over one connection
    assert api.stats()["connections"] == 1
    # and three at once use three
    await asyncio.gather(*(sender.post(c, b"x") for c in ("c1", "c2", "c3")))
    assert api.stats()["connections"] == 3
    # WHEN the server closes all three idle connections (its idle timeout) and,
    # before this loop has seen the closes, another frame is posted
    assert api.drop_idle() == 3
    await sender.post("c1", b"after")
    # THEN the frame is delivered once, over a new connection (the retry does not
    # take another of the stale ones)
    assert api.delivered("c1")[-2:] == [b"x", b"after"]
    assert api.stats()["connections"] == 4


async def test_posts_are_concurrent(lambda_env: None) -> None:
    # GIVEN API Gateway answering after 100 ms
    with ConnectionsApi(latency=0.1, region="eu-west-3", credentials=(LAMBDA,)) as api:
        ids = [f"c{i}" for i in range(30)]
        api.open(*ids)
        sender = ApiGatewaySender(api.url)
        # WHEN 30 frames are broadcast
        result = await broadcast(sender, ids, {"type": "x"})
        await sender.aclose()
        # THEN all were delivered, all 30 requests in flight at once, each signed right
        assert len(result.delivered) == 30
        assert api.stats()["peak_in_flight"] == 30
        assert api.stats()["verified"] == 30


def test_one_sender_serves_several_event_loops(api: ConnectionsApi) -> None:
    # GIVEN one sender shared by 4 threads, each running its own event loops in turn
    sender = ApiGatewaySender(api.url)
    ids = [f"t{t}" for t in range(4)]
    api.open(*ids)
    errors: list[BaseException] = []

    def run(cid: str) -> None:
        try:
            for round_ in range(3):  # a new loop each round, as a test or Mangum makes

                async def main(round_: int = round_) -> None:
                    for n in range(5):
                        await sender.post(cid, f"{round_}.{n}".encode())
                    await sender.aclose()  # this loop's connections; the others' stay

                asyncio.run(main())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(cid,)) for cid in ids]
    # WHEN they all post at once
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # THEN every frame arrived, in order, and no connection crossed loops
    assert errors == []
    for cid in ids:
        assert api.delivered(cid) == [f"{r}.{n}".encode() for r in range(3) for n in range(5)]


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM files)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stand-in")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_https_is_verified_and_kept_alive(
    lambda_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN the stand-in behind TLS with a certificate for 127.0.0.1
    cert, key = _self_signed(tmp_path)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    api = ConnectionsApi(region="eu-west-3", credentials=(LAMBDA,))
    url = api.start(ssl_context=server_tls)
    try:
        api.open("c1")
        # WHEN the sender's trust store does not hold that certificate
        # THEN it refuses to connect, naming the failure
        sender = ApiGatewaySender(url)
        with pytest.raises(SendError, match=r"could not connect to 127\.0\.0\.1"):
            await sender.post("c1", b"untrusted")
        await sender.aclose()
        # and WHEN it trusts it, three posts go over one verified TLS connection, signed right
        monkeypatch.setattr(rejoin._http1, "_ssl_context", ssl.create_default_context(cafile=cert))
        sender = ApiGatewaySender(url)
        for n in range(3):
            await sender.post("c1", str(n).encode())
        await sender.aclose()
        assert api.delivered("c1") == [b"0", b"1", b"2"]
        assert [r.signature for r in api.received()] == ["ok", "ok", "ok"]
        assert api.stats()["connections"] == 1  # (the refused handshake never reached HTTP)
    finally:
        api.stop()


def test_endpoint_must_be_http() -> None:
    # GIVEN a wss:// URL (the client's, not the management API's) / THEN ConfigError
    with pytest.raises(ConfigError):
        ApiGatewaySender("wss://abc123.execute-api.us-east-1.amazonaws.com/prod")


async def test_an_empty_connection_id_is_a_send_error(sender: ApiGatewaySender) -> None:
    # GIVEN an empty id / WHEN posting / THEN a SendError before any request
    with pytest.raises(SendError, match="empty"):
        await sender.post("", b"{}")


def test_importing_the_modules_does_not_import_boto3_or_agents() -> None:
    # GIVEN a fresh interpreter / WHEN the three modules are imported
    code = (
        "import sys, rejoin.sender, rejoin.frames, rejoin.tokens; "
        "print(sorted(m for m in ('boto3', 'botocore', 'agents') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "shared")}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    # THEN neither boto3 nor the Agents SDK was loaded
    assert done.stdout.strip() == "[]"


def test_posting_with_lambda_credentials_needs_no_boto3(api: ConnectionsApi) -> None:
    # GIVEN a fresh interpreter with Lambda's environment
    api.open("c1")
    code = (
        "import asyncio, sys\n"
        "from rejoin.sender import ApiGatewaySender\n"
        f"asyncio.run(ApiGatewaySender({api.url!r}).post('c1', b'fresh'))\n"
        "print(sorted(m for m in ('boto3', 'botocore') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "shared")}
    # WHEN it posts a frame
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    # THEN the frame arrived, signed right, and neither boto3 nor botocore was imported
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert api.delivered("c1") == [b"fresh"]
    assert api.received()[0].signature == "ok"


# --- the in-memory sender -----------------------------------------------------------


async def test_in_memory_records_frames_in_order() -> None:
    # GIVEN an open connection
    sender = InMemorySender()
    sender.open("c1")
    # WHEN two frames are posted
    await sender.post("c1", b'{"n":1}')
    await sender.post("c1", b'{"n":2}')
    # THEN both are recorded in order, raw and decoded, and counted
    assert sender.raw("c1") == [b'{"n":1}', b'{"n":2}']
    assert sender.frames("c1") == [{"n": 1}, {"n": 2}]
    assert sender.posts == 2
    assert await sender.exists("c1") is True


async def test_in_memory_gone_throttle_and_close() -> None:
    # GIVEN a connection closed by its client, one never opened, and one throttled once
    sender = InMemorySender()
    for cid in ("closed", "busy"):
        sender.open(cid)
    sender.close_socket("closed")
    sender.throttle("busy", 1)
    # WHEN posting to each
    # THEN gone connections raise ConnectionGone; the throttled one raises once, then delivers
    with pytest.raises(ConnectionGone):
        await sender.post("closed", b"{}")
    with pytest.raises(ConnectionGone):
        await sender.post("never", b"{}")
    with pytest.raises(SenderThrottled):
        await sender.post("busy", b'{"n":1}')
    await sender.post("busy", b'{"n":2}')
    assert sender.frames("busy") == [{"n": 2}]
    assert await sender.exists("closed") is False
    # and close() (DeleteConnection) ends a connection, twice without error
    await sender.close("busy")
    await sender.close("busy")
    with pytest.raises(ConnectionGone):
        await sender.post("busy", b"{}")
    assert sender.posts == 5


async def test_in_memory_refuses_frames_over_the_frame_limit() -> None:
    # GIVEN an open connection / WHEN a 32 KB + 1 frame is posted directly
    sender = InMemorySender()
    sender.open("c1")
    with pytest.raises(PayloadTooLarge):
        await sender.post("c1", b"x" * (32 * KB + 1))
    # THEN it is refused, as code that skips split_frame should be
    assert sender.raw("c1") == []


async def test_in_memory_on_deliver_hook_sync_and_async() -> None:
    # GIVEN a sync and an async delivery hook
    seen: list[tuple[str, bytes]] = []

    async def push(cid: str, data: bytes) -> None:
        await asyncio.sleep(0)
        seen.append((cid, data))

    for hook in (push, lambda cid, data: seen.append((cid, data))):
        sender = InMemorySender(on_deliver=hook)
        sender.open("c1")
        # WHEN a frame is delivered
        await sender.post("c1", b'{"x":1}')
    # THEN each hook saw it
    assert seen == [("c1", b'{"x":1}'), ("c1", b'{"x":1}')]


async def test_in_memory_latency_is_awaited() -> None:
    # GIVEN 50 ms latency per post
    sender = InMemorySender(latency=0.05)
    sender.open("c1")
    loop = asyncio.get_running_loop()
    started = loop.time()
    # WHEN 10 posts run concurrently
    await asyncio.gather(*(sender.post("c1", b"{}") for _ in range(10)))
    # THEN each waited, but concurrently (not 10 x 50 ms)
    elapsed = loop.time() - started
    assert 0.05 <= elapsed < 0.4


def test_in_memory_is_usable_from_several_threads() -> None:
    # GIVEN one sender shared by 8 threads, each running its own event loop
    sender = InMemorySender()
    for t in range(8):
        sender.open(f"c{t}")

    def run(t: int) -> None:
        async def main() -> None:
            for n in range(200):
                await sender.post(f"c{t}", json.dumps({"n": n}).encode())

        asyncio.run(main())

    threads = [threading.Thread(target=run, args=(t,)) for t in range(8)]
    # WHEN they all post at once
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # THEN nothing is lost or reordered
    assert sender.posts == 1600
    for t in range(8):
        assert [f["n"] for f in sender.frames(f"c{t}")] == list(range(200))


# --- broadcast and send ---------------------------------------------------------------


async def test_broadcast_to_100_with_3_gone() -> None:
    # GIVEN 100 connections of which 3 have gone away
    sender = InMemorySender()
    ids = [f"c{i:03d}" for i in range(100)]
    for cid in ids:
        sender.open(cid)
    closed = {"c007", "c050", "c099"}
    for cid in closed:
        sender.close_socket(cid)
    frame = {"type": "message", "seq": 1, "text": "hi"}
    # WHEN one frame is broadcast to all
    result = await broadcast(sender, ids, frame)
    # THEN 97 got it exactly once, the 3 are reported gone, nothing failed
    assert sorted(result.gone) == sorted(closed)
    assert result.delivered == [c for c in ids if c not in closed]
    assert result.failed == {}
    for cid in ids:
        assert sender.frames(cid) == ([] if cid in closed else [frame])


async def test_broadcast_is_parallel_and_bounded() -> None:
    # GIVEN 40 connections with 50 ms latency each, and a sender that tracks concurrency
    class Counting(InMemorySender):
        def __init__(self) -> None:
            super().__init__(latency=0.05)
            self.now = self.peak = 0

        async def post(self, connection_id: str, data: bytes) -> None:
            self.now += 1
            self.peak = max(self.peak, self.now)
            try:
                await super().post(connection_id, data)
            finally:
                self.now -= 1

    sender = Counting()
    for i in range(40):
        sender.open(f"c{i}")
    # WHEN broadcasting with max_parallel=10
    result = await broadcast(sender, [f"c{i}" for i in range(40)], {"type": "x"}, max_parallel=10)
    # THEN all are delivered, never more than 10 at once, but 10 at once indeed
    assert len(result.delivered) == 40
    assert sender.peak == 10


async def test_broadcast_retries_throttling_with_growing_backoff() -> None:
    # GIVEN a connection throttled twice, then open, and a fake sleep
    sender = InMemorySender()
    sender.open("c1")
    sender.open("c2")
    sender.throttle("c1", 2)
    sleep = FakeSleep()
    # WHEN broadcasting (jitter pinned to its maximum)
    result = await broadcast(
        sender, ["c1", "c2"], {"type": "x"}, sleep=sleep, rand=lambda: 1.0, base_delay=0.05
    )
    # THEN both are delivered; c1 after two backoffs that doubled
    assert result == BroadcastResult(delivered=["c1", "c2"], gone=[], failed={})
    assert sleep.delays == pytest.approx([0.05, 0.1])
    assert sender.frames("c1") == [{"type": "x"}]
    assert sender.posts == 4


async def test_backoff_has_full_jitter_and_a_cap() -> None:
    # GIVEN a connection throttled 6 times, a cap of 0.3 s, and a fixed jitter of 0.5
    sender = InMemorySender()
    sender.open("c1")
    sender.throttle("c1", 6)
    sleep = FakeSleep()
    # WHEN sending with 7 attempts
    await send(
        sender,
        "c1",
        {"type": "x"},
        max_attempts=7,
        base_delay=0.05,
        max_delay=0.3,
        sleep=sleep,
        rand=lambda: 0.5,
    )
    # THEN each delay is the jitter times min(cap, base * 2^n)
    assert sleep.delays == pytest.approx([0.025, 0.05, 0.1, 0.15, 0.15, 0.15])


async def test_throttled_forever_fails_after_max_attempts() -> None:
    # GIVEN one connection throttled forever and one healthy
    sender = InMemorySender()
    sender.open("stuck")
    sender.open("ok")
    sender.throttle("stuck", 10_000)
    sleep = FakeSleep()
    # WHEN broadcasting with 4 attempts
    result = await broadcast(sender, ["stuck", "ok"], {"type": "x"}, max_attempts=4, sleep=sleep)
    # THEN the stuck one failed after exactly 4 posts (3 backoffs); the other was delivered
    assert result.delivered == ["ok"]
    assert list(result.failed) == ["stuck"]
    assert "throttled 4 times" in result.failed["stuck"]
    assert sender.posts == 5
    assert len(sleep.delays) == 3
    # and send() raises SenderThrottled for the same situation
    with pytest.raises(SenderThrottled):
        await send(sender, "stuck", {"type": "x"}, max_attempts=2, sleep=sleep)


async def test_send_raises_gone_without_retrying() -> None:
    # GIVEN a closed connection / WHEN sending
    sender = InMemorySender()
    sleep = FakeSleep()
    with pytest.raises(ConnectionGone):
        await send(sender, "c1", {"type": "x"}, sleep=sleep)
    # THEN one post, no backoff
    assert sender.posts == 1
    assert sleep.delays == []


async def test_broadcast_reports_other_send_errors_as_failed() -> None:
    # GIVEN a sender that fails one connection with a non-throttling error
    class Flaky(InMemorySender):
        async def post(self, connection_id: str, data: bytes) -> None:
            if connection_id == "bad":
                raise SendError("PostToConnection for bad failed: ForbiddenException (HTTP 403)")
            await super().post(connection_id, data)

    sender = Flaky()
    sender.open("good")
    # WHEN broadcasting / THEN the error is reported for that one only
    result = await broadcast(sender, ["bad", "good", "good"], {"type": "x"})
    assert result.delivered == ["good"]
    assert "ForbiddenException" in result.failed["bad"]
    # and a connection listed twice got the frame once
    assert len(sender.raw("good")) == 1


async def test_broadcast_to_nobody() -> None:
    # GIVEN no connections / WHEN broadcasting / THEN an empty result, no posts
    sender = InMemorySender()
    assert await broadcast(sender, [], {"type": "x"}) == BroadcastResult()
    assert sender.posts == 0


# --- splitting ---------------------------------------------------------------------------


def _big_frame(target_bytes: int) -> dict[str, Any]:
    """A frame of exactly ``target_bytes`` with multi-byte characters, quotes, escapes."""
    unit = 'é"\\ 👋 «q» \n\t\x01 日本 '
    frame: dict[str, Any] = {"type": "welcome", "session": "s", "transcript": [], "pad": ""}
    while len(encode_frame(frame)) < target_bytes - 2000:
        seq = len(frame["transcript"])
        frame["transcript"].append({"type": "message", "seq": seq, "text": unit * 20})
    frame["pad"] = "a" * (target_bytes - len(encode_frame(frame)))
    return frame


@pytest.mark.parametrize("size_kb", [31, 33, 100, 128])
def test_split_frame_round_trip(size_kb: int) -> None:
    # GIVEN a frame of the given size full of unicode, quotes and escapes
    frame = _big_frame(size_kb * KB)
    original = encode_frame(frame)
    # WHEN split
    parts = split_frame(frame)
    # THEN every part fits in a 32 KB frame
    assert all(len(p) <= 32 * KB for p in parts)
    if len(original) <= 32 * KB:
        # a frame that fits is sent as is
        assert parts == [original]
        return
    decoded = [json.loads(p) for p in parts]
    # and the parts share one id, count up from 0, and say how many there are
    assert {d["type"] for d in decoded} == {"part"}
    assert len({d["id"] for d in decoded}) == 1
    assert [d["index"] for d in decoded] == list(range(len(parts)))
    assert {d["count"] for d in decoded} == {len(parts)}
    # and their data concatenated is the original JSON exactly
    assert "".join(d["data"] for d in decoded).encode() == original
    assert _reassemble(decoded) == [frame]
    # and the split is not wasteful: parts are filled close to the limit
    assert len(parts) <= len(original) * 2 // (32 * KB) + 1


def test_split_frame_exact_boundary() -> None:
    # GIVEN frames of exactly 32 KB and one byte more
    at_limit = _big_frame(32 * KB)
    over = _big_frame(32 * KB + 1)
    assert len(encode_frame(at_limit)) == 32 * KB
    # WHEN split / THEN the first is sent whole and the second in parts
    assert split_frame(at_limit) == [encode_frame(at_limit)]
    assert len(split_frame(over)) == 2


def test_split_frame_worst_case_escaping() -> None:
    # GIVEN a frame whose text is all characters that escape to 6 bytes
    # (control characters already escaped once in the JSON, escaped again in parts)
    frame = {"type": "message", "text": "\x01" * 15_000}
    parts = split_frame(frame)
    # WHEN reassembled / THEN parts fit and the frame comes back intact
    assert all(len(p) <= 32 * KB for p in parts)
    assert _reassemble([json.loads(p) for p in parts]) == [frame]


def test_split_frame_with_small_limits() -> None:
    # GIVEN custom limits / WHEN splitting / THEN each part respects them
    frame = {"type": "message", "text": '"quoted" 👋 ' * 100}
    parts = split_frame(frame, frame_limit=200, message_limit=10_000)
    assert len(parts) > 5
    assert all(len(p) <= 200 for p in parts)
    assert _reassemble([json.loads(p) for p in parts]) == [frame]


def test_split_frame_refuses_over_128_kb() -> None:
    # GIVEN a frame just over 128 KB / WHEN split / THEN PayloadTooLarge, naming the sizes
    frame = _big_frame(128 * KB + 1)
    with pytest.raises(PayloadTooLarge, match=str(128 * KB)):
        split_frame(frame)


async def test_broadcast_and_send_split_large_frames() -> None:
    # GIVEN two connections and a 70 KB frame
    sender = InMemorySender()
    sender.open("a")
    sender.open("b")
    frame = _big_frame(70 * KB)
    # WHEN broadcast to one and sent to the other
    result = await broadcast(sender, ["a"], frame)
    await send(sender, "b", frame)
    # THEN both receive parts (each under 32 KB) that reassemble to the frame
    assert result.delivered == ["a"]
    for cid in ("a", "b"):
        assert len(sender.raw(cid)) == 3
        assert _reassemble(sender.frames(cid)) == [frame]


async def test_broadcast_refuses_oversize_before_posting() -> None:
    # GIVEN a frame over 128 KB / WHEN broadcast / THEN refused and nothing posted
    sender = InMemorySender()
    sender.open("a")
    with pytest.raises(PayloadTooLarge):
        await broadcast(sender, ["a"], _big_frame(129 * KB))
    assert sender.posts == 0
