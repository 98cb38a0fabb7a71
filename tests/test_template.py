"""template.yaml: the shape and the security properties that matter, checked statically.

`sam validate --lint` (scripts/check-template.sh) proves the template is valid
CloudFormation; these tests prove it is the template we mean: every function on
python3.13/arm64 with the layer, the routes wired to the right functions, the FIFO
turn queue with its dead-letter queue, SnapStart behind the alias the queue
triggers, least-privilege IAM, secrets only by reference, log retention, outputs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml  # PyYAML

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "template.yaml"

# --- a YAML loader for CloudFormation's short-form intrinsic functions ------------------------


class CfnLoader(yaml.SafeLoader):
    """SafeLoader that turns ``!Ref x`` into ``{"Ref": "x"}``, ``!Sub s`` into
    ``{"Fn::Sub": s}``, ``!GetAtt A.B`` into ``{"Fn::GetAtt": ["A", "B"]}`` and so on."""


def _construct(tag: str) -> Any:
    name = "Ref" if tag == "Ref" else ("Condition" if tag == "Condition" else f"Fn::{tag}")

    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> dict[str, Any]:
        value: Any
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
            if tag == "GetAtt":
                value = value.split(".", 1)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        return {name: value}

    return construct


SHORT_TAGS = (
    "Ref Sub GetAtt If Equals Not And Or Join Select Split FindInMap Base64 Cidr GetAZs "
    "ImportValue Condition Transform Length ToJsonString"
)
for _tag in SHORT_TAGS.split():
    CfnLoader.add_constructor(f"!{_tag}", _construct(_tag))


def load_template(path: Path = TEMPLATE) -> dict[str, Any]:
    """Parse a CloudFormation/SAM YAML template, short tags included."""
    return yaml.load(path.read_text(), Loader=CfnLoader)  # CfnLoader is a SafeLoader


@pytest.fixture(scope="module")
def t() -> dict[str, Any]:
    return load_template()


# --- helpers ----------------------------------------------------------------------------------

FUNCTIONS = {
    "AuthorizeFunction": "authorize",
    "ConnectFunction": "connect",
    "MessageFunction": "message",
    "DisconnectFunction": "disconnect",
    "TurnFunction": "turn",
    "CleanupFunction": "cleanup",
    "ApiFunction": "api",
}
WS_ROUTES = {
    "$connect": "ConnectFunction",
    "$disconnect": "DisconnectFunction",
    "resume": "MessageFunction",
    "say": "MessageFunction",
    "ping": "MessageFunction",
    "leave": "MessageFunction",
    "stop": "MessageFunction",
    "$default": "MessageFunction",
}
# The Lambda function behind a WebSocket route must answer within API Gateway's 29 s.
WS_FUNCTIONS = {"ConnectFunction", "MessageFunction", "DisconnectFunction"}
TOKEN_SECRET = {
    "Fn::If": [
        "CreateTokenSigningSecret",
        {"Ref": "TokenSigningSecret"},
        {"Ref": "TokenSigningSecretArn"},
    ]
}
ADMIN_SECRET = {"Fn::If": ["CreateAdminSecret", {"Ref": "AdminSecret"}, {"Ref": "AdminSecretArn"}]}
# The store's secret: Upstash's, or (issue 13) one holding a Redis URL.
STORE_SECRET = {"Fn::If": ["UseRedisStore", {"Ref": "StoreSecretArn"}, {"Ref": "UpstashSecretArn"}]}
STORE_ENV = {
    "REJOIN_UPSTASH_SECRET": {"Fn::If": ["UseRedisStore", "", {"Ref": "UpstashSecretArn"}]},
    "REJOIN_STORE_SECRET": {"Fn::If": ["UseRedisStore", {"Ref": "StoreSecretArn"}, ""]},
}
OPENAI_SECRET = {"Ref": "OpenAISecretArn"}
OTLP_SECRET = {"Ref": "OtlpHeadersSecretArn"}
ENCRYPTION_SECRET = {"Ref": "EncryptionKeySecretArn"}
# Which secret each function may read, and the environment variable that names it.
SECRET_READS: dict[str, dict[str, Any]] = {
    # The authorizer checks signatures only: no store, so no Upstash secret.
    "AuthorizeFunction": {"REJOIN_TOKEN_SECRET_NAME": TOKEN_SECRET},
    "ConnectFunction": {
        "store": STORE_SECRET,
        "REJOIN_TOKEN_SECRET_NAME": TOKEN_SECRET,
    },
    "MessageFunction": {
        "store": STORE_SECRET,
        "REJOIN_ENCRYPTION_SECRET": ENCRYPTION_SECRET,
    },
    "DisconnectFunction": {"store": STORE_SECRET},
    "TurnFunction": {
        "store": STORE_SECRET,
        "REJOIN_OPENAI_SECRET_NAME": OPENAI_SECRET,
        "REJOIN_OTLP_HEADERS_SECRET_NAME": OTLP_SECRET,
        "REJOIN_ENCRYPTION_SECRET": ENCRYPTION_SECRET,
    },
    "CleanupFunction": {"store": STORE_SECRET},
    "ApiFunction": {
        "store": STORE_SECRET,
        "REJOIN_TOKEN_SECRET_NAME": TOKEN_SECRET,
        "REJOIN_ADMIN_SECRET_NAME": ADMIN_SECRET,
        "REJOIN_ENCRYPTION_SECRET": ENCRYPTION_SECRET,
    },
}
SQS_SENDERS = {"MessageFunction", "ApiFunction"}
# execute-api:ManageConnections methods per function.
CONNECTION_METHODS = {
    "AuthorizeFunction": set(),
    "ConnectFunction": {"POST"},
    "MessageFunction": {"POST", "DELETE"},
    "DisconnectFunction": {"POST"},
    "TurnFunction": {"POST"},
    "CleanupFunction": {"POST", "GET", "DELETE"},
    "ApiFunction": {"POST", "GET", "DELETE"},
}
# Variables that exist only so `sam local invoke --env-vars` can set them (SAM overrides
# only declared variables); in the template they must stay empty.
LOCAL_ONLY_VARS = {
    "UPSTASH_REDIS_REST_URL",
    "UPSTASH_REDIS_REST_TOKEN",
    "REJOIN_TOKEN_SECRET",
    "REJOIN_ADMIN_KEY",
    "OPENAI_API_KEY",
    "AWS_ENDPOINT_URL_SQS",
    "REJOIN_STORE_URL",
}
# Policy templates and managed policies a function may use (anything broader fails).
ALLOWED_POLICY_TEMPLATES = {
    "AWSSecretsManagerGetSecretValuePolicy",
    "SQSSendMessagePolicy",
    "SQSPollerPolicy",
}


def resources(t: dict[str, Any], rtype: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in t["Resources"].items() if v["Type"] == rtype}


def fn_props(t: dict[str, Any], name: str) -> dict[str, Any]:
    """A function's properties with Globals.Function applied (maps merged, as SAM does)."""
    glob = t.get("Globals", {}).get("Function", {})
    own = t["Resources"][name]["Properties"]
    merged = dict(glob)
    for key, value in own.items():
        if isinstance(value, dict) and isinstance(glob.get(key), dict):
            merged[key] = _merge(glob[key], value)
        else:
            merged[key] = value
    return merged


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return out


