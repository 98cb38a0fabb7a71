"""Encryption at rest, optional: the agent's history and the room's message texts.

Off unless keys are configured (``REJOIN_ENCRYPTION_SECRET`` names a Secrets
Manager secret; locally ``REJOIN_ENCRYPTION_KEYS``). When on:

- **History items** are stored as the Agents SDK's ``EncryptedSession``
  envelopes (``{"__enc__": 1, "v": 1, "kid": "hkdf-v1", "payload": <Fernet
  token>}``), with the SDK's per-session key derivation (HKDF-SHA256, the
  session id as salt). So the SDK's own ``EncryptedSession``, given the same
  key, reads what rejoin's turns wrote, and rejoin reads what it writes.
- **Message texts** in the event log (``message`` and ``agent_message``
  events, which the transcript, replays and the HTTP API read) are stored as
  ``enc:v1:<Fernet token>`` under the same per-session key, and decrypted
  before anything is sent or answered.

What stays readable in the store: session and user ids, display names,
presence, sequence numbers, timestamps, message ids (the room needs them to
work). Lua never sees a plaintext that is encrypted: Python encrypts before a
script and decrypts after it.

**Keys and rotation.** A key is a Fernet key (``Fernet.generate_key()``, 32
random bytes, urlsafe base64). The secret holds one key, or JSON ``{"keys":
[newest, ..., oldest]}``: new data is encrypted with the first, reads try
each in turn. To rotate: put a new key first and keep the old ones until
every session that used them has ended (the longest a session lives: its
meetings plus the grace period; a day is plenty), then drop them.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from .errors import ConfigError

__all__ = ["TEXT_PREFIX", "Encryption", "SessionCipher", "parse_keys"]

TEXT_PREFIX = "enc:v1:"
_INFO = b"agents.session-store.hkdf.v1"  # the SDK's EncryptedSession derivation
_KID = "hkdf-v1"


def parse_keys(value: str | dict[str, Any] | None) -> tuple[str, ...]:
    """Keys from a secret's value: one key, a comma-separated list, or ``{"keys": [...]}``.

    Raises:
        ConfigError: no key, or a key that is not a Fernet key.
    """
    if value is None or value == "":
        return ()
    if isinstance(value, dict):
        raw = value.get("keys")
        if not isinstance(raw, list) or not all(isinstance(k, str) for k in raw):
            raise ConfigError('the encryption secret must hold {"keys": ["<key>", ...]}')
        keys = tuple(k.strip() for k in raw if k.strip())
    else:
        keys = tuple(k.strip() for k in value.split(",") if k.strip())
    if not keys:
        raise ConfigError("the encryption secret holds no key")
    for key in keys:
        try:
            if len(base64.urlsafe_b64decode(key)) != 32:
                raise ValueError
        except ValueError:
            raise ConfigError(
                "an encryption key must be a Fernet key (32 bytes, urlsafe base64): "
                'python -c "from cryptography.fernet import Fernet; '
                'print(Fernet.generate_key().decode())"'
            ) from None
    return keys


class SessionCipher:
    """Encrypts and decrypts one session's items and texts.

    Args:
        keys: Fernet keys, newest first (the first one encrypts).
        session_id: the session (the per-session key's salt).
    """

    def __init__(self, keys: Sequence[str], session_id: str) -> None:
        from cryptography.fernet import Fernet, MultiFernet
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        if not keys:
            raise ConfigError("no encryption key")
        fernets = []
        for key in keys:
            hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=session_id.encode(), info=_INFO)
            derived = hkdf.derive(base64.urlsafe_b64decode(key))
            fernets.append(Fernet(base64.urlsafe_b64encode(derived)))
        self._fernet = MultiFernet(fernets)

    def wrap(self, item: Any) -> dict[str, Any]:
        """An item as the SDK's ``EncryptedSession`` stores it."""
        plain = json.dumps(item, ensure_ascii=False, separators=(",", ":"), default=str)
        token = self._fernet.encrypt(plain.encode()).decode()
        return {"__enc__": 1, "v": 1, "kid": _KID, "payload": token}

    def unwrap(self, stored: Any) -> Any | None:
        """The item in an envelope; ``None`` if it is not one this key can open.

        A plain (unencrypted) item is returned as it is: history written
        before encryption was turned on stays readable.
        """
        from cryptography.fernet import InvalidToken

        if not (isinstance(stored, dict) and stored.get("__enc__") == 1):
            return stored
        try:
            return json.loads(self._fernet.decrypt(str(stored["payload"]).encode()))
        except (InvalidToken, KeyError, ValueError):
            return None

    def encrypt_text(self, text: str) -> str:
        """``enc:v1:<token>``."""
        return TEXT_PREFIX + self._fernet.encrypt(text.encode()).decode()

    def decrypt_text(self, stored: str) -> str:
        """The text; a text stored in plain is returned as it is.

        Raises:
            ConfigError: encrypted with a key that is no longer configured.
        """
        from cryptography.fernet import InvalidToken

        if not stored.startswith(TEXT_PREFIX):
            return stored
        try:
            return self._fernet.decrypt(stored[len(TEXT_PREFIX) :].encode()).decode()
        except InvalidToken:
            raise ConfigError(
                "a stored text was encrypted with a key that is not configured any more"
            ) from None

    def decrypt_event(self, event: dict[str, Any]) -> dict[str, Any]:
        """A logged event with its ``text`` decrypted (others are returned as they are)."""
        text = event.get("text")
        if isinstance(text, str) and text.startswith(TEXT_PREFIX):
            return {**event, "text": self.decrypt_text(text)}
        return event


class Encryption:
    """The deployment's keys; a cipher per session (cached: deriving costs HKDF).

    Args:
        keys: Fernet keys, newest first.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise ConfigError("no encryption key")
        self.keys = tuple(keys)
        self._cipher = lru_cache(maxsize=1024)(self._make)

    def _make(self, session_id: str) -> SessionCipher:
        return SessionCipher(self.keys, session_id)

    def for_session(self, session_id: str) -> SessionCipher:
        """The cipher of one session."""
        return self._cipher(session_id)
