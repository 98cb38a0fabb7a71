"""Agent-run tracing to an OpenTelemetry backend (Langfuse, Honeycomb, any OTLP collector).

:func:`enable_otlp_tracing` replaces the Agents SDK's default trace exporter
(which would post to OpenAI) with :class:`OtelTracingProcessor`, which turns
every SDK trace into an OpenTelemetry trace: the SDK trace becomes the root
span (named after the run's ``workflow_name``), and each SDK span (agent,
generation, response, function tool, handoff, guardrail, task, turn, ...)
becomes a child span, exported over OTLP/HTTP.

Grouped by session: every span carries ``session.id`` and
``langfuse.session.id`` set to the trace's ``group_id`` (the turn worker
passes the rejoin session id), and ``rejoin.<key>`` for each scalar of the
trace metadata (``rejoin.turn``, ``rejoin.epoch``).

Structure, not content: spans carry names, timing, models, token usage, tool
names and errors, never what was said (model input and output, tool arguments
and results), unless ``REJOIN_TRACE_CONTENT=1``. The conversation lives in
the store; a trace is for watching the system, never for rebuilding a
conversation.

OpenTelemetry is optional: ``pip install opentelemetry-sdk
opentelemetry-exporter-otlp-proto-http`` (add both to the layer's
requirements to trace on AWS). They are imported only here, only when
tracing is turned on.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agents.tracing import (
    AgentSpanData,
    CustomSpanData,
    FunctionSpanData,
    GenerationSpanData,
    GuardrailSpanData,
    HandoffSpanData,
    MCPListToolsSpanData,
    ResponseSpanData,
    Span,
    SpanData,
    SpeechGroupSpanData,
    SpeechSpanData,
    TaskSpanData,
    Trace,
    TracingProcessor,
    TranscriptionSpanData,
    TurnSpanData,
    set_trace_processors,
    set_tracing_disabled,
)

from .config import load_secret
from .errors import ConfigError
from .observability import SERVICE, logger, register_flush

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span as OtelSpan

__all__ = [
    "OTEL_PACKAGES",
    "OtelTracingProcessor",
    "disable_otlp_tracing",
    "enable_otlp_tracing",
]

OTEL_PACKAGES = ("opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http")
_PIP_LINE = "pip install " + " ".join(OTEL_PACKAGES)

# Where OTLP/HTTP traces go when no endpoint is configured (the OpenTelemetry
# default: a collector on this host, such as the ADOT Lambda layer's).
DEFAULT_ENDPOINT = "http://localhost:4318"
TRACES_PATH = "/v1/traces"
# How long the end-of-invocation flush may wait for the exporter.
FLUSH_TIMEOUT_MILLIS = 5000

# Model settings that are safe to record (no headers, no metadata, no content).
_MODEL_PARAMETERS = ("temperature", "top_p", "max_tokens", "frequency_penalty", "presence_penalty")

_Attributes = dict[str, str | bool | int | float | Sequence[str]]


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _json(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)


@dataclass
class _TraceState:
    root: OtelSpan
    common: _Attributes


class OtelTracingProcessor(TracingProcessor):
    """An Agents SDK trace processor that records SDK traces as OpenTelemetry spans.

    Args:
        tracer_provider: the OpenTelemetry provider whose span processor
            exports (built by :func:`enable_otlp_tracing`).
        include_content: record model input and output, tool arguments and
            results (``REJOIN_TRACE_CONTENT=1``); off by default.
        flush_timeout_millis: the longest :meth:`force_flush` waits.

    Never raises into the agent run: a failure to record is logged and dropped.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider,
        *,
        include_content: bool = False,
        flush_timeout_millis: int = FLUSH_TIMEOUT_MILLIS,
    ) -> None:
        self._provider = tracer_provider
        self._tracer = tracer_provider.get_tracer("rejoin.tracing")
        self.include_content = include_content
        self._flush_timeout = flush_timeout_millis
        self._lock = threading.Lock()
        self._traces: dict[str, _TraceState] = {}
        self._spans: dict[str, OtelSpan] = {}

    # --- TracingProcessor -------------------------------------------------------

    def on_trace_start(self, trace: Trace) -> None:
        try:
            from opentelemetry.context import Context

            exported = trace.export() or {}
            common = _session_attributes(exported.get("group_id"), exported.get("metadata"))
            root = self._tracer.start_span(
                trace.name,
                context=Context(),  # a new OTel trace, whatever is current around it
                attributes={
                    **common,
                    "langfuse.trace.name": trace.name,
                    "openai.agents.trace_id": trace.trace_id,
                },
                start_time=time.time_ns(),
            )
            with self._lock:
                self._traces[trace.trace_id] = _TraceState(root, common)
        except Exception as exc:
            _dropped("trace start", exc)

    def on_trace_end(self, trace: Trace) -> None:
        try:
            with self._lock:
                state = self._traces.pop(trace.trace_id, None)
            if state is not None:
                state.root.end(end_time=time.time_ns())
        except Exception as exc:
            _dropped("trace end", exc)

    def on_span_start(self, span: Span[Any]) -> None:
        try:
            from opentelemetry import trace as otel_trace
            from opentelemetry.context import Context

            with self._lock:
                state = self._traces.get(span.trace_id)
                parent = self._spans.get(span.parent_id) if span.parent_id else None
            if parent is None and state is not None:
                parent = state.root
            if state is not None:
                common = state.common
            else:  # the trace began before this processor was installed
                common = _session_attributes(None, span.trace_metadata)
            data = span.span_data
            otel_span = self._tracer.start_span(
                _span_name(data),
                context=otel_trace.set_span_in_context(parent) if parent else Context(),
                kind=_span_kind(data),
                attributes={
                    **common,
                    "openai.agents.span_type": data.type,
                    "openai.agents.span_id": span.span_id,
                    "langfuse.observation.type": _observation_type(data),
                },
                start_time=time.time_ns(),
            )
            with self._lock:
                self._spans[span.span_id] = otel_span
        except Exception as exc:
            _dropped("span start", exc)

    def on_span_end(self, span: Span[Any]) -> None:
        try:
            from opentelemetry.trace import Status, StatusCode

            with self._lock:
                otel_span = self._spans.pop(span.span_id, None)
            if otel_span is None:
                return
            data = span.span_data
            otel_span.update_name(_span_name(data))  # e.g. the model is known only now
            otel_span.set_attributes(_structure(data))
            if self.include_content:
                otel_span.set_attributes(_content(data))
            error = span.error
            if error:
                otel_span.set_status(Status(StatusCode.ERROR, str(error.get("message") or "")))
                if self.include_content and error.get("data"):
                    otel_span.set_attribute("openai.agents.error.data", _json(error["data"]))
            otel_span.end(end_time=time.time_ns())
        except Exception as exc:
            _dropped("span end", exc)

    def shutdown(self) -> None:
        """Flush what is buffered and stop the exporter."""
        self._provider.shutdown()

    def force_flush(self) -> None:
        """Export every finished span now (at most ``flush_timeout_millis``)."""
        self._provider.force_flush(self._flush_timeout)