def env_of(t: dict[str, Any], name: str) -> dict[str, Any]:
    return fn_props(t, name).get("Environment", {}).get("Variables", {})


def policies(t: dict[str, Any], name: str) -> list[Any]:
    """A function's policies, with ``Fn::If [cond, policy, AWS::NoValue]`` unwrapped."""
    out: list[Any] = []
    for p in t["Resources"][name]["Properties"].get("Policies", []):
        if isinstance(p, dict) and "Fn::If" in p:
            _, yes, no = p["Fn::If"]
            out.extend(x for x in (yes, no) if x != {"Ref": "AWS::NoValue"})
        else:
            out.append(p)
    return out


def statements(t: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [
        s
        for p in policies(t, name)
        if isinstance(p, dict) and "Statement" in p
        for s in p["Statement"]
    ]


def as_list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else [x]


# --- basics -----------------------------------------------------------------------------------


def test_is_a_sam_template(t):
    assert t["AWSTemplateFormatVersion"] == "2010-09-09"
    assert t["Transform"] == "AWS::Serverless-2016-10-31"


def test_exactly_the_seven_functions(t):
    assert set(resources(t, "AWS::Serverless::Function")) == set(FUNCTIONS)


def test_connect_goes_through_the_token_authorizer(t):
    # The authorizer's context reaches every later event of the connection, so
    # no frame needs a store lookup to learn its session and sender.
    auth = t["Resources"]["WebSocketApi"]["Properties"]["Auth"]
    assert auth["AuthType"] == "CUSTOM"
    assert auth["AuthArn"] == {"Fn::GetAtt": ["AuthorizeFunction", "Arn"]}
    assert auth["IdentitySource"] == [
        "route.request.querystring.session",
        "route.request.querystring.token",
    ]
    # and it never reads the store (nor is told where it is)
    assert env_of(t, "AuthorizeFunction")["REJOIN_UPSTASH_SECRET"] == ""


@pytest.mark.parametrize("name", FUNCTIONS)
def test_function_runs_python313_on_arm64_with_the_layer(t, name):
    p = fn_props(t, name)
    assert p["Runtime"] == "python3.13"
    assert p["Architectures"] == ["arm64"]
    assert p["Layers"] == [{"Ref": "RejoinLayer"}]
    assert p["CodeUri"] == f"functions/{FUNCTIONS[name]}/"
    assert p["Handler"] == "app.handler"
    assert p["Tracing"] == "Active"
    assert p["LoggingConfig"]["LogFormat"] == "JSON"
    assert (ROOT / "functions" / FUNCTIONS[name]).is_dir() or pytest.skip(
        f"functions/{FUNCTIONS[name]}/ not written yet"
    )


@pytest.mark.parametrize("name", FUNCTIONS)
def test_timeouts_fit_their_callers(t, name):
    timeout = fn_props(t, name)["Timeout"]
    if name in WS_FUNCTIONS or name == "ApiFunction":
        assert timeout <= 29, "API Gateway's integration timeout is 29 s"
    if name == "CleanupFunction":
        assert timeout < 60, "a run must end before the next one-minute tick"


def test_layer_is_built_from_shared_for_python313_arm64(t):
    layer = t["Resources"]["RejoinLayer"]
    assert layer["Type"] == "AWS::Serverless::LayerVersion"
    assert layer["Properties"]["ContentUri"] == "shared/"
    assert layer["Properties"]["CompatibleRuntimes"] == ["python3.13"]
    assert layer["Properties"]["CompatibleArchitectures"] == ["arm64"]
    assert layer["Metadata"] == {"BuildMethod": "python3.13", "BuildArchitecture": "arm64"}
    assert (ROOT / "shared" / "requirements.txt").is_file()
    assert (ROOT / "shared" / "rejoin" / "__init__.py").is_file()


# --- WebSocket API ----------------------------------------------------------------------------


def test_websocket_routes_go_to_the_right_functions(t):
    api = t["Resources"]["WebSocketApi"]
    assert api["Type"] == "AWS::Serverless::WebSocketApi"
    props = api["Properties"]
    assert props["RouteSelectionExpression"] == "$request.body.action"
    assert props["StageName"] == {"Ref": "Stage"}
    routes = {key: route["FunctionArn"] for key, route in props["Routes"].items()}
    assert routes == {key: {"Fn::GetAtt": [fn, "Arn"]} for key, fn in WS_ROUTES.items()}


def test_websocket_actions_match_the_protocol(t):
    """Every client action in docs/protocol.md has its own route (the rest hit $default)."""
    protocol = (ROOT / "docs" / "protocol.md").read_text()
    actions = set(re.findall(r'\{"action": "([a-z]+)"', protocol))
    assert actions, "no actions found in docs/protocol.md"
    assert actions <= set(t["Resources"]["WebSocketApi"]["Properties"]["Routes"])


def test_apis_are_throttled(t):
    for name in ("WebSocketApi", "HttpApi"):
        settings = t["Resources"][name]["Properties"]["DefaultRouteSettings"]
        assert settings["ThrottlingRateLimit"] == {"Ref": "ApiThrottlingRateLimit"}
        assert settings["ThrottlingBurstLimit"] == {"Ref": "ApiThrottlingBurstLimit"}


def test_http_api_serves_every_path_on_the_default_stage(t):
    api = t["Resources"]["HttpApi"]
    assert api["Type"] == "AWS::Serverless::HttpApi"
    # No StageName: the $default stage, so paths reach FastAPI without a stage prefix.
    assert "StageName" not in api["Properties"]
    assert api["Properties"]["AccessLogSettings"]["DestinationArn"] == {
        "Fn::GetAtt": ["HttpApiAccessLogGroup", "Arn"]
    }
    events = t["Resources"]["ApiFunction"]["Properties"]["Events"]
    seen = {(e["Properties"]["Path"], e["Properties"]["Method"]) for e in events.values()}
    assert seen == {("/", "ANY"), ("/{proxy+}", "ANY")}
    for e in events.values():
        assert e["Type"] == "HttpApi"
        assert e["Properties"]["ApiId"] == {"Ref": "HttpApi"}


# --- turn queue and worker --------------------------------------------------------------------


def test_turn_queue_is_fifo_with_a_fifo_dead_letter_queue(t):
    q = t["Resources"]["TurnQueue"]["Properties"]
    dlq = t["Resources"]["TurnDeadLetterQueue"]["Properties"]
    assert q["FifoQueue"] is True and dlq["FifoQueue"] is True
    assert q["ContentBasedDeduplication"] is False, "the producer sets MessageDeduplicationId"
    assert q["DeduplicationScope"] == "messageGroup"
    assert q["FifoThroughputLimit"] == "perMessageGroupId"
    assert q["SqsManagedSseEnabled"] is True and dlq["SqsManagedSseEnabled"] is True
    assert q["RedrivePolicy"]["deadLetterTargetArn"] == {
        "Fn::GetAtt": ["TurnDeadLetterQueue", "Arn"]
    }
    assert 1 <= q["RedrivePolicy"]["maxReceiveCount"] <= 5
    assert dlq["MessageRetentionPeriod"] >= q.get("MessageRetentionPeriod", 345600)


def test_visibility_timeout_is_at_least_six_turn_timeouts(t):
    turn_timeout = fn_props(t, "TurnFunction")["Timeout"]
    assert t["Resources"]["TurnQueue"]["Properties"]["VisibilityTimeout"] >= 6 * turn_timeout


def test_turn_lease_outlives_the_turn_function(t):
    env = env_of(t, "TurnFunction")
    assert int(env["REJOIN_TURN_LEASE_SECONDS"]) > fn_props(t, "TurnFunction")["Timeout"]


def test_turn_worker_has_snapstart_and_the_queue_triggers_its_alias(t):
    p = t["Resources"]["TurnFunction"]["Properties"]
    assert p["SnapStart"] == {"ApplyOn": "PublishedVersions"}
    assert p["AutoPublishAlias"] == "live"
    # No SAM SQS event: it would attach AWSLambdaSQSQueueExecutionRole (sqs:* reads on "*").
    assert not any(e["Type"] == "SQS" for e in p.get("Events", {}).values())
    mappings = resources(t, "AWS::Lambda::EventSourceMapping")
    assert len(mappings) == 1
    (esm,) = mappings.values()
    props = esm["Properties"]
    assert props["FunctionName"] == {"Ref": "TurnFunction.Alias"}
    assert props["EventSourceArn"] == {"Fn::GetAtt": ["TurnQueue", "Arn"]}
    assert props["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert 1 <= props["BatchSize"] <= 10


def test_cleanup_runs_every_minute(t):
    events = t["Resources"]["CleanupFunction"]["Properties"]["Events"]
    schedules = [e for e in events.values() if e["Type"] == "Schedule"]
    assert len(schedules) == 1
    assert schedules[0]["Properties"]["Schedule"] == "rate(1 minute)"
    assert schedules[0]["Properties"].get("Enabled", True) is True


# --- IAM --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FUNCTIONS)
def test_only_narrow_policy_templates_and_statements(t, name):
    for p in policies(t, name):
        assert isinstance(p, dict), f"{name}: managed policy {p!r} is not allowed"
        if "Statement" in p:
            continue
        (template,) = p
        assert template in ALLOWED_POLICY_TEMPLATES, f"{name}: policy template {template}"


@pytest.mark.parametrize("name", FUNCTIONS)
def test_no_wildcard_resources_or_actions(t, name):
    for s in statements(t, name):
        assert s["Effect"] == "Allow"
        for action in as_list(s["Action"]):
            assert "*" not in action, f"{name}: wildcard action {action}"
        for resource in as_list(s["Resource"]):
            assert resource != "*", f"{name}: Resource '*'"
            text = resource["Fn::Sub"] if isinstance(resource, dict) else resource
            assert isinstance(text, str) and not text.endswith(":*"), f"{name}: {resource}"


@pytest.mark.parametrize("name", FUNCTIONS)
def test_manage_connections_only_on_this_api_and_stage(t, name):
    prefix = (
        "arn:${AWS::Partition}:execute-api:${AWS::Region}:${AWS::AccountId}:"
        "${WebSocketApi}/${Stage}/"
    )
    methods = set()
    for s in statements(t, name):
        if "execute-api:ManageConnections" not in as_list(s["Action"]):
            continue
        assert as_list(s["Action"]) == ["execute-api:ManageConnections"]
        for resource in as_list(s["Resource"]):
            arn = resource["Fn::Sub"]
            assert arn.startswith(prefix), arn
            method, rest = arn[len(prefix) :].split("/", 1)
            assert rest == "@connections/*", arn
            methods.add(method)
    assert methods == CONNECTION_METHODS[name]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_sqs_send_only_to_the_turn_queue(t, name):
    sends = [p["SQSSendMessagePolicy"] for p in policies(t, name) if "SQSSendMessagePolicy" in p]
    if name in SQS_SENDERS:
        assert sends == [{"QueueName": {"Fn::GetAtt": ["TurnQueue", "QueueName"]}}]
        assert env_of(t, name)["REJOIN_TURN_QUEUE_URL"] == {"Ref": "TurnQueue"}
    else:
        assert sends == []
    for s in statements(t, name):
        assert not any(a.startswith("sqs:") for a in as_list(s["Action"])), name


def test_only_the_turn_worker_consumes_the_queue(t):
    for name in FUNCTIONS:
        polls = [p["SQSPollerPolicy"] for p in policies(t, name) if "SQSPollerPolicy" in p]
        expected = [{"QueueName": {"Fn::GetAtt": ["TurnQueue", "QueueName"]}}]
        assert polls == (expected if name == "TurnFunction" else []), name


@pytest.mark.parametrize("name", FUNCTIONS)
def test_reads_exactly_the_secrets_it_names(t, name):
    granted = [
        p["AWSSecretsManagerGetSecretValuePolicy"]["SecretArn"]
        for p in policies(t, name)
        if "AWSSecretsManagerGetSecretValuePolicy" in p
    ]
    expected = SECRET_READS[name]
    assert sorted(map(repr, granted)) == sorted(map(repr, expected.values()))
    env = env_of(t, name)
    for var, secret in expected.items():
        if var == "store":  # two variables, one of them set (see STORE_ENV)
            assert {k: env[k] for k in STORE_ENV} == STORE_ENV, name
            continue
        assert env[var] == secret, f"{name}: {var} must name the secret it may read"
    # Functions that may not read a secret are not told its name either.
    for var in (
        "REJOIN_TOKEN_SECRET_NAME",
        "REJOIN_OPENAI_SECRET_NAME",
        "REJOIN_ADMIN_SECRET_NAME",
        "REJOIN_ENCRYPTION_SECRET",
    ):
        assert (var in env) == (var in expected), f"{name}: {var}"
    for s in statements(t, name):
        assert not any(a.startswith("secretsmanager:") for a in as_list(s["Action"])), name


def test_optional_secrets_are_granted_only_when_given(t):
    encryption = [
        "EncryptAtRest",
        {"AWSSecretsManagerGetSecretValuePolicy": {"SecretArn": ENCRYPTION_SECRET}},
        {"Ref": "AWS::NoValue"},
    ]
    otlp = [
        "HasOtlpHeadersSecret",
        {"AWSSecretsManagerGetSecretValuePolicy": {"SecretArn": OTLP_SECRET}},
        {"Ref": "AWS::NoValue"},
    ]
    for name, expected in (
        ("TurnFunction", [encryption, otlp]),
        ("MessageFunction", [encryption]),
        ("ApiFunction", [encryption]),
    ):
        raw = t["Resources"][name]["Properties"]["Policies"]
        conditional = [p["Fn::If"] for p in raw if isinstance(p, dict) and "Fn::If" in p]
        assert conditional == expected, name
    # one parameter turns encryption at rest on; off by default
    assert t["Parameters"]["EncryptionKeySecretArn"]["Default"] == ""
    assert t["Conditions"]["EncryptAtRest"] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "EncryptionKeySecretArn"}, ""]}]
    }


