"""Encryption at rest (issue 13, item 2): the key comes from Secrets Manager.

The template passes ``EncryptionKeySecretArn`` to the functions as
``REJOIN_ENCRYPTION_SECRET``; this reads it as a deployed function does
(Powertools' Secrets Manager client, against moto).
"""

from __future__ import annotations

import uuid

import pytest
from cryptography.fernet import Fernet

from rejoin.config import Settings
from rejoin.errors import ConfigError


def test_encryption_keys_come_from_the_secret_the_template_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GIVEN secrets holding one Fernet key, the rotation form {"keys": [new, old]}, and junk
    WHEN the settings are read with REJOIN_ENCRYPTION_SECRET naming each
    THEN the keys are the secret's, newest first, the secret winning over
    REJOIN_ENCRYPTION_KEYS; junk is a ConfigError that never shows the value.
    """
    import boto3
    from moto import mock_aws

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    old, new, other = (Fernet.generate_key().decode() for _ in range(3))
    with mock_aws():
        sm = boto3.client("secretsmanager", region_name="us-east-1")
        single, rotating, junk = (f"enc-{n}-{uuid.uuid4().hex}" for n in range(3))
        sm.create_secret(Name=single, SecretString=old)
        sm.create_secret(Name=rotating, SecretString=f'{{"keys": ["{new}", "{old}"]}}')
        sm.create_secret(Name=junk, SecretString="not-a-fernet-key-but-secret")

        env = {"REJOIN_ENCRYPTION_KEYS": other}
        assert Settings.from_env({**env, "REJOIN_ENCRYPTION_SECRET": single}).encryption_keys == (
            old,
        )
        both = Settings.from_env({**env, "REJOIN_ENCRYPTION_SECRET": rotating})
        assert both.encryption_keys == (new, old)
        assert new not in repr(both)
        with pytest.raises(ConfigError) as err:
            Settings.from_env({"REJOIN_ENCRYPTION_SECRET": junk})
        assert "not-a-fernet-key-but-secret" not in str(err.value)
    assert Settings.from_env({}).encryption_keys == ()
