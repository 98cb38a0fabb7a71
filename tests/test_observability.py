"""Observability: JSON logs with the ids and never the content, EMF metrics, and
agent-run traces exported over OpenTelemetry, grouped by session.

Logs and metrics are checked on a real conversation driven through the
handlers (the harness); traces on a real ``Runner`` run with a scripted model
and a function tool, exported to an in-memory exporter and, once, over real
OTLP/HTTP to a receiver on this machine.
"""

from __future__ import annotations

import asyncio
import http.server
import io
import json
import re
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import agents
import pytest
from agents.testing import ScriptedModel
from harness import SECRET, Stack, make_stack, offline_agent, scripted_agent
from scripted import call, text

from rejoin import observability
from rejoin.errors import ConfigError
from rejoin.observability import METRICS, bind, lambda_handler, logger
from rejoin.queue import TurnRequest
from rejoin.runtime import set_runtime
from rejoin.tokens import mint_token

REPO = Path(__file__).resolve().parents[1]

# What people say: it must never reach a log line or (by default) a span.
TEXT = "the quiet heron sings at dawn"
REPLY = "herons are patient birds"
TOOL_RESULT = "sunny over the fjord"


# --------------------------------------------------------------------------- #
# Logs
# --------------------------------------------------------------------------- #


class LogCapture:
    """The Powertools handler's output, as parsed JSON lines, taken step by step."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()
        self._pos = 0
        self.all: list[dict[str, Any]] = []

    def take(self) -> list[dict[str, Any]]:
        value = self.buffer.getvalue()
        new, self._pos = value[self._pos :], len(value)
        lines = [json.loads(line) for line in new.splitlines() if line.strip()]
        self.all.extend(lines)
        return lines

    def raw(self) -> str:
        return self.buffer.getvalue()


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    """Redirect the JSON log stream (Powertools bound it to stdout at import)."""
    capture = LogCapture()
    handler = logger.registered_handler
    assert isinstance(handler, __import__("logging").StreamHandler)
    previous = handler.setStream(capture.buffer)
    level = logger.log_level
    logger.setLevel("DEBUG")
    try:
        yield capture
    finally:
        logger.setLevel(level)
        handler.setStream(previous)


def forged_token(stack: Stack, session: str, user: str) -> str:
    return mint_token(
        secret="another-secret-0123456789-abcdefghijkl",
        session_id=session,
        user_id=user,
        name=user.title(),
        now=stack.clock(),
    )


def assert_ids(
    lines: list[dict[str, Any]],
    *,
    session: str | None,
    connection: str | None,
    user: str | None,
) -> None:
    """Every line has the service and exactly the expected ids (none left over)."""
    for line in lines:
        assert line["service"], line
        assert line.get("session_id") == session, line
        assert line.get("connection_id") == connection, line
        assert line.get("user_id") == user, line


class TestLogs:
    def test_every_line_has_the_ids_and_none_has_text_or_secrets(
        self, upstash: Any, logs: LogCapture
    ) -> None:
        session = f"obs-{uuid.uuid4().hex[:8]}"
        stack = make_stack(
            upstash,
            agent=scripted_agent([REPLY, RuntimeError("model unavailable")]),
        )
        tokens: list[str] = []
        try:
            # a refused connect: logged with the ids it had, never the token
            forged = forged_token(stack, session, "eve")
            tokens.append(forged)
            status, eve = stack.connect(session, "eve", token=forged)
            assert status == 401
            lines = logs.take()
            assert [x["message"] for x in lines] == ["connect refused"]
            assert_ids(lines, session=session, connection=eve, user=None)

            # two participants connect and resume
            cids = {}
            for user in ("ada", "bob"):
                token = stack.token(session, user)
                tokens.append(token)
                status, cid = stack.connect(session, user, token=token)
                assert status == 200
                lines = logs.take()
                assert "connected" in [x["message"] for x in lines]
                assert_ids(lines, session=session, connection=cid, user=user)
                stack.resume(cid)
                lines = logs.take()
                assert "welcome" in [x["message"] for x in lines]
                assert_ids(lines, session=session, connection=cid, user=user)
                cids[user] = cid

            # a say and its turn (the agent answers), then a say whose turn fails
            stack.say(cids["ada"], TEXT)
            assert_ids(logs.take(), session=session, connection=cids["ada"], user="ada")
            stack.run_turns()
            assert_ids(logs.take(), session=session, connection=None, user=None)
            assert REPLY in stack.last(cids["bob"], "agent_message")["text"]

            stack.say(cids["bob"], f"{TEXT}, again")
            assert_ids(logs.take(), session=session, connection=cids["bob"], user="bob")
            answer = stack.deliver(stack.queue.take(session))
            assert answer["batchItemFailures"]
            lines = logs.take()
            failed = [x for x in lines if x["message"] == "turn failed"]
            assert failed and failed[0]["level"] == "ERROR"
            assert_ids(lines, session=session, connection=None, user=None)

            # a drop
            stack.drop(cids["bob"])
            lines = logs.take()
            assert "disconnected" in [x["message"] for x in lines]
            assert_ids(lines, session=session, connection=cids["bob"], user="bob")

            # the next invocation starts clean: no ids left from the last one
            stack.cleanup()
            lines = logs.take()
            assert "cleanup done" in [x["message"] for x in lines]
            assert_ids(lines, session=None, connection=None, user=None)
        finally:
            set_runtime(None)

        everything = logs.raw()
        assert logs.all, "nothing was logged"
        for forbidden in (TEXT, REPLY, SECRET, upstash.token, *tokens):
            assert forbidden not in everything
        # and no INFO line carries an exception's text either
        for line in logs.all:
            if line["level"] in ("DEBUG", "INFO"):
                assert "exception" not in line, line

    def test_ids_are_per_thread_and_per_invocation(self, logs: LogCapture) -> None:
        # The local gateway runs handlers on several threads at once.
        barrier = threading.Barrier(2)

        @lambda_handler
        def handler(event: dict[str, str], context: Any) -> None:
            bind(session_id=event["session"], connection_id=event["connection"])
            barrier.wait(timeout=5)
            logger.info("working")
            barrier.wait(timeout=5)

        threads = [
            threading.Thread(target=handler, args=({"session": s, "connection": c}, None))
            for s, c in (("s-a", "c-a"), ("s-b", "c-b"))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        pairs = {(x["session_id"], x["connection_id"]) for x in logs.take()}
        assert pairs == {("s-a", "c-a"), ("s-b", "c-b")}

    def test_an_escaping_exception_is_logged_with_the_ids_but_not_its_text(
        self, logs: LogCapture
    ) -> None:
        class Context:
            aws_request_id = "req-1"
            function_name = "rejoin-message"

        @lambda_handler
        def handler(event: Any, context: Any) -> None:
            bind(session_id="s-1", connection_id="c-1", user_id="u-1")
            raise ValueError(f"bad input: {TEXT}")

        logger.setLevel("INFO")
        with pytest.raises(ValueError):
            handler({}, Context())
        (line,) = logs.take()
        assert line["message"] == "handler failed" and line["level"] == "ERROR"
        assert line["error"] == "ValueError" and "test_observability.py:" in line["where"]
        assert (line["session_id"], line["connection_id"], line["user_id"]) == ("s-1", "c-1", "u-1")
        assert line["function_request_id"] == "req-1" and "cold_start" in line
        assert TEXT not in json.dumps(line)


# --------------------------------------------------------------------------- #
# Metrics
# --------------------------------------------------------------------------- #


def emitted(out: str) -> dict[str, float]:
    """Metric name -> total value, from the EMF blobs Powertools printed."""
    totals: dict[str, float] = {}
    for line in out.splitlines():
        if not line.startswith("{") or '"_aws"' not in line:
            continue
        blob = json.loads(line)
        (directive,) = blob["_aws"]["CloudWatchMetrics"]
        assert directive["Namespace"] == "Rejoin"
        assert ["service"] in directive["Dimensions"]
        for metric in directive["Metrics"]:
            value = blob[metric["Name"]]
            values = value if isinstance(value, list) else [value]
            totals[metric["Name"]] = totals.get(metric["Name"], 0) + sum(values)
    return totals


class TestMetrics:
    def test_each_action_emits_its_metric(
        self, upstash: Any, capsys: pytest.CaptureFixture[str]
    ) -> None:
        session = f"met-{uuid.uuid4().hex[:8]}"
        stack = make_stack(
            upstash,
            agent=scripted_agent([REPLY, RuntimeError("model unavailable")]),
            rate_limit=3,  # Ada's resume and two messages
            rate_window_seconds=30,
        )
        capsys.readouterr()

        def step() -> dict[str, float]:
            return emitted(capsys.readouterr().out)

        try:
            stack.connect(session, "eve", token=forged_token(stack, session, "eve"))
            assert step() == {"RefusedConnects": 1}

            ada, welcome = stack.join(session, "ada")
            assert step() == {"Connects": 1}  # a fresh session: not a resume
            bob, _ = stack.join(session, "bob")
            assert step() == {"Connects": 1, "Joins": 1}  # joined a live session

            stack.say(ada, TEXT)
            assert step() == {"Messages": 1}
            stack.run_turns()
            assert step() == {"Turns": 1}

            # Bob's connection dies without a $disconnect: the next broadcast finds it
            stack.drop(bob, lose_disconnect=True)
            stack.say(ada, "second")
            assert step() == {"Messages": 1, "GoneConnections": 1}
            stack.deliver(stack.queue.take(session))
            assert step() == {"TurnFailures": 1}

            stack.say(ada, "third")  # over the 30 s budget: every frame counts, resumes too
            assert stack.last(ada, "error")["code"] == "rate_limited"
            assert step() == {"RateLimitedFrames": 1}

            # Ada drops and comes back within the grace period, from where she was
            seen = max(f["seq"] for f in stack.logged(ada))
            stack.drop(ada)
            stack.clock.advance(60)
            ada2, back = stack.join(session, "ada", epoch=welcome["epoch"], last_seq=seen)
            assert back["recovered"] is True
            assert step() == {"Connects": 1, "Joins": 1, "Resumes": 1, "RecoveredReplays": 1}

            # everyone leaves; past the grace the cleanup deletes the session
            stack.drop(ada2)
            stack.clock.advance(123)  # the deadline plus the cleanup's clock-skew margin
            assert stack.cleanup()["expired"] == [session]
            assert step() == {"Expirations": 1, "GoneConnections": 0}

            # a turn that arrives late for the deleted session is dropped
            late = TurnRequest(session, welcome["epoch"], "9", reply_to=9)
            stack.deliver([late])
            assert step() == {"TurnsDropped": 1}
        finally:
            set_runtime(None)

    def test_every_metric_in_the_code_is_known_and_documented(self) -> None:
        used: set[str] = set()
        for path in [*REPO.glob("shared/rejoin/*.py"), *REPO.glob("functions/*/app.py")]:
            used |= set(re.findall(r"\bcount\(\s*\"(\w+)\"", path.read_text()))
        assert used, "no count() calls found"
        assert used <= METRICS.keys(), used - METRICS.keys()
        assert {
            "Turns",
            "TurnFailures",
            "TurnsDropped",
            "Resumes",
            "RecoveredReplays",
            "Expirations",
            "GoneConnections",
            "RateLimitedFrames",
            "Connects",
            "Messages",
            "RefusedConnects",
        } <= used
        doc = (REPO / "docs" / "observability.md").read_text()
        for name in METRICS:
            assert f"`{name}`" in doc, f"{name} is not in docs/observability.md"

    def test_an_unknown_metric_name_warns(self, logs: LogCapture) -> None:
        observability.count("Turnz")
        (line,) = logs.take()
        assert line["level"] == "WARNING" and line["metric"] == "Turnz"
        observability.metrics.clear_metrics()


# --------------------------------------------------------------------------- #
# Traces
# --------------------------------------------------------------------------- #


# The SDK's ScriptedModel reports no tokens unless told to.
SCRIPTED_USAGE = agents.Usage(requests=1, input_tokens=12, output_tokens=5, total_tokens=17)


class TracedScriptedModel(ScriptedModel):
    """A ScriptedModel that reports each call as a generation span, as the
    SDK's own models do (the SDK leaves that to the model)."""

    async def get_response(  # type: ignore[override]
        self,
        system_instructions: str | None,
        input: Any,
        model_settings: Any,
        tools: Any,
        output_schema: Any,
        handoffs: Any,
        tracing: Any,
        **kwargs: Any,
    ) -> Any:
        items = [{"role": "user", "content": input}] if isinstance(input, str) else list(input)
        with agents.tracing.generation_span(
            model="scripted-model",
            model_config={"temperature": 0.2, "extra_headers": {"x-secret": "nope"}},
            input=items if tracing.include_data() else None,
            disabled=tracing.is_disabled(),
        ) as span:
            response = await super().get_response(
                system_instructions,
                input,
                model_settings,
                tools,
                output_schema,
                handoffs,
                tracing,
                **kwargs,
            )
            usage = response.usage
            span.span_data.usage = {
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "total_tokens": usage.total_tokens,
            }
            if tracing.include_data():
                span.span_data.output = [item.model_dump() for item in response.output]
            return response


