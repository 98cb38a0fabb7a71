"""The local stack is safe by default (issue 9, item 5), tried as an attacker would.

- ``python -m rejoin_local`` (what ``make dev`` runs) listens on 127.0.0.1 only;
  with ``--host`` it warns, and the documented default keys stop working;
- ``/local/token`` and ``@connections`` need the local admin key (or, for
  tokens, an invite for that one session);
- a web page cannot use the stack through DNS rebinding or a cross-site
  WebSocket;
- a deeply nested frame gets the handler's own ``bad_json`` error.

The stack runs for real: in-process over the test session's Upstash endpoint,
or as the ``python -m rejoin_local`` process a user starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from rejoin.tokens import mint_token
from rejoin_local.stack import (
    DEFAULT_ADMIN_KEY,
    DEFAULT_SIGNING_KEY,
    INVITE_TTL,
    Stack,
    StackConfig,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def stack(upstash: Any) -> Iterator[Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "REJOIN_"))}
    started = Stack(
        StackConfig(port=0, upstash_url=upstash.url, upstash_token=upstash.token, env=env)
    )
    with started.serve_in_thread() as urls:
        started.urls = urls  # type: ignore[attr-defined]
        yield started


def _token_request(stack: Any, auth: str | None, **body: Any) -> httpx.Response:
    headers = {"Authorization": auth} if auth else {}
    return httpx.post(f"{stack.urls.http}/local/token", json=body, headers=headers)


# ---------------------------------------------------------------------------
# /local/token
# ---------------------------------------------------------------------------


def test_minting_needs_the_admin_key_or_an_invite_for_that_session(stack: Any) -> None:
    admin = f"Bearer {stack.config.admin_key}"
    # No credential, a wrong key, another session's invite: nothing minted.
    assert _token_request(stack, None, session="s1", name="Eve").status_code == 401
    assert _token_request(stack, "Bearer guess", session="s1", name="Eve").status_code == 403
    other = f"Invite {stack.invite('s2')}"
    assert _token_request(stack, other, session="s1", name="Eve").status_code == 403
    # An expired invite (time injected: minted a day and a second ago) is refused.
    old = stack.invite("s1", now=time.time() - INVITE_TTL - 1)
    assert _token_request(stack, f"Invite {old}", session="s1", name="Eve").status_code == 403
    # A forged one (right shape, wrong MAC) too.
    version, expiry, _ = stack.invite("s1").split(".")
    forged = f"Invite {version}.{expiry}.{'A' * 43}"
    assert _token_request(stack, forged, session="s1", name="Eve").status_code == 403

    # The admin key mints for any session and user; the grant carries an invite.
    r = _token_request(stack, admin, session="s1", name="Ada", user="u-ada")
    assert r.status_code == 200 and r.json()["user"] == "u-ada"
    invite = f"Invite {r.json()['invite']}"
    # The invite mints for s1 only, and never for a chosen user id.
    assert _token_request(stack, invite, session="s1", name="Bob").status_code == 200
    assert _token_request(stack, invite, session="s2", name="Bob").status_code == 403
    taken = _token_request(stack, invite, session="s1", name="Ada", user="u-ada")
    assert taken.status_code == 403


def test_a_browser_secret_is_one_participant_per_session_and_name(stack: Any) -> None:
    invite = f"Invite {stack.invite('s1')}"
    mine, theirs = secrets.token_hex(16), secrets.token_hex(16)

    def user(secret: str, name: str = "Ada", session: str = "s1") -> str:
        auth = invite if session == "s1" else f"Invite {stack.invite(session)}"
        r = _token_request(stack, auth, session=session, name=name, secret=secret)
        assert r.status_code == 200, r.text
        return str(r.json()["user"])

    # Same browser, session and name: the same id, every time (tabs, reloads).
    assert user(mine) == user(mine) == user(mine, name=" Ada ")
    assert user(mine).startswith("u-ada-")
    # Another browser, another name or another session: another participant.
    assert len({user(mine), user(theirs), user(mine, name="Bob"), user(mine, session="s2")}) == 4
    bad = _token_request(stack, invite, session="s1", name="Ada", secret="short")
    assert bad.status_code == 400


# ---------------------------------------------------------------------------
# Web pages: DNS rebinding and cross-site WebSockets
# ---------------------------------------------------------------------------


async def test_a_token_minted_in_the_second_of_an_end_connects(stack: Any) -> None:
    """GIVEN a session that the admin ends through the HTTP API
    WHEN the page asks /local/token for a new token within the same second
    THEN that token joins the session's next epoch (it is not born revoked:
    `iat` has one-second resolution), while the old one stays refused."""
    key = f"Bearer {stack.config.admin_key}"
    old = _token_request(stack, key, session="s-end", name="Ada", user="u-ada").json()["token"]
    async with connect(f"{stack.urls.ws}?session=s-end&token={old}"):
        pass
    # Start just after a second boundary, so the end and the mint share a second.
    if (fraction := time.time() % 1) > 0.3:
        await asyncio.sleep(1 - fraction)
    async with httpx.AsyncClient(base_url=stack.urls.http, headers={"Authorization": key}) as http:
        ended = await http.delete("/api/sessions/s-end")
        fresh = await http.post(
            "/local/token", json={"session": "s-end", "name": "Ada", "user": "u-ada"}
        )
    assert ended.status_code in (200, 204), ended.text
    assert fresh.status_code == 200, fresh.text
    async with connect(f"{stack.urls.ws}?session=s-end&token={fresh.json()['token']}") as ws:
        await ws.send(json.dumps({"action": "resume"}))
        while json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] != "welcome":
            pass
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{stack.urls.ws}?session=s-end&token={old}"):
            pass
    assert refused.value.response.status_code == 403


def test_requests_for_another_host_name_are_refused(stack: Any) -> None:
    # A page that rebinds its own name to 127.0.0.1 sends its name as Host.
    admin = {"Authorization": f"Bearer {stack.config.admin_key}"}
    for path, method in (("/", "GET"), ("/local/token", "POST"), ("/api/health", "GET")):
        r = httpx.request(
            method, f"{stack.urls.http}{path}", headers={"Host": "evil.example:80"} | admin
        )
        assert r.status_code == 403, path
    assert httpx.get(f"{stack.urls.http}/", headers={"Host": "localhost"}).status_code == 200


async def test_cross_site_websockets_are_refused(stack: Any) -> None:
    token = mint_token(
        secret=stack.config.signing_key, session_id="s1", user_id="u1", name="A", ttl_seconds=60
    )
    url = f"{stack.urls.ws}?session=s1&token={token}"
    with pytest.raises(InvalidStatus) as refused:
        await connect(url, origin="https://evil.example")  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403
    # The page's own origin, and clients that send none, are fine.
    async with connect(url, origin=stack.urls.http) as ws:  # type: ignore[arg-type]
        await ws.send('{"action": "resume"}')
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] in ("welcome", "part")
    async with connect(url) as ws:
        await ws.send('{"action": "ping"}')


def test_management_api_of_the_stack_needs_the_key(stack: Any) -> None:
    url = f"{stack.urls.http}/@connections/AAAAAAAAAAAAAAA="
    assert httpx.post(url, content=b"{}").status_code == 403
    signed = {"Authorization": f"Bearer {stack.config.admin_key}"}
    assert httpx.post(url, content=b"{}", headers=signed).status_code == 410  # known key: gone


# ---------------------------------------------------------------------------
# Frames the parser cannot take
# ---------------------------------------------------------------------------


async def test_deeply_nested_frame_gets_the_handlers_bad_json(stack: Any) -> None:
    token = mint_token(
        secret=stack.config.signing_key, session_id="s1", user_id="u1", name="A", ttl_seconds=60
    )
    async with connect(f"{stack.urls.ws}?session=s1&token={token}", max_size=None) as ws:

        async def answer(frame: str) -> dict[str, Any]:
            await ws.send(frame)
            while True:
                got = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if got.get("type") == "error":
                    return got  # type: ignore[no-any-return]

        # GIVEN plain broken JSON, the handler's bad_json answer
        plain = await answer("{not json")
        # WHEN 10,000 nested arrays (20 KB) are sent
        nested = await answer("[" * 10_000 + "]" * 10_000)
        # THEN the answer is the same bad_json frame, and the connection lives on
        assert nested == plain
        assert plain["code"] == "bad_json"
        await ws.send('{"action": "ping"}')
        while json.loads(await asyncio.wait_for(ws.recv(), 10)).get("type") != "pong":
            pass


# ---------------------------------------------------------------------------
# Where it listens: python -m rejoin_local, as `make dev` runs it
# ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _lan_address() -> str | None:
    """This machine's address on its network (no packet is sent), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
        except OSError:
            return None
        address = str(s.getsockname()[0])
    return None if address.startswith("127.") else address


