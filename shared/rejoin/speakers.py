"""How participants' messages reach the agent: one input item each, speaker set by the server.

The ``say`` transition stores each message in the session history, in the
room's order, as a user message whose content is a JSON object::

    {"speaker": {"user": "u-ada", "name": "Ada"}, "id": "c-7f1d2a", "text": "..."}

The speaker comes from the token the connection was admitted with, never
from the text. The text is a JSON string inside it: newlines, quotes, a fake
``Alice:`` prefix or markup stay inside ``text`` and cannot make a second
speaker appear. The agent's instructions say so (``Settings.agent_instructions``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["Spoken", "parse_spoken", "spoken_item"]


@dataclass(frozen=True)
class Spoken:
    """One participant message as the agent reads it.

    Attributes:
        user: the speaker's user id (from their token).
        name: the speaker's display name (from their token).
        id: the message id the speaker's client gave it.
        text: what they wrote, verbatim.
    """

    user: str
    name: str
    id: str
    text: str


def spoken_item(spoken: Spoken) -> dict[str, Any]:
    """The session item for a message, as the ``say`` transition stores it."""
    content = json.dumps(
        {
            "speaker": {"user": spoken.user, "name": spoken.name},
            "id": spoken.id,
            "text": spoken.text,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return {"role": "user", "content": content}


def parse_spoken(item: Any) -> Spoken | None:
    """The message an item holds, or ``None`` if it is not a participant message."""
    if not isinstance(item, dict) or item.get("role") != "user":
        return None
    content = item.get("content")
    if not isinstance(content, str) or not content.startswith('{"speaker"'):
        return None
    try:
        body = json.loads(content)
        speaker = body["speaker"]
        return Spoken(str(speaker["user"]), str(speaker["name"]), str(body["id"]), body["text"])
    except (ValueError, KeyError, TypeError):
        return None