def _dropped(what: str, exc: Exception) -> None:
    logger.warning("trace not recorded", extra={"step": what, "error": type(exc).__name__})


def _scalar(value: Any) -> str | bool | int | float | None:
    if isinstance(value, str | bool | int | float):
        return value
    return None


def _session_attributes(group_id: Any, metadata: Any) -> _Attributes:
    """``session.id`` (and Langfuse's name for it) plus ``rejoin.<key>`` per metadata scalar."""
    attrs: _Attributes = {}
    if isinstance(metadata, Mapping):
        for key, value in metadata.items():
            scalar = _scalar(value)
            if scalar is not None:
                attrs[f"rejoin.{key}"] = scalar
    if isinstance(group_id, str) and group_id:
        attrs["session.id"] = group_id
        attrs["langfuse.session.id"] = group_id
    return attrs


def _span_name(data: SpanData) -> str:
    """Names after the OpenTelemetry GenAI conventions where one exists."""
    if isinstance(data, AgentSpanData):
        return f"invoke_agent {data.name}"
    if isinstance(data, GenerationSpanData):
        return f"chat {data.model}" if data.model else "chat"
    if isinstance(data, ResponseSpanData):
        model = data.response.model if data.response is not None else None
        return f"chat {model}" if model else "chat"
    if isinstance(data, FunctionSpanData):
        return f"execute_tool {data.name}"
    if isinstance(data, HandoffSpanData):
        return f"handoff {data.from_agent} -> {data.to_agent}"
    if isinstance(data, GuardrailSpanData):
        return f"guardrail {data.name}"
    if isinstance(data, TaskSpanData):
        return f"task {data.name}"
    if isinstance(data, TurnSpanData):
        return f"turn {data.turn} {data.agent_name}"
    if isinstance(data, MCPListToolsSpanData):
        return f"mcp_list_tools {data.server}" if data.server else "mcp_list_tools"
    if isinstance(data, CustomSpanData):
        return data.name
    return data.type