@contextlib.contextmanager
def local_stack_process(*args: str, env: dict[str, str] | None = None) -> Iterator[tuple[int, str]]:
    """``python -m rejoin_local`` on free ports; yields its port and the banner."""
    with stack_process(*args, env=env) as (_, port, banner):
        yield port, banner


@contextlib.contextmanager
def stack_process(
    *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], int, str]]:
    """``python -m rejoin_local`` on free ports; yields the process, its port and the banner.

    Stopped with SIGINT (Ctrl-C) at the end, unless it exited already.
    """
    port, upstash_port = _free_port(), _free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "REJOIN_"))}
    clean["PYTHONPATH"] = f"{ROOT / 'local'}:{ROOT / 'shared'}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rejoin_local", "--port", str(port),
         "--upstash-port", str(upstash_port), *args],
        cwd=ROOT,
        env=clean | (env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    banner: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            banner.append(line)
            if line.startswith("Press Ctrl-C") or time.monotonic() > deadline:
                break
        assert banner and banner[-1].startswith("Press Ctrl-C"), "".join(banner)
        yield proc, port, "".join(banner)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def test_it_listens_on_this_machine_only_by_default() -> None:
    lan = _lan_address()
    if lan is None:
        pytest.skip("this machine has no network address besides loopback to try from")
    with local_stack_process() as (port, banner):
        assert _reachable("127.0.0.1", port)
        assert not _reachable(lan, port), f"reachable on {lan} without --host"
        assert "WARNING" not in banner
        # The page link carries the key in its fragment; the client hint follows --port.
        assert f"http://127.0.0.1:{port}/#key={DEFAULT_ADMIN_KEY}" in banner
        assert f"client --url ws://127.0.0.1:{port}/ws --session demo --name Ada" in banner


def test_exposed_it_warns_and_the_documented_keys_stop_working() -> None:
    lan = _lan_address()
    if lan is None:
        pytest.skip("this machine has no network address besides loopback to try from")
    with local_stack_process("--host", "0.0.0.0") as (port, banner):
        # GIVEN the stack exposed with --host: a warning says so
        assert "WARNING: listening on 0.0.0.0" in banner
        assert "REJOIN_TOKEN_SECRET, REJOIN_ADMIN_KEY, REJOIN_LOCAL_UPSTASH_TOKEN" in banner
        # WHEN an attacker on the network uses the documented defaults
        base = f"http://{lan}:{port}"
        r = httpx.post(
            f"{base}/local/token",
            json={"session": "s1", "name": "Eve"},
            headers={"Authorization": f"Bearer {DEFAULT_ADMIN_KEY}"},
        )
        forged = mint_token(
            secret=DEFAULT_SIGNING_KEY, session_id="s1", user_id="eve", name="Eve", ttl_seconds=60
        )

        async def handshake() -> int:
            try:
                async with connect(f"ws://{lan}:{port}/ws?session=s1&token={forged}"):
                    return 101
            except InvalidStatus as exc:
                return exc.response.status_code

        # THEN nothing is minted and the forged token is refused
        assert r.status_code == 403
        assert asyncio.run(handshake()) == 401
        # (while the key printed for the user works)
        key = re.search(r"#key=(\S+)", banner)
        assert key is not None and key.group(1) != DEFAULT_ADMIN_KEY
        ok = httpx.post(
            f"{base}/local/token",
            json={"session": "s1", "name": "Ada"},
            headers={"Authorization": f"Bearer {key.group(1)}"},
        )
        assert ok.status_code == 200


def test_exposed_with_keys_set_keeps_them() -> None:
    # Keys the user set are the user's choice (e.g. for sam local invoke): kept.
    config = StackConfig(host="0.0.0.0", env={"REJOIN_ADMIN_KEY": "mine-0123456789"})
    config.admin_key = "mine-0123456789"
    hardened, generated = config.hardened()
    assert hardened.admin_key == "mine-0123456789"
    assert generated == ["REJOIN_TOKEN_SECRET", "REJOIN_LOCAL_UPSTASH_TOKEN"]
    assert hardened.signing_key != DEFAULT_SIGNING_KEY
    assert StackConfig(host="127.0.0.1").hardened() == (StackConfig(host="127.0.0.1"), [])


# ---------------------------------------------------------------------------
# The Upstash endpoint in its own process (the default)
# ---------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)


def _endpoint_of(banner: str) -> tuple[str, int]:
    found = re.search(r"Upstash REST\s+(http://\S+)\s+\(.*own process pid (\d+)", banner)
    assert found is not None, banner
    return found.group(1), int(found.group(2))


async def _welcomed(ws_url: str, session: str) -> dict[str, Any]:
    token = mint_token(
        secret=DEFAULT_SIGNING_KEY, session_id=session, user_id="u1", name="Ada", ttl_seconds=60
    )
    async with connect(f"{ws_url}?session={session}&token={token}") as ws:
        await ws.send(json.dumps({"action": "resume"}))
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 20))
            if frame.get("type") == "welcome":
                return frame  # type: ignore[no-any-return]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_the_endpoint_runs_in_its_own_process_and_stops_with_the_stack() -> None:
    """GIVEN `python -m rejoin_local` with no options (what `make dev` runs)
    WHEN it serves, and is then stopped with Ctrl-C
    THEN the banner names the endpoint's own process, which answers as Upstash and
    backs the handlers (a client is welcomed); after the stop no endpoint is left."""
    with stack_process() as (proc, port, banner):
        url, pid = _endpoint_of(banner)
        assert pid != proc.pid and _alive(pid)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"rejoin_local.upstash_rest" in cmdline
        assert httpx.get(url + "/").status_code == 200
        assert httpx.post(url, json=["PING"]).status_code == 401  # the token is required
        ok = httpx.post(url, json=["PING"], headers={"Authorization": "Bearer local-dev-token"})
        assert ok.json() == {"result": "PONG"}
        welcome = asyncio.run(_welcomed(f"ws://127.0.0.1:{port}/ws", "proc-1"))
        assert welcome["type"] == "welcome"
    assert proc.returncode == 0
    assert not _alive(pid), "the endpoint outlived the stack"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_killed_stack_leaves_no_endpoint_behind() -> None:
    """GIVEN the stack with its endpoint in a child process
    WHEN the stack is killed outright (SIGKILL: no handler, no cleanup of its own)
    THEN the endpoint sees its lifeline pipe close and exits too."""
    with stack_process() as (proc, _, banner):
        _, pid = _endpoint_of(banner)
        proc.kill()
        proc.wait(10)
        assert _gone_within(pid, 20), "the endpoint was orphaned"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_the_stack_says_so_and_stops_when_its_endpoint_dies() -> None:
    """GIVEN the stack with its endpoint in a child process
    WHEN the endpoint's process dies
    THEN the stack logs that it did, stops, and exits with status 1."""
    with stack_process() as (proc, _, banner):
        _, pid = _endpoint_of(banner)
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        assert "the Upstash endpoint's process exited" in out, out
        assert proc.returncode == 1


def test_the_endpoint_in_process_is_still_an_option() -> None:
    """GIVEN `python -m rejoin_local --upstash-in-process`
    WHEN it serves
    THEN the banner says the endpoint is in this process, and clients are welcomed."""
    with stack_process("--upstash-in-process") as (_, port, banner):
        assert "in this process" in banner and "own process" not in banner
        welcome = asyncio.run(_welcomed(f"ws://127.0.0.1:{port}/ws", "proc-2"))
        assert welcome["type"] == "welcome"
