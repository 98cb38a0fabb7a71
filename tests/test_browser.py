"""The chat page in headless Chromium against the real stack, in-process.

Real handlers (``functions/``), the Upstash-compatible endpoint in front of the
test session's Redis, the local gateway, the turn worker with the offline
model, and the cleanup on a short timer; the grace period is shortened to
2 s. Debian's ``chromium`` (``scripts/ensure-chromium.sh`` installs it when
missing) is driven by Playwright's Python package through
``executable_path``; no browser is downloaded.

On failure, screenshots of every open page are saved under
``test-artifacts/``; the phone-sized screenshot is saved on every run.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
GRACE_SECONDS = 2
TIMEOUT_MS = 10_000


# ---------------------------------------------------------------------------
# Screenshots on failure: a small plugin, registered once, that records each
# phase's report on the test item so fixtures can see how the test went.
# ---------------------------------------------------------------------------


class _ReportPlugin:
    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: Any) -> Any:
        report = yield
        setattr(item, f"rep_{report.when}", report)
        return report


@pytest.fixture(autouse=True)
def _record_reports(request: pytest.FixtureRequest) -> None:
    manager = request.config.pluginmanager
    if not manager.has_plugin("rejoin-browser-reports"):
        manager.register(_ReportPlugin(), "rejoin-browser-reports")


def _failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "rep_call", None)
    return report is None or report.failed


# ---------------------------------------------------------------------------
# Fixtures: Chromium and the stack
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium_path() -> str:
    """Debian's Chromium, installed with apt-get by scripts/ensure-chromium.sh if missing."""
    if not os.access(CHROMIUM, os.X_OK):
        result = subprocess.run(
            ["bash", str(ROOT / "scripts" / "ensure-chromium.sh")],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if result.returncode != 0 or not os.access(CHROMIUM, os.X_OK):
            pytest.skip(
                "Chromium is not installed and scripts/ensure-chromium.sh could not install it: "
                + (result.stderr.strip().splitlines() or ["no output"])[-1]
            )
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium_path: str) -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -r requirements-dev.txt)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def running_stack(upstash: Any, **env: str) -> Iterator[Any]:
    """The real stack on free ports, over the test session's Upstash endpoint."""
    from rejoin_local.stack import Stack, StackConfig

    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "REJOIN_"))}
    config = StackConfig(
        port=0,
        upstash_url=upstash.url,
        upstash_token=upstash.token,
        grace_seconds=GRACE_SECONDS,
        cleanup_interval=1.0,
        turn_backoff=0.1,
        env=base | env,
    )
    stack = Stack(config)
    with stack.serve_in_thread() as urls:
        stack.urls = urls
        yield stack


@pytest.fixture
def stack(upstash: Any) -> Iterator[Any]:
    with running_stack(upstash) as started:
        yield started


@dataclass
class Pages:
    """Every page the test opened, their console errors, and the contexts to close."""

    browser: Any
    request: pytest.FixtureRequest
    contexts: list[Any] = field(default_factory=list)
    pages: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def open(self, label: str, url: str, **context_options: Any) -> Any:
        context = self.browser.new_context(**context_options)
        context.set_default_timeout(TIMEOUT_MS)
        self.contexts.append(context)
        page = context.new_page()
        page.on(
            "console",
            lambda msg: (
                msg.type == "error" and self.errors.append(f"{label}: console error: {msg.text}")
            ),
        )
        page.on("pageerror", lambda exc: self.errors.append(f"{label}: page error: {exc}"))
        page.add_init_script(_STREAM_WATCHER)
        self.pages[label] = page
        page.goto(url)
        return page

    def save_artifacts(self, prefix: str) -> None:
        """Screenshots, page state and the frames each page saw, under test-artifacts/."""
        ARTIFACTS.mkdir(exist_ok=True)
        for label, page in self.pages.items():
            # A page that crashed cannot be captured: keep the others.
            with contextlib.suppress(Exception):
                page.screenshot(path=str(ARTIFACTS / f"{prefix}-{label}.png"), full_page=True)
            with contextlib.suppress(Exception):
                debug = page.evaluate(
                    "() => ({state: window.rejoinDebug.state, frames: window.rejoinDebug.frames})"
                )
                (ARTIFACTS / f"{prefix}-{label}.json").write_text(json.dumps(debug, indent=1))
        if self.errors:
            (ARTIFACTS / f"{prefix}-console-errors.txt").write_text("\n".join(self.errors))