def weather_agent() -> agents.Agent[Any]:
    @agents.function_tool
    def weather(city: str) -> str:
        """The weather in a city."""
        return f"{TOOL_RESULT} of {city}"

    model = TracedScriptedModel(
        [call("weather", {"city": "Reykjavik"}), text(REPLY)], default_usage=SCRIPTED_USAGE
    )
    return agents.Agent(name="helper", model=model, tools=[weather])


def run_agent(text: str = TEXT, group_id: str = "sess-1") -> Any:
    config = agents.RunConfig(
        workflow_name="rejoin turn",
        group_id=group_id,
        trace_metadata={"turn": "t-1", "epoch": "e1"},
    )
    return asyncio.run(agents.Runner.run(weather_agent(), text, run_config=config))


def attribute_text(span: Any) -> str:
    return json.dumps(dict(span.attributes), default=str)


@pytest.fixture
def otel(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """OTLP tracing on, to an in-memory exporter; everything restored afterwards."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import rejoin.turns  # noqa: F401 (its import applies REJOIN_TRACING: do that first)
    from rejoin.tracing import disable_otlp_tracing, enable_otlp_tracing

    monkeypatch.delenv("REJOIN_TRACE_CONTENT", raising=False)
    exporter = InMemorySpanExporter()
    enable_otlp_tracing(exporter=exporter)
    try:
        yield exporter
    finally:
        # Other tests rely on the SDK's tracing being off (REJOIN_TRACING=off).
        disable_otlp_tracing()
        agents.set_tracing_disabled(True)


def by_type(spans: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for span in spans:
        out.setdefault(span.attributes.get("openai.agents.span_type", "trace"), []).append(span)
    return out


class TestTracing:
    def test_agent_generation_and_tool_spans_grouped_by_session_without_content(
        self, otel: Any
    ) -> None:
        result = run_agent()
        assert result.final_output == REPLY
        agents.tracing.flush_traces()
        spans = otel.get_finished_spans()
        kinds = by_type(spans)
        assert {"trace", "task", "agent", "turn", "generation", "function"} <= kinds.keys()

        # one OTel trace per run; the SDK trace is its root, named after the workflow
        (root,) = kinds["trace"]
        assert root.name == "rejoin turn" and root.parent is None
        assert {s.context.trace_id for s in spans} == {root.context.trace_id}
        ids = {s.context.span_id for s in spans}
        assert all(s.parent.span_id in ids for s in spans if s is not root)

        for span in spans:
            attrs = span.attributes
            assert attrs["session.id"] == "sess-1", span.name
            assert attrs["langfuse.session.id"] == "sess-1", span.name
            assert attrs["rejoin.turn"] == "t-1" and attrs["rejoin.epoch"] == "e1"

        (agent,) = kinds["agent"]
        assert agent.name == "invoke_agent helper"
        assert agent.attributes["gen_ai.agent.name"] == "helper"
        assert list(agent.attributes["openai.agents.agent.tools"]) == ["weather"]
        (tool,) = kinds["function"]
        assert tool.name == "execute_tool weather"
        assert tool.attributes["gen_ai.tool.name"] == "weather"
        assert tool.attributes["langfuse.observation.type"] == "tool"
        assert len(kinds["generation"]) == 2
        for gen in kinds["generation"]:
            assert gen.attributes["gen_ai.request.model"] == "scripted-model"
            assert gen.attributes["langfuse.observation.type"] == "generation"
            assert gen.attributes["gen_ai.usage.input_tokens"] > 0
            assert gen.attributes["gen_ai.usage.output_tokens"] > 0
            assert gen.attributes["gen_ai.request.temperature"] == 0.2

        # structure, timing, usage and names; never what was said
        for span in spans:
            text = attribute_text(span)
            for said in (TEXT, REPLY, TOOL_RESULT, "Reykjavik", "x-secret"):
                assert said not in text, (span.name, said)
            assert span.end_time >= span.start_time

    def test_content_only_when_asked(self, otel: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from rejoin.tracing import enable_otlp_tracing

        monkeypatch.setenv("REJOIN_TRACE_CONTENT", "1")
        exporter = InMemorySpanExporter()
        enable_otlp_tracing(exporter=exporter)  # replaces the fixture's processor
        run_agent()
        agents.tracing.flush_traces()
        kinds = by_type(exporter.get_finished_spans())
        assert not otel.get_finished_spans()  # the replaced exporter got nothing
        gen_text = "".join(attribute_text(s) for s in kinds["generation"])
        assert TEXT in gen_text and REPLY in gen_text
        (tool,) = kinds["function"]
        assert "Reykjavik" in tool.attributes["langfuse.observation.input"]
        assert TOOL_RESULT in tool.attributes["langfuse.observation.output"]
        assert "x-secret" not in gen_text  # model settings beyond the safe ones, never

    def test_a_failing_tool_marks_its_span_as_an_error(self, otel: Any) -> None:
        from opentelemetry.trace import StatusCode

        @agents.function_tool(failure_error_function=None)
        def explode() -> str:
            """Always fails."""
            raise RuntimeError(f"cannot: {TEXT}")

        model = TracedScriptedModel([call("explode", {})])
        agent = agents.Agent(name="helper", model=model, tools=[explode])
        with pytest.raises(Exception):  # noqa: B017 (the SDK wraps the tool's error)
            asyncio.run(
                agents.Runner.run(agent, TEXT, run_config=agents.RunConfig(group_id="sess-2"))
            )
        agents.tracing.flush_traces()
        (tool,) = by_type(otel.get_finished_spans())["function"]
        assert tool.status.status_code == StatusCode.ERROR
        assert tool.attributes["session.id"] == "sess-2"
        assert TEXT not in attribute_text(tool) and TEXT not in (tool.status.description or "")

    def test_a_turn_through_the_handlers_is_traced_and_flushed_by_the_handler(
        self, upstash: Any, otel: Any
    ) -> None:
        session = f"trc-{uuid.uuid4().hex[:8]}"
        stack = make_stack(upstash, agent=offline_agent())
        try:
            ada, _ = stack.join(session, "ada")
            stack.say(ada, TEXT, msg_id="m-traced")
            stack.run_turns()
        finally:
            set_runtime(None)
        # no explicit flush: the handler wrapper flushed before returning, as on Lambda
        spans = otel.get_finished_spans()
        kinds = by_type(spans)
        (root,) = kinds["trace"]
        assert root.name == "rejoin turn"
        assert "agent" in kinds
        for span in spans:
            assert span.attributes["session.id"] == session
            assert span.attributes["rejoin.turn"] == "2"  # the seq of the message
            assert "rejoin.epoch" in span.attributes
            assert TEXT not in attribute_text(span)

    def test_exports_over_otlp_http_with_the_headers(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        from rejoin.tracing import disable_otlp_tracing, enable_otlp_tracing

        received: list[tuple[str, dict[str, str], bytes]] = []

        class Receiver(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((self.path, dict(self.headers), body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        monkeypatch.delenv("REJOIN_TRACE_CONTENT", raising=False)
        monkeypatch.delenv("REJOIN_OTLP_HEADERS_SECRET_NAME", raising=False)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Basic%20cGs6c2s=")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        try:
            enable_otlp_tracing()
            run_agent(group_id="sess-otlp")
            agents.tracing.flush_traces()
        finally:
            disable_otlp_tracing()
            agents.set_tracing_disabled(True)
            server.shutdown()
            server.server_close()
        assert received, "nothing was exported"
        path, headers, _ = received[0]
        assert path == "/v1/traces"
        assert {k.lower(): v for k, v in headers.items()}["authorization"] == "Basic cGs6c2s="
        sessions = set()
        for _, _, body in received:
            request = ExportTraceServiceRequest.FromString(body)
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        attrs = {a.key: a.value.string_value for a in span.attributes}
                        sessions.add(attrs.get("session.id"))
                        assert TEXT not in str(span)
        assert sessions == {"sess-otlp"}


class TestTracingSetup:
    def test_without_opentelemetry_it_says_what_to_install(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from rejoin.tracing import enable_otlp_tracing

        monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
        with pytest.raises(ConfigError) as caught:
            enable_otlp_tracing()
        message = str(caught.value)
        assert "pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http" in message

    def test_without_the_otlp_exporter_it_names_it(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from rejoin.tracing import enable_otlp_tracing

        monkeypatch.setitem(
            sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None
        )
        with pytest.raises(ConfigError, match="missing: opentelemetry-exporter-otlp-proto-http"):
            enable_otlp_tracing()

    def test_configure_tracing_otlp_uses_it(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from rejoin.turns import configure_tracing

        monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
        with pytest.raises(ConfigError, match="opentelemetry-sdk"):
            configure_tracing("otlp")

    @pytest.mark.parametrize(
        "arg, env, expected",
        [
            (None, {}, "http://localhost:4318/v1/traces"),
            (
                None,
                {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://cloud.langfuse.com/api/public/otel"},
                "https://cloud.langfuse.com/api/public/otel/v1/traces",
            ),
            (
                None,
                {
                    "OTEL_EXPORTER_OTLP_ENDPOINT": "https://ignored.example",
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://c.example/custom",
                },
                "https://c.example/custom",
            ),
            ("https://api.honeycomb.io/", {}, "https://api.honeycomb.io/v1/traces"),
            ("https://x.example/v1/traces", {}, "https://x.example/v1/traces"),
        ],
    )
    def test_endpoint(self, arg: str | None, env: dict[str, str], expected: str) -> None:
        from rejoin.tracing import _traces_endpoint

        assert _traces_endpoint(arg, env) == expected

    def test_headers_from_argument_env_or_secret(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import boto3
        from moto import mock_aws

        from rejoin.tracing import _export_headers

        assert _export_headers({"X-A": "1"}, {"OTEL_EXPORTER_OTLP_HEADERS": "x-b=2"}) == {
            "X-A": "1"
        }
        assert _export_headers(None, {"OTEL_EXPORTER_OTLP_HEADERS": "x-b=2,x-c=a%20b"}) == {
            "x-b": "2",
            "x-c": "a b",
        }
        assert _export_headers(None, {}) == {}

        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        with mock_aws():
            sm = boto3.client("secretsmanager", region_name="us-east-1")
            as_json, as_env = f"otlp-json-{uuid.uuid4().hex}", f"otlp-env-{uuid.uuid4().hex}"
            sm.create_secret(Name=as_json, SecretString='{"Authorization": "Basic cGs6c2s="}')
            sm.create_secret(Name=as_env, SecretString="Authorization=Basic%20cGs6c2s=")
            env = {"OTEL_EXPORTER_OTLP_HEADERS": "x-b=2"}  # the secret wins
            for name in (as_json, as_env):
                got = _export_headers(None, {**env, "REJOIN_OTLP_HEADERS_SECRET_NAME": name})
                assert {k.lower(): v for k, v in got.items()} == {"authorization": "Basic cGs6c2s="}
            with pytest.raises(ConfigError, match="cannot read secret"):
                _export_headers(None, {"REJOIN_OTLP_HEADERS_SECRET_NAME": "missing-secret"})

    def test_disable_restores_the_sdk_default(self) -> None:
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from rejoin.tracing import disable_otlp_tracing, enable_otlp_tracing

        exporter = InMemorySpanExporter()
        enable_otlp_tracing(exporter=exporter)
        disable_otlp_tracing()
        run_agent()
        agents.tracing.flush_traces()
        assert exporter.get_finished_spans() == ()
