"""Session ids and the Redis keys built from them.

Every key of one session shares one hash-tagged prefix, ``<prefix>:{<id>}:``,
so one Lua script can read, change or delete a whole session atomically (and
Upstash can lock just those keys). Ids are validated before any key is built:
an id is user input, and an unchecked ``}`` or ``:`` would let one session
name another's keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidSessionId

__all__ = ["SessionKeys", "validate_session_id"]

_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def validate_session_id(session_id: object) -> str:
    """Return ``session_id`` if it is 1-128 characters of ``A-Za-z0-9_-``.

    Raises:
        InvalidSessionId: otherwise, with a message saying why.
    """
    if not isinstance(session_id, str):
        raise InvalidSessionId(f"session id must be a string, not {type(session_id).__name__}")
    if not _SESSION_ID.fullmatch(session_id):
        shown = session_id if len(session_id) <= 40 else session_id[:40] + "..."
        raise InvalidSessionId(
            f"invalid session id {shown!r}: use 1-128 characters of A-Z, a-z, 0-9, '_' and '-'"
        )
    return session_id


@dataclass(frozen=True)
class SessionKeys:
    """The keys of one session.

    Attributes:
        prefix: the key prefix shared by every rejoin key (default ``rejoin``).
        session_id: the validated session id.
    """

    prefix: str
    session_id: str

    def __post_init__(self) -> None:
        validate_session_id(self.session_id)
        if not _PREFIX.fullmatch(self.prefix):
            raise ValueError(f"invalid key prefix {self.prefix!r}: use 1-64 of A-Za-z0-9_.-")

    def _key(self, name: str) -> str:
        return f"{self.prefix}:{{{self.session_id}}}:{name}"

    @property
    def items(self) -> str:
        """List of the Agents SDK items (JSON), oldest first."""
        return self._key("items")

    @property
    def ops(self) -> str:
        """Sorted set of applied write ids (score: time), for idempotent retries."""
        return self._key("ops")

    @property
    def results(self) -> str:
        """Hash of results of applied non-repeatable writes (pops), by write id."""
        return self._key("results")

    @property
    def meta(self) -> str:
        """Hash of the room's state: epoch, deadline, sequence, turn lease."""
        return self._key("meta")

    @property
    def connections(self) -> str:
        """Hash of connection id to connection record (JSON)."""
        return self._key("conns")

    @property
    def participants(self) -> str:
        """Hash of user id to participant record (JSON)."""
        return self._key("users")

    @property
    def events(self) -> str:
        """List of the room's events (JSON, with increasing ``seq``), capped."""
        return self._key("events")

    @property
    def rate(self) -> str:
        """Hash of rate-limit windows, per connection and per participant."""
        return self._key("rate")

    @property
    def departed(self) -> str:
        """Hash of recently closed connections (so a late ``leave`` still wins)."""
        return self._key("departed")

    @property
    def revoked(self) -> str:
        """Hash of token revocations: ``*`` (session ended) and ``u:<user>`` (removed).

        It is the one key that outlives the session on purpose: it expires on
        its own once every token it revokes has expired.
        """
        return self._key("revoked")

    @property
    def store(self) -> tuple[str, str, str, str]:
        """The keys the session store's scripts touch, in KEYS order."""
        return (self.items, self.ops, self.results, self.meta)

    @property
    def all(self) -> tuple[str, ...]:
        """Every key of the session's data, for deletion (not :attr:`revoked`)."""
        return (
            self.items,
            self.ops,
            self.results,
            self.meta,
            self.connections,
            self.participants,
            self.events,
            self.rate,
            self.departed,
        )

    @property
    def room(self) -> tuple[str, ...]:
        """The keys the room scripts touch, in KEYS order: :attr:`all`, then :attr:`revoked`."""
        return (*self.all, self.revoked)