@pytest.fixture
def pages(browser: Any, request: pytest.FixtureRequest) -> Iterator[Pages]:
    opened = Pages(browser=browser, request=request)
    try:
        yield opened
    finally:
        if _failed(request):
            opened.save_artifacts(request.node.name)
        for context in opened.contexts:
            context.close()


# Records, in the page, every streamed bubble the page showed and its longest text.
_STREAM_WATCHER = """
window.__streamed = {};
new MutationObserver(() => {
  for (const el of document.querySelectorAll('#live .streaming')) {
    const turn = el.dataset.turn, text = el.querySelector('.bubble').textContent;
    const seen = window.__streamed[turn] || {updates: 0, longest: 0};
    seen.updates += 1;
    seen.longest = Math.max(seen.longest, text.length);
    window.__streamed[turn] = seen;
  }
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def state(page: Any) -> dict[str, Any]:
    return page.evaluate("() => window.rejoinDebug.state")  # type: ignore[no-any-return]


def wait_until(check: Callable[[], Any], what: str, timeout: float = TIMEOUT_MS / 1000) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def wait_status(page: Any, text: str) -> None:
    page.wait_for_function("t => document.getElementById('status').textContent === t", arg=text)


def send(page: Any, text: str) -> None:
    box = page.locator("#text")
    box.fill(text)
    box.press("Enter")


def message_events(s: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in s["events"] if e["type"] in ("message", "agent_message")]


def agent_reply_to(page: Any, text: str) -> dict[str, Any]:
    """Wait until the page shows the agent's final reply to the message ``text``."""

    def find() -> dict[str, Any] | None:
        s = state(page)
        seqs = [e["seq"] for e in s["events"] if e["type"] == "message" and e["text"] == text]
        for e in s["events"]:
            if e["type"] == "agent_message" and seqs and e["reply_to"] == seqs[0]:
                return e
        return None

    found: dict[str, Any] = wait_until(find, f"the agent's reply to {text!r}")
    return found


def presence_of(page: Any, name: str) -> str | None:
    for p in state(page)["participants"]:
        if p["name"] == name:
            return str(p["status"])
    return None


def dom_texts(page: Any) -> list[str]:
    return page.eval_on_selector_all(  # type: ignore[no-any-return]
        "#events li.message .bubble, #events li.agent .bubble", "els => els.map(e => e.textContent)"
    )


def people(page: Any) -> list[dict[str, Any]]:
    """The People list as shown: each entry's text, status and whether it is the agent."""
    return state(page)["people"]  # type: ignore[no-any-return]


def person(page: Any, user: str) -> dict[str, Any] | None:
    return next((p for p in people(page) if p["user"] == user), None)


def errors_shown(page: Any, code: str) -> list[str]:
    return page.eval_on_selector_all(  # type: ignore[no-any-return]
        f'#errors .error[data-code="{code}"]', "els => els.map(e => e.textContent)"
    )


def dom_seqs(page: Any) -> list[int]:
    return page.eval_on_selector_all(  # type: ignore[no-any-return]
        "#events li[data-seq]", "els => els.map(e => Number(e.dataset.seq))"
    )


# ---------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------