# --- secrets and parameters -------------------------------------------------------------------


def test_the_store_is_upstash_or_redis_over_tcp_exactly_one(t):
    params, cond = t["Parameters"], t["Conditions"]
    for name in ("UpstashSecretArn", "StoreSecretArn"):
        assert params[name]["Default"] == "" and params[name]["AllowedPattern"].startswith("^(arn:")
    assert cond["UseRedisStore"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "StoreSecretArn"}, ""]}]}
    rule = t["Rules"]["ExactlyOneStore"]["Assertions"][0]["Assert"]["Fn::Or"]
    assert len(rule) == 2 and all("Fn::And" in branch for branch in rule)
    assert t["Outputs"]["StoreSecretArn"]["Condition"] == "UseRedisStore"
    assert t["Outputs"]["UpstashSecretArn"]["Condition"] == "UseUpstashStore"


def test_vpc_is_optional_and_needs_security_groups(t):
    params = t["Parameters"]
    for name in ("VpcSubnetIds", "VpcSecurityGroupIds"):
        assert params[name]["Type"] == "CommaDelimitedList" and params[name]["Default"] == ""
    assert t["Globals"]["Function"]["VpcConfig"] == {
        "Fn::If": [
            "InVpc",
            {
                "SubnetIds": {"Ref": "VpcSubnetIds"},
                "SecurityGroupIds": {"Ref": "VpcSecurityGroupIds"},
            },
            {"Ref": "AWS::NoValue"},
        ]
    }
    assert "VpcNeedsSecurityGroups" in t["Rules"]


