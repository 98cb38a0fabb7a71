"""The TCP transport: redis.asyncio beside Upstash REST, chosen by URL.

The store's behaviour on both transports is tested once, in test_session.py
(the ``store`` fixture). This file tests what only the TCP side has: the
choice by configuration, the plain Lua it sends, connection reuse, faults on
the wire (refused, timed out, closed mid-request), credentials, TLS, Redis
Cluster's hash slots, the SDK-shaped ``RedisSession``, and the rooms and the
rate limiter running unchanged over TCP.
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import json
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
from harness import make_stack, offline_agent

import rejoin
from rejoin import RedisSession, UpstashSession, redis_client, store_client
from rejoin._lua import Script, is_cluster, is_upstash
from rejoin.config import Settings
from rejoin.errors import (
    ConfigError,
    SessionGone,
    StoreResponseError,
    StoreTimeout,
    StoreUnavailable,
)
from rejoin.keys import SessionKeys
from rejoin.redis_tcp import TcpRedisClient, _strip_upstash_flag, redacted
from rejoin.runtime import Runtime, set_runtime
from rejoin_local.redis_server import PrivateRedis, TlsFiles

ROOT = Path(__file__).resolve().parents[1]


def msg(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def tcp_url(redis_proxy: Any, redis_server: Any) -> Iterator[str]:
    """The session Redis through the RESP proxy, with fresh counts; faults cleared after."""
    redis_proxy.reset()
    yield f"redis://127.0.0.1:{redis_proxy.port}/0"
    redis_proxy.faults.clear()


# --- the choice of transport ------------------------------------------------------------------


class TestChoiceByUrl:
    def test_scheme_picks_the_client(self):
        # GIVEN one URL per scheme, WHEN building the store client
        upstash = store_client("https://eu1-x.upstash.io", "token")
        plain = store_client("redis://127.0.0.1:6390/0")
        tls = store_client("rediss://:pw@cache.example.com:6379/0")
        cluster = store_client("rediss+cluster://:pw@config.example.com:6379")
        # THEN https is Upstash REST, the others redis.asyncio over TCP
        assert is_upstash(upstash) and not isinstance(upstash, TcpRedisClient)
        for client in (plain, tls, cluster):
            assert isinstance(client, TcpRedisClient) and not is_upstash(client)
        assert not is_cluster(plain) and not is_cluster(tls) and is_cluster(cluster)
        # AND rediss means TLS with the certificate checked
        kwargs = tls.client.connection_pool.connection_kwargs
        assert tls.client.connection_pool.connection_class.__name__ == "SSLConnection"
        assert kwargs.get("ssl_cert_reqs", "required") == "required"
        # AND the timeout applies to connecting and to every answer
        assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 5.0

    @pytest.mark.parametrize(
        ("url", "token", "words"),
        [
            ("ftp://host", None, "must start with"),
            ("host:6379", None, "must start with"),
            ("https://x.upstash.io", None, "REST token"),
            ("redis://:s3cret-pw@host:notaport/0", None, "malformed Redis URL"),
        ],
    )
    def test_bad_urls_are_config_errors_without_the_password(self, url, token, words):
        with pytest.raises(ConfigError, match=words) as err:
            store_client(url, token)
        assert "s3cret" not in str(err.value)

    def test_timeout_must_be_positive(self):
        with pytest.raises(ConfigError, match="positive"):
            redis_client("redis://127.0.0.1:6390", timeout=0)

    def test_redacted_never_shows_credentials(self):
        assert redacted("rediss://user:pa55@cache.example.com:6380/0?x=1") == (
            "rediss://cache.example.com:6380"
        )
        assert "pa55" not in repr(store_client("rediss://user:pa55@cache.example.com:6380/0"))

    def test_upstash_path_never_imports_redis(self):
        # GIVEN a fresh interpreter importing what an Upstash deployment imports
        code = (
            "import sys, rejoin, rejoin.runtime, rejoin.rooms, rejoin.routes, rejoin.session;"
            "rejoin.store_client('https://x.upstash.io', 't');"
            "print(sorted(m for m in sys.modules if m == 'redis' or m.startswith('redis.')))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONPATH": str(ROOT / "shared"), "PATH": "/usr/bin:/bin"},
        )
        # THEN redis-py was never loaded
        assert out.stdout.strip() == "[]", out.stderr


class TestSettings:
    def test_store_url_from_the_environment(self):
        s = Settings.from_env({"REJOIN_STORE_URL": "rediss://:pw@h:6379/0"})
        assert s.store_url == "rediss://:pw@h:6379/0"
        assert "pw" not in repr(s)
        assert Settings.from_env({}).store_url is None

    def test_store_timeout_setting_and_its_upstash_alias(self):
        assert Settings.from_env({"REJOIN_STORE_TIMEOUT": "2.5"}).upstash_timeout == 2.5
        assert Settings.from_env({"REJOIN_UPSTASH_TIMEOUT": "3"}).upstash_timeout == 3.0
        both = {"REJOIN_STORE_TIMEOUT": "1", "REJOIN_UPSTASH_TIMEOUT": "9"}
        assert Settings.from_env(both).upstash_timeout == 1.0
        with pytest.raises(ConfigError, match="REJOIN_STORE_TIMEOUT"):
            Settings.from_env({"REJOIN_STORE_TIMEOUT": "soon"})

    def test_store_url_from_secrets_manager(self, monkeypatch):
        import boto3
        from moto import mock_aws

        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        with mock_aws():
            sm = boto3.client("secretsmanager", region_name="us-east-1")
            plain, as_json, bad = (f"store-{n}-{uuid.uuid4().hex}" for n in range(3))
            sm.create_secret(Name=plain, SecretString="rediss://:pw1@cache:6379/0\n")
            sm.create_secret(Name=as_json, SecretString='{"url": "rediss://:pw2@cache:6379/0"}')
            sm.create_secret(Name=bad, SecretString='{"host": "cache"}')
            # GIVEN a secret holding the URL, plain or as JSON {"url": ...}
            for name, expected in ((plain, "pw1"), (as_json, "pw2")):
                s = Settings.from_env({"REJOIN_STORE_SECRET": name, "REJOIN_STORE_URL": "x"})
                # THEN the secret wins over the plain variable
                assert s.store_url == f"rediss://:{expected}@cache:6379/0"
            with pytest.raises(ConfigError, match="must hold a URL") as err:
                Settings.from_env({"REJOIN_STORE_SECRET": bad})
            assert "cache" not in str(err.value)

    def test_runtime_builds_one_tcp_client_per_loop_and_reuses_its_connection(
        self, tcp_url, redis_proxy
    ):
        # GIVEN a runtime configured with a redis:// store URL (no factory)
        rt = Runtime(Settings(store_url=tcp_url, upstash_timeout=2.0))
        session = SessionKeys("rejoin", "warm")

        async def invocation(n: int) -> Any:
            client = rt.redis()
            s = UpstashSession(session.session_id, redis=client)
            await s.add_items([msg(f"call {n}")])
            return client

        # WHEN three warm invocations run on the runtime's long-lived loop
        clients = [rt.run(invocation(n)) for n in range(3)]
        # THEN they share one client and one TCP connection, and each is one round trip
        assert isinstance(clients[0], TcpRedisClient)
        assert clients[0] is clients[1] is clients[2]
        assert redis_proxy.connections == 1
        assert redis_proxy.stats.snapshot()["requests"]["command"] in (3, 4)  # +1 EVAL if cold


# --- scripts over TCP -------------------------------------------------------------------------


class TestPlainLua:
    def test_tcp_text_drops_only_the_upstash_flag_and_keeps_line_numbers(self):
        script = Script("t", "return 1\n")
        assert script.source.startswith("#!lua flags=allow-key-locking\n")
        assert "allow-key-locking" not in script.plain_source
        assert script.plain_source.count("\n") == script.source.count("\n")
        assert script.plain_source.split("\n")[1:] == script.source.split("\n")[1:]
        assert script.sha != script.plain_sha

    def test_real_redis_refuses_the_flag_so_tcp_must_not_send_it(self, redis_url):
        raw = redis.Redis.from_url(redis_url)
        try:
            script = Script("t", "return 1\n")
            if raw.info("server").get("redis_version", "0") < "7":
                pytest.skip("shebang flags need Redis 7")
            with pytest.raises(redis.ResponseError, match="flag"):
                raw.eval(script.source, 0)
            assert raw.eval(script.plain_source, 0) == 1
        finally:
            raw.close()

    @pytest.mark.parametrize(
        ("given", "sent"),
        [
            ("#!lua flags=allow-key-locking\nreturn 1", "\nreturn 1"),
            (
                "#!lua flags=no-writes,allow-key-locking\nreturn 1",
                "#!lua flags=no-writes\nreturn 1",
            ),
            ("#!lua name=x flags=allow-key-locking\nreturn 1", "#!lua name=x\nreturn 1"),
            ("#!lua flags=no-writes\nreturn 1", "#!lua flags=no-writes\nreturn 1"),
            ("return 1", "return 1"),
        ],
    )
    def test_scripts_written_for_upstash_are_made_acceptable(self, given, sent):
        assert _strip_upstash_flag(given) == sent

    async def test_errors_are_typed_with_the_transport_named(self, tcp_url):
        client = redis_client(tcp_url, timeout=2.0)
        try:
            # GIVEN a script that fails in Lua, and one whose epoch guard fails
            broken = Script("broken", "return redis.call('NOSUCHCOMMAND')\n")
            with pytest.raises(StoreResponseError, match="script broken") as err:
                await broken(client, ["k"], [])
            assert "Unknown Redis command" in str(err.value) or "unknown" in str(err.value)
            session = UpstashSession("guarded", redis=client, epoch="e-1")
            # THEN the gone prefix becomes SessionGone, with the script's reason
            with pytest.raises(SessionGone, match="deleted or replaced"):
                await session.add_items([msg("late")])
        finally:
            await client.close()


# --- faults on the wire -----------------------------------------------------------------------


class TestFaults:
    async def test_connection_refused_is_unavailable_and_fast(self):
        client = redis_client(f"redis://127.0.0.1:{closed_port()}/0", timeout=2.0, retries=1)
        session = RedisSession("refused", redis_client=client)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(StoreUnavailable, match="add_items: Redis unreachable") as err:
            await session.add_items([msg("a")])
        assert not isinstance(err.value, StoreTimeout)
        assert loop.time() - started < 1.0  # refused at once, not waited out
        assert await session.ping() is False

    async def test_hang_times_out_within_the_timeouts(self, tcp_url, redis_proxy, raw_redis):
        # GIVEN a 0.3 s timeout, one retry, and a proxy that holds every EVALSHA 2 s
        client = redis_client(tcp_url, timeout=0.3, retry_interval=0.01)
        session = RedisSession(f"h-{uuid.uuid4().hex[:6]}", redis_client=client)
        await session.add_items([msg("a")])
        redis_proxy.faults.hang(2.0, times=2, command="EVALSHA")
        loop = asyncio.get_running_loop()
        started = loop.time()
        # WHEN adding, THEN a StoreTimeout after both tries, well before the hang ends
        with pytest.raises(StoreTimeout, match="add_items: Redis did not answer in time"):
            await session.add_items([msg("b"), msg("c")])
        assert loop.time() - started < 1.5
        # AND once the held requests reach Redis the batch is there once, whole
        redis_proxy.faults.clear()
        await _until(lambda: raw_redis.llen(session.keys.items) == 3)
        assert [json.loads(x)["content"] for x in raw_redis.lrange(session.keys.items, 0, -1)] == [
            "a",
            "b",
            "c",
        ]
        await client.close()

    async def test_server_closes_after_applying_on_every_try(self, tcp_url, redis_proxy, raw_redis):
        # GIVEN a proxy that runs the script, then closes the connection, twice
        client = redis_client(tcp_url, timeout=2.0, retry_interval=0.01)
        session = RedisSession(f"c-{uuid.uuid4().hex[:6]}", redis_client=client)
        await session.add_items([msg("a")])
        redis_proxy.faults.lose_response(times=2, command="EVALSHA")
        # WHEN adding, THEN the caller hears the store is unavailable
        with pytest.raises(StoreUnavailable, match="add_items"):
            await session.add_items([msg("b"), msg("c")])
        # AND although both tries ran in Redis, the batch is stored once
        assert redis_proxy.stats.snapshot()["commands"]["EVALSHA"] == 3
        contents = [json.loads(x)["content"] for x in raw_redis.lrange(session.keys.items, 0, -1)]
        assert contents == ["a", "b", "c"]
        # AND the session works again at once
        await session.add_items([msg("d")])
        assert [i["content"] for i in await session.get_items()] == ["a", "b", "c", "d"]
        await client.close()

    async def test_server_closes_before_applying_nothing_is_written(
        self, tcp_url, redis_proxy, raw_redis
    ):
        client = redis_client(tcp_url, timeout=2.0, retry_interval=0.01)
        session = RedisSession(f"f-{uuid.uuid4().hex[:6]}", redis_client=client)
        await session.add_items([msg("a")])
        redis_proxy.faults.fail(times=2, command="EVALSHA")
        with pytest.raises(StoreUnavailable, match="replace_items: Redis unreachable"):
            await session._atomic_replace_items([msg("x")])
        assert [json.loads(x)["content"] for x in raw_redis.lrange(session.keys.items, 0, -1)] == [
            "a"
        ]
        await client.close()

    async def test_wrong_password_is_refused_and_never_shown(self, redis_server):
        port = redis.connection.parse_url(redis_server.url)["port"]
        url = f"redis://:s3cret-pw@127.0.0.1:{port}/0"
        client = store_client(url, timeout=2.0)
        session = RedisSession("auth", redis_client=client)
        refused = "get_items: Redis refused the credentials"
        with pytest.raises(StoreResponseError, match=refused) as e:
            await session.get_items()
        assert "s3cret" not in str(e.value) and "s3cret" not in repr(e.value)
        assert "s3cret" not in repr(client) and "s3cret" not in repr(session)
        await client.close()


async def _until(condition: Any, limit: float = 5.0) -> None:
    """Wait (bounded) for something another thread or process does."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# --- TLS --------------------------------------------------------------------------------------