def test_two_people_chat_drop_resume_and_session_end(stack: Any, pages: Pages) -> None:
    started = time.monotonic()
    urls = stack.urls
    session = "browser-" + secrets.token_hex(4)

    # --- two participants join from links and chat ---------------------------------
    # Ada runs the stack (her link carries the admin key); Bob got an invite link.
    ada = pages.open("ada", urls.join(session, "Ada", key=stack.config.admin_key))
    wait_status(ada, "connected")
    bob = pages.open("bob", urls.join(session, "Bob", invite=stack.invite(session)))
    wait_status(bob, "connected")

    badge = ada.locator("#agent-badge")
    assert badge.is_visible() and badge.inner_text() == "offline stand-in model"
    assert state(ada)["agent"]["offline"] is True
    wait_until(lambda: presence_of(ada, "Bob") == "active", "Ada to see Bob active")
    assert presence_of(bob, "Ada") == "active"

    send(ada, "Hello from Ada")
    for page in (ada, bob):
        reply = agent_reply_to(page, "Hello from Ada")
        assert "Ada" in reply["text"]
        # Both saw the reply stream in (several deltas, shown growing) before the final one.
        assert state(page)["deltaCounts"].get(reply["turn"], 0) >= 2
        streamed = page.evaluate("() => window.__streamed")[reply["turn"]]
        assert streamed["updates"] >= 2 and streamed["longest"] > 0
        # The streaming bubble is replaced by the final message.
        page.wait_for_selector(f'#live .streaming[data-turn="{reply["turn"]}"]', state="detached")
    send(bob, "Hi Ada, Bob here")
    agent_reply_to(ada, "Hi Ada, Bob here")
    agent_reply_to(bob, "Hi Ada, Bob here")

    # --- Bob's network drops; Ada goes on; Bob comes back within the grace ---------
    bob.evaluate("() => window.rejoinDebug.dropConnection({hold: true})")
    wait_status(bob, "reconnecting...")
    wait_until(lambda: presence_of(ada, "Bob") == "away", "Ada to see Bob away")
    bob_before = state(bob)
    missed_texts = ["While you were away 1", "While you were away 2"]
    for text in missed_texts:
        send(ada, text)
        agent_reply_to(ada, text)
    assert not state(bob)["connected"]
    ARTIFACTS.mkdir(exist_ok=True)
    bob.screenshot(path=str(ARTIFACTS / "chat-reconnecting.png"))
    ada.screenshot(path=str(ARTIFACTS / "chat-peer-away.png"))

    bob.evaluate("() => window.rejoinDebug.release()")
    wait_status(bob, "connected")
    wait_until(lambda: presence_of(ada, "Bob") == "active", "Ada to see Bob active again")
    # Once both views settle, Bob's log is exactly Ada's: same seqs, same events.
    wait_until(
        lambda: (
            [e["seq"] for e in state(bob)["events"]] == [e["seq"] for e in state(ada)["events"]]
        ),
        "Bob's log to match Ada's",
    )
    after = state(bob)
    welcome = after["welcomes"][-1]
    assert welcome["resumed"] is True and welcome["recovered"] is True
    assert welcome["epoch"] == bob_before["epoch"]
    ada_seqs = [e["seq"] for e in state(ada)["events"]]
    # The welcome replayed exactly what Bob missed: every seq after his position, in order.
    assert welcome["events"] == [s for s in ada_seqs if bob_before["lastSeq"] < s <= welcome["seq"]]
    missed = [e for e in message_events(after) if e["seq"] > bob_before["lastSeq"]]
    assert [e["text"] for e in missed if e["type"] == "message"] == missed_texts
    assert len([e for e in missed if e["type"] == "agent_message"]) == len(missed_texts)
    # And the page shows each of them once, in seq order.
    seqs = dom_seqs(bob)
    assert seqs == sorted(set(seqs))
    texts = dom_texts(bob)
    for text in missed_texts:
        assert texts.count(text) == 1
    assert texts == [e["text"] for e in message_events(state(ada))]

    # --- everyone leaves; after the grace a rejoin starts a fresh session ------------
    for page in (ada, bob):
        page.locator("#leave").click()
        wait_status(page, "left")
    old_epoch = after["epoch"]
    time.sleep(GRACE_SECONDS + 1.5)
    bob.locator("#rejoin").click()
    wait_status(bob, "connected")
    fresh = state(bob)
    last = fresh["welcomes"][-1]
    assert last["resumed"] is False
    assert fresh["epoch"] != old_epoch
    assert message_events(fresh) == []  # empty history
    assert fresh["sessionsEnded"] == 1
    notice = bob.locator("#notice")
    assert notice.is_visible()
    assert "Session ended" in notice.inner_text()
    assert dom_texts(bob) == []
    # Only the fresh session's events are on the page (seqs restart with the epoch).
    shown = bob.eval_on_selector_all("#events li", "els => els.map(e => e.textContent)")
    assert shown == ["Bob is here"], shown
    bob.screenshot(path=str(ARTIFACTS / "chat-session-ended.png"))
    # The fresh session works.
    send(bob, "Anyone here?")
    reply = agent_reply_to(bob, "Anyone here?")
    assert "1 message" in reply["text"]  # the offline model counts a fresh history

    # --- a phone-sized screen ---------------------------------------------------------
    phone = pages.open(
        "phone",
        urls.join("phone-standup-" + secrets.token_hex(6), "Cy", key=stack.config.admin_key),
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )
    wait_status(phone, "connected")
    send(phone, "Typing on a phone")
    agent_reply_to(phone, "Typing on a phone")
    ARTIFACTS.mkdir(exist_ok=True)
    phone.screenshot(path=str(ARTIFACTS / "chat-phone.png"))
    layout = phone.evaluate(
        """() => {
          const box = (id) => document.getElementById(id).getBoundingClientRect();
          const name = document.getElementById('session-name');
          return {scrollWidth: document.documentElement.scrollWidth, width: window.innerWidth,
                  height: window.innerHeight, text: box('text'), send: box('send'),
                  people: box('participants'), log: box('scroller'),
                  invite: box('invite-link'), copy: box('invite-copy'),
                  session: box('session-name'),
                  sessionCut: name.scrollWidth > name.clientWidth,
                  sessionText: name.textContent};
        }"""
    )
    assert layout["scrollWidth"] <= layout["width"], "the page scrolls sideways on a phone"
    # The whole session name is shown (it wraps, it is not cut to a few letters).
    assert layout["sessionText"].startswith("phone-standup-") and not layout["sessionCut"]
    for name in ("text", "send", "people", "log", "invite", "copy", "session"):
        rect = layout[name]
        assert rect["width"] > 0 and rect["height"] > 0, f"{name} is not shown"
        assert rect["left"] >= 0 and rect["right"] <= layout["width"] + 1, f"{name} overflows"
        assert rect["bottom"] <= layout["height"] + 1, f"{name} is below the screen"
    assert layout["send"]["height"] >= 36  # a comfortable tap target

    # --- no console errors anywhere ---------------------------------------------------
    assert pages.errors == []
    assert time.monotonic() - started < 60