def _span_kind(data: SpanData) -> Any:
    from opentelemetry.trace import SpanKind

    if isinstance(data, GenerationSpanData | ResponseSpanData):
        return SpanKind.CLIENT
    return SpanKind.INTERNAL


def _observation_type(data: SpanData) -> str:
    """Langfuse's observation type (how it draws and prices the span)."""
    if isinstance(data, GenerationSpanData | ResponseSpanData):
        return "generation"
    if isinstance(data, AgentSpanData):
        return "agent"
    if isinstance(data, FunctionSpanData):
        return "tool"
    if isinstance(data, GuardrailSpanData):
        return "guardrail"
    return "span"


def _usage(usage: Any, prefix: str) -> _Attributes:
    attrs: _Attributes = {}
    if not isinstance(usage, Mapping):
        return attrs
    for key in ("input_tokens", "output_tokens", "total_tokens"):
        value = usage.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            attrs[f"{prefix}.{key}"] = value
    return attrs


def _model(model: str | None) -> _Attributes:
    if not model:
        return {}
    return {"gen_ai.request.model": model, "langfuse.observation.model.name": model}


def _structure(data: SpanData) -> _Attributes:
    """What a span says about structure: safe to export, no message text."""
    attrs: _Attributes = {}
    if isinstance(data, AgentSpanData):
        attrs["gen_ai.operation.name"] = "invoke_agent"
        attrs["gen_ai.agent.name"] = data.name
        if data.tools:
            attrs["openai.agents.agent.tools"] = [str(t) for t in data.tools]
        if data.handoffs:
            attrs["openai.agents.agent.handoffs"] = [str(h) for h in data.handoffs]
        if data.output_type:
            attrs["openai.agents.agent.output_type"] = data.output_type
    elif isinstance(data, GenerationSpanData):
        attrs["gen_ai.operation.name"] = "chat"
        attrs.update(_model(data.model))
        config = data.model_config or {}
        for key in _MODEL_PARAMETERS:
            value = _scalar(config.get(key))
            if value is not None:
                attrs[f"gen_ai.request.{key}"] = value
        attrs.update(_usage(data.usage, "gen_ai.usage"))
    elif isinstance(data, ResponseSpanData):
        attrs["gen_ai.operation.name"] = "chat"
        response = data.response
        if response is not None:
            attrs["gen_ai.response.id"] = response.id
            attrs["gen_ai.response.model"] = response.model
            attrs.update(_model(response.model))
            usage = data.usage
            if usage is None and response.usage is not None:
                usage = response.usage.model_dump()
            attrs.update(_usage(usage, "gen_ai.usage"))
        else:
            attrs.update(_usage(data.usage, "gen_ai.usage"))
    elif isinstance(data, FunctionSpanData):
        attrs["gen_ai.operation.name"] = "execute_tool"
        attrs["gen_ai.tool.name"] = data.name
        server = (data.mcp_data or {}).get("server")
        if isinstance(server, str):
            attrs["openai.agents.mcp.server"] = server
    elif isinstance(data, HandoffSpanData):
        if data.from_agent:
            attrs["openai.agents.handoff.from"] = data.from_agent
        if data.to_agent:
            attrs["openai.agents.handoff.to"] = data.to_agent
    elif isinstance(data, GuardrailSpanData):
        attrs["openai.agents.guardrail.name"] = data.name
        attrs["openai.agents.guardrail.triggered"] = bool(data.triggered)
    elif isinstance(data, TaskSpanData):
        attrs["openai.agents.task.name"] = data.name
        attrs.update(_usage(data.usage, "openai.agents.usage"))
    elif isinstance(data, TurnSpanData):
        attrs["openai.agents.turn"] = data.turn
        attrs["gen_ai.agent.name"] = data.agent_name
        attrs.update(_usage(data.usage, "openai.agents.usage"))
    elif isinstance(data, MCPListToolsSpanData):
        if data.server:
            attrs["openai.agents.mcp.server"] = data.server
        if data.result:
            attrs["openai.agents.mcp.tools"] = [str(t) for t in data.result]
    elif isinstance(data, TranscriptionSpanData | SpeechSpanData):
        attrs.update(_model(data.model))
    return attrs