def _tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 it signed.

    With the extensions Python 3.13's strict verification asks for (key
    usage, subject and authority key identifiers).
    """
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rejoin test CA")])

    def usage(**on: bool) -> x509.KeyUsage:
        names = [
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ]
        return x509.KeyUsage(**{n: on.get(n, False) for n in names})

    def base(subject: x509.Name, public: Any) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        )

    ca = (
        base(ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage(key_cert_sign=True, crl_sign=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        base(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "server.crt", directory / "server.key", directory / "ca.crt")
    pem = serialization.Encoding.PEM
    files.ca.write_bytes(ca.public_bytes(pem))
    files.cert.write_bytes(server.public_bytes(pem))
    files.key.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return files


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[tuple[str, TlsFiles]]:
    """A TLS-only redis-server (skips if redis-server is missing or built without TLS)."""
    with tempfile.TemporaryDirectory(prefix="rejoin-tls-") as workdir:
        files = _tls_files(Path(workdir))
        private = PrivateRedis(workdir, tls=files)
        try:
            url = private.start()
        except Exception as exc:  # no binary, or no TLS in this build
            pytest.skip(f"no TLS redis-server here: {exc}")
        try:
            yield url, files
        finally:
            private.stop()


class TestTls:
    async def test_rediss_works_with_the_servers_ca(self, tls_redis):
        url, files = tls_redis
        assert url.startswith("rediss://")
        session = RedisSession.from_url(
            "tls_1", url=url, redis_kwargs={"ssl_ca_certs": str(files.ca)}, timeout=2.0
        )
        await session.add_items([msg("over TLS")])
        assert await session.get_items() == [msg("over TLS")]
        await session.close()

    async def test_a_server_certificate_nobody_trusts_is_refused(self, tls_redis):
        url, _ = tls_redis
        session = RedisSession.from_url("tls_2", url=url, timeout=2.0)  # system CAs only
        with pytest.raises(StoreUnavailable, match="Redis unreachable") as err:
            await session.get_items()
        assert "certificate" in str(err.value).lower()
        await session.close()

    async def test_plain_tcp_to_a_tls_port_fails_cleanly(self, tls_redis):
        url, _ = tls_redis
        plain = url.replace("rediss://", "redis://")
        session = RedisSession.from_url("tls_3", url=plain, timeout=0.5)
        with pytest.raises(StoreUnavailable):
            await session.get_items()
        await session.close()


# --- Redis Cluster ----------------------------------------------------------------------------


class TestCluster:
    async def test_each_sessions_keys_share_one_slot_and_sessions_spread(self, redis_cluster):
        url = "redis+cluster://" + str(redis_cluster.url).split("://", 1)[1]
        client = redis_client(url, timeout=5.0)
        try:
            # GIVEN 30 sessions written through the cluster client (items, ops, results)
            sessions = [RedisSession(f"slot-{n}", redis_client=client) for n in range(30)]
            for s in sessions:
                await s.add_items([msg("a"), msg("b")])
                await s.pop_item()
            # THEN every key of a session is in its session's slot ...
            per_node: dict[str, set[str]] = {}
            for node_url in redis_cluster.node_urls:
                node = redis.Redis.from_url(node_url, decode_responses=True)
                try:
                    per_node[node_url] = set(node.keys("rejoin:*"))
                    for key in per_node[node_url]:
                        tag = key.split("{", 1)[1].split("}", 1)[0]
                        assert node.cluster("keyslot", key) == node.cluster("keyslot", tag)
                finally:
                    node.close()
            for s in sessions:
                holders = [u for u, keys in per_node.items() if s.keys.items in keys]
                owners = [u for u, keys in per_node.items() if s.keys.ops in keys]
                assert holders == owners and len(holders) == 1, s.session_id
            # ... and the sessions are spread over all three nodes (real routing ran)
            assert all(per_node.values()) and len(per_node) == 3
        finally:
            await client.close()

    async def test_an_unreachable_cluster_is_unavailable(self):
        client = redis_client(f"redis+cluster://127.0.0.1:{closed_port()}", timeout=1.0)
        with pytest.raises(StoreUnavailable, match="get_items: Redis unreachable"):
            await RedisSession("nowhere", redis_client=client).get_items()

    async def test_first_calls_of_a_fresh_client_run_concurrently(self, redis_cluster):
        url = "redis+cluster://" + str(redis_cluster.url).split("://", 1)[1]
        for attempt in range(5):
            # GIVEN a new cluster client (its slot map not loaded yet)
            client = redis_client(url, timeout=5.0)
            session = RedisSession(f"fresh-{attempt}", redis_client=client)
            try:
                # WHEN 50 calls on one session start at once
                await asyncio.gather(*(session.add_items([msg(str(n))]) for n in range(50)))
                # THEN every one succeeded: none went to a wrong node while the map
                # loaded (a MOVED makes redis-py rebuild its nodes and close the
                # connections other calls are using)
                assert len(await session.get_items()) == 50
            finally:
                await client.close()

    async def test_keys_in_two_slots_are_refused(self, redis_cluster):
        url = "redis+cluster://" + str(redis_cluster.url).split("://", 1)[1]
        client = redis_client(url, timeout=5.0)
        try:
            script = Script("two_slots", "return #KEYS\n")
            # GIVEN keys without a shared hash tag (what the tags prevent)
            with pytest.raises(StoreResponseError, match=r"two_slots.*same (key )?slot"):
                await script(client, ["rejoin:{a}:items", "rejoin:{b}:items"], [])
            # AND the same keys behind one tag run
            assert await script(client, ["rejoin:{a}:items", "rejoin:{a}:meta"], []) == 2
        finally:
            await client.close()


# --- RedisSession, the SDK's shape ------------------------------------------------------------


class TestRedisSessionShape:
    def test_constructor_and_from_url_take_the_sdks_arguments(self):
        from agents.extensions.memory import RedisSession as SdkRedisSession

        for name in ("__init__", "from_url"):
            sdk = inspect.signature(getattr(SdkRedisSession, name)).parameters
            ours = inspect.signature(getattr(RedisSession, name)).parameters
            for param, spec in sdk.items():
                assert param in ours, f"{name}: missing {param}"
                assert ours[param].kind == spec.kind, f"{name}: {param}"

    async def test_a_drop_in_for_the_sdks_redis_session(self, redis_server, raw_redis):
        import agents
        from scripted import script

        agents.set_tracing_disabled(True)
        # GIVEN the SDK's usage pattern, with rejoin's class
        session = RedisSession.from_url(
            "swap_1",
            url=redis_server.url,
            redis_kwargs={"client_name": "rejoin-test"},
            session_settings={"limit": 10},
            ttl=60,
        )
        agent = agents.Agent(name="a", model=script(["hi Ada"]))
        # WHEN the Runner uses it
        result = await agents.Runner.run(agent, "Ada: hello", session=session)
        # THEN it works as the SDK's would, in rejoin's hash-tagged layout
        assert result.final_output == "hi Ada"
        assert await session.ping() is True
        assert (await session.get_items())[0].get("content") == "Ada: hello"
        assert raw_redis.llen("rejoin:{swap_1}:items") == 2
        assert 0 < raw_redis.ttl("rejoin:{swap_1}:items") <= 60
        await session.close()

    async def test_takes_a_raw_client_without_decoded_responses(self, redis_server):
        import redis.asyncio as aioredis

        raw = aioredis.Redis.from_url(redis_server.url)  # bytes answers
        session = RedisSession("raw_1", redis_client=raw)
        await session.add_items([msg("é😀")])
        assert await session.get_items() == [msg("é😀")]
        assert await session.pop_item() == msg("é😀")
        await raw.aclose()

    def test_from_env(self, monkeypatch, redis_server):
        monkeypatch.delenv("REJOIN_STORE_URL", raising=False)
        with pytest.raises(ConfigError, match="REJOIN_STORE_URL"):
            RedisSession.from_env("e")
        monkeypatch.setenv("REJOIN_STORE_URL", redis_server.url)
        monkeypatch.setenv("REJOIN_STORE_TIMEOUT", "2")

        async def go() -> Any:
            session = RedisSession.from_env("env_tcp")
            await session.add_items([msg("hi")])
            items = await session.get_items()
            await session.close()
            return items

        assert asyncio.run(go()) == [msg("hi")]

    def test_is_exported_next_to_upstash_session(self):
        assert rejoin.RedisSession is RedisSession and rejoin.UpstashSession is UpstashSession
        assert {"RedisSession", "store_client", "redis_client"} <= set(rejoin.__all__)


# --- the rooms, unchanged, over TCP ------------------------------------------------------------


def _stack_on(upstash: Any, url: str, **overrides: Any) -> Any:
    """The whole deployment with its store configured as a URL (no factory), as on AWS."""
    stack = make_stack(upstash, agent=offline_agent(), **overrides)
    settings = replace(stack.settings, store_url=url, upstash_url="", upstash_token="")
    stack.settings = settings
    stack.rt = Runtime(
        settings,
        clock=stack.clock,
        sender=stack.sender,
        queue=stack.queue,
        agent_factory=lambda rt: stack.agent,
    )
    set_runtime(stack.rt)
    return stack


@pytest.fixture
def tcp_stack(upstash: Any, tcp_url: str) -> Iterator[Any]:
    """The whole deployment with its store configured as a redis:// URL."""
    yield _stack_on(upstash, tcp_url, rate_limit=3, rate_window_seconds=60)
    set_runtime(None)