# ---------------------------------------------------------------------------
# One person, one participant; order after a rate limit; the text limit; the
# page's own state; unreachable vs refused.
# ---------------------------------------------------------------------------


def test_one_person_is_one_participant_across_tabs_and_reloads(upstash: Any, pages: Pages) -> None:
    # GIVEN a stack whose agent has a name, and an invite link for a session
    with running_stack(upstash, REJOIN_AGENT_NAME="Juniper") as stack:
        session = "ids-" + secrets.token_hex(4)
        invite = stack.urls.join(session, invite=stack.invite(session))
        # WHEN Ada joins from the invite, then opens it again in a second tab
        # of the same browser, and reloads the first tab
        ada = pages.open("ada", stack.urls.join(session, "Ada", invite=stack.invite(session)))
        wait_status(ada, "connected")
        ada_user = state(ada)["user"]
        # The invite never leaves the address bar with the admin key, nor stays there.
        assert "#" not in ada.url
        tab = ada.context.new_page()
        pages.pages["ada-tab"] = tab
        tab.goto(invite)
        tab.wait_for_selector("#join-form")
        assert tab.locator("#join-name").input_value() == "Ada"  # remembered in this browser
        assert "as Ada" in tab.locator("#join-again").inner_text()
        tab.locator("#join-form button[type=submit]").click()
        wait_status(tab, "connected")
        ada.reload()
        wait_status(ada, "connected")

        # THEN both tabs, before and after the reload, are the same participant
        assert state(tab)["user"] == ada_user == state(ada)["user"]
        bob = pages.open("bob", stack.urls.join(session, "Bob", invite=stack.invite(session)))
        wait_status(bob, "connected")
        wait_until(lambda: person(bob, ada_user), "Bob to see Ada")
        shown = [p["text"] for p in people(bob) if not p["agent"]]
        assert sorted(shown) == ["Ada", "Bob"], shown
        # AND the agent is in the People list, by its name
        agents = [p for p in people(bob) if p["agent"]]
        assert [p["text"] for p in agents] == ["Juniper"]

        # WHEN somebody else (another browser) also calls themselves Ada
        other = pages.open("ada2", stack.urls.join(session, "Ada", invite=stack.invite(session)))
        wait_status(other, "connected")
        other_user = state(other)["user"]

        # THEN that is a second participant, and the list tells the two apart
        assert other_user != ada_user
        wait_until(lambda: person(bob, other_user), "Bob to see the second Ada")
        texts = sorted(p["text"] for p in people(bob) if p["text"].startswith("Ada"))
        assert texts == sorted([f"Ada \u00b7 {ada_user[-4:]}", f"Ada \u00b7 {other_user[-4:]}"])
        # An invite cannot be used to pick somebody else's user id.
        refused = httpx.post(
            f"{stack.urls.http}/local/token",
            headers={"Authorization": f"Invite {stack.invite(session)}"},
            json={"session": session, "name": "Ada", "user": ada_user},
        ).status_code
        assert refused == 403
        assert pages.errors == []