def test_no_parameter_carries_a_secret_value(t):
    for name, p in t["Parameters"].items():
        if re.search(r"token|key|password|secret|credential", name, re.IGNORECASE):
            assert name.endswith(("Arn", "Name")), f"parameter {name} looks like a secret value"
            assert p["Type"] == "String"
            assert p["AllowedPattern"].lstrip("^(").startswith("arn:"), name


def test_every_parameter_is_described(t):
    for name, p in t["Parameters"].items():
        assert p.get("Description", "").strip(), f"parameter {name} has no Description"


def test_conversation_parameters(t):
    params = t["Parameters"]
    assert params["GraceSeconds"]["Default"] == 120 and params["GraceSeconds"]["MinValue"] == 10
    assert params["ReplyMode"]["AllowedValues"] == ["every", "addressed"]
    assert params["Stage"]["Default"] == "dev"
    for name in ("ModelName", "RateLimit", "RateWindowSeconds", "TracingMode", "OtlpEndpoint"):
        assert name in params
    assert set(params["LogRetentionDays"]["AllowedValues"]) <= {
        1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192,
        2557, 2922, 3288, 3653,
    }  # fmt: skip


def test_generated_secrets_only_when_no_arn_is_given(t):
    cond = t["Conditions"]
    assert cond["CreateTokenSigningSecret"] == {
        "Fn::Equals": [{"Ref": "TokenSigningSecretArn"}, ""]
    }
    assert cond["CreateAdminSecret"] == {"Fn::Equals": [{"Ref": "AdminSecretArn"}, ""]}
    for name, condition in (
        ("TokenSigningSecret", "CreateTokenSigningSecret"),
        ("AdminSecret", "CreateAdminSecret"),
    ):
        secret = t["Resources"][name]
        assert secret["Type"] == "AWS::SecretsManager::Secret"
        assert secret["Condition"] == condition
        gen = secret["Properties"]["GenerateSecretString"]
        assert gen["PasswordLength"] >= 32, "HS256 keys need at least 32 bytes"
        assert "SecretString" not in secret["Properties"]