class TestRoomsOverTcp:
    def test_chat_turn_drop_resume_and_cleanup(self, tcp_stack, raw_redis, redis_proxy):
        stack = tcp_stack
        # GIVEN Ada and Bob in a session, the store reached over TCP only
        ada, welcome = stack.join("tcp-room", "ada")
        bob, _ = stack.join("tcp-room", "bob")
        assert isinstance(stack.rt.redis(), TcpRedisClient)
        stack.say(ada, "hello over tcp")
        stack.run_turns()
        # THEN both saw the message and the agent's answer
        for cid in (ada, bob):
            events = stack.logged(cid)
            assert "hello over tcp" in [e.get("text") for e in events]
            assert stack.last(cid, "agent_message")["text"]
        assert raw_redis.llen("rejoin:{tcp-room}:items") >= 2
        # AND the proxy saw only scripts: the rooms speak to Redis through them
        commands = redis_proxy.stats.snapshot()["commands"]
        assert set(commands) <= {"EVAL", "EVALSHA"}, commands
        # WHEN everyone leaves and Bob comes back within the grace period
        stack.drop(ada)
        stack.drop(bob)
        stack.clock.advance(60)
        bob_again, back = stack.join("tcp-room", "bob", epoch=welcome["epoch"], last_seq=0)
        assert back["epoch"] == welcome["epoch"] and back["resumed"] is True
        # WHEN he leaves and the grace period runs out, the cleanup deletes it all
        stack.drop(bob_again)
        stack.clock.advance(stack.settings.grace_seconds + 3)  # + the cleanup's skew margin
        assert stack.cleanup()["expired"] == ["tcp-room"]
        assert raw_redis.keys("rejoin:{tcp-room}:*") == []

    def test_rate_limit_over_tcp(self, tcp_stack):
        # GIVEN a limit of 3 frames a minute (kept in the transition scripts, over TCP)
        ada, _ = tcp_stack.join("tcp-limit", "ada")
        # WHEN Ada sends messages quickly
        answers = [tcp_stack.say(ada, f"m{n}") for n in range(5)]
        kinds = [a["type"] for a in answers]
        # THEN the first is acknowledged, and at most 3 get through before a refusal
        assert kinds[0] == "ack" and "error" in kinds
        refused = answers[kinds.index("error")]
        assert kinds.index("error") <= 3
        assert refused["code"] == "rate_limited" and refused["retry_after"] > 0


