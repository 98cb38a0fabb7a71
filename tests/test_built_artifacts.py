"""What `sam build` produced is what Lambda runs, and each handler answers its events from it.

Two parts:

- Fast checks of ``events/`` (no build needed): the files are what
  ``events/generate.py`` writes, every event has the exact shape its service sends
  (validated with the same Powertools models the handlers use), the sample token
  verifies with the documented local key, and ``events/env.local.json`` overrides only
  variables the template declares (SAM silently ignores any other).
- ``slow``: the artefacts in ``.aws-sam/`` (``bash scripts/check-template.sh`` builds
  them; ``make test`` runs it first). The arm64 build is checked for what it contains;
  then every handler is imported from the build *for this machine's architecture*
  (``.aws-sam/host/build`` on x86_64, where arm64 wheels cannot load) in a fresh
  interpreter with no site-packages, ``sys.path`` laid out as Lambda lays it out
  (``/var/task``, then the layer's ``/opt/python``, then the runtime's own boto3), the
  environment the template gives the function (with the local overrides of
  ``events/env.local.json`` pointed at test servers), and invoked with each event.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import unquote

import pytest
from test_template import FUNCTIONS, env_of, fn_props, load_template

ROOT = Path(__file__).resolve().parents[1]
EVENTS = ROOT / "events"
BUILD = ROOT / ".aws-sam" / "build"
HOST_IS_ARM64 = platform.machine().lower() in ("aarch64", "arm64")
# The build this machine can import: the arm64 one only on arm64.
HOST_BUILD = BUILD if HOST_IS_ARM64 else ROOT / ".aws-sam" / "host" / "build"
BUILD_HINT = "run `bash scripts/check-template.sh` (make test does) to build it"
_BUILT: list[bool] = []


def _newest_source() -> float:
    paths = [
        ROOT / "template.yaml",
        *(ROOT / "shared").rglob("*"),
        *(ROOT / "functions").rglob("*"),
    ]
    return max(p.stat().st_mtime for p in paths if p.is_file() and "__pycache__" not in p.parts)


def ensure_built() -> None:
    """Build the artefacts these tests import when they are missing or older than the sources.

    A plain ``sam build`` (or ``make build``) builds only arm64, which an x86_64
    machine cannot import: the tests would otherwise skip. They build what they
    need instead (``scripts/check-template.sh``, cached), and fail, saying why,
    when that is not possible.
    """
    if _BUILT:
        return
    stamps = [BUILD / "template.yaml", HOST_BUILD / "template.yaml"]
    newest = _newest_source()
    if not all(s.is_file() and s.stat().st_mtime >= newest for s in stamps):
        result = subprocess.run(
            ["bash", "scripts/check-template.sh"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        if result.returncode != 0:
            pytest.fail(
                "the built artefacts are missing or older than the sources, and "
                "`bash scripts/check-template.sh` could not build them:\n"
                + (result.stdout + result.stderr)[-3000:]
            )
    _BUILT.append(True)


ENV_LOCAL = json.loads((EVENTS / "env.local.json").read_text())["Parameters"]

CONNECTION_ID = "L0SM9cOFvHcCIhw="
SESSION = "demo-session"
# The packages the Lambda python3.13 runtime itself provides (boto3 and its dependencies):
# the only ones a handler may use without shipping them.
RUNTIME_PACKAGES = ("boto3", "botocore", "s3transfer", "jmespath", "dateutil", "six", "urllib3")


def load_json(name: str) -> Any:
    return json.loads((EVENTS / name).read_text())


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rejoin_events_generate", EVENTS / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- events/ (fast) -------------------------------------------------------------------------------


def test_event_files_are_what_generate_py_writes():
    gen = load_generator()
    expected = gen.all_events()
    on_disk = {p.name for p in EVENTS.glob("*.json")} - {"env.local.json"}
    assert on_disk == set(expected), "run .venv/bin/python events/generate.py"
    for name, event in expected.items():
        assert (EVENTS / name).read_text() == gen.render(event), (
            f"events/{name} is stale: run .venv/bin/python events/generate.py"
        )


def test_sample_token_verifies_with_the_local_key():
    from rejoin.tokens import TokenVerifier

    token = load_json("connect.json")["queryStringParameters"]["token"]
    # The sample token lives until 2100: only the local env's raised maximum lifetime
    # accepts it (a deployment's default, 12 h, refuses it).
    verifier = TokenVerifier(
        secret=ENV_LOCAL["REJOIN_TOKEN_SECRET"],
        max_ttl_seconds=int(ENV_LOCAL["REJOIN_TOKEN_MAX_TTL_SECONDS"]),
    )
    grant = verifier.verify(token, session_id=SESSION)
    assert grant.participant.user_id == "u-ada"
    assert grant.participant.name == "Ada"
    assert grant.expires_at >= 4102444800  # 2100-01-01
    assert load_json("api-transcript.json")["headers"]["authorization"] == f"Bearer {token}"


def test_websocket_events_parse_with_the_handlers_models():
    from rejoin.events import ConnectEvent, DisconnectEvent, MessageEvent

    connect = ConnectEvent.model_validate(load_json("connect.json"))
    assert connect.request_context.connection_id == CONNECTION_ID
    assert connect.query_string_parameters == {
        "session": SESSION,
        "token": load_json("connect.json")["queryStringParameters"]["token"],
    }
    disconnect = DisconnectEvent.model_validate(load_json("disconnect.json"))
    assert disconnect.request_context.disconnect_status_code == 1001
    for name in ("resume", "say", "ping", "stop", "leave", "bad"):
        event = load_json(f"message-{name}.json")
        parsed = MessageEvent.model_validate(event)
        assert parsed.request_context.connection_id == CONNECTION_ID
        assert "headers" not in event, "API Gateway sends message routes without headers"
        route = event["requestContext"]["routeKey"]
        if name == "bad":
            assert route == "$default"
            with pytest.raises(ValueError):
                json.loads(event["body"])
        else:
            assert json.loads(event["body"])["action"] == route == name


def test_turn_event_is_an_sqs_fifo_batch():
    from aws_lambda_powertools.utilities.parser.models import SqsModel

    from rejoin.queue import TurnRequest, dedup_id

    event = load_json("turn.json")
    SqsModel.model_validate(event)
    assert 1 <= len(event["Records"]) <= 10
    for record in event["Records"]:
        turn = TurnRequest.from_json(record["body"])
        attrs = record["attributes"]
        assert attrs["MessageGroupId"] == turn.session_id == SESSION
        assert attrs["MessageDeduplicationId"] == dedup_id(
            turn.session_id, turn.epoch, turn.turn_id
        )
        assert record["md5OfBody"] == hashlib.md5(record["body"].encode()).hexdigest()
        assert record["eventSourceARN"].endswith(".fifo")
        assert json.loads(record["body"]) == {
            "v": 2,
            "session": SESSION,
            "epoch": "e1",
            "turn": "3",
            "reply_to": 3,
        }


def test_authorizer_event_and_the_context_the_others_carry():
    from rejoin.authorizer import identity_from_context

    event = load_json("authorize.json")
    assert event["type"] == "REQUEST" and event["methodArn"].endswith("/$connect")
    assert event["queryStringParameters"]["session"] == SESSION
    assert "authorizer" not in event["requestContext"]
    for name in ("connect", "disconnect", "message-say", "message-resume", "message-stop"):
        context = load_json(f"{name}.json")["requestContext"]["authorizer"]
        who = identity_from_context(context)
        assert (who.session_id, who.user_id, who.name) == (SESSION, "u-ada", "Ada")


def test_cleanup_event_is_a_scheduled_event():
    from aws_lambda_powertools.utilities.parser.models import EventBridgeModel

    event = load_json("cleanup.json")
    EventBridgeModel.model_validate(event)
    assert event["detail-type"] == "Scheduled Event" and event["source"] == "aws.events"


def test_api_events_are_http_api_v2():
    from aws_lambda_powertools.utilities.parser.models import APIGatewayProxyEventV2Model

    for path in sorted(EVENTS.glob("api-*.json")):
        event = json.loads(path.read_text())
        APIGatewayProxyEventV2Model.model_validate(event)
        assert event["version"] == "2.0"
        assert event["rawPath"] == event["requestContext"]["http"]["path"]
        assert event["requestContext"]["stage"] == "$default"
        assert all(k == k.lower() for k in event["headers"]), "HTTP API lowercases headers"


def test_env_local_overrides_only_declared_variables():
    t = load_template()
    declared = {var for name in FUNCTIONS for var in env_of(t, name)}
    assert set(ENV_LOCAL) <= declared, set(ENV_LOCAL) - declared
    # Nothing may reach for Secrets Manager locally.
    for var in ENV_LOCAL:
        if var.endswith("_SECRET_NAME") or var == "REJOIN_UPSTASH_SECRET":
            assert ENV_LOCAL[var] == "", var


# --- the arm64 build (slow) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def build() -> Path:
    ensure_built()
    return BUILD


def _elf_machine(path: Path) -> int:
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF", path
    return int.from_bytes(header[18:20], "little")


def _dist_names(site: Path) -> set[str]:
    return {re.sub(r"[-_.]+", "-", p.name.split("-")[0]).lower() for p in site.glob("*.dist-info")}


def _requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name = re.split(r"[\[<>=!~; ]", line, maxsplit=1)[0]
            names.add(re.sub(r"[-_.]+", "-", name).lower())
    return names


def _same_tree(built: Path, source: Path, pattern: str = "*.py") -> None:
    src = {p.relative_to(source) for p in source.rglob(pattern) if "__pycache__" not in p.parts}
    out = {p.relative_to(built) for p in built.rglob(pattern) if "__pycache__" not in p.parts}
    assert src == out, f"{built} differs from {source}: {sorted(map(str, src ^ out))[:10]}"
    for rel in src:
        assert (built / rel).read_bytes() == (source / rel).read_bytes(), (
            f"{built / rel} is stale: {BUILD_HINT}"
        )


@pytest.mark.slow
@pytest.mark.parametrize("name", FUNCTIONS)
def test_each_function_artefact_is_its_source(build, name):
    source = ROOT / "functions" / FUNCTIONS[name]
    artefact = build / name
    assert (artefact / "app.py").is_file()
    assert (artefact / "app.py").read_bytes() == (source / "app.py").read_bytes(), BUILD_HINT
    requirements = source / "requirements.txt"
    if requirements.is_file():
        missing = _requirement_names(requirements) - _dist_names(artefact)
        assert not missing, f"{name}: not installed in the artefact: {missing}"
    else:
        # Nothing but the handler: the layer brings everything else.
        assert not list(artefact.glob("*.dist-info")), name


@pytest.mark.slow
def test_layer_holds_rejoin_and_its_requirements_on_opt_python(build):
    python = build / "RejoinLayer" / "python"
    assert python.is_dir(), "the layer must put its packages under python/ (/opt/python)"
    _same_tree(python / "rejoin", ROOT / "shared" / "rejoin")
    missing = _requirement_names(ROOT / "shared" / "requirements.txt") - _dist_names(python)
    assert not missing, f"not installed in the layer: {missing}"
    for module in ("rejoin", "upstash_redis", "aws_lambda_powertools", "jwt", "agents", "pydantic"):
        assert (python / module).is_dir(), module


@pytest.mark.slow
def test_native_code_is_built_for_arm64(build):
    objects = list(build.rglob("*.so"))
    assert objects, "expected compiled extensions (pydantic-core, jiter, cryptography...)"
    aarch64 = 183
    wrong = [str(p.relative_to(build)) for p in objects if _elf_machine(p) != aarch64]
    assert not wrong, f"not arm64: {wrong[:10]}"


@pytest.mark.slow
def test_built_template_points_at_the_artefacts(build):
    built = load_template(build / "template.yaml")
    for name in FUNCTIONS:
        assert built["Resources"][name]["Properties"]["CodeUri"] == name
    assert built["Resources"]["RejoinLayer"]["Properties"]["ContentUri"] == "RejoinLayer"


@pytest.mark.slow
def test_host_build_has_the_same_code(build):
    if HOST_IS_ARM64:
        pytest.skip("on arm64 the deployable build is the test build")
    _same_tree(
        HOST_BUILD / "RejoinLayer" / "python" / "rejoin",
        build / "RejoinLayer" / "python" / "rejoin",
    )
    for name in FUNCTIONS:
        assert (HOST_BUILD / name / "app.py").read_bytes() == (build / name / "app.py").read_bytes()
    assert _dist_names(HOST_BUILD / "RejoinLayer" / "python") == _dist_names(
        build / "RejoinLayer" / "python"
    )


# --- invoking the built handlers (slow) ----------------------------------------------------------

# Runs in a fresh `python -S` (no site-packages): sys.path as Lambda's python3.13 runtime
# has it, the handler imported by name from the task root, called once with the event.
_RUNNER = r"""
import json, os, sys, time, uuid
task, layer, runtime_site, event_path, out_path = sys.argv[1:6]
stdlib = [p for p in sys.path if p and os.path.isabs(p) and "site-packages" not in p]
sys.path[:] = [task, os.path.join(layer, "lib", "python3.13", "site-packages"), layer,
               *stdlib, runtime_site]