def test_local_only_variables_are_empty_in_the_template(t):
    for name in FUNCTIONS:
        for var, value in env_of(t, name).items():
            if var in LOCAL_ONLY_VARS:
                assert value == "", (
                    f"{name}: {var} must stay empty (secrets come from Secrets Manager)"
                )


def test_no_literal_looks_like_a_secret(t):
    """No env value or property is a literal that looks like a key or token."""
    suspicious = re.compile(r"(sk-[A-Za-z0-9]{10,}|eyJ[A-Za-z0-9_-]{10,}|[A-Za-z0-9+/]{40,})")
    text = TEMPLATE.read_text()
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        assert not suspicious.search(line), line


# --- environment ------------------------------------------------------------------------------

GLOBAL_ENV = {
    "REJOIN_UPSTASH_SECRET",
    "REJOIN_UPSTASH_TIMEOUT",
    "REJOIN_KEY_PREFIX",
    "REJOIN_WS_ENDPOINT",
    "REJOIN_GRACE_SECONDS",
    "REJOIN_REPLY_MODE",
    "REJOIN_MODEL",
    "REJOIN_RATE_LIMIT",
    "REJOIN_RATE_WINDOW_SECONDS",
    "REJOIN_IDLE_TIMEOUT_SECONDS",
    "POWERTOOLS_SERVICE_NAME",
    "POWERTOOLS_METRICS_NAMESPACE",
    "POWERTOOLS_LOG_LEVEL",
}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_every_function_gets_the_shared_settings(t, name):
    env = env_of(t, name)
    assert env.keys() >= GLOBAL_ENV
    assert env["REJOIN_GRACE_SECONDS"] == {"Ref": "GraceSeconds"}
    assert env["REJOIN_REPLY_MODE"] == {"Ref": "ReplyMode"}
    assert env["REJOIN_MODEL"] == {"Ref": "ModelName"}
    assert env["REJOIN_RATE_LIMIT"] == {"Ref": "RateLimit"}
    assert env["REJOIN_RATE_WINDOW_SECONDS"] == {"Ref": "RateWindowSeconds"}
    assert env["REJOIN_IDLE_TIMEOUT_SECONDS"] == "600"
    assert env["REJOIN_KEY_PREFIX"] == "rejoin"
    assert env["POWERTOOLS_SERVICE_NAME"] == "rejoin"
    assert env["POWERTOOLS_METRICS_NAMESPACE"] == "Rejoin"
    assert env["REJOIN_WS_ENDPOINT"] == {
        "Fn::Sub": "https://${WebSocketApi}.execute-api.${AWS::Region}.${AWS::URLSuffix}/${Stage}"
    }


