"""A history window that never splits a tool call from its output.

A model API refuses an input where a tool call lacks its output, an output
lacks its call, or an item the model produced after a reasoning item comes
without that reasoning item. Taking "the latest N items" of a conversation
can cut any of these pairs (the SDK's ``session_settings.limit`` does).
:func:`safe_window` takes the latest items within a count limit and/or an
approximate token budget, starting only where no pair is cut:

- every call in the window has its output, and no output lacks its call:
  ``function_call``/``function_call_output``, ``custom_tool_call``,
  ``computer_call``, ``shell_call``, ``local_shell_call``,
  ``apply_patch_call``, ``tool_search_call`` and ``program`` with their
  outputs (matched by ``call_id``), ``mcp_approval_request`` with its
  ``mcp_approval_response`` (``approval_request_id``), and items a program
  issued (``caller.caller_id``) with that program;
- a reasoning item stays with the item that follows it (the item the model
  produced after it): the window never starts between them.

If a limit falls inside such a group, the window starts after the group
(fewer items, never a broken pair). The newest group is kept whole even if
it alone exceeds the limits (``keep_newest=True``, the default: the model
needs the latest input to answer), or dropped (``keep_newest=False``).

Items whose counterpart is not in the list at all (an output whose call was
already cut off) are never in the window. When the list is itself only the
latest items of a longer history (``get_items(n)``), say so with
``complete=False``: its first item then only shows what it is tied to (a
reasoning item cut from the item after it cannot be seen from that item
alone) and is never in the window; read one item more than you need.
A call whose output does not exist yet (a call pending at the very end) is
left as it is: the window only chooses where to start.

Token estimate (:func:`estimate_tokens`): ``ceil(chars / 4) + 4`` per item,
where ``chars`` counts the item's string values (the text, the JSON of a
speaker item, tool arguments and outputs) but not ids, types and statuses:
OpenAI's rule of thumb of about four characters per English token, plus a
few tokens for the item's framing. It is approximate: it underestimates
text in many other scripts and encrypted reasoning content; keep a margin.

This module is pure (no SDK import, no I/O) but for :class:`WindowedSession`,
a thin ``Session`` wrapper that serves the safe window from any session.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from agents.items import TResponseInputItem
    from agents.memory import Session, SessionSettings

__all__ = ["CALL_OUTPUT", "WindowedSession", "estimate_tokens", "safe_start", "safe_window"]

T = TypeVar("T")

# Per item, for the role/type framing the model sees around the text.
ITEM_OVERHEAD_TOKENS = 4

# call type -> output type; both carry the same `call_id`.
CALL_OUTPUT: dict[str, str] = {
    "function_call": "function_call_output",
    "custom_tool_call": "custom_tool_call_output",
    "computer_call": "computer_call_output",
    "shell_call": "shell_call_output",
    "local_shell_call": "local_shell_call_output",
    "apply_patch_call": "apply_patch_call_output",
    "tool_search_call": "tool_search_output",
    "program": "program_output",
}
_OUTPUT_CALL = {output: call for call, output in CALL_OUTPUT.items()}
# Not text the model reads: left out of the token estimate.
_NOT_TEXT = frozenset({"id", "call_id", "role", "status", "type", "annotations", "logprobs"})


def _get(item: Any, key: str) -> Any:
    """A field of an item, whether a dict (as stored) or a pydantic model."""
    if isinstance(item, Mapping):
        return item.get(key)
    return getattr(item, key, None)


def _chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        return sum(_chars(v) for k, v in value.items() if k not in _NOT_TEXT)
    if isinstance(value, list | tuple):
        return sum(_chars(v) for v in value)
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return _chars(dump(exclude_none=True))
    return 0


def estimate_tokens(item: Any) -> int:
    """The approximate number of tokens ``item`` costs in a model's input.

    Args:
        item: an SDK input item (a dict, or a pydantic output item).

    Returns:
        ``ceil(chars / 4) + 4``, ``chars`` being the length of the item's
        string values other than ids, roles, types and statuses.
    """
    return math.ceil(_chars(item) / 4) + ITEM_OVERHEAD_TOKENS


def _links(items: Sequence[Any]) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``: item ``j`` needs item ``i`` (``i = -1``: it is not there).

    A window may not start in ``(i, j]``.
    """
    links: list[tuple[int, int]] = []
    calls: dict[tuple[str, str], int] = {}
    anonymous: dict[str, list[int]] = {}  # tool searches without a call id, in order
    requests: dict[str, int] = {}
    programs: dict[str, int] = {}
    pending_reasoning: list[int] = []
    for j, item in enumerate(items):
        kind = _get(item, "type")
        if kind == "reasoning":
            pending_reasoning.append(j)
            continue
        # The reasoning items just before this one belong to it.
        links.extend((r, j) for r in pending_reasoning)
        pending_reasoning.clear()
        call_id = _get(item, "call_id")
        if kind == "local_shell_call_output" and not isinstance(call_id, str):
            call_id = _get(item, "id")  # the API's schema names the call by `id` here
        if kind in CALL_OUTPUT:
            if isinstance(call_id, str):
                calls[(kind, call_id)] = j
            elif kind == "tool_search_call":
                anonymous.setdefault(kind, []).append(j)
            if kind == "program" and isinstance(call_id, str):
                programs[call_id] = j
        elif kind in _OUTPUT_CALL:
            call_kind = _OUTPUT_CALL[kind]
            if isinstance(call_id, str):
                links.append((calls.get((call_kind, call_id), -1), j))
            else:
                waiting = anonymous.get(call_kind) or []
                links.append((waiting.pop(0) if waiting else -1, j))
        elif kind == "mcp_approval_request":
            request_id = _get(item, "id")
            if isinstance(request_id, str):
                requests[request_id] = j
        elif kind == "mcp_approval_response":
            request_id = _get(item, "approval_request_id")
            links.append((requests.get(request_id, -1) if isinstance(request_id, str) else -1, j))
        caller = _get(item, "caller")
        caller_type = _get(caller, "type") if caller is not None else None
        if caller_type == "program" and kind != "program":
            caller_id = _get(caller, "caller_id")
            if isinstance(caller_id, str):
                links.append((programs.get(caller_id, -1), j))
    return links