os.chdir(task)

class Context:
    def __init__(self):
        self.function_name = os.environ["AWS_LAMBDA_FUNCTION_NAME"]
        self.function_version = os.environ["AWS_LAMBDA_FUNCTION_VERSION"]
        self.memory_limit_in_mb = int(os.environ["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"])
        self.invoked_function_arn = ("arn:aws:lambda:%s:123456789012:function:%s"
                                     % (os.environ["AWS_REGION"], self.function_name))
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = os.environ["AWS_LAMBDA_LOG_GROUP_NAME"]
        self.log_stream_name = os.environ["AWS_LAMBDA_LOG_STREAM_NAME"]
        self._deadline = time.time() + int(os.environ["AWS_LAMBDA_FUNCTION_TIMEOUT"])
    def get_remaining_time_in_millis(self):
        return max(0, int((self._deadline - time.time()) * 1000))

module_name, function = os.environ["_HANDLER"].rsplit(".", 1)
handler = getattr(__import__(module_name), function)
with open(event_path) as f:
    event = json.load(f)
result = handler(event, Context())
with open(out_path, "w") as f:
    json.dump(result, f, default=str)
"""


@dataclass
class Invocation:
    """What one handler call answered and printed."""

    result: Any
    stdout: str
    stderr: str


def runtime_site() -> Path:
    """A directory with only the runtime-provided packages (symlinks into this venv)."""
    import boto3

    site = Path(boto3.__file__).resolve().parents[1]
    digest = hashlib.sha256(str(site).encode()).hexdigest()[:12]
    target = Path(tempfile.gettempdir()) / f"rejoin-lambda-runtime-{os.getuid()}-{digest}"
    target.mkdir(exist_ok=True)
    for name in RUNTIME_PACKAGES:
        for candidate in (site / name, site / f"{name}.py"):
            link = target / candidate.name
            if candidate.exists() and not link.is_symlink():
                link.symlink_to(candidate)
    return target


def lambda_env(function_name: str, overrides: dict[str, str]) -> dict[str, str]:
    """The environment Lambda (or `sam local invoke --env-vars`) gives the function.

    The template's variables, with parameter defaults resolved and anything unresolvable
    (resource references) empty; then ``overrides`` for the declared variables only, as
    SAM does; then the variables the Lambda runtime itself sets.
    """
    t = load_template()
    params = t["Parameters"]
    env: dict[str, str] = {}
    for var, value in env_of(t, function_name).items():
        if isinstance(value, dict) and set(value) == {"Ref"} and value["Ref"] in params:
            value = params[value["Ref"]].get("Default", "")
        env[var] = (
            value if isinstance(value, str) else ("" if isinstance(value, dict) else str(value))
        )
    env.update({k: v for k, v in overrides.items() if k in env})
    props = fn_props(t, function_name)
    task = HOST_BUILD / function_name
    env.update(
        {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "en_US.UTF-8",
            "TZ": ":UTC",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_EXECUTION_ENV": "AWS_Lambda_python3.13",
            "AWS_LAMBDA_FUNCTION_NAME": f"rejoin-{function_name}",
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(props["MemorySize"]),
            "AWS_LAMBDA_FUNCTION_TIMEOUT": str(props["Timeout"]),
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/rejoin/{FUNCTIONS[function_name]}",
            "AWS_LAMBDA_LOG_STREAM_NAME": "2025/11/25/[$LATEST]0123456789abcdef",
            "AWS_LAMBDA_LOG_FORMAT": props["LoggingConfig"]["LogFormat"],
            "AWS_LAMBDA_LOG_LEVEL": "INFO",
            "AWS_SAM_LOCAL": "true",  # as under `sam local invoke`: no X-Ray daemon here
            "LAMBDA_TASK_ROOT": str(task),
            "_HANDLER": props["Handler"],
        }
    )
    return env


def invoke_built(function_name: str, event_path: Path, env: dict[str, str]) -> Invocation:
    """Invoke ``function_name``'s built handler with the event, as Lambda would; return its answer.

    The handler is imported from ``HOST_BUILD/<function_name>/app.py`` with the built layer
    as ``/opt/python``, in a subprocess of its own (no module cache is shared between
    handlers or events), with exactly ``env`` as its environment.
    """
    if sys.version_info[:2] != (3, 13):
        pytest.skip("the artefacts are built for python3.13")
    ensure_built()
    task = HOST_BUILD / function_name
    layer = HOST_BUILD / "RejoinLayer" / "python"
    if not (task / "app.py").is_file() or not layer.is_dir():
        pytest.fail(f"no built {function_name} in {HOST_BUILD.relative_to(ROOT)}: {BUILD_HINT}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.run(
            [sys.executable, "-S", "-c", _RUNNER, str(task), str(layer), str(runtime_site()),
             str(event_path), str(out)],
            env=env,
            cwd=task,
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip
        if proc.returncode != 0 or not out.is_file():
            raise AssertionError(
                f"{function_name} with {event_path.name} failed (exit {proc.returncode}):\n"
                f"{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}"
            )
        return Invocation(json.loads(out.read_text()), proc.stdout, proc.stderr)


# --- test servers: API Gateway's management API and SQS ----------------------------------------


@dataclass
class ManagementApi:
    """A stand-in for API Gateway's @connections API that records what the handlers post."""

    url: str
    live: set[str] = field(default_factory=set)
    posts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)

    def frames(self, connection_id: str = CONNECTION_ID) -> list[dict[str, Any]]:
        return [body for cid, body in self.posts if cid == connection_id]

    def types(self, connection_id: str = CONNECTION_ID) -> list[str]:
        return [f.get("type", "?") for f in self.frames(connection_id)]


