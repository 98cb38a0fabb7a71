// rejoin's local chat page: the client protocol of docs/protocol.md, no build step.
//
// One WebSocket per page. The first frame on every connection is `resume`
// (with the epoch and the highest seq seen with none missing below, once
// there is one); the answer is `welcome`. Logged events are kept by seq
// (ordered, deduplicated), so a replay after a drop shows exactly the missed
// events once. Gaps are filled: a seq above a hole (an event logged but never
// posted here, or an ack naming a message not received) waits a short grace
// (posts may arrive out of order; ?gap_ms= sets it, default 1500), then
// `resume` from the last contiguous seq replays the missing events; one at a
// time, at most one per grace. A welcome with a
// new epoch means the old session ended while we were away: the page says so
// and shows the fresh session.
//
// Credentials (see rejoin_local.stack): the page link `make dev` prints
// carries the local admin key in its fragment (#key=...), an invite link a
// session-scoped invite (#invite=...). Both are moved into localStorage and
// removed from the address bar; tokens are minted with them through
// /local/token. This browser keeps one random secret; the server derives the
// user id from it, the session and the name, so one person is one participant
// across tabs and reloads.
//
// Messages go out one at a time, in the order typed: the next is sent when
// the previous one is acknowledged (handlers run concurrently, so only this
// keeps the order), and a message is sent again (same id) after a reconnect
// or once a rate limit's retry_after has passed.
(() => {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const tabStore = (() => {
    try { return window.sessionStorage; } catch (_) { return null; }
  })();
  const store = (() => {
    try { return window.localStorage; } catch (_) { return null; }
  })();

  const SESSION_RE = /^[A-Za-z0-9_-]{1,128}$/;
  const KEEPALIVE_MS = 4 * 60 * 1000; // well inside API Gateway's 10-minute idle timeout
  const LOGGED = new Set(["message", "presence", "agent_message"]);
  const DEFAULT_MAX_TEXT = 4000; // until the welcome says otherwise (welcome.limits.max_text)
  const AGENT_ID = "\u0000agent"; // the agent's entry in the People list (no user id can be this)
  const GAP_GRACE_MS = (() => {
    const ms = Number(params.get("gap_ms"));
    return ms > 0 ? ms : 1500;
  })();

  const state = {
    session: null,
    token: null,
    name: null,
    user: null,
    minted: false, // the token came from /local/token: it can be minted again
    epoch: null,
    lastSeq: 0,
    events: new Map(), // seq -> logged event
    floor: 0, // every seq up to this one is in events (or before the log's start)
    ackTop: 0, // the highest seq an ack named (its message may not have come)
    backlogSeq: null, // a welcome's seq while its replay pages come
    gapTimer: null, // set while a hole waits its grace
    gapAsked: false, // a gap-filling resume is waiting for its welcome
    gapAskedAt: 0,
    gapFills: 0,
    participants: new Map(), // user -> {user, name, status}
    streams: new Map(), // turn -> Map(index -> text)
    finishedTurns: new Set(),
    pending: new Map(), // say id -> {text, acked}, in the order typed
    inflight: null, // the say id sent and not yet answered (one at a time keeps the order)
    pauseTimer: null, // set while a rate limit's retry_after runs
    parts: new Map(), // part id -> {count, data: []}
    ws: null,
    opened: false,
    welcomed: false,
    preWelcome: [],
    status: "idle",
    attempts: 0,
    refusals: 0,
    hold: false,
    reconnectTimer: null,
    left: false,
    endedByServer: null,
    lastEndReason: null,
    agent: null,
    maxText: DEFAULT_MAX_TEXT,
    diagnosis: null, // why the last handshake failed: "unreachable" | "refused"
    invite: null,
    mode: null,
    graceSeconds: null,
    lastSentAt: 0,
    welcomes: [],
    sessionsEnded: 0,
    deltaCounts: {}, // turn -> agent_delta frames received (for the test hook)
    frameLog: [], // the last frames in and out, for debugging (rejoinDebug.frames)
  };

  function logFrame(direction, frame) {
    state.frameLog.push({ t: Date.now(), direction, frame });
    if (state.frameLog.length > 300) state.frameLog.shift();
  }

  // ------------------------------------------------------------------ joining

  function load(key, fallback) {
    if (!store) return fallback;
    try { return JSON.parse(store.getItem(key) || "null") ?? fallback; } catch (_) { return fallback; }
  }

  function save(key, value) {
    if (!store) return;
    try { store.setItem(key, JSON.stringify(value)); } catch (_) { /* private mode: fine */ }
  }

  // Credentials from the link's fragment, moved into storage and off the address bar.
  function takeFragment() {
    const hash = new URLSearchParams(location.hash.replace(/^#/, ""));
    const key = hash.get("key");
    const invite = hash.get("invite");
    const session = params.get("session");
    if (key) save("rejoin:admin-key", key);
    if (invite && session && SESSION_RE.test(session)) save("rejoin:invite:" + session, invite);
    if (key || invite) history.replaceState(null, "", location.pathname + location.search);
  }

  function adminKey() { return load("rejoin:admin-key", null); }
  function inviteFor(session) { return load("rejoin:invite:" + session, null); }

  function deviceSecret() {
    let secret = load("rejoin:device", null);
    if (!secret) {
      secret = randomId("d", 16);
      save("rejoin:device", secret);
    }
    return secret;
  }

  // This browser's identities in a session: name -> {user, token}; plus the last name used.
  function identities(session) { return load("rejoin:ids:" + session, { last: null, names: {} }); }

  function remember() {
    const ids = identities(state.session);
    if (state.name) {
      ids.names[state.name] = { user: state.user, token: state.minted ? state.token : null };
      ids.last = state.name;
      save("rejoin:ids:" + state.session, ids);
    }
    if (tabStore) {
      try { tabStore.setItem("rejoin:tab:" + state.session, state.name || ""); } catch (_) { /* fine */ }
    }
  }

  function tabName(session) {
    if (!tabStore) return null;
    try { return tabStore.getItem("rejoin:tab:" + session) || null; } catch (_) { return null; }
  }

  class MintError extends Error {
    constructor(message, status) { super(message); this.status = status; }
  }

  async function mint(session, name) {
    const key = adminKey();
    const invite = inviteFor(session);
    if (!key && !invite) {
      throw new MintError("this page needs the link `make dev` printed (it carries the local key), " +
        "or an invite link for this session", 401);
    }
    let response;
    try {
      response = await fetch("/local/token", {
        method: "POST",
        headers: {
          "Content-Type": "application/json",
          Authorization: key ? "Bearer " + key : "Invite " + invite,
        },
        body: JSON.stringify({ session, name, secret: deviceSecret() }),
      });
    } catch (_) {
      throw new MintError("cannot reach the server at " + location.host + " (is `make dev` running?)", 0);
    }
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      throw new MintError(body.detail || body.message || ("HTTP " + response.status), response.status);
    }
    if (body.invite) save("rejoin:invite:" + session, body.invite);
    return body;
  }

  function randomId(prefix, n) {
    const bytes = new Uint8Array(n);
    crypto.getRandomValues(bytes);
    return prefix + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function showJoin(errorText) {
    $("chat").hidden = true;
    $("join").hidden = false;
    const session = params.get("session");
    const valid = session && SESSION_RE.test(session);
    $("join-session").value = valid ? session : randomId("room-", 3);
    const last = valid ? identities(session).last : null;
    if (params.get("name")) $("join-name").value = params.get("name");
    else if (last && !$("join-name").value) $("join-name").value = last;
    $("join-again").hidden = !last;
    if (last) $("join-again").textContent = "You joined this session as " + last +
      " in this browser: the same name continues as the same person.";
    const err = $("join-error");
    const missing = !adminKey() && !(valid && inviteFor(session));
    const text = errorText || (missing
      ? "This page needs the link `make dev` printed (it carries the local key), or an invite link."
      : "");
    err.hidden = !text;
    err.textContent = text;
    ($("join-name").value ? $("join-session") : $("join-name")).focus();
  }

  async function joinWithName(session, name) {
    const known = identities(session).names[name];
    state.session = session;
    state.name = name;
    if (known && known.token) {
      Object.assign(state, { token: known.token, user: known.user, minted: true });
    } else {
      const grant = await mint(session, name);
      Object.assign(state, { token: grant.token, name: grant.name, user: grant.user, minted: true });
    }
    remember();
    history.replaceState(null, "", "/join?session=" + encodeURIComponent(session));
    startChat();
  }

  async function boot() {
    takeFragment();
    const session = params.get("session");
    if (session && !SESSION_RE.test(session)) {
      showJoin("That session id is not valid: use 1-128 letters, digits, _ or -.");
      return;
    }
    if (session && params.get("token")) {
      state.session = session;
      state.token = params.get("token");
      startChat();
      return;
    }
    if (session) {
      const wanted = params.get("name") || tabName(session);
      if (wanted) {
        try {
          await joinWithName(session, wanted);
        } catch (exc) {
          showJoin("Could not get a token: " + exc.message);
        }
        return;
      }
    }
    showJoin();
  }

  $("join-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const session = $("join-session").value.trim();
    const name = $("join-name").value.trim();
    if (!SESSION_RE.test(session)) {
      showJoin("Session ids are 1-128 letters, digits, _ or -.");
      return;
    }
    if (!name) return;
    try {
      await joinWithName(session, name);
    } catch (exc) {
      showJoin("Could not get a token: " + exc.message);
    }
  });

  function startChat() {
    $("join").hidden = true;
    $("chat").hidden = false;
    $("session-name").textContent = state.session;
    $("session-name").title = state.session;
    document.title = state.session + " - rejoin";
    showInvite();
    connect();
    updateCounter();
    $("text").focus();
  }

  // The link for a second person: the session's invite, never the admin key.
  function showInvite() {
    const invite = inviteFor(state.session);
    const link = location.origin + "/join?session=" + encodeURIComponent(state.session) +
      (invite ? "#invite=" + invite : "");
    $("invite-link").href = link;
    $("invite-link").textContent = link;
    $("invite-note").textContent = invite
      ? "joins this session only"
      : "the other person needs their own token or invite";
  }

  $("invite-copy").addEventListener("click", async () => {
    const link = $("invite-link").href;
    try {
      await navigator.clipboard.writeText(link);
      $("invite-copy").textContent = "Copied";
    } catch (_) {
      window.prompt("Copy the invite link:", link);
    }
    setTimeout(() => { $("invite-copy").textContent = "Copy invite link"; }, 2000);
  });

  // --------------------------------------------------------------- connection

  function wsUrl() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const query = new URLSearchParams({ session: state.session, token: state.token });
    return proto + "//" + location.host + "/ws?" + query.toString();
  }

  function setStatus(status) {
    state.status = status;
    const labels = {
      idle: "not connected",
      connecting: "connecting...",
      reconnecting: "reconnecting...",
      open: "connected",
      leaving: "leaving...",
      left: "left",
      ended: "session ended",
    };
    const el = $("status");
    el.textContent = labels[status] || status;
    el.className = "status status-" + status;
    updateComposer();
    if (state.session) renderParticipants();
  }

  function connect() {
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = null;
    if (state.ws) return;
    setStatus(state.attempts > 0 || state.epoch ? "reconnecting" : "connecting");
    const ws = new WebSocket(wsUrl());
    state.ws = ws;
    state.opened = false;
    state.welcomed = false;
    state.preWelcome = [];
    state.parts.clear();
    ws.onopen = () => {
      if (ws !== state.ws) return;
      state.opened = true;
      sendResume();
    };
    ws.onmessage = (event) => {
      if (ws !== state.ws) return;
      onText(event.data);
    };
    ws.onerror = () => { /* onclose follows */ };
    ws.onclose = (event) => {
      if (ws !== state.ws) return;
      state.ws = null;
      onClosed(event);
    };
  }

  function sendResume() {
    const frame = { action: "resume" };
    if (state.epoch) {
      frame.epoch = state.epoch;
      frame.last_seq = state.floor; // the replay fills any hole above it
    }
    sendRaw(frame);
  }

  function sendRaw(frame) {
    const ws = state.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(frame));
    state.lastSentAt = Date.now();
    logFrame("out", frame);
    return true;
  }

  function onClosed(event) {
    const wasOpen = state.opened;
    state.opened = false;
    state.welcomed = false;
    state.inflight = null; // sent again after the next welcome
    clearTimeout(state.gapTimer);
    state.gapTimer = null;
    state.gapAsked = false;
    state.backlogSeq = null;
    if (state.left) {
      setStatus("left");
      return;
    }
    if (state.endedByServer) {
      setStatus("ended");
      return;
    }
    if (!wasOpen) state.refusals += 1;
    state.attempts += 1;
    setStatus("reconnecting");
    if (event && event.code === 1009) {
      showError("too_large", "The connection was closed: a message was too large.");
    }
    if (state.hold) return;
    if (wasOpen) {
      state.diagnosis = null;
      scheduleReconnect();
    } else {
      diagnose().then(() => scheduleReconnect());
    }
  }

  // A failed handshake shows no HTTP status to a page: ask the server whether
  // it is there at all, to tell "unreachable" from "refused the token".
  async function diagnose() {
    let reachable = true;
    try {
      await fetch("/", { method: "HEAD", cache: "no-store" });
    } catch (_) {
      reachable = false;
    }
    state.diagnosis = reachable ? "refused" : "unreachable";
    clearErrors("connect");
    if (!reachable) {
      showError("connect", "Cannot reach the server at " + location.host +
        " (is `make dev` still running?). Retrying.", true);
    } else if (!state.minted || state.refusals >= 2) {
      showError("connect", "The server refused the connection: the token was not accepted " +
        "(expired, for another session, revoked, or signed with another key)." +
        (state.minted ? " Getting a new one failed too; open a fresh invite link." : ""), true);
    }
  }

  function scheduleReconnect(delay) {
    clearTimeout(state.reconnectTimer);
    const wait = delay !== undefined ? delay
      : Math.min(10000, 250 * Math.pow(2, Math.min(state.attempts - 1, 6)));
    state.reconnectTimer = setTimeout(async () => {
      state.reconnectTimer = null;
      if (state.minted && state.diagnosis === "refused") {
        // A locally minted token may have expired or the stack's key changed:
        // mint a fresh one for the same person (same browser secret, same id).
        try {
          const grant = await mint(state.session, state.name);
          state.token = grant.token;
          state.user = grant.user;
          remember();
          showInvite();
        } catch (exc) {
          if (exc.status === 401 || exc.status === 403) {
            clearErrors("connect");
            showError("connect", "Could not get a new token: " + exc.message, true);
          }
        }
      }
      connect();
    }, wait);
  }

  setInterval(() => {
    if (state.welcomed && Date.now() - state.lastSentAt > KEEPALIVE_MS) sendRaw({ action: "ping" });
  }, 30 * 1000);

  // ------------------------------------------------------------------- frames

  function onText(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch (_) {
      showError("internal", "The server sent a frame that is not JSON.");
      return;
    }
    handleFrame(frame);
  }

  function handleFrame(frame) {
    if (!frame || typeof frame !== "object") return;
    logFrame("in", frame);
    if (frame.type === "part") { onPart(frame); return; }
    if (frame.type === "welcome") { onWelcome(frame); return; }
    if (frame.type === "replay") { onReplay(frame); return; }
    if (!state.welcomed && (LOGGED.has(frame.type) || frame.type === "agent_delta")) {
      // A live frame that overtook the welcome: apply it after the welcome.
      state.preWelcome.push(frame);
      return;
    }
    switch (frame.type) {
      case "message":
      case "presence":
      case "agent_message":
        addEvent(frame, true);
        render();
        checkGap();
        break;
      case "agent_delta":
        onDelta(frame);
        break;
      case "ack":
        onAck(frame);
        break;
      case "pong":
        break;
      case "ended":
        onEnded(frame);
        break;
      case "left":
        onLeft();
        break;
      case "error":
        onError(frame);
        break;
      default:
        if (typeof frame.message === "string" && frame.connectionId) {
          // API Gateway's own answer when a handler failed or timed out.
          showError("gateway", "Gateway: " + frame.message);
        }
    }
  }

  function onPart(frame) {
    const { id, index, count, data } = frame;
    if (typeof id !== "string" || !(count > 0) || !(index >= 0 && index < count)) return;
    let entry = state.parts.get(id);
    if (!entry) {
      entry = { count, data: new Array(count), received: 0 };
      state.parts.set(id, entry);
    }
    if (entry.data[index] === undefined) {
      entry.data[index] = String(data);
      entry.received += 1;
    }
    if (entry.received === entry.count) {
      state.parts.delete(id);
      onText(entry.data.join(""));
    }
  }

  function onWelcome(w) {
    const refill = state.welcomed; // the answer to a gap-filling resume
    const freshSession = state.epoch !== null && w.epoch !== state.epoch;
    if (freshSession) {
      state.sessionsEnded += 1;
      state.events.clear();
      state.streams.clear();
      state.finishedTurns.clear();
      state.lastSeq = 0;
      state.floor = 0;
      state.ackTop = 0;
      const grace = w.grace_seconds || state.graceSeconds;
      showNotice("ended", state.lastEndReason
        ? "Session ended (" + state.lastEndReason + "). You are now in a fresh session " +
          "with an empty history."
        : "Session ended: everyone was away for longer than the " +
          (grace ? grace + "-second " : "") + "grace period, so the old conversation was " +
          "deleted. You are now in a fresh session with an empty history.");
      state.lastEndReason = null;
    }
    state.epoch = w.epoch;
    state.graceSeconds = w.grace_seconds || state.graceSeconds;
    const limits = w.limits || {};
    state.maxText = Number.isInteger(limits.max_text) && limits.max_text > 0
      ? limits.max_text : DEFAULT_MAX_TEXT;
    updateCounter();
    state.mode = w.mode || state.mode;
    if (w.you) {
      state.user = w.you.user;
      state.name = w.you.name;
      remember();
    }
    if (w.agent) showAgent(w.agent);
    state.participants.clear();
    for (const p of w.participants || []) state.participants.set(p.user, { ...p });
    if (w.recovered) {
      for (const e of w.events || []) addEvent(e, false);
    } else {
      state.events.clear();
      for (const e of w.transcript || []) addEvent(e, false);
    }
    if (typeof w.seq === "number") state.lastSeq = Math.max(state.lastSeq, w.seq);
    state.welcomes.push({
      epoch: w.epoch, resumed: !!w.resumed, recovered: !!w.recovered, seq: w.seq,
      events: (w.events || []).map((e) => e.seq),
      transcript: w.transcript ? w.transcript.length : null,
    });
    state.welcomed = true;
    state.attempts = 0;
    state.refusals = 0;
    state.diagnosis = null;
    clearErrors("connect");
    setStatus("open");
    const early = state.preWelcome;
    state.preWelcome = [];
    for (const frame of early) handleFrame(frame);
    // Messages typed while disconnected (or not yet acknowledged) go out now, in order.
    if (!refill) state.inflight = null;
    pump();
    render();
    state.backlogSeq = typeof w.seq === "number" ? w.seq : null;
    if (!w.more) backlogDone();
  }

  function onReplay(frame) {
    for (const e of frame.events || []) addEvent(e, false);
    render();
    if (!frame.more) backlogDone();
  }

  // The welcome and its pages held every event up to its seq (from the log's
  // start when not recovered): nothing below it is missing.
  function backlogDone() {
    if (state.backlogSeq !== null) state.floor = Math.max(state.floor, state.backlogSeq);
    state.backlogSeq = null;
    state.gapAsked = false;
    advanceFloor();
    checkGap();
  }

  function advanceFloor() {
    while (state.events.has(state.floor + 1)) state.floor += 1;
  }

  // A seq above a hole: wait the grace (a late post may fill it), then ask
  // for the rest with resume from the last contiguous seq.
  function checkGap() {
    if (state.gapTimer || !state.welcomed || state.backlogSeq !== null) return;
    if (state.gapAsked && Date.now() - state.gapAskedAt < Math.max(5000, 4 * GAP_GRACE_MS)) return;
    const target = Math.max(state.lastSeq, state.ackTop);
    if (target <= state.floor) return;
    state.gapTimer = setTimeout(() => {
      state.gapTimer = null;
      if (state.floor >= target) { checkGap(); return; } // filled; a newer hole waits its own grace
      if (!state.welcomed || state.backlogSeq !== null) return;
      state.gapAsked = true;
      state.gapAskedAt = Date.now();
      state.gapFills += 1;
      sendResume();
    }, GAP_GRACE_MS);
  }

  function addEvent(e, live) {
    if (!e || typeof e.seq !== "number" || !LOGGED.has(e.type)) return;
    if (state.events.has(e.seq)) return; // each seq once
    state.events.set(e.seq, e);
    state.lastSeq = Math.max(state.lastSeq, e.seq);
    advanceFloor();
    if (e.type === "message") {
      if (e.user === state.user) state.pending.delete(e.id);
      if (live && !state.participants.has(e.user)) {
        state.participants.set(e.user, { user: e.user, name: e.name, status: "active" });
      }
    } else if (e.type === "agent_message") {
      state.finishedTurns.add(e.turn);
      state.streams.delete(e.turn);
    } else if (e.type === "presence" && live) {
      // The welcome's participants are current; replayed presence is history.
      state.participants.set(e.user, { user: e.user, name: e.name, status: e.status });
    }
  }

  function onDelta(d) {
    if (typeof d.turn !== "string" || state.finishedTurns.has(d.turn)) return;
    let deltas = state.streams.get(d.turn);
    if (!deltas) {
      deltas = new Map();
      state.streams.set(d.turn, deltas);
    }
    if (!deltas.has(d.index)) deltas.set(d.index, String(d.text || ""));
    state.deltaCounts[d.turn] = (state.deltaCounts[d.turn] || 0) + 1;
    renderLive();
  }

  function onAck(a) {
    // A resent say acknowledged as duplicate may name a message never posted here.
    if (typeof a.seq === "number") state.ackTop = Math.max(state.ackTop, a.seq);
    checkGap();
    const say = state.pending.get(a.id);
    if (a.id === state.inflight) state.inflight = null;
    if (say) {
      const logged = state.events.get(a.seq);
      if (logged && logged.type === "message" && logged.id === a.id) state.pending.delete(a.id);
      else say.acked = true;
      renderLive();
    }
    pump();
  }

  function onEnded(frame) {
    state.endedByServer = frame.reason || "ended";
    state.lastEndReason = state.endedByServer;
    showNotice("ended", "Session ended by the server (" + state.endedByServer + ").");
    setStatus("ended");
    $("left-text").textContent = "This session was ended.";
    $("left").hidden = false;
  }

  function onError(frame) {
    const code = frame.code || "internal";
    let text = frame.message || code;
    const mine = frame.id && state.pending.has(frame.id);
    if (code === "rate_limited") {
      const wait = Math.max(0.1, Number(frame.retry_after) || 1);
      text = "Sending too fast: waiting " + Math.ceil(wait) + " s, then sending the rest in order.";
      if (frame.id) {
        // Paused: this message and every later one wait, then go out in typed order.
        if (frame.id === state.inflight) state.inflight = null;
        clearTimeout(state.pauseTimer);
        state.pauseTimer = setTimeout(() => { state.pauseTimer = null; pump(); }, wait * 1000);
      } else if (!state.welcomed) {
        setTimeout(() => { if (state.ws && state.opened && !state.welcomed) sendResume(); }, wait * 1000);
      } else if (state.gapAsked) {
        // The gap fill's resume was refused: ask again once the limit allows.
        state.gapAsked = false;
        clearTimeout(state.gapTimer);
        state.gapTimer = setTimeout(() => { state.gapTimer = null; checkGap(); }, wait * 1000);
      }
    } else if (code === "not_joined") {
      if (frame.id === state.inflight) state.inflight = null;
      sendResume();
    } else if (code === "session_gone") {
      text = "The session is gone; reconnecting starts a fresh one.";
      if (state.ws) state.ws.close(4001, "session gone");
    } else if (code === "turn_failed") {
      text = "The agent's reply failed; it is retried automatically.";
    } else if (code === "turn_not_queued" && mine) {
      // Stored, but the agent was not told: the same say (same id) queues it again.
      text = "The agent was not reached; sending again.";
      if (frame.id === state.inflight) state.inflight = null;
      clearTimeout(state.pauseTimer);
      state.pauseTimer = setTimeout(() => { state.pauseTimer = null; pump(); }, 1000);
    } else if (mine) {
      state.pending.delete(frame.id); // refused: it will never be logged
      if (frame.id === state.inflight) state.inflight = null;
      text = "Not sent: " + text;
      renderLive();
      pump();
    }
    showError(code, text);
  }

  // ------------------------------------------------------------------ actions

  function codePoints(text) { return Array.from(text).length; }

  function say(text) {
    const id = randomId("c-", 8);
    state.pending.set(id, { text, acked: false });
    pump();
    renderLive();
  }

  // Sends the oldest unacknowledged message, if none is in flight.
  function pump() {
    if (!state.welcomed || state.inflight || state.pauseTimer) return;
    for (const [id, entry] of state.pending) {
      if (entry.acked) continue;
      if (sendRaw({ action: "say", id, text: entry.text })) state.inflight = id;
      return;
    }
  }

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const box = $("text");
    const text = box.value.trim();
    if (!text || state.left || state.endedByServer) return;
    if (codePoints(text) > state.maxText) {
      updateCounter(true);
      return; // kept in the box, never cut: the counter says by how much it is over
    }
    say(text);
    box.value = "";
    updateCounter();
    box.focus();
  });

  $("text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });

  $("text").addEventListener("input", () => updateCounter());

  function updateCounter(flash) {
    const count = codePoints($("text").value.trim());
    const over = count - state.maxText;
    const el = $("counter");
    el.textContent = over > 0
      ? count.toLocaleString("en") + " / " + state.maxText.toLocaleString("en") +
        ": " + over.toLocaleString("en") + " too many"
      : count.toLocaleString("en") + " / " + state.maxText.toLocaleString("en");
    el.className = "counter" + (over > 0 ? " over" : count > state.maxText * 0.9 ? " near" : "") +
      (flash ? " flash" : "");
    el.dataset.count = String(count);
    el.dataset.max = String(state.maxText);
    $("send").disabled = over > 0 || state.left || !!state.endedByServer;
  }

  $("leave").addEventListener("click", () => {
    state.left = true;
    clearTimeout(state.reconnectTimer);
    $("left-text").textContent = "You left the session.";
    $("left").hidden = false;
    if (state.ws && sendRaw({ action: "leave" })) {
      // The server answers `left` and closes; close ourselves only if it does not.
      setStatus("leaving");
      const ws = state.ws;
      setTimeout(() => { if (state.ws === ws) ws.close(1000, "left"); }, 5000);
    } else {
      if (state.ws) state.ws.close(1000, "left");
      setStatus("left");
    }
  });

  function onLeft() {
    if (state.ws) state.ws.close(1000, "left");
    setStatus("left");
  }

  $("rejoin").addEventListener("click", () => {
    state.left = false;
    state.endedByServer = null;
    $("left").hidden = true;
    connect();
  });

  $("notice-close").addEventListener("click", () => { $("notice").hidden = true; });

  function updateComposer() {
    const blocked = state.left || !!state.endedByServer;
    $("leave").disabled = blocked;
    $("composer").hidden = blocked;
    updateCounter();
  }

  // ---------------------------------------------------------------- rendering

  function agentName() { return (state.agent && state.agent.name) || "agent"; }

  function showAgent(agent) {
    state.agent = { ...agent };
    const badge = $("agent-badge");
    badge.hidden = false;
    if (agent.offline) {
      badge.textContent = "offline stand-in model";
      badge.className = "badge offline";
      badge.title = "OPENAI_API_KEY is not set: a deterministic stand-in answers instead of a real model.";
    } else {
      badge.textContent = "model: " + (agent.model || "?");
      badge.className = "badge";
      badge.title = "";
    }
  }

  function showNotice(kind, text) {
    const notice = $("notice");
    notice.className = "notice " + kind;
    $("notice-text").textContent = text;
    notice.hidden = false;
  }

  function showError(code, text, sticky) {
    const box = $("errors");
    const el = document.createElement("div");
    el.className = "error";
    el.dataset.code = code;
    el.textContent = text;
    box.appendChild(el);
    while (box.children.length > 3) box.removeChild(box.firstChild);
    if (!sticky) setTimeout(() => el.remove(), 8000);
  }

  function clearErrors(code) {
    for (const el of Array.from($("errors").children)) {
      if (el.dataset.code === code) el.remove();
    }
  }

  function formatTime(ts) {
    if (typeof ts !== "number") return "";
    return new Date(ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function eventElement(e) {
    const li = document.createElement("li");
    li.dataset.seq = String(e.seq);
    li.dataset.type = e.type;
    if (e.type === "presence") {
      li.className = "event presence";
      const verb = { active: "is here", away: "is away", left: "left" }[e.status] || e.status;
      li.textContent = (e.name || e.user) + " " + verb;
      return li;
    }
    const mine = e.type === "message" && e.user === state.user;
    li.className = "event " + (e.type === "agent_message" ? "agent" : "message") + (mine ? " mine" : "");
    if (e.type === "message") li.dataset.id = e.id;
    if (e.type === "agent_message") li.dataset.turn = e.turn;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = (e.type === "agent_message" ? agentName() : displayName(e.user, e.name)) +
      (e.ts ? " \u00b7 " + formatTime(e.ts) : "");
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    bubble.textContent = e.text;
    li.append(meta, bubble);
    return li;
  }

  function nearBottom() {
    const s = $("scroller");
    return s.scrollHeight - s.scrollTop - s.clientHeight < 80;
  }

  function scrollDown(stick) {
    if (stick) {
      const s = $("scroller");
      s.scrollTop = s.scrollHeight;
    }
  }

  // Two people may pick the same name: then each also shows the end of their id.
  function displayName(user, name) {
    const shown = name || user;
    let same = 0;
    for (const p of state.participants.values()) if ((p.name || p.user) === shown) same += 1;
    return same > 1 && user ? shown + " \u00b7 " + String(user).slice(-4) : shown;
  }

  // Your own entry tells the truth about this page's connection, not the
  // last status the server reported.
  function ownStatus(serverStatus) {
    switch (state.status) {
      case "open": return serverStatus;
      case "connecting":
      case "reconnecting": return "reconnecting";
      case "leaving":
      case "left": return "left";
      case "ended": return "ended";
      default: return "offline";
    }
  }

  function renderParticipants() {
    const list = $("participants");
    list.replaceChildren();
    const people = Array.from(state.participants.values()).map((p) =>
      (p.user === state.user ? { ...p, status: ownStatus(p.status) } : p));
    if (state.user && !state.participants.has(state.user) && state.name) {
      people.push({ user: state.user, name: state.name, status: ownStatus("active") });
    }
    const order = { active: 0, reconnecting: 1, away: 1, left: 2, ended: 2, offline: 2 };
    people.sort((a, b) => (order[a.status] ?? 3) - (order[b.status] ?? 3) ||
      String(a.name).localeCompare(String(b.name)));
    if (state.agent) {
      people.unshift({ user: AGENT_ID, name: agentName(), status: "agent" });
    }
    for (const p of people) {
      const li = document.createElement("li");
      li.className = "person presence-" + p.status;
      li.dataset.user = p.user === AGENT_ID ? "" : p.user;
      li.dataset.status = p.status;
      if (p.user === AGENT_ID) li.dataset.agent = "true";
      const dot = document.createElement("span");
      dot.className = "presence-dot";
      const who = document.createElement("span");
      who.className = "who";
      who.textContent = p.user === AGENT_ID ? p.name : displayName(p.user, p.name);
      const label = document.createElement("span");
      label.className = "presence-label";
      label.textContent = p.user === AGENT_ID
        ? (state.agent.offline ? "agent, offline model" : "agent")
        : p.status;
      li.append(dot, who);
      if (p.user === state.user) {
        const you = document.createElement("span");
        you.className = "you";
        you.textContent = "(you)";
        li.append(you);
      }
      li.append(label);
      list.append(li);
    }
  }

  function renderEvents() {
    const list = $("events");
    const shown = new Map();
    for (const li of Array.from(list.children)) {
      const seq = Number(li.dataset.seq);
      // Seqs restart with each epoch: an element of another epoch is stale.
      if (li.dataset.epoch === state.epoch && state.events.get(seq) === li.rejoinEvent) {
        shown.set(seq, li);
      } else {
        li.remove();
      }
    }
    const seqs = Array.from(state.events.keys()).sort((a, b) => a - b);
    let previous = null;
    for (const seq of seqs) {
      let li = shown.get(seq);
      if (!li) {
        li = eventElement(state.events.get(seq));
        li.dataset.epoch = state.epoch;
        li.rejoinEvent = state.events.get(seq);
        if (previous) previous.after(li);
        else list.prepend(li);
      }
      previous = li;
    }
  }

  function renderLive() {
    const stick = nearBottom();
    const list = $("live");
    list.replaceChildren();
    for (const [turn, deltas] of state.streams) {
      const li = document.createElement("li");
      li.className = "event agent streaming";
      li.dataset.turn = turn;
      const meta = document.createElement("div");
      meta.className = "meta";
      meta.textContent = agentName() + " \u00b7 typing";
      const bubble = document.createElement("div");
      bubble.className = "bubble";
      bubble.textContent = Array.from(deltas.keys()).sort((a, b) => a - b)
        .map((i) => deltas.get(i)).join("");
      li.append(meta, bubble);
      list.append(li);
    }
    for (const [id, say] of state.pending) {
      const li = document.createElement("li");
      li.className = "event message mine pending";
      li.dataset.pending = id;
      const meta = document.createElement("div");
      meta.className = "meta";
      meta.textContent = (state.name || "you") + " \u00b7 " +
        (say.acked ? "sent" : id === state.inflight ? "sending..." : "waiting to send");
      const bubble = document.createElement("div");
      bubble.className = "bubble";
      bubble.textContent = say.text;
      li.append(meta, bubble);
      list.append(li);
    }
    scrollDown(stick);
  }

  function render() {
    const stick = nearBottom();
    renderParticipants();
    renderEvents();
    renderLive();
    scrollDown(stick);
  }

  // ---------------------------------------------------------------- test hook

  function snapshot() {
    const seqs = Array.from(state.events.keys()).sort((a, b) => a - b);
    return {
      status: state.status,
      session: state.session,
      user: state.user,
      name: state.name,
      epoch: state.epoch,
      lastSeq: state.lastSeq,
      floor: state.floor,
      gapFills: state.gapFills,
      connected: !!state.ws && state.welcomed,
      events: seqs.map((seq) => {
        const e = state.events.get(seq);
        return {
          seq, type: e.type, user: e.user, text: e.text, status: e.status, turn: e.turn,
          reply_to: e.reply_to, id: e.id,
        };
      }),
      participants: Array.from(state.participants.values()).map((p) => ({ ...p })),
      people: Array.from($("participants").children).map((li) => ({
        user: li.dataset.user, status: li.dataset.status, agent: li.dataset.agent === "true",
        text: li.querySelector(".who").textContent,
      })),
      maxText: state.maxText,
      diagnosis: state.diagnosis,
      inflight: state.inflight,
      streams: Array.from(state.streams.keys()),
      pending: Array.from(state.pending.keys()),
      welcomes: state.welcomes.map((w) => ({ ...w })),
      sessionsEnded: state.sessionsEnded,
      agent: state.agent,
      deltaCounts: { ...state.deltaCounts },
    };
  }

  window.rejoinDebug = {
    // Simulate a network drop: the socket closes without `leave`. With
    // {hold: true} the page stays disconnected until release().
    dropConnection(options) {
      state.hold = !!(options && options.hold);
      if (state.ws) state.ws.close(4000, "simulated drop");
    },
    release() {
      state.hold = false;
      if (!state.ws && !state.left) scheduleReconnect(0);
    },
    get state() { return snapshot(); },
    // The last 300 frames received and sent, oldest first.
    get frames() { return state.frameLog.map((f) => ({ ...f })); },
  };

  boot();
})();