def _content(data: SpanData) -> _Attributes:
    """What was said (only with ``REJOIN_TRACE_CONTENT=1``)."""
    inp: Any = None
    out: Any = None
    if isinstance(data, GenerationSpanData):
        inp, out = data.input, data.output
    elif isinstance(data, ResponseSpanData):
        inp = data.input
        if data.response is not None:
            out = [item.model_dump() for item in data.response.output]
    elif isinstance(data, FunctionSpanData):
        inp, out = data.input, data.output
    elif isinstance(data, CustomSpanData):
        inp = data.data
    elif isinstance(data, SpeechSpanData | SpeechGroupSpanData):
        inp = data.input  # the text spoken; the audio is never recorded
    elif isinstance(data, TranscriptionSpanData):
        out = data.output  # the text heard; the audio is never recorded
    attrs: _Attributes = {}
    if inp is not None:
        attrs["langfuse.observation.input"] = inp if isinstance(inp, str) else _json(inp)
    if out is not None:
        attrs["langfuse.observation.output"] = out if isinstance(out, str) else _json(out)
    return attrs


# --- turning it on ----------------------------------------------------------------


def _traces_endpoint(endpoint: str | None, env: Mapping[str, str]) -> str:
    """The full OTLP/HTTP traces URL.

    ``endpoint`` and ``OTEL_EXPORTER_OTLP_ENDPOINT`` are base URLs
    (``/v1/traces`` is appended unless present);
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is used as is.
    """
    if not endpoint:
        if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            return env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or DEFAULT_ENDPOINT
    base = endpoint.rstrip("/")
    return base if base.endswith(TRACES_PATH) else base + TRACES_PATH


def _parse_headers(value: str) -> dict[str, str]:
    from opentelemetry.util.re import parse_env_headers

    return dict(parse_env_headers(value, liberal=True))


def _export_headers(headers: Mapping[str, str] | None, env: Mapping[str, str]) -> dict[str, str]:
    """Headers from the argument, else the secret, else the environment.

    A secret (``REJOIN_OTLP_HEADERS_SECRET_NAME``) holds either a JSON object
    (``{"Authorization": "Basic ..."}``) or the ``OTEL_EXPORTER_OTLP_HEADERS``
    form (``Authorization=Basic%20...``).
    """
    if headers is not None:
        return dict(headers)
    name = env.get("REJOIN_OTLP_HEADERS_SECRET_NAME")
    if name:
        secret = load_secret(name)
        if isinstance(secret, dict):
            return {str(k): str(v) for k, v in secret.items()}
        parsed = _parse_headers(secret)
        if not parsed:
            raise ConfigError(
                f"secret {name!r} holds no headers: use JSON "
                '{"Authorization": "..."} or key=value pairs separated by commas'
            )
        return parsed
    raw = env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get("OTEL_EXPORTER_OTLP_HEADERS")
    return _parse_headers(raw) if raw else {}


def _missing(packages: Sequence[str]) -> ConfigError:
    return ConfigError(
        f"REJOIN_TRACING=otlp needs OpenTelemetry: {_PIP_LINE} "
        f"(missing: {', '.join(packages)}; on AWS add them to shared/requirements.txt, "
        "the layer)"
    )


