"""Who a participant is: a user id and a display name, with their rules.

Apart from :mod:`rejoin.tokens` (which imports PyJWT and, through it,
``cryptography``) so that the frame handlers, which only read the identity
the authorizer handed on, load neither.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidParticipant

__all__ = ["Participant"]

_USER_ID = re.compile(r"[A-Za-z0-9_.@:-]{1,128}")
_MAX_NAME = 80
# Zero-width (non-)joiners are format characters that str.isprintable()
# refuses, but emoji sequences and some scripts need them.
_JOINERS = frozenset("\u200c\u200d")


@dataclass(frozen=True)
class Participant:
    """A person in a session.

    Attributes:
        user_id: 1-128 characters of ``A-Za-z0-9_-.@:``.
        name: the display name: 1-80 printable characters, stripped of
            surrounding whitespace on construction.

    Raises:
        InvalidParticipant: on construction, when a field breaks its rule.
    """

    user_id: str
    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.user_id, str) or not _USER_ID.fullmatch(self.user_id):
            raise InvalidParticipant("user id must be 1-128 characters of A-Za-z0-9_-.@:")
        if not isinstance(self.name, str):
            raise InvalidParticipant("name must be a string")
        name = self.name.strip()
        if not 1 <= len(name) <= _MAX_NAME or not _printable(name):
            raise InvalidParticipant(f"name must be 1-{_MAX_NAME} printable characters")
        # Frozen: the stripped name is stored the one way a frozen dataclass allows.
        object.__setattr__(self, "name", name)


def _printable(text: str) -> bool:
    return text.isprintable() or all(c.isprintable() or c in _JOINERS for c in text)