@pytest.fixture
def cluster_stack(upstash: Any, redis_cluster: Any) -> Iterator[Any]:
    """The whole deployment on a three-node Redis Cluster (redis+cluster://)."""
    yield _stack_on(upstash, str(redis_cluster.url).replace("redis://", "redis+cluster://", 1))
    set_runtime(None)


class TestRoomsOnCluster:
    def test_every_transition_runs_with_the_index_in_its_own_slot(
        self, cluster_stack: Any, redis_cluster: Any
    ) -> None:
        import redis.cluster

        stack = cluster_stack
        inspect = redis.cluster.RedisCluster.from_url(str(redis_cluster.url), decode_responses=True)
        try:
            # GIVEN several sessions, spread over the cluster's nodes by their hash tags
            sessions = [f"cl-{n}" for n in range(6)]
            people = {}
            for sid in sessions:
                ada, welcome = stack.join(sid, "ada")
                bob, _ = stack.join(sid, "bob")
                people[sid] = (ada, bob, welcome["epoch"])
                stack.say(ada, f"hello {sid}")
                stack.send(bob, {"action": "ping"})
            stack.run_turns()
            # THEN each got its message and answer
            for sid, (ada, bob, _) in people.items():
                assert f"hello {sid}" in [e.get("text") for e in stack.logged(bob)]
                assert stack.last(ada, "agent_message")["text"]
            slots = {inspect.keyslot(f"rejoin:{{{sid}}}:meta") for sid in sessions}
            assert len(slots) > 1  # (not all in one slot: the test means something)
            # WHEN they drop, one comes back within the grace, the rest expire
            for ada, bob, _ in people.values():
                stack.drop(ada)
                stack.send(bob, {"action": "leave"})
            assert inspect.zcard("rejoin:schedule") == len(sessions)
            stack.clock.advance(60)
            _back, welcome = stack.join("cl-0", "ada", epoch=people["cl-0"][2], last_seq=0)
            assert welcome["epoch"] == people["cl-0"][2] and welcome["recovered"] is True
            stack.clock.advance(stack.settings.grace_seconds + 3)
            report = stack.cleanup()
            # THEN the cleanup found them through the index and deleted all but the one
            assert sorted(report["expired"]) == sorted(sessions[1:])
            for sid in sessions[1:]:
                assert inspect.exists(f"rejoin:{{{sid}}}:meta") == 0
            assert inspect.zscore("rejoin:schedule", "cl-0") is not None
            assert stack.rt.run(stack.rt.rooms().status("cl-0"))["connections"] == 1
        finally:
            inspect.close()