def _build_provider(exporter: SpanExporter, env: Mapping[str, str]) -> TracerProvider:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.id_generator import IdGenerator
    from opentelemetry.trace import INVALID_SPAN_ID, INVALID_TRACE_ID

    class UrandomIdGenerator(IdGenerator):
        # Ids from the OS, not from `random`: a SnapStart snapshot restores
        # `random`'s state identically in every environment, so its ids repeat.
        def generate_span_id(self) -> int:
            while (span_id := secrets.randbits(64)) == INVALID_SPAN_ID:
                pass
            return span_id

        def generate_trace_id(self) -> int:
            while (trace_id := secrets.randbits(128)) == INVALID_TRACE_ID:
                pass
            return trace_id

        def is_trace_id_random(self) -> bool:
            return True

    attributes: dict[str, str] = {"service.name": env.get("OTEL_SERVICE_NAME") or SERVICE}
    if env.get("AWS_LAMBDA_FUNCTION_NAME"):
        attributes["faas.name"] = env["AWS_LAMBDA_FUNCTION_NAME"]
    provider = TracerProvider(
        resource=Resource.create(attributes), id_generator=UrandomIdGenerator()
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


_active: OtelTracingProcessor | None = None
_active_lock = threading.Lock()


def _flush_active() -> None:
    processor = _active
    if processor is not None:
        processor.force_flush()


def enable_otlp_tracing(
    *,
    endpoint: str | None = None,
    headers: dict[str, str] | None = None,
    exporter: Any | None = None,
) -> None:
    """Send Agents SDK traces over OTLP/HTTP instead of to OpenAI.

    Replaces the SDK's trace processors (``set_trace_processors``) with one
    :class:`OtelTracingProcessor` and turns SDK tracing on. Spans are batched
    in the background and flushed after every Lambda invocation (see
    :func:`rejoin.observability.register_flush`). Calling it again replaces
    the previous exporter.

    Args:
        endpoint: the OTLP/HTTP base URL (``/v1/traces`` is appended), e.g.
            ``https://cloud.langfuse.com/api/public/otel``; default
            ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (as is), then
            ``OTEL_EXPORTER_OTLP_ENDPOINT``, then ``http://localhost:4318``.
        headers: export headers (e.g. ``Authorization``); default the Secrets
            Manager secret named by ``REJOIN_OTLP_HEADERS_SECRET_NAME``, then
            ``OTEL_EXPORTER_OTLP_HEADERS``.
        exporter: an OpenTelemetry ``SpanExporter`` to use instead of OTLP
            (tests pass an ``InMemorySpanExporter``); ``endpoint`` and
            ``headers`` are then ignored.

    Raises:
        ConfigError: the OpenTelemetry packages are not installed (the
            message has the pip line), or the headers secret is unreadable.
    """
    global _active
    env = os.environ
    try:
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        raise _missing(OTEL_PACKAGES) from None
    if exporter is None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise _missing(OTEL_PACKAGES[1:]) from None
        exporter = OTLPSpanExporter(
            endpoint=_traces_endpoint(endpoint, env), headers=_export_headers(headers, env)
        )
    processor = OtelTracingProcessor(
        _build_provider(exporter, env), include_content=_truthy(env.get("REJOIN_TRACE_CONTENT"))
    )
    with _active_lock:
        previous, _active = _active, processor
        set_trace_processors([processor])
        set_tracing_disabled(False)
    register_flush(_flush_active)
    if previous is not None:
        previous.shutdown()


def disable_otlp_tracing() -> None:
    """Flush and stop the OTLP exporter, give the SDK back its default processor, tracing off.

    The state rejoin starts in (``REJOIN_TRACING=off``); tests call it to undo
    :func:`enable_otlp_tracing`.
    """
    global _active
    from agents.tracing.processors import default_processor

    with _active_lock:
        previous, _active = _active, None
        set_trace_processors([default_processor()])
        set_tracing_disabled(True)
    if previous is not None:
        previous.shutdown()