def _allowed_starts(items: Sequence[Any], complete: bool) -> list[bool]:
    """``allowed[c]``: a window may start at index ``c`` (``0 <= c <= len(items)``)."""
    n = len(items)
    # Difference array over forbidden starts: each link forbids (i, j].
    change = [0] * (n + 2)
    for i, j in _links(items):
        change[i + 1] += 1
        change[j + 1] -= 1
    allowed: list[bool] = []
    depth = 0
    for c in range(n + 1):
        depth += change[c]
        allowed.append(depth == 0)
    if not complete and n:
        allowed[0] = False  # what came before the first item is unknown
    return allowed


def safe_start(
    items: Sequence[Any],
    *,
    limit: int | None = None,
    max_tokens: int | None = None,
    keep_newest: bool = True,
    complete: bool = True,
    estimate: Callable[[Any], int] = estimate_tokens,
) -> int:
    """The index where :func:`safe_window` starts (``len(items)``: an empty window).

    Args and the rules are those of :func:`safe_window`.
    """
    n = len(items)
    if limit is not None and limit < 0:
        raise ValueError("limit must be 0 or more (or None)")
    if max_tokens is not None and max_tokens < 0:
        raise ValueError("max_tokens must be 0 or more (or None)")
    if limit == 0 or max_tokens == 0:
        return n
    # The smallest start within both budgets (budgets shrink as the start moves on).
    lowest = 0 if limit is None else max(0, n - limit)
    if max_tokens is not None:
        total = 0
        lowest_by_tokens = n
        for c in range(n - 1, -1, -1):
            total += estimate(items[c])
            if total > max_tokens:
                break
            lowest_by_tokens = c
        lowest = max(lowest, lowest_by_tokens)
    allowed = _allowed_starts(items, complete)
    start = next(c for c in range(lowest, n + 1) if allowed[c])
    if start == n and keep_newest and n:
        # Nothing fits: the newest group alone, if there is a boundary before it.
        start = next((c for c in range(n - 1, -1, -1) if allowed[c]), n)
    return start