@contextlib.contextmanager
def management_api() -> Iterator[ManagementApi]:
    path_re = re.compile(r"^(?:/[^/@]+)?/@connections/([^/?]+)")
    state = ManagementApi(url="", live={CONNECTION_ID})
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _conn(self) -> str | None:
            m = path_re.match(self.path)
            return unquote(m[1]) if m else None

        def _answer(self, status: int, body: dict[str, Any] | None = None, error: str = "") -> None:
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            if error:
                self.send_header("x-amzn-ErrorType", error)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            cid = self._conn()
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with lock:
                if cid not in state.live:
                    return self._answer(410, {"message": None}, "GoneException")
                try:
                    frame = json.loads(raw)
                except ValueError:
                    frame = {"type": "?", "raw": base64.b64encode(raw).decode()}
                state.posts.append((cid, frame))
            self._answer(200)

        def do_GET(self) -> None:
            cid = self._conn()
            if cid not in state.live:
                return self._answer(410, {"message": None}, "GoneException")
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self._answer(
                200,
                {
                    "ConnectedAt": now,
                    "LastActiveAt": now,
                    "Identity": {"SourceIp": "203.0.113.10", "UserAgent": "test"},
                },
            )

        def do_DELETE(self) -> None:
            cid = self._conn()
            with lock:
                if cid not in state.live:
                    return self._answer(410, {"message": None}, "GoneException")
                state.live.discard(cid)
                state.deletes.append(cid)
            self._answer(204)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Sqs:
    endpoint: str
    queue_url: str
    client: Any


