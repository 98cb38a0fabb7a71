"""The docs name real tests, and no section is left as a placeholder.

docs/security.md's adversarial list tells the next engineer which test proves
each answer: a renamed test, or a "to be completed" note left from a merge,
would send them nowhere.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REFERENCE = re.compile(r"tests/(test_\w+\.py)((?:::\w+)*)")
PLACEHOLDER = re.compile(r"to be completed|\bTODO\b|\bTBD\b|\bFIXME\b", re.IGNORECASE)


def _resolves(file: str, parts: list[str]) -> bool:
    path = ROOT / "tests" / file
    if not path.exists():
        return False
    scope: list[ast.stmt] = ast.parse(path.read_text()).body
    for name in parts:
        found = [
            node
            for node in scope
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and node.name == name
        ]
        if not found:
            return False
        scope = found[0].body if isinstance(found[0], ast.ClassDef) else []
    return True


def test_every_test_the_docs_name_exists() -> None:
    """GIVEN the README and docs/*.md
    WHEN every ``tests/test_x.py::Class::test`` they name is looked up in the source
    THEN each file, class and test exists.
    """
    broken = [
        f"{doc.relative_to(ROOT)}: {m.group(0)}"
        for doc in DOCS
        for m in REFERENCE.finditer(doc.read_text())
        if not _resolves(m.group(1), m.group(2).strip(":").split("::") if m.group(2) else [])
    ]
    assert not broken, "the docs name tests that do not exist:\n" + "\n".join(broken)


def test_no_section_of_the_docs_is_a_placeholder() -> None:
    """GIVEN the README and docs/*.md
    WHEN they are searched for "to be completed", TODO, TBD or FIXME
    THEN none is found: every section says what holds and which test proves it.
    """
    left = [
        f"{doc.relative_to(ROOT)}:{n}: {line.strip()}"
        for doc in DOCS
        for n, line in enumerate(doc.read_text().splitlines(), 1)
        if PLACEHOLDER.search(line)
    ]
    assert not left, "placeholders left in the docs:\n" + "\n".join(left)


def test_the_adversarial_list_runs_every_file_it_names() -> None:
    """GIVEN docs/security.md's adversarial list and its "Run them all with" command
    WHEN the test files its tables name are compared with the files the command runs
    THEN the command runs every one of them: rerunning it reruns every attack listed.
    """
    section = (ROOT / "docs" / "security.md").read_text().partition("## Adversarial tests")[2]
    command = re.search(r"Run them all with\s+`([^`]+)`", section)
    assert command, "docs/security.md: the adversarial list says how to run it"
    run = set(re.findall(r"tests/test_\w+\.py", command.group(1)))
    named = {m.group(0).split("::")[0] for m in REFERENCE.finditer(section)}
    assert named <= run, f"the command leaves out {sorted(named - run)}"


def test_the_rate_limit_is_described_as_every_frame_everywhere() -> None:
    """GIVEN the rate limit that every frame costs (issue 9, item 3: resume, ping,
    leave and unknown actions too, per connection and per participant)
    WHEN the template's RateLimit parameter and its rows in docs/deploy.md and
    docs/security.md are read
    THEN none describes it as a limit on messages only.
    """
    template = (ROOT / "template.yaml").read_text()
    described = re.search(r"\n  RateLimit:\n(?:    .*\n)*?    Description: (.*)", template)
    assert described, "template.yaml: RateLimit has a description"
    rows = [
        line
        for doc in ("deploy.md", "security.md")
        for line in (ROOT / "docs" / doc).read_text().splitlines()
        if line.startswith("|") and "`RateLimit`" in line
    ]
    assert rows, "docs/deploy.md and docs/security.md describe RateLimit"
    for text in [described.group(1), *rows]:
        assert "frame" in text.lower() and "messages" not in text.lower(), text