def test_messages_after_a_rate_limit_go_out_in_typed_order(upstash: Any, pages: Pages) -> None:
    # GIVEN a stack that allows 3 messages a second per participant
    with running_stack(
        upstash,
        REJOIN_RATE_LIMIT="3",
        REJOIN_RATE_WINDOW_SECONDS="1",
        REJOIN_REPLY_MODE="addressed",
    ) as stack:
        session = "order-" + secrets.token_hex(4)
        ada = pages.open("ada", stack.urls.join(session, "Ada", key=stack.config.admin_key))
        wait_status(ada, "connected")
        typed = [f"message {i:02d}" for i in range(1, 13)]

        # WHEN Ada types 12 messages as fast as she can
        for text in typed:
            send(ada, text)

        # THEN the server stored all 12, once each, in the order typed
        def stored() -> list[str]:
            return [e["text"] for e in state(ada)["events"] if e["type"] == "message"]

        wait_until(lambda: len(stored()) == len(typed), "all 12 messages stored", timeout=30)
        assert stored() == typed
        assert state(ada)["pending"] == []
        # (and the limit was really hit on the way)
        frames = ada.evaluate("() => window.rejoinDebug.frames")
        limited = [
            f for f in frames if f["direction"] == "in" and f["frame"].get("code") == "rate_limited"
        ]
        assert limited, "the rate limit was never reached: the test proves nothing"
        assert pages.errors == []


def test_long_text_is_counted_against_the_limit_and_never_cut(stack: Any, pages: Pages) -> None:
    session = "limit-" + secrets.token_hex(4)
    ada = pages.open("ada", stack.urls.join(session, "Ada", key=stack.config.admin_key))
    wait_status(ada, "connected")
    box, counter = ada.locator("#text"), ada.locator("#counter")
    assert state(ada)["maxText"] == 4000  # no welcome.limits yet: the documented default

    # WHEN a 5,000-character text is pasted
    box.fill("x" * 5000)

    # THEN the counter says by how much it is over, Send is off, and Enter sends nothing
    assert counter.inner_text() == "5,000 / 4,000: 1,000 too many"
    assert ada.locator("#send").is_disabled()
    box.press("Enter")
    assert len(box.input_value()) == 5000  # kept whole: nothing cut
    assert state(ada)["pending"] == []
    assert not [e for e in state(ada)["events"] if e["type"] == "message"]

    # WHEN it is cut to the limit by the user (4,000 emoji are 4,000 characters,
    # though 8,000 UTF-16 units)
    box.fill("\U0001f600" * 4000)
    assert counter.inner_text() == "4,000 / 4,000"
    box.press("Enter")

    # THEN it is sent and stored whole
    def stored() -> list[str]:
        return [e["text"] for e in state(ada)["events"] if e["type"] == "message"]

    wait_until(stored, "the message to be stored")
    assert stored() == ["\U0001f600" * 4000]
    assert pages.errors == []