@contextlib.contextmanager
def moto_sqs() -> Iterator[Sqs]:
    # Not importorskip: without moto's server (moto[server]) this test would
    # silently stop proving that the built artefacts work.
    import boto3
    import moto.server as moto_server

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client(
            "sqs",
            region_name="us-east-1",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        url = client.create_queue(
            QueueName="rejoin-turns.fifo",
            Attributes={"FifoQueue": "true", "ContentBasedDeduplication": "false"},
        )["QueueUrl"]
        yield Sqs(endpoint, url, client)
    finally:
        server.stop()


@dataclass
class Stack:
    """Everything a built handler talks to, and the overrides that point it there."""

    management: ManagementApi
    sqs: Sqs
    overrides: dict[str, str]
    secrets: tuple[str, ...]


@pytest.fixture
def stack(upstash: Any) -> Iterator[Stack]:
    """The local Upstash endpoint (conftest's ``upstash``), moto's SQS, a management API.

    ``events/env.local.json`` with its ``host.docker.internal`` addresses replaced by
    these servers': the same variables ``sam local invoke --env-vars`` would set.
    """
    with management_api() as management, moto_sqs() as sqs:
        overrides = dict(ENV_LOCAL)
        overrides.update(
            {
                "UPSTASH_REDIS_REST_URL": upstash.url,
                "UPSTASH_REDIS_REST_TOKEN": upstash.token,
                "REJOIN_WS_ENDPOINT": management.url,
                "REJOIN_TURN_QUEUE_URL": sqs.queue_url,
                "AWS_ENDPOINT_URL_SQS": sqs.endpoint,
            }
        )
        secrets = (upstash.token, ENV_LOCAL["REJOIN_TOKEN_SECRET"], ENV_LOCAL["REJOIN_ADMIN_KEY"])
        yield Stack(management, sqs, overrides, secrets)


def _sqs_event_from(message: dict[str, Any], queue_url: str) -> dict[str, Any]:
    """The Lambda event for a message received from the queue (as the poller builds it)."""
    name = queue_url.rsplit("/", 1)[1]
    return {
        "Records": [
            {
                "messageId": message["MessageId"],
                "receiptHandle": message["ReceiptHandle"],
                "body": message["Body"],
                "attributes": {
                    "ApproximateReceiveCount": message["Attributes"]["ApproximateReceiveCount"],
                    "SentTimestamp": message["Attributes"]["SentTimestamp"],
                    "SequenceNumber": message["Attributes"].get("SequenceNumber", "1"),
                    "MessageGroupId": message["Attributes"]["MessageGroupId"],
                    "SenderId": message["Attributes"].get("SenderId", "AIDAEXAMPLE"),
                    "MessageDeduplicationId": message["Attributes"]["MessageDeduplicationId"],
                    "ApproximateFirstReceiveTimestamp": message["Attributes"][
                        "ApproximateFirstReceiveTimestamp"
                    ],
                },
                "messageAttributes": {},
                "md5OfBody": message["MD5OfBody"],
                "eventSource": "aws:sqs",
                "eventSourceARN": f"arn:aws:sqs:us-east-1:123456789012:{name}",
                "awsRegion": "us-east-1",
            }
        ]
    }


@pytest.mark.slow
def test_every_built_handler_answers_its_events(stack: Stack, tmp_path: Path):
    """The whole story of events/, in order, each event through its built handler."""
    logs: list[str] = []

    def invoke(function_name: str, event: str | Path) -> Any:
        path = event if isinstance(event, Path) else EVENTS / event
        inv = invoke_built(function_name, path, lambda_env(function_name, stack.overrides))
        logs.append(inv.stdout + inv.stderr)
        return inv.result

    def ok(answer: Any) -> None:
        assert isinstance(answer, dict) and answer.get("statusCode") == 200, answer

    mgmt = stack.management

    # The authorizer admits Ada; its context is what the later events carry.
    policy = invoke("AuthorizeFunction", "authorize.json")
    assert policy["policyDocument"]["Statement"][0]["Effect"] == "Allow", policy
    carried = load_json("connect.json")["requestContext"]["authorizer"]
    assert {**policy["context"], "principalId": policy["principalId"]} == {
        k: v for k, v in carried.items() if k != "integrationLatency"
    }

    ok(invoke("ConnectFunction", "connect.json"))

    ok(invoke("MessageFunction", "message-resume.json"))
    welcome = [f for f in mgmt.frames() if f.get("type") == "welcome"]
    assert welcome and welcome[0]["session"] == SESSION and welcome[0]["resumed"] is False
    assert welcome[0]["you"]["user"] == "u-ada"

    ok(invoke("MessageFunction", "message-say.json"))
    (ack,) = [f for f in mgmt.frames() if f.get("type") == "ack" and f.get("id") == "c-1"]
    assert any(f.get("type") == "message" and f.get("text") == "Hello agent" for f in mgmt.frames())
    queued = stack.sqs.client.receive_message(
        QueueUrl=stack.sqs.queue_url, MaxNumberOfMessages=10, AttributeNames=["All"]
    ).get("Messages", [])
    assert len(queued) == 1
    assert queued[0]["Attributes"]["MessageGroupId"] == SESSION
    assert json.loads(queued[0]["Body"])["reply_to"] == ack["seq"]

    ok(invoke("MessageFunction", "message-ping.json"))
    assert "pong" in mgmt.types()

    ok(invoke("MessageFunction", "message-bad.json"))
    assert any(f.get("type") == "error" and f.get("code") == "bad_json" for f in mgmt.frames())

    # The turn that `say` queued, as the SQS poller hands it over: the agent answers.
    real_turn = tmp_path / "turn-from-queue.json"
    real_turn.write_text(json.dumps(_sqs_event_from(queued[0], stack.sqs.queue_url)))
    assert invoke("TurnFunction", real_turn) == {"batchItemFailures": []}
    assert any(
        f.get("type") == "agent_message" and f.get("reply_to") == ack["seq"] for f in mgmt.frames()
    ), mgmt.types()
    ok(invoke("MessageFunction", "message-stop.json"))
    assert any(f.get("type") == "stopping" for f in mgmt.frames()), mgmt.types()
    # The sample turn is for epoch "e1", not this session's: a no-op, not a failure.
    assert invoke("TurnFunction", "turn.json") == {"batchItemFailures": []}

    ok(invoke("MessageFunction", "message-leave.json"))
    ok(invoke("DisconnectFunction", "disconnect.json"))
    assert isinstance(invoke("CleanupFunction", "cleanup.json"), dict)

    def http(event: str, *statuses: int) -> Any:
        answer = invoke("ApiFunction", event)
        assert answer["statusCode"] in statuses, answer
        body = answer.get("body") or ""
        return json.loads(body) if body else None

    assert http("api-health.json", 200)
    assert http("api-create-session.json", 200, 201)["session_id"] == SESSION
    assert http("api-mint-token.json", 200)["token"].count(".") == 2
    assert http("api-status.json", 200)["session_id"] == SESSION
    transcript = http("api-transcript.json", 200)
    assert "Hello agent" in json.dumps(transcript)
    http("api-end.json", 204)

    # Nothing secret, and no message text, in any log line at INFO.
    text = "\n".join(logs)
    for secret in stack.secrets:
        assert secret not in text, "a secret value reached the logs"
    assert "Hello agent" not in text, "message text reached the logs at INFO"


@pytest.mark.slow
def test_runtime_site_has_only_the_runtime_packages():
    names = {p.name for p in runtime_site().iterdir()}
    assert {"boto3", "botocore"} <= names
    assert not names & {"pydantic", "fastapi", "agents", "rejoin", "upstash_redis", "jwt"}
