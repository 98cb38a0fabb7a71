"""The shell commands the docs tell a reader to run, with where each one is.

Used by the docs check (``tests/test_docs.py``), which runs or skips each of
them; run it directly to list them::

    .venv/bin/python scripts/doc_commands.py            # README.md and docs/*.md
    .venv/bin/python scripts/doc_commands.py docs/deploy.md

A command is:

- a logical line of a fenced code block labelled ``sh``, ``bash``, ``shell``,
  ``console`` or ``zsh`` (backslash continuations joined; a ``$ `` prompt, blank
  lines and ``#`` comment lines dropped, a trailing ``  # comment`` removed); or
- an inline code span in prose that starts like a command line (``make``,
  ``bash``, ``sam``, ``aws``, ``curl``, ``python``, ``.venv/bin/...``,
  ``pytest``, ``npx``, ... possibly after ``NAME=value`` assignments).

Fenced blocks in other languages (``json``, ``python``, ...) are not commands.
An unlabelled fenced block that starts like a command line is reported too
(label it, so it is checked).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DOCS", "ROOT", "Command", "commands", "doc_files"]

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/*.md")
"""The documents checked, as globs relative to the repository root."""

SHELL_LANGUAGES = frozenset({"sh", "bash", "shell", "console", "zsh"})
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<info>[^\s`]*)")
_INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
_COMMAND_START = re.compile(
    r"^(?:[A-Z][A-Z0-9_]*=\S*\s+)*"
    r"(?:make|bash|sh|sam|aws|curl|npx|node|npm|pip3?|pytest|python3?(?:\.\d+)?|"
    r"\.venv(?:-sam)?/bin/\S+|scripts/\S+|git|docker|export|source|TOKEN=\$\()(?:\s|$)"
)


@dataclass(frozen=True)
class Command:
    """One command found in a document.

    Attributes:
        text: the command as a reader would type it (one logical line).
        path: the document, relative to the repository root.
        line: the line it starts on (1-based).
        inline: True for an inline code span in prose, False for a code block line.
        block: the index of its code block within the document (-1 for inline spans).
        first_in_block: True for the first command of its code block.
        unlabelled: True when it comes from a code block without a language.
    """

    text: str
    path: str
    line: int
    inline: bool = False
    block: int = -1
    first_in_block: bool = False
    unlabelled: bool = False

    @property
    def where(self) -> str:
        """``path:line``."""
        return f"{self.path}:{self.line}"


def doc_files(root: Path = ROOT, globs: Sequence[str] = DOCS) -> list[Path]:
    """The documents to check, in a stable order."""
    found: list[Path] = []
    for pattern in globs:
        found.extend(sorted(root.glob(pattern)))
    return found


def _strip_comment(line: str) -> str:
    """Drop a trailing ``# comment`` that is outside quotes and after whitespace."""
    quote: str | None = None
    for index, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip()
    return line.rstrip()


def _block_commands(lines: list[str]) -> Iterator[tuple[int, str]]:
    """(offset, command) for each logical line of a shell block."""
    pending: list[str] = []
    start = 0
    for offset, raw in enumerate(lines):
        line = raw.strip()
        if not pending:
            if not line or line.startswith("#"):
                continue
            start = offset
            if line.startswith("$ "):
                line = line[2:]
        if line.endswith("\\"):
            pending.append(line[:-1].rstrip())
            continue
        pending.append(_strip_comment(line))
        text = " ".join(part for part in pending if part)
        pending = []
        if text:
            yield start, text
    if pending:
        yield start, " ".join(pending)


def commands(path: Path, root: Path = ROOT) -> list[Command]:
    """Every command in the document at ``path``, in order."""
    rel = path.relative_to(root).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Command] = []
    block = -1
    index = 0
    while index < len(lines):
        opened = _FENCE.match(lines[index])
        if opened is None:
            for match in _INLINE.finditer(lines[index]):
                text = match.group(1).strip()
                if _COMMAND_START.match(text):
                    found.append(Command(text, rel, index + 1, inline=True))
            index += 1
            continue
        fence, info = opened["fence"], opened["info"].lower()
        end = index + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        body = lines[index + 1 : end]
        block += 1
        if info in SHELL_LANGUAGES or (not info and body and _COMMAND_START.match(body[0].strip())):
            for position, (offset, text) in enumerate(_block_commands(body)):
                found.append(
                    Command(
                        text,
                        rel,
                        index + 2 + offset,
                        block=block,
                        first_in_block=position == 0,
                        unlabelled=not info,
                    )
                )
        index = end + 1
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """List the commands of the given documents (default: README.md and docs/*.md)."""
    names = list(sys.argv[1:] if argv is None else argv)
    paths = [ROOT / name for name in names] if names else doc_files()
    for path in paths:
        for command in commands(path.resolve()):
            kind = "inline" if command.inline else f"block {command.block}"
            print(f"{command.where}\t{kind}\t{command.text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