def safe_window(
    items: Sequence[T],
    *,
    limit: int | None = None,
    max_tokens: int | None = None,
    keep_newest: bool = True,
    complete: bool = True,
    estimate: Callable[[Any], int] = estimate_tokens,
) -> list[T]:
    """The latest items within the limits, never splitting a call from its output.

    Args:
        items: the history, oldest first (SDK input items).
        limit: at most this many items (None: no count limit; 0: none).
        max_tokens: at most this many estimated tokens (None: no budget;
            0: none).
        keep_newest: when even the newest group (e.g. a call, its output and
            its reasoning) exceeds the limits, keep it whole (True) rather
            than return an empty window (False).
        complete: False when ``items`` are only the latest items of a longer
            history: the first one is then never in the window (see the
            module docstring).
        estimate: tokens per item (default :func:`estimate_tokens`).

    Returns:
        A suffix of ``items`` (a new list): the longest one within the limits
        that starts at a safe boundary (see the module docstring). With no
        limits, every item from the first safe boundary on.

    Raises:
        ValueError: a limit is negative.
    """
    start = safe_start(
        items,
        limit=limit,
        max_tokens=max_tokens,
        keep_newest=keep_newest,
        complete=complete,
        estimate=estimate,
    )
    return list(items[start:])


class WindowedSession:
    """Any Agents SDK session, read through :func:`safe_window`.

    ``get_items`` returns the safe window of the wrapped session's history;
    writes (``add_items``, ``pop_item``, ``clear_session``) go to the wrapped
    session unchanged. Pass it to ``Runner.run(..., session=...)`` instead of
    setting ``session_settings.limit``::

        session = WindowedSession(UpstashSession("room-1", redis=redis), limit=200,
                                  max_tokens=24_000)

    Args:
        session: the session that stores the history (e.g. ``UpstashSession``).
        limit: at most this many items per read (None: no count limit).
        max_tokens: at most this many estimated tokens per read (None: none).
        keep_newest: see :func:`safe_window`.

    Reads fetch only the latest ``limit + 1`` items from the wrapped session
    when a count limit applies (the window is chosen within them, the extra
    one showing what the first is tied to), and the whole history when only a
    token budget does.
    """

    def __init__(
        self,
        session: Session,
        *,
        limit: int | None = None,
        max_tokens: int | None = None,
        keep_newest: bool = True,
    ) -> None:
        if limit is not None and limit < 0:
            raise ValueError("limit must be 0 or more (or None)")
        if max_tokens is not None and max_tokens < 0:
            raise ValueError("max_tokens must be 0 or more (or None)")
        self.session = session
        self.session_id = session.session_id
        self.limit = limit
        self.max_tokens = max_tokens
        self.keep_newest = keep_newest

    @property
    def session_settings(self) -> SessionSettings | None:
        """The wrapped session's settings (a ``limit`` there also caps reads)."""
        return getattr(self.session, "session_settings", None)

    def __repr__(self) -> str:
        return (
            f"WindowedSession({self.session!r}, limit={self.limit!r}, "
            f"max_tokens={self.max_tokens!r})"
        )

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """The safe window of the history (oldest first).

        Args:
            limit: a count limit for this read, combined with the session's
                (the smaller wins); None uses the session's alone.
        """
        counts = [c for c in (limit, self.limit) if c is not None]
        count = min(counts) if counts else None
        if count == 0:
            return []
        items = await self.session.get_items(None if count is None else count + 1)
        return safe_window(
            items,
            limit=count,
            max_tokens=self.max_tokens,
            keep_newest=self.keep_newest,
            complete=count is None or len(items) <= count,
        )

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        """Append to the wrapped session."""
        await self.session.add_items(items)

    async def pop_item(self) -> TResponseInputItem | None:
        """Remove the wrapped session's latest item."""
        return await self.session.pop_item()

    async def clear_session(self) -> None:
        """Clear the wrapped session."""
        await self.session.clear_session()

    async def _atomic_replace_items(self, items: list[TResponseInputItem]) -> bool:
        """Replace the whole stored history, when the wrapped session can do it atomically.

        Returns False (so the caller falls back) when it cannot.
        """
        replace = getattr(self.session, "_atomic_replace_items", None)
        if replace is None:
            return False
        return bool(await replace(items))
