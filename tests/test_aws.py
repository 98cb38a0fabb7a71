"""The AWS edges, with moto: the SQS FIFO turn queue and Secrets Manager."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from harness import make_stack, offline_agent
from moto import mock_aws

from rejoin.config import Settings
from rejoin.errors import ConfigError
from rejoin.queue import SqsTurnQueue, TurnRequest, dedup_id
from rejoin.runtime import set_runtime


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        yield


def fifo_queue() -> tuple[Any, str]:
    sqs = boto3.client("sqs", region_name="us-east-1")
    url = sqs.create_queue(
        QueueName=f"turns-{uuid.uuid4().hex[:8]}.fifo",
        Attributes={"FifoQueue": "true", "ContentBasedDeduplication": "false"},
    )["QueueUrl"]
    return sqs, url


def receive_all(sqs: Any, url: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        got = sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        ).get("Messages", [])
        if not got:
            return out
        for m in got:
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
        out.extend(got)


def turn(session: str, turn_id: str, epoch: str = "e1") -> TurnRequest:
    return TurnRequest(session, epoch, turn_id, reply_to=int(turn_id.lstrip("m")))


class TestSqsTurnQueue:
    async def test_fifo_group_is_the_session_and_resends_are_deduplicated(self, aws):
        sqs, url = fifo_queue()
        queue = SqsTurnQueue(url, client=sqs)
        # GIVEN turns of two sessions, one sent twice, and one of a recreated
        # session (new epoch) reusing a turn id within the dedup window
        for t in (
            turn("s1", "m1"),
            turn("s2", "m1"),
            turn("s1", "m1"),
            turn("s1", "m2"),
            turn("s2", "m1", epoch="e2"),
        ):
            await queue.enqueue(t)
        messages = receive_all(sqs, url)
        # THEN the resend was dropped by SQS, the new epoch's turn was not, and
        # each message is grouped by session
        got = [(m["Attributes"]["MessageGroupId"], json.loads(m["Body"])["turn"]) for m in messages]
        assert sorted(got) == [("s1", "m1"), ("s1", "m2"), ("s2", "m1"), ("s2", "m1")]
        for m in messages:
            body = TurnRequest.from_json(m["Body"])
            assert m["Attributes"]["MessageDeduplicationId"] == dedup_id(
                body.session_id, body.epoch, body.turn_id
            )
        # and the order within a group is kept
        s1 = [t for g, t in got if g == "s1"]
        assert s1 == ["m1", "m2"]

    async def test_failed_deliveries_come_back_soon(self, aws):
        # GIVEN a received turn (invisible for the queue's long timeout)
        sqs, url = fifo_queue()
        queue = SqsTurnQueue(url, client=sqs)
        await queue.enqueue(turn("s1", "m1"))
        got = sqs.receive_message(QueueUrl=url, VisibilityTimeout=1800)["Messages"]
        assert sqs.receive_message(QueueUrl=url).get("Messages") is None
        # WHEN the worker asks for a retry without delay
        await queue.retry_later([(got[0]["ReceiptHandle"], 0)])
        # THEN it can be received again at once
        again = sqs.receive_message(QueueUrl=url)["Messages"]
        assert json.loads(again[0]["Body"])["turn"] == "m1"

    def test_retry_delay_backs_off(self):
        from rejoin.turns import retry_delay

        assert [retry_delay(n) for n in (1, 2, 3, 4, 10)] == [5, 10, 20, 40, 300]

    def test_refuses_a_standard_queue(self):
        with pytest.raises(ValueError, match="FIFO"):
            SqsTurnQueue("https://sqs.us-east-1.amazonaws.com/1/turns")

    def test_from_the_message_handler_to_the_turn_handler(self, aws, upstash, raw_redis):
        # GIVEN a deployment whose turn queue is an SQS FIFO queue (moto)
        sqs, url = fifo_queue()
        stack = make_stack(upstash, agent=offline_agent())
        stack.rt._queue = SqsTurnQueue(url, client=sqs)
        try:
            ada, _ = stack.join("sqs-1", "ada")
            stack.say(ada, "hello via SQS", msg_id="c-1")
            stack.say(ada, "hello via SQS", msg_id="c-1")  # the client retried
            messages = receive_all(sqs, url)
            assert len(messages) == 1
            # WHEN Lambda delivers the batch as SQS would
            event = {
                "Records": [
                    {
                        "messageId": m["MessageId"],
                        "receiptHandle": m["ReceiptHandle"],
                        "body": m["Body"],
                        "attributes": m["Attributes"],
                        "messageAttributes": {},
                        "md5OfBody": m["MD5OfBody"],
                        "eventSource": "aws:sqs",
                        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:turns.fifo",
                        "awsRegion": "us-east-1",
                    }
                    for m in messages
                ]
            }
            from rejoin_local.handlers import load_handler

            result = load_handler("turn")(event, None)
            # THEN the turn ran once and the participant got the reply
            assert result == {"batchItemFailures": []}
            assert "hello via SQS" in stack.last(ada, "agent_message")["text"]
        finally:
            set_runtime(None)


class TestSecrets:
    def test_settings_read_secrets_from_secrets_manager(self, aws, monkeypatch):
        sm = boto3.client("secretsmanager", region_name="us-east-1")
        suffix = uuid.uuid4().hex[:6]
        sm.create_secret(
            Name=f"upstash-{suffix}",
            SecretString=json.dumps({"url": "https://eu1-x.upstash.io", "token": "tok-123"}),
        )
        sm.create_secret(Name=f"signing-{suffix}", SecretString="s" * 40)
        sm.create_secret(Name=f"openai-{suffix}", SecretString="sk-test")
        env = {
            "REJOIN_UPSTASH_SECRET": f"upstash-{suffix}",
            "REJOIN_TOKEN_SECRET_NAME": f"signing-{suffix}",
            "REJOIN_OPENAI_SECRET_NAME": f"openai-{suffix}",
            "REJOIN_GRACE_SECONDS": "90",
            "REJOIN_REPLY_MODE": "addressed",
        }
        s = Settings.from_env(env)
        assert (s.upstash_url, s.upstash_token) == ("https://eu1-x.upstash.io", "tok-123")
        assert s.token_secret == "s" * 40 and s.openai_api_key == "sk-test"
        assert (s.grace_seconds, s.reply_mode) == (90, "addressed")
        # secrets never show in the settings' repr (logs)
        assert "tok-123" not in repr(s) and "sk-test" not in repr(s)

    def test_missing_secret_is_a_clear_error(self, aws):
        with pytest.raises(ConfigError) as err:
            Settings.from_env({"REJOIN_TOKEN_SECRET_NAME": f"nope-{uuid.uuid4().hex}"})
        assert "nope-" in str(err.value)

    def test_malformed_upstash_secret(self, aws):
        sm = boto3.client("secretsmanager", region_name="us-east-1")
        name = f"bad-{uuid.uuid4().hex[:6]}"
        sm.create_secret(Name=name, SecretString="just-a-token")
        with pytest.raises(ConfigError, match="url"):
            Settings.from_env({"REJOIN_UPSTASH_SECRET": name})

    @pytest.mark.parametrize(
        "env, word",
        [
            ({"REJOIN_GRACE_SECONDS": "soon"}, "REJOIN_GRACE_SECONDS"),
            ({"REJOIN_GRACE_SECONDS": "0"}, "at least"),
            ({"REJOIN_REPLY_MODE": "sometimes"}, "REJOIN_REPLY_MODE"),
            ({"REJOIN_UPSTASH_TIMEOUT": "x"}, "REJOIN_UPSTASH_TIMEOUT"),
        ],
    )
    def test_bad_settings(self, env, word):
        with pytest.raises(ConfigError, match=word):
            Settings.from_env(env)

    def test_defaults(self):
        s = Settings.from_env({})
        assert (s.grace_seconds, s.reply_mode, s.key_prefix) == (120, "every", "rejoin")
        assert Settings.from_env({"GRACE_SECONDS": "30"}).grace_seconds == 30