def test_own_entry_shows_reconnecting_and_left(stack: Any, pages: Pages) -> None:
    session = "own-" + secrets.token_hex(4)
    ada = pages.open("ada", stack.urls.join(session, "Ada", key=stack.config.admin_key))
    wait_status(ada, "connected")
    me = state(ada)["user"]
    assert person(ada, me)["status"] == "active"

    # WHEN the connection drops, THEN her own entry says so (not a green "active")
    ada.evaluate("() => window.rejoinDebug.dropConnection({hold: true})")
    wait_status(ada, "reconnecting...")
    assert person(ada, me)["status"] == "reconnecting"
    ada.evaluate("() => window.rejoinDebug.release()")
    wait_status(ada, "connected")
    assert person(ada, me)["status"] == "active"

    # WHEN she leaves, THEN her entry says left once the server confirmed it
    ada.locator("#leave").click()
    wait_status(ada, "left")
    assert person(ada, me)["status"] == "left"
    assert pages.errors == []


def test_server_unreachable_is_told_apart_from_token_refused(upstash: Any, pages: Pages) -> None:
    with running_stack(upstash) as stack:
        session = "diag-" + secrets.token_hex(4)
        # GIVEN a link whose token the server refuses
        bad = pages.open("bad", f"{stack.urls.http}/join?session={session}&token=not-a-token")
        # THEN the page says the token was refused (the server is there)
        wait_until(lambda: errors_shown(bad, "connect"), "the refusal to be shown")
        assert state(bad)["diagnosis"] == "refused"
        assert "refused the connection" in errors_shown(bad, "connect")[0]

        # GIVEN a page connected to a stack that then goes away
        ada = pages.open("ada", stack.urls.join(session, "Ada", key=stack.config.admin_key))
        wait_status(ada, "connected")
    # THEN (the stack stopped) the page says it cannot reach the server
    wait_until(lambda: state(ada)["diagnosis"] == "unreachable", "the page to diagnose", 20)
    shown = errors_shown(ada, "connect")
    assert shown and "Cannot reach the server" in shown[-1], shown
    assert all("refused" not in text for text in shown)


def test_a_message_stored_but_never_posted_is_filled_at_the_next_event(
    stack: Any, pages: Pages
) -> None:
    """GIVEN Ada and Bob on the page (gap grace 0.3 s via ?gap_ms=300), and a
    say of Bob's stored in the room's log without any post (the room store's
    ``say`` called directly: a request that timed out, yet landed)
    WHEN Bob sends the next message
    THEN each page sends one gap-filling resume and shows the hidden message
    exactly once, in seq order before the next one.
    """
    session = "gap-" + secrets.token_hex(4)

    def link(name: str, **cred: str) -> str:
        url = stack.urls.join(session, name, **cred)
        at = url.index("#")
        return url[:at] + "&gap_ms=300" + url[at:]

    ada = pages.open("ada", link("Ada", key=stack.config.admin_key))
    wait_status(ada, "connected")
    bob = pages.open("bob", link("Bob", invite=stack.invite(session)))
    wait_status(bob, "connected")
    wait_until(lambda: presence_of(ada, "Bob") == "active", "Ada to see Bob active")
    frames = bob.evaluate("() => window.rejoinDebug.frames")
    you = next(f["frame"]["you"] for f in frames if f["frame"].get("type") == "welcome")

    rt = stack.runtime
    with concurrent.futures.ThreadPoolExecutor(
        1
    ) as pool:  # the runtime's own loop, off Playwright's
        hidden = pool.submit(
            rt.run,
            rt.rooms().say(
                session, you["connection"], "m-hidden", "stored, never posted",
                speaker=(you["user"], you["name"]), addressed=False,
            ),
        ).result(10)  # fmt: skip
    assert not hidden.duplicate
    send(bob, "the next message")

    for page in (ada, bob):
        wait_until(
            lambda page=page: (
                {"stored, never posted", "the next message"}
                <= {e["text"] for e in message_events(state(page))}
            ),
            "the hidden message and the next one",
        )
    time.sleep(1.0)  # room for a (wrong) second resume
    for page in (ada, bob):
        s = state(page)
        texts = [e["text"] for e in s["events"] if e["type"] == "message"]
        assert texts[:2] == ["stored, never posted", "the next message"], texts
        assert dom_texts(page).count("stored, never posted") == 1
        seqs = dom_seqs(page)
        assert seqs == sorted(set(seqs)) and hidden.seq in seqs, seqs
        assert s["gapFills"] == 1
        assert s["floor"] == s["lastSeq"]
    assert pages.errors == []