def test_turn_worker_tracing_settings(t):
    env = env_of(t, "TurnFunction")
    assert env["REJOIN_TRACING"] == {"Ref": "TracingMode"}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == {"Ref": "OtlpEndpoint"}
    assert env["REJOIN_OTLP_HEADERS_SECRET_NAME"] == OTLP_SECRET


# Declared for libraries (Powertools, OpenTelemetry, botocore), not read by rejoin itself.
LIBRARY_VARS = re.compile(r"^(POWERTOOLS_|OTEL_|AWS_ENDPOINT_URL_)|^OPENAI_API_KEY$")


def test_every_declared_variable_is_read_by_the_code(t):
    """A typo between template and code would silently fall back to a default."""
    code = "\n".join(
        p.read_text() for d in ("shared", "functions") for p in (ROOT / d).rglob("*.py")
    )
    for name in FUNCTIONS:
        for var in env_of(t, name):
            if LIBRARY_VARS.search(var):
                continue
            assert f'"{var}"' in code, (
                f"{name}: {var} is set but no code in shared/ or functions/ reads it"
            )


# --- logs and outputs -------------------------------------------------------------------------


@pytest.mark.parametrize("name", FUNCTIONS)
def test_each_function_logs_to_its_own_log_group_with_retention(t, name):
    group = fn_props(t, name)["LoggingConfig"]["LogGroup"]
    assert isinstance(group, dict) and set(group) == {"Ref"}
    resource = t["Resources"][group["Ref"]]
    assert resource["Type"] == "AWS::Logs::LogGroup"
    assert resource["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}
    others = {fn_props(t, n)["LoggingConfig"]["LogGroup"]["Ref"] for n in FUNCTIONS if n != name}
    assert group["Ref"] not in others


def test_every_log_group_has_retention(t):
    for name, group in resources(t, "AWS::Logs::LogGroup").items():
        assert group["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}, name


def test_outputs(t):
    out = t["Outputs"]
    for name in (
        "WebSocketURL",
        "WebSocketManagementEndpoint",
        "HttpApiUrl",
        "TurnQueueUrl",
        "TurnDeadLetterQueueUrl",
        "UpstashSecretArn",
        "OpenAISecretArn",
        "TokenSigningSecretArn",
        "AdminSecretArn",
    ):
        assert name in out, name
        assert out[name].get("Description"), name
    assert out["WebSocketURL"]["Value"]["Fn::Sub"].startswith("wss://${WebSocketApi}.execute-api.")
    assert out["WebSocketURL"]["Value"]["Fn::Sub"].endswith("/${Stage}")
    assert out["WebSocketManagementEndpoint"]["Value"]["Fn::Sub"].startswith(
        "https://${WebSocketApi}."
    )
    assert out["HttpApiUrl"]["Value"]["Fn::Sub"].startswith("https://${HttpApi}.execute-api.")


# --- the files around the template ------------------------------------------------------------


def test_every_sample_event_is_documented(t):
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    events = sorted(p.name for p in (ROOT / "events").glob("*.json") if p.name != "env.local.json")
    assert events
    for name in events:
        assert f"events/{name}" in deploy, f"docs/deploy.md has no sam local invoke for {name}"
    for name in FUNCTIONS:
        assert f"bash scripts/sam.sh local invoke {name}" in deploy, name


def test_samconfig_environments():
    import tomllib

    cfg = tomllib.loads((ROOT / "samconfig.toml").read_text())
    assert cfg["version"] == 0.1
    deploy = cfg["default"]["deploy"]["parameters"]
    assert deploy["stack_name"] == "rejoin-dev"  # the default environment is dev
    assert deploy["region"] == "us-east-1"
    assert "CAPABILITY_IAM" in deploy["capabilities"]
    assert deploy["confirm_changeset"] is True and deploy["resolve_s3"] is True
    assert cfg["default"]["build"]["parameters"] == {"cached": True, "parallel": True}
    assert cfg["default"]["validate"]["parameters"]["lint"] is True
    assert cfg["default"]["local_invoke"]["parameters"]["env_vars"] == "events/env.local.json"
    for env in ("dev", "prod"):
        p = cfg[env]["deploy"]["parameters"]
        assert p["confirm_changeset"] is True
        assert f'Stage="{env}"' in p["parameter_overrides"]
    prod_days = re.search(
        r'LogRetentionDays="(\d+)"', cfg["prod"]["deploy"]["parameters"]["parameter_overrides"]
    )
    dev_days = re.search(
        r'LogRetentionDays="(\d+)"', cfg["dev"]["deploy"]["parameters"]["parameter_overrides"]
    )
    assert prod_days and dev_days and int(prod_days[1]) > int(dev_days[1])
    # No secret values in the config either.
    assert not re.search(r"(Token|Key|Password)\w*=", (ROOT / "samconfig.toml").read_text())
