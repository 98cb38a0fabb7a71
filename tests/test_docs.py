"""The docs check: every command in README.md and docs/*.md runs as written, or says why not.

``scripts/doc_commands.py`` extracts the commands (shell code blocks, and inline
code in prose that starts like a command line). Each one must match a rule of
:data:`RULES`, first match wins:

- ``run``: run on this checkout as written, its output checked;
- ``serve``: a long-running command (``make dev``): started, checked (the page
  answers, the clients of the docs work against it), stopped;
- ``skip``: not run, with the reason (it needs AWS, Docker or the internet, or
  it is ``make test`` itself); each skip rule shows up as a skipped test with
  its reason (``make test`` prints them with ``-rs``);
- ``forbid``: never allowed in the docs (a bare ``pytest`` or ``sam``, ``npx``),
  with what to write instead.

A command no rule matches fails the check, and so does a rule that no longer
matches any command: the docs and this list cannot drift apart.

Adding a command to the docs: add a rule, e.g. ``skip(r"aws s3 .*", AWS)`` or
``run(r"make lint", expect="All checks passed")``, or a ``block`` rule whose
pattern matches the first command of a code block to classify the whole block
(for scripts such as the secrets recipe). ``.venv/bin/python
scripts/doc_commands.py`` lists every command with its place.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import threading
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from scripts.doc_commands import Command, commands, doc_files

ROOT = Path(__file__).resolve().parents[1]

# Reasons, shared by the rules below.
AWS = "needs an AWS account (and the AWS CLI with credentials)"
DOCKER = "needs Docker: sam local invoke runs each function in the Lambda container image"
SUITE = "runs inside `make test`, which runs this check: a second run would double CI time"
MENTION = "names a tool or a subcommand in prose; it is not a command line to type"
INTERNET = "downloads from PyPI (the pinned SAM CLI, the arm64 wheels): needs the internet"


@dataclass(frozen=True)
class Rule:
    """How the docs check treats the commands that match ``pattern`` (a full match).

    Attributes:
        pattern: a regular expression over the whole command text.
        kind: ``run``, ``serve``, ``skip`` or ``forbid``.
        reason: why it is skipped, or what to write instead of a forbidden command.
        where: ``any``, ``block`` (code blocks only) or ``inline`` (prose only).
        block: the pattern matches a code block's first command and classifies
            the whole block.
        check: for ``run`` and ``serve``: what is checked (see :class:`Runner`).
    """

    pattern: str
    kind: str
    reason: str = ""
    where: str = "any"
    block: bool = False
    check: Callable[[Runner, str], None] | None = None

    def matches(self, command: Command) -> bool:
        if (self.where == "block" and command.inline) or (
            self.where == "inline" and not command.inline
        ):
            return False
        return re.fullmatch(self.pattern, command.text) is not None


def skip(pattern: str, reason: str, **options: Any) -> Rule:
    return Rule(pattern, "skip", reason, **options)


def forbid(pattern: str, instead: str, **options: Any) -> Rule:
    return Rule(pattern, "forbid", instead, **options)


def run(pattern: str, check: Callable[[Runner, str], None], **options: Any) -> Rule:
    return Rule(pattern, "run", check=check, **options)


def serve(pattern: str, check: Callable[[Runner, str], None]) -> Rule:
    return Rule(pattern, "serve", check=check)


# ---------------------------------------------------------------------------
# Running commands
# ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    """A long-running command started by :meth:`Runner.start`."""

    process: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)
    port: int = 0
    command: str = ""

    def text(self) -> str:
        return "".join(self.output)


class Runner:
    """Runs doc commands in this checkout with a clean environment.

    The environment drops ``OPENAI_*`` and ``REJOIN_*`` (a developer's own
    settings must not change the outcome) and make's own variables (``make
    test`` runs this; a user's shell is not inside a make). Clients find the stack started by
    ``make dev`` through ``REJOIN_WS_URL``, as a user's would find it on 8080.
    """

    def __init__(self) -> None:
        # A user's shell: no settings of their own, and not inside `make test` (a sub-make
        # prints "Entering directory" on stdout).
        # `make test ARGS=...` also exports ARGS to its recipes' environment.
        skipped = ("OPENAI_", "REJOIN_", "MAKEFLAGS", "MAKELEVEL", "MFLAGS", "ARGS", "SAM_ENV")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(skipped)}
        self.stack: Served | None = None
        self.started: dict[str, Served] = {}
        self.to_serve: list[str] = []

    def served(self, command: str) -> Served:
        """The running ``command``; on first use every serve command is started, side by side."""
        if not self.started:
            from concurrent.futures import ThreadPoolExecutor

            commands = self.to_serve
            with ThreadPoolExecutor(max_workers=max(1, len(commands))) as pool:
                started = pool.map(self._start_documented, commands)
                self.started = dict(zip(commands, started, strict=True))
            self.stack = self.started.get("make dev")
        return self.started[command]

    def _start_documented(self, command: str) -> Served:
        # Example ports in the docs become free ones (others may run a stack here).
        actual = re.sub(r"--port \d+", f"--port {_free_port()}", command)
        actual = re.sub(r"--upstash-port \d+", f"--upstash-port {_free_port()}", actual)
        served = self.start(actual)
        served.command = actual
        port = re.search(r"--port (\d+)", actual)
        if port is not None:
            served.port = int(port.group(1))
        return served

    def stop_all(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, len(self.started))) as pool:
            list(pool.map(self.stop, self.started.values()))

    def shell(
        self, command: str, *, timeout: float = 180, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` with bash in the repository root, stdin closed."""
        extra = {}
        if "scripts/dev.sh client" in command:  # against the stack `make dev` started
            extra = {"REJOIN_WS_URL": f"ws://127.0.0.1:{self.served('make dev').port}/ws"}
        return subprocess.run(
            ["bash", "-c", command],
            cwd=ROOT,
            env=self.env | extra | (env or {}),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, command: str) -> Served:
        """Start a long-running command (its ports free ones) until it prints its banner."""
        port, upstash_port = _free_port(), _free_port()
        process = subprocess.Popen(
            ["bash", "-c", command],
            cwd=ROOT,
            env=self.env | {"REJOIN_PORT": str(port), "REJOIN_UPSTASH_PORT": str(upstash_port)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # one process group: make, bash and python stop together
        )
        served = Served(process, port=port)
        ready = threading.Event()

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                served.output.append(line)
                if line.startswith("Press Ctrl-C"):
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(180) or process.poll() is not None:
            self.stop(served)
            raise AssertionError(f"`{command}` did not start:\n{served.text()[-3000:]}")
        return served

    def start_plain(self, command: str, ready_line: str) -> Served:
        """Start a long-running command that prints ``ready_line`` when it is up."""
        process = subprocess.Popen(
            ["bash", "-c", command],
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        served = Served(process)
        ready = threading.Event()

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                served.output.append(line)
                if line.startswith(ready_line):
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(60) or process.poll() is not None:
            self.stop(served)
            raise AssertionError(f"`{command}` did not start:\n{served.text()[-3000:]}")
        return served

    @staticmethod
    def stop(served: Served) -> None:
        """Ctrl-C, as a user stops it; then make sure it is gone."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(served.process.pid, signal.SIGINT)
        try:
            served.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(served.process.pid, signal.SIGKILL)
            served.process.wait(10)


def _ok(result: subprocess.CompletedProcess[str], command: str) -> str:
    assert result.returncode == 0, (
        f"`{command}` exited {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    )
    return result.stdout


def expect(*needles: str) -> Callable[[Runner, str], None]:
    """Run the command; it exits 0 and its output contains every needle."""

    def check(runner: Runner, command: str) -> None:
        out = _ok(runner.shell(command), command)
        for needle in needles:
            assert needle in out, f"`{command}` printed no {needle!r}:\n{out[-2000:]}"

    return check


def check_fernet_key(runner: Runner, command: str) -> None:
    """It prints one key that rejoin's encryption at rest accepts."""
    from rejoin.encryption import parse_keys

    out = _ok(runner.shell(command), command).strip()
    assert parse_keys(out) == (out,), out


def check_token(runner: Runner, command: str) -> None:
    """``TOKEN=$(make token ...)`` captures one line: a token that verifies."""
    from rejoin.tokens import TokenVerifier
    from rejoin_local.stack import DEFAULT_SIGNING_KEY

    out = _ok(runner.shell(command + '; printf %s "$TOKEN"'), command)
    assert out and "\n" not in out, f"TOKEN holds {out!r}"
    session = re.search(r"--session (\S+)", command)
    assert session is not None
    TokenVerifier(secret=DEFAULT_SIGNING_KEY).verify(out, session_id=session.group(1))


def check_bootstrap(runner: Runner, command: str) -> None:
    """It sets up .venv and writes nothing to stdout (so commands that capture stay clean)."""
    assert _ok(runner.shell(command), command) == ""


def check_events(runner: Runner, command: str) -> None:
    """``events/generate.py`` rewrites the sample events; the committed ones are current."""
    before = {p.name: p.read_bytes() for p in (ROOT / "events").glob("*.json")}
    _ok(runner.shell(command), command)
    after = {p.name: p.read_bytes() for p in (ROOT / "events").glob("*.json")}
    assert after == before, "events/ changed: the committed events are stale"


def check_interactive_client(runner: Runner, command: str) -> None:
    """The interactive client joins; at the end of input it quits cleanly."""
    out = _ok(runner.shell(command, timeout=60), command)
    name = re.search(r"--name (\S+)", command)
    assert name is not None and f"as {name.group(1)}:" in out, out


def check_client_say(runner: Runner, command: str) -> None:
    """The scripted client's message is acknowledged and answered, and the reply printed once."""
    out = _ok(runner.shell(command, timeout=90), command)
    text = shlex.split(command)[shlex.split(command).index("--say") + 1]
    assert re.search(rf"#\d+ \S+: {re.escape(text)}$", out, re.M), out
    assert out.count(f'you said: "{text}"') == 1, out


def check_model_server(runner: Runner, command: str) -> None:
    """The README's OpenAI-compatible server block: the stub, then the stack pointed at it;
    a message sent by the terminal client is answered by the stub, through the real client."""
    stub_port = _free_port()
    stub = runner.start_plain(
        f"bash scripts/dev.sh openai-stub --port {stub_port}", "OpenAI stub at"
    )
    try:
        url = f"http://127.0.0.1:{stub_port}/v1"
        stack = runner.start(f"OPENAI_API_KEY=x OPENAI_BASE_URL={url} make dev")
        try:
            assert f"at {url}" in stack.text(), stack.text()[-2000:]
            client = runner.shell(
                'bash scripts/dev.sh client --session model-demo --name Ada --say "hello" '
                "--wait-agent",
                timeout=90,
                env={"REJOIN_WS_URL": f"ws://127.0.0.1:{stack.port}/ws"},
            )
            out = _ok(client, "the terminal client")
            assert "offline" not in out and "Ada" in out, out  # the stub echoes the speaker
        finally:
            runner.stop(stack)
    finally:
        runner.stop(stub)


def check_page(served: Served) -> None:
    """The page link of the banner answers with the chat page, and its script loads."""
    link = re.search(r"chat page\s+(http://\S+)", served.text())
    assert link is not None, served.text()
    page = httpx.get(link.group(1).split("#")[0], timeout=10)
    assert page.status_code == 200 and "<title>rejoin" in page.text
    assert httpx.get(link.group(1).split("#")[0] + "static/app.js", timeout=10).status_code == 200


def check_make_dev(runner: Runner, command: str) -> None:
    served = runner.served(command)
    check_page(served)
    assert f"http://127.0.0.1:{served.port}/#key=" in served.text()


def check_make_dev_options(runner: Runner, command: str) -> None:
    """Options as documented (on free ports instead of the example's): the banner shows them."""
    served = runner.served(command)
    check_page(served)
    text = served.text()
    for option, shown in (
        (r"--port (\d+)", "http://127.0.0.1:{}/"),
        (r"--upstash-port (\d+)", "Upstash REST    http://127.0.0.1:{}"),
        (r"--grace (\d+)", "grace {} s"),
    ):
        value = re.search(option, served.command)
        assert value is not None and shown.format(value.group(1)) in text, (option, text)


# ---------------------------------------------------------------------------
# The rules (first match wins). Other docs add theirs here.
# ---------------------------------------------------------------------------

RULES: list[Rule] = [
    # Never in the docs.
    forbid(r"pytest(\s.*)?", "a bare pytest lacks the venv's plugins: use `make test ARGS=...` "
           "or `.venv/bin/python -m pytest ...`", where="block"),
    forbid(r"pytest\s.+", "a bare pytest lacks the venv's plugins: use `make test ARGS=...` "
           "or `.venv/bin/python -m pytest ...`", where="inline"),
    forbid(r"(?:[A-Z_]+=\S+\s+)*sam\s.*", "`sam` is not installed by anything the docs name: "
           "use `make build`, `make deploy` or `bash scripts/sam.sh ...`", where="block"),
    forbid(r"npx .*", "needs Node.js: use the terminal client, `bash scripts/dev.sh client`"),
    # The local stack: started, checked, stopped; its clients run against it.
    serve(r"make dev", check_make_dev),
    serve(r'make dev ARGS="--port \d+ --upstash-port \d+ --grace \d+"', check_make_dev_options),
    run(r'make dev ARGS="--help"', expect("--upstash-port", "--host", "REJOIN_HOST")),
    run(r"bash scripts/dev\.sh client --session demo --name \w+", check_interactive_client),
    run(r'bash scripts/dev\.sh client --session demo --name \w+ --say "[^"]+" --wait-agent',
        check_client_say),
    run(r'TOKEN=\$\(make token ARGS="--session \S+ --user \S+ --name \S+"\)', check_token),
    run(r"make help", expect("dev", "test", "build", "deploy", "token")),
    run(r"bash scripts/bootstrap\.sh", check_bootstrap),
    run(r"\.venv/bin/python events/generate\.py", check_events),
    run(r"bash scripts/dev\.sh openai-stub --port \d+ &", check_model_server, block=True),
    run(r'\.venv/bin/python -c "from cryptography\.fernet import Fernet; '
        r'print\(Fernet\.generate_key\(\)\.decode\(\)\)"', check_fernet_key),
    # make test and what it runs.
    skip(r'make test(?: ARGS="[^"]*")?', SUITE),
    skip(r"bash scripts/check-template\.sh", "`make test` runs it before pytest (scripts/test.sh)"),
    skip(r"\.venv/bin/python -m pytest .*", SUITE),
    run(r"\.venv/bin/python -m bench\.scale", expect("| sessions", "first limit reached")),
    skip(r"\.venv/bin/python -m bench\.scale --write docs/scale\.md", "rewrites docs/scale.md; "
         "tests/test_scale.py checks the page equals what it would write"),
    skip(r"\.venv/bin/python -m bench --only rooms", "measures for minutes on every core; "
         "tests/test_bench_smoke.py runs it small inside `make test`"),
    skip(r"make bench", "the benchmarks take minutes of every core; tests/test_bench_smoke.py "
         "runs them small inside `make test`"),
    skip(r"make load(?: ARGS=\"[^\"]*\")?", "puts 1,000 WebSocket clients on a stack for about "
         "25 s of every core; tests/test_load.py runs it small inside `make test`"),
    skip(r"make build", INTERNET + "; `make test` builds the same artefacts"),
    # AWS.
    skip(r"make deploy(?: SAM_ENV=\w+)?(?: ARGS=.*)?", AWS),
    skip(r"bash scripts/sam\.sh (?:list stack-outputs|delete) .*", AWS),
    skip(r"aws .*", AWS),
    skip(r'bash scripts/dev\.sh client --url "\$WS_URL" .*', AWS + ": the deployed stack's URL"),
    skip(r"export AWS_REGION=us-east-1 STAGE=dev", AWS + ": creates the secrets", block=True),
    skip(r"STACK=rejoin-\w+", AWS + ": reads the stack's outputs and secrets", block=True),
    skip(r"ADMIN_KEY=\$\(aws .*", AWS, block=True),
    skip(r"auth=\$\(printf .*", AWS + ": creates the OTLP headers secret", block=True),
    # Docker.
    skip(r"bash scripts/sam\.sh local invoke .*", DOCKER),
    skip(r"export AWS_ACCESS_KEY_ID=local .*", DOCKER + " (this block prepares for it)",
         block=True),
    # Mentions in prose.
    skip(r"sam(?: <arguments>| build| deploy| local invoke| validate --lint)?", MENTION,
         where="inline"),
    skip(r"(?:bash )?scripts/sam\.sh(?: \.\.\.| <arguments>)?", MENTION, where="inline"),
    skip(r"python -m rejoin\.tokens", MENTION + " (README's `make token` runs it)",
         where="inline"),
    skip(r"pytest", MENTION + " (the README warns against a bare pytest)", where="inline"),
    skip(r"make token", MENTION + " (the README's `TOKEN=$(make token ...)` runs it)",
         where="inline"),
    skip(r"python -m rejoin\.tokens --ttl \d+", MENTION + " (a case in the adversarial "
         "list; tests/test_tokens.py runs it)", where="inline"),
    skip(r"bash scripts/ensure-chromium\.sh", "installs Debian's Chromium (needs root and "
         "the package mirror); `make test` runs it", where="inline"),
]  # fmt: skip


# ---------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------


def classify(found: list[Command]) -> list[tuple[Command, Rule | None]]:
    """Each command with the rule that applies to it (None: no rule)."""
    out: list[tuple[Command, Rule | None]] = []
    block_rule: dict[tuple[str, int], Rule] = {}
    for command in found:
        rule: Rule | None = None
        if not command.inline and (command.path, command.block) in block_rule:
            rule = block_rule[(command.path, command.block)]
        else:
            rule = next((r for r in RULES if r.matches(command)), None)
            if rule is not None and rule.block:
                if not command.first_in_block:
                    rule = next((r for r in RULES if not r.block and r.matches(command)), None)
                else:
                    block_rule[(command.path, command.block)] = rule
        out.append((command, rule))
    return out


def all_commands() -> list[Command]:
    return [c for path in doc_files() for c in commands(path)]


CLASSIFIED = classify(all_commands())


def test_every_command_in_the_docs_is_classified() -> None:
    unclassified = [c for c, rule in CLASSIFIED if rule is None]
    assert not unclassified, (
        "commands in the docs that the docs check does not know; add a rule to RULES in "
        "tests/test_docs.py (run it, or skip it with a reason):\n"
        + "\n".join(f"  {c.where}: {c.text}" for c in unclassified)
    )


def test_no_forbidden_command_in_the_docs() -> None:
    forbidden = [(c, rule) for c, rule in CLASSIFIED if rule is not None and rule.kind == "forbid"]
    assert not forbidden, "\n".join(f"  {c.where}: {c.text}\n    {r.reason}" for c, r in forbidden)


def test_no_shell_block_is_unlabelled() -> None:
    unlabelled = [c for c, _ in CLASSIFIED if c.unlabelled and c.first_in_block]
    assert not unlabelled, "label these code blocks ```sh so they are checked:\n" + "\n".join(
        f"  {c.where}: {c.text}" for c in unlabelled
    )


def test_every_rule_still_matches_a_command() -> None:
    used = {id(rule) for _, rule in CLASSIFIED if rule is not None}
    # Forbid rules guard against commands that must never come back: exempt.
    stale = [r.pattern for r in RULES if id(r) not in used and r.kind != "forbid"]
    assert not stale, "rules that match no command in the docs any more (remove them):\n" + (
        "\n".join(f"  {p}" for p in stale)
    )


def _by_rule(kind: str) -> list[tuple[Rule, list[Command]]]:
    grouped: dict[int, tuple[Rule, list[Command]]] = {}
    for command, rule in CLASSIFIED:
        if rule is not None and rule.kind == kind:
            grouped.setdefault(id(rule), (rule, []))[1].append(command)
    return list(grouped.values())


@pytest.mark.parametrize(
    ("rule", "found"), _by_rule("skip"), ids=[r.pattern[:60] for r, _ in _by_rule("skip")]
)
def test_skipped_command(rule: Rule, found: list[Command]) -> None:
    """Listed, not run: the reason and where (``-rs`` shows it)."""
    places = ", ".join(sorted({c.where for c in found})[:4])
    more = f" (+{len(found) - 4} more)" if len(found) > 4 else ""
    pytest.skip(f"{rule.reason}: `{found[0].text[:70]}` at {places}{more}")


# ---------------------------------------------------------------------------
# Running: `make dev` once (its clients run against it), then the rest
# ---------------------------------------------------------------------------


def _runnable(kind: str) -> list[tuple[Rule, str]]:
    seen: dict[str, Rule] = {}
    for command, rule in CLASSIFIED:
        if rule is not None and rule.kind == kind:
            seen.setdefault(command.text, rule)
    return [(rule, text) for text, rule in seen.items()]


@pytest.fixture(scope="module")
def runner() -> Iterator[Runner]:
    """Every ``serve`` command started (side by side) for the module; stopped at its end."""
    runner = Runner()
    runner.to_serve = [text for _, text in _runnable("serve")]
    assert "make dev" in runner.to_serve, "the README's `make dev` is gone: clients need a stack"
    try:
        yield runner
    finally:
        runner.stop_all()


@pytest.mark.parametrize(
    ("rule", "command"),
    _runnable("serve") + _runnable("run"),
    ids=[t for _, t in _runnable("serve") + _runnable("run")],
)
def test_command_works_as_written(runner: Runner, rule: Rule, command: str) -> None:
    assert rule.check is not None
    rule.check(runner, command)


def test_served_commands_stop_cleanly(runner: Runner) -> None:
    """Ctrl-C stops every part and frees the port (checked after the clients ran)."""
    runner.served("make dev")
    runner.stop_all()
    for served in runner.started.values():
        assert "stopped" in served.text(), served.text()[-2000:]
        with socket.socket() as probe:
            # Free again: nothing listens (connections in TIME_WAIT may remain).
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", served.port))


# ---------------------------------------------------------------------------
# One stack name per environment, everywhere
# ---------------------------------------------------------------------------


def test_stack_names_and_environments_agree() -> None:
    cfg = tomllib.loads((ROOT / "samconfig.toml").read_text())
    names = {env: cfg[env]["deploy"]["parameters"]["stack_name"] for env in ("dev", "prod")}
    assert names == {"dev": "rejoin-dev", "prod": "rejoin-prod"}
    # A plain `sam deploy` (the default environment) deploys the dev stack, the same way.
    assert cfg["default"]["deploy"]["parameters"] == cfg["dev"]["deploy"]["parameters"]
    assert cfg["default"]["global"]["parameters"] == cfg["dev"]["global"]["parameters"]
    for env in ("dev", "prod"):
        assert cfg[env]["global"]["parameters"]["stack_name"] == names[env]
    # `make deploy` deploys dev unless ENV says otherwise.
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^SAM_ENV \?= dev$", makefile, re.M)
    assert "--config-env $(SAM_ENV)" in makefile
    # Every stack name a doc uses is one of those.
    text = "\n".join(p.read_text() for p in doc_files())
    used = set(re.findall(r"(?:--stack-name|STACK=)\s*\"?([\w-]+)", text))
    used |= set(re.findall(r"\bstack `([\w-]+)`", text))
    assert used and used <= set(names.values()), used


# ---------------------------------------------------------------------------
# The extractor and the classification themselves
# ---------------------------------------------------------------------------


def test_a_new_command_in_a_doc_fails_until_it_is_classified(tmp_path: Path) -> None:
    # GIVEN a document with a shell block (prompt, comment, continuation), an
    # inline command, a JSON block, and an unlabelled block that is a command
    doc = tmp_path / "NEW.md"
    doc.write_text(
        "Run `make help` first, then:\n\n"
        "```sh\n"
        "# set up\n"
        "$ make dev   # the stack\n"
        "bash scripts/frobnicate.sh --all \\\n"
        "  --twice\n"
        "```\n\n"
        '```json\n{"action": "resume"}\n```\n\n'
        "```\nmake frobnicate\n```\n",
        encoding="utf-8",
    )
    # WHEN its commands are extracted and classified
    found = commands(doc, root=tmp_path)
    assert [(c.text, c.line, c.inline) for c in found] == [
        ("make help", 1, True),
        ("make dev", 5, False),
        ("bash scripts/frobnicate.sh --all --twice", 6, False),
        ("make frobnicate", 15, False),
    ]
    rules = dict(classify(found))
    # THEN known ones get their rule, and the new ones none: the check fails on them
    assert rules[found[0]] is not None and rules[found[0]].kind == "run"
    assert rules[found[1]] is not None and rules[found[1]].kind == "serve"
    assert rules[found[2]] is None and rules[found[3]] is None
    assert found[3].unlabelled and found[3].first_in_block


def test_forbidden_commands_are_caught() -> None:
    def rule_for(text: str, inline: bool = False) -> str | None:
        command = Command(text, "X.md", 1, inline=inline, block=-1 if inline else 0)
        rule = dict(classify([command]))[command]
        return None if rule is None else rule.kind

    assert rule_for("pytest -m slow tests/test_built_artifacts.py") == "forbid"
    assert rule_for("pytest tests/", inline=True) == "forbid"
    assert rule_for("sam deploy --guided") == "forbid"
    assert rule_for("npx wscat -c ws://127.0.0.1:8080/ws") == "forbid"
    assert rule_for("sam deploy", inline=True) == "skip"  # naming it in prose is fine
