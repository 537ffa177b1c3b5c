// roomcast browser client: no build step, no dependencies.
//
// Protocol (SPEC.md §4): connect to <prefix>/ws/chat?room=&name=[&since=&epoch=], offering the
// "roomcast.batch" subprotocol (one or more newline-separated JSON events per frame when
// the server agrees, one event per frame otherwise). Messages are deduplicated by seq
// within an epoch; a welcome with a new epoch means the room's sequence restarted.
// Presence notices are coalesced by the server (README, "Presence"): one `system` event
// can report several joins and leaves, and its `count` and `members` are the room as it
// is now, so the member list is replaced with them rather than patched.
//
// Everything user-supplied is rendered with textContent, never as HTML (links in messages
// are <a> elements built from the text, their href only ever http: or https:).
//
// A draft is never dropped: the page refuses one the server would refuse (welcome.limits
// says the longest text; FRAME_LIMIT the largest frame) and keeps it in the box; a message
// the server refuses, or that was not confirmed when the connection dropped and is not in
// the resumed history, is put back into the box.

"use strict";

(() => {
  // The server's address, mount prefix included: this script is <prefix>/static/app.js.
  const BASE = new URL("../", document.currentScript.src);
  const BATCH = "roomcast.batch";
  const ROOM_RE = /^[A-Za-z0-9_.\-]{1,64}$/;
  const MAX_NAME = 32;
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_CAP_MS = 10000;
  const CONNECT_TIMEOUT_MS = 10000;
  const MAX_RENDERED = 500; // messages kept in the DOM
  // Hypercorn's websocket_max_message_size as roomcast runs it (hypercorn.toml): a bigger
  // frame is closed with 1009. The app cannot know the server's real value when mounted
  // elsewhere; a 1009 lowers the page's idea of it.
  const FRAME_LIMIT = 65536;
  const SETTLE_TIMEOUT_MS = 5000; // most a resume's replay may take to show what arrived
  const URL_RE = /\bhttps?:\/\/[^\s<>"'`]+/gi;
  const GROUP_WINDOW_MS = 5 * 60 * 1000;

  // code -> [human text, reconnect automatically?]
  const CLOSE_CODES = {
    1000: ["the server closed the connection", true],
    1001: ["the server is restarting", true],
    1005: ["the connection was closed", true],
    1006: ["the connection was lost", true],
    1009: ["a message was too large", true],
    1011: ["the server hit an internal error", true],
    1012: ["the server is restarting", true],
    1013: ["the server is busy", true],
    4001: ["not signed in", false],
    4003: ["the room is full", false],
    4004: ["no chat endpoint at this address", false],
    4008: ["the connection was too slow and fell behind", true],
    4400: ["invalid room or name", false],
    4403: ["you are not allowed in this room", false],
    4429: ["you have too many connections open", false],
  };

  const ERROR_TEXT = {
    rate_limited: "You're sending messages too fast; some were not delivered. Slow down a little.",
    too_long: "That message is too long to send.",
    binary_unsupported: "The server only accepts text messages.",
    bad_id: "The server rejected a message id.",
    unavailable: "The chat service is temporarily unavailable.",
  };

  const $ = (id) => document.getElementById(id);
  const el = {
    app: $("app"),
    join: $("join"),
    joinForm: $("join-form"),
    roomInput: $("room-input"),
    nameInput: $("name-input"),
    nameLabel: $("name-label"),
    signedAs: $("signed-as"),
    joinError: $("join-error"),
    signin: $("signin"),
    tokenInput: $("token-input"),
    chat: $("chat"),
    roomTitle: $("room-title"),
    roomName: $("room-name"),
    status: $("status"),
    statusText: $("status-text"),
    banner: $("banner"),
    bannerText: $("banner-text"),
    retry: $("retry"),
    changeRoom: $("change-room"),
    messages: $("messages"),
    composer: $("composer"),
    text: $("text"),
    draftHint: $("draft-hint"),
    send: $("send"),
    members: $("members"),
    membersMore: $("members-more"),
    count: $("count"),
    membersToggle: $("members-toggle"),
    membersToggleCount: $("members-toggle-count"),
    sidebar: $("sidebar"),
    scrim: $("scrim"),
    leave: $("leave"),
  };

  // -- state -------------------------------------------------------------------------------

  const session = {
    room: null,
    name: null, // the name asked for with ?name= (null with a signed token: its name wins)
    self: null, // the name this page appears as in the room
    token: null,
    ws: null,
    active: false, // the user wants to be in the room
    wasOpen: false, // the current socket reached welcome
    wasEverOpen: false, // some socket in this room visit reached welcome
    attempt: 0, // reconnect attempts since the last welcome
    retryTimer: null,
    countdownTimer: null,
    connectTimer: null,
    retryAt: 0,
    dropReason: "",
    // resume state: the room's sequence run and what we have shown of it
    epoch: null,
    lastSeq: 0,
    seen: new Set(),
    resuming: false, // the current socket asked for since/epoch of a previous run
    restartedNow: false, // this socket's welcome showed a new epoch
    members: new Map(), // display name -> how many members use it
    count: 0,
    myIds: new Set(),
    pending: new Map(), // id -> {text, bytes} of sent messages not yet acked or seen
    // sent before the connection dropped and not confirmed: shown when the resume replays
    // them, put back into the box if the replay ends without them
    unconfirmed: new Map(), // id -> text
    replayTo: null, // the welcome's seq: the replay is over once a message reaches it
    settleTimer: null,
    maxText: null, // welcome.limits.text: the longest text the server takes, in characters
    frameLimit: FRAME_LIMIT,
  };

  // -- small helpers -----------------------------------------------------------------------

  function newId() {
    const bytes = new Uint8Array(9);
    crypto.getRandomValues(bytes);
    let hex = "";
    for (const b of bytes) hex += b.toString(16).padStart(2, "0");
    return Date.now().toString(36) + "-" + hex;
  }

  function node(tag, className, text) {
    const element = document.createElement(tag);
    if (className) element.className = className;
    if (text !== undefined && text !== null) element.textContent = String(text);
    return element;
  }

  const NUMBER = new Intl.NumberFormat("en-US");
  const UTF8 = new TextEncoder();

  // characters as the server counts them (code points; JS strings count UTF-16 units)
  function characters(text) {
    let n = 0;
    for (const _ of text) n++;
    return n;
  }

  // Message text as nodes: http(s) URLs become links, everything else stays text. A link
  // is built from the parsed URL, so "javascript:" and markup can never become one.
  function linkified(text) {
    const fragment = document.createDocumentFragment();
    let last = 0;
    for (const match of text.matchAll(URL_RE)) {
      // a sentence's closing punctuation is not part of the address; a ")" is, if the
      // address opened one ("https://en.wikipedia.org/wiki/Tor_(network)")
      let url = match[0].replace(/[.,;:!?]+$/, "");
      while (url.endsWith(")") && url.split("(").length < url.split(")").length) url = url.slice(0, -1);
      let href;
      try {
        href = new URL(url);
      } catch (err) {
        continue;
      }
      if (href.protocol !== "http:" && href.protocol !== "https:") continue;
      fragment.append(text.slice(last, match.index));
      const a = node("a", "link", url);
      a.href = href.href;
      a.target = "_blank";
      a.rel = "noopener noreferrer";
      fragment.append(a);
      last = match.index + url.length;
    }
    fragment.append(text.slice(last));
    return fragment;
  }

  function hashName(name) {
    let h = 0;
    for (let i = 0; i < name.length; i++) h = (h * 31 + name.charCodeAt(i)) | 0;
    return Math.abs(h) % 8;
  }

  function initials(name) {
    if (!name) return "?";
    const parts = name.trim().split(/\s+/).filter(Boolean);
    const chars = parts.length > 1 ? [parts[0], parts[parts.length - 1]] : [parts[0] || "?"];
    return chars.map((p) => Array.from(p)[0] || "").join("").toUpperCase() || "?";
  }

  function avatar(name) {
    const a = node("span", name ? "avatar c" + hashName(name) : "avatar anon", initials(name));
    a.setAttribute("aria-hidden", "true");
    return a;
  }

  function formatTime(ts) {
    const date = new Date(typeof ts === "number" ? ts : Date.now());
    const now = new Date();
    const sameDay = date.toDateString() === now.toDateString();
    const time = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    return sameDay ? time : date.toLocaleDateString([], { month: "short", day: "numeric" }) + " " + time;
  }

  function nearBottom() {
    const m = el.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
  }

  // Whether the list follows new messages: true until the reader scrolls up, and again
  // once they scroll back down. Decided by the reader's scrolling, not re-measured when a
  // message arrives: a growing message box shrinks the list and would otherwise look like
  // "scrolled up".
  let following = true;
  el.messages.addEventListener("scroll", () => { following = nearBottom(); });
  new ResizeObserver(() => { if (following) scrollToBottom(); }).observe(el.messages);

  function scrollToBottom() {
    el.messages.scrollTop = el.messages.scrollHeight;
  }

  function append(item) {
    el.messages.appendChild(item);
    while (el.messages.childElementCount > MAX_RENDERED) el.messages.firstElementChild.remove();
    if (following) scrollToBottom();
  }

  // -- rendering ---------------------------------------------------------------------------

  function notice(kind, text, extra) {
    const li = node("li", "notice " + kind);
    li.dataset.kind = kind;
    if (extra) for (const [k, v] of Object.entries(extra)) li.dataset[k] = v;
    li.appendChild(node("span", "notice-text", text));
    append(li);
    return li;
  }

  function renderMessage(ev) {
    const sender = typeof ev.from === "string" && ev.from ? ev.from : null;
    const mine = typeof ev.id === "string" && session.myIds.has(ev.id);
    const li = node("li", "message" + (mine ? " mine" : ""));
    li.dataset.seq = String(ev.seq);
    li.dataset.epoch = session.epoch || "";
    li.dataset.from = sender || "";
    li.dataset.ts = String(ev.ts || "");
    if (typeof ev.id === "string") li.dataset.id = ev.id;

    const prev = el.messages.lastElementChild;
    if (
      prev && prev.classList.contains("message") && prev.dataset.from === li.dataset.from &&
      prev.classList.contains("mine") === mine &&
      Math.abs(Number(ev.ts) - Number(prev.dataset.ts)) < GROUP_WINDOW_MS
    ) {
      li.classList.add("cont");
    }

    li.appendChild(avatar(sender));
    const bubble = node("div", "bubble");
    const meta = node("div", "meta");
    meta.appendChild(node("span", "from", sender || "anonymous"));
    const time = node("time", "ts", formatTime(ev.ts));
    if (typeof ev.ts === "number") {
      const d = new Date(ev.ts);
      time.dateTime = d.toISOString();
      time.title = d.toLocaleString();
    }
    meta.appendChild(time);
    bubble.appendChild(meta);
    const text = node("div", "text");
    text.appendChild(linkified(typeof ev.text === "string" ? ev.text : ""));
    bubble.appendChild(text);
    li.appendChild(bubble);
    append(li);
  }

  function renderMembers() {
    el.members.replaceChildren();
    let named = 0;
    const me = session.self;
    const entries = Array.from(session.members.entries());
    // me first, then everyone else in join order
    entries.sort((a, b) => (b[0] === me) - (a[0] === me));
    for (const [name, n] of entries) {
      named += n;
      const li = node("li", "member");
      li.dataset.name = name;
      li.appendChild(avatar(name));
      li.appendChild(node("span", "member-name", name));
      if (name === me) li.appendChild(node("span", "you", "you"));
      if (n > 1) li.appendChild(node("span", "multi", "×" + n));
      el.members.appendChild(li);
    }
    const others = Math.max(0, session.count - named);
    el.membersMore.hidden = others === 0;
    // the server names at most 100 members; the rest, and anyone without a name, are counted
    el.membersMore.textContent = others === 0 ? "" : "+ " + others + (others === 1 ? " other" : " others");
    el.count.textContent = String(session.count);
    el.membersToggleCount.textContent = String(session.count);
  }

  function setStatus(state, text) {
    el.status.dataset.state = state;
    el.statusText.textContent = text;
    el.status.title = text;
    el.app.dataset.connection = state;
    const canSend = state === "connected";
    updateSend();
    el.text.placeholder = canSend ? "Message #" + session.room
      : state === "closed" ? "Not connected" : "Waiting for the connection…";
  }

  function setBanner(kind, text, showRetry) {
    if (!kind) {
      el.banner.hidden = true;
      el.banner.dataset.kind = "";
      return;
    }
    el.banner.hidden = false;
    el.banner.dataset.kind = kind;
    el.bannerText.textContent = text;
    el.retry.hidden = !showRetry;
    el.changeRoom.hidden = kind !== "closed";
  }

  // -- protocol ----------------------------------------------------------------------------

  function chatUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const params = new URLSearchParams();
    params.set("room", session.room);
    if (session.name) params.set("name", session.name); // never with a signed token
    if (session.token) params.set("token", session.token);
    if (session.epoch) {
      params.set("since", String(session.lastSeq));
      params.set("epoch", session.epoch);
    } else {
      params.set("since", "0"); // first join: show the room's recent history
    }
    const url = new URL("ws/chat?" + params.toString(), BASE);
    url.protocol = scheme;
    return url.toString();
  }

  function handleEvent(ev) {
    if (!ev || typeof ev !== "object") return;
    switch (ev.type) {
      case "welcome": return onWelcome(ev);
      case "message": return onMessage(ev);
      case "system": return onSystem(ev);
      case "ack": return onAck(ev);
      case "error": return onError(ev);
      default: return undefined;
    }
  }

  function onWelcome(ev) {
    const reconnect = session.wasEverOpen;
    session.restartedNow = false;
    if (session.epoch !== null && ev.epoch !== session.epoch) {
      // The room's sequence started again (e.g. the server restarted): old seqs mean
      // nothing now, so forget them or new messages would look like duplicates.
      session.seen.clear();
      session.lastSeq = 0;
      session.restartedNow = true;
      notice("restart", "The room's history restarted (the server was restarted). Messages sent while you were away may be missing.");
    }
    session.epoch = typeof ev.epoch === "string" ? ev.epoch : null;
    const limits = ev.limits && typeof ev.limits === "object" ? ev.limits : {};
    session.maxText = Number.isInteger(limits.text) && limits.text > 0 ? limits.text : null;
    session.members = new Map();
    for (const name of Array.isArray(ev.members) ? ev.members : []) {
      if (typeof name === "string") session.members.set(name, (session.members.get(name) || 0) + 1);
    }
    session.count = Number(ev.count) || 0;
    renderMembers();
    session.wasOpen = true;
    session.wasEverOpen = true;
    session.attempt = 0;
    clearTimeout(session.connectTimer);
    setStatus("connected", "Connected");
    setBanner(null);
    if (reconnect) notice("info", "Reconnected to #" + session.room + ".");
    awaitReplay(Number(ev.seq));
  }

  // What was sent but not confirmed before a drop is known once the resume's replay has
  // caught up with the welcome's seq: what it did not hold never reached the room.
  function awaitReplay(seq) {
    if (!session.unconfirmed.size) return;
    if (session.restartedNow || !session.resuming || !Number.isInteger(seq) || session.lastSeq >= seq) {
      settleUnconfirmed();
      return;
    }
    session.replayTo = seq;
    clearTimeout(session.settleTimer);
    session.settleTimer = setTimeout(settleUnconfirmed, SETTLE_TIMEOUT_MS);
  }

  function settleUnconfirmed() {
    clearTimeout(session.settleTimer);
    session.settleTimer = null;
    session.replayTo = null;
    const texts = Array.from(session.unconfirmed.values());
    session.unconfirmed.clear();
    if (!texts.length) return;
    giveBack(texts);
    notice("error", (texts.length === 1 ? "A message you sent was" : texts.length + " messages you sent were") +
      " not confirmed before the connection dropped and " + (texts.length === 1 ? "is" : "are") +
      " not in the room's history: back in the message box, to send again.", { error: "unsent" });
  }

  // Put refused or undelivered text back into the box, after whatever is being typed.
  function giveBack(texts) {
    const back = texts.filter((t) => typeof t === "string" && t.trim());
    if (!back.length) return;
    el.text.value = [el.text.value, ...back].filter((t) => t.trim()).join("\n");
    autosize();
    updateSend();
  }

  function onMessage(ev) {
    const seq = Number(ev.seq);
    if (!Number.isInteger(seq)) return;
    if (typeof ev.id === "string" && session.myIds.has(ev.id)) {
      session.unconfirmed.delete(ev.id); // it did arrive
      if (typeof ev.from === "string" && ev.from && ev.from !== session.self) {
        session.self = ev.from; // the server's word on who this page is
        renderMembers();
      }
    }
    if (session.replayTo !== null && seq >= session.replayTo) settleUnconfirmed();
    if (session.seen.has(seq)) return; // already shown in this epoch (resume overlap)
    session.seen.add(seq);
    if (session.seen.size > 4 * MAX_RENDERED) {
      // seqs only grow; forget the oldest ones
      const it = session.seen.values();
      for (let i = 0; i < MAX_RENDERED; i++) session.seen.delete(it.next().value);
    }
    if (seq > session.lastSeq) session.lastSeq = seq;
    if (typeof ev.id === "string") session.pending.delete(ev.id);
    renderMessage(ev);
  }

  function names(value) {
    return Array.isArray(value) ? value.filter((n) => typeof n === "string" && n) : [];
  }

  // "Ann", "Ann and Bob", "Ann, Bob and 3 others", "Someone", "5 people"
  function who(named, total) {
    const others = total - named.length;
    if (!named.length) return total === 1 ? "Someone" : total + " people";
    if (others > 0) return named.join(", ") + " and " + others + (others === 1 ? " other" : " others");
    return named.length === 1 ? named[0] : named.slice(0, -1).join(", ") + " and " + named[named.length - 1];
  }

  function onSystem(ev) {
    const name = typeof ev.name === "string" && ev.name ? ev.name : null;
    // what changed: a coalesced notice lists names and totals; a single-change one (older
    // servers) has only `event` and `name`
    const joined = Array.isArray(ev.joined) ? names(ev.joined) : ev.event === "join" && name ? [name] : [];
    const left = Array.isArray(ev.left) ? names(ev.left) : ev.event === "leave" && name ? [name] : [];
    const joins = typeof ev.joins === "number" ? ev.joins : ev.event === "join" ? 1 : 0;
    const leaves = typeof ev.leaves === "number" ? ev.leaves : ev.event === "leave" ? 1 : 0;
    if (Array.isArray(ev.members)) {
      session.members = new Map();
      for (const n of names(ev.members)) session.members.set(n, (session.members.get(n) || 0) + 1);
    } else {
      for (const n of joined) session.members.set(n, (session.members.get(n) || 0) + 1);
      for (const n of left) {
        const k = session.members.get(n) || 0;
        if (k <= 1) session.members.delete(n); else session.members.set(n, k - 1);
      }
    }
    if (typeof ev.count === "number") session.count = ev.count;
    renderMembers();
    const parts = [];
    if (joins > 0) parts.push(who(joined, joins) + " joined");
    if (leaves > 0) parts.push(who(left, leaves) + " left");
    if (parts.length) {
      notice("system", parts.join(", "), { event: String(ev.event || "") });
    } else if (typeof ev.message === "string") {
      notice("system", ev.message);
    }
  }

  function onAck(ev) {
    if (typeof ev.id === "string" && session.pending.has(ev.id)) {
      // the server handles a connection's frames in order: anything sent before this one
      // and still pending was refused without an error saying so
      const refused = [];
      for (const [id, sent] of session.pending) {
        session.pending.delete(id);
        if (id === ev.id) break;
        refused.push(sent.text);
      }
      if (refused.length) {
        giveBack(refused);
        notice("error", "The server did not take a message you sent: it is back in the message box.", { error: "unsent" });
      }
    }
  }

  function onError(ev) {
    if (ev.error === "history_gap") {
      // A fresh join asks for since=0 only to show recent history: a trimmed history is
      // not news then; after a restart the restart notice already says so.
      if (session.resuming && !session.restartedNow) {
        notice("gap", "Some messages may be missing: the room no longer has everything sent while you were disconnected.");
      }
      return;
    }
    if (["too_long", "rate_limited", "bad_id"].includes(ev.error)) {
      // a refusal names the message it answers; without an id, the oldest one waiting;
      // its text goes back into the box to be shortened or sent again
      const id = typeof ev.id === "string" && session.pending.has(ev.id)
        ? ev.id : session.pending.keys().next().value;
      if (id !== undefined) {
        giveBack([session.pending.get(id).text]);
        session.pending.delete(id);
      }
    }
    const last = el.messages.lastElementChild;
    if (ev.error === "rate_limited" && last && last.dataset.error === "rate_limited") {
      return; // one notice for a burst of refusals, not one per message
    }
    const known = ERROR_TEXT[ev.error];
    const text = known || "The server refused that";
    // the server's own words add the specifics (e.g. "message is 4200 characters; the limit
    // is 4000"); a rate-limit notice needs none
    const detail = ev.error !== "rate_limited" && typeof ev.message === "string" && ev.message
      ? (known ? " (" + ev.message + ")" : ": " + ev.message) : "";
    const back = ["too_long", "rate_limited"].includes(ev.error) ? " What was refused is back in the message box." : "";
    notice("error", text + detail + back, { error: String(ev.error || "") });
  }

  // -- connection lifecycle ----------------------------------------------------------------

  function connect() {
    clearTimers();
    if (!session.active) return;
    session.wasOpen = false;
    session.resuming = session.epoch !== null;
    setStatus(session.wasEverOpen ? "reconnecting" : "connecting",
      session.wasEverOpen ? "Reconnecting…" : "Connecting…");
    let ws;
    try {
      ws = new WebSocket(chatUrl(), [BATCH]);
    } catch (err) {
      scheduleReconnect("the address is not valid");
      return;
    }
    session.ws = ws;
    session.connectTimer = setTimeout(() => {
      if (session.ws === ws && !session.wasOpen) ws.close(); // handshake stalled
    }, CONNECT_TIMEOUT_MS);

    ws.onmessage = (e) => {
      if (session.ws !== ws || typeof e.data !== "string") return;
      const lines = ws.protocol === BATCH ? e.data.split("\n") : [e.data];
      for (const line of lines) {
        if (!line) continue;
        let ev;
        try {
          ev = JSON.parse(line);
        } catch (err) {
          continue;
        }
        handleEvent(ev);
      }
    };
    ws.onclose = (e) => {
      if (session.ws !== ws) return;
      session.ws = null;
      clearTimeout(session.connectTimer);
      onClosed(e.code, e.reason);
    };
  }

  function describeClose(code, reason) {
    const known = CLOSE_CODES[code];
    let text = known ? known[0] : "the connection closed (code " + code + ")";
    if (!session.wasOpen && (code === 1006 || code === 1000) && !reason) text = "the server can't be reached";
    if (reason && (code === 4400 || !known)) text += ": " + reason;
    return { text, reconnect: known ? known[1] : true };
  }

  function onClosed(code, reason) {
    const { text, reconnect } = describeClose(code, reason);
    const hadSession = session.wasOpen;
    session.wasOpen = false;
    if (!session.active) return;
    if (hadSession) {
      notice("disconnect", "Disconnected: " + text + ".", { code: String(code) });
    }
    // a replay cut short says nothing: the next welcome starts the wait again
    clearTimeout(session.settleTimer);
    session.settleTimer = null;
    session.replayTo = null;
    if (code === 1009) refusedAsTooLarge();
    if (session.pending.size) {
      // sent, but neither acked nor seen: the server may or may not have it. A resume
      // tells which (awaitReplay); without one, the text goes back into the box now.
      for (const [id, sent] of session.pending) session.unconfirmed.set(id, sent.text);
      session.pending.clear();
      const n = session.unconfirmed.size;
      if (reconnect && session.epoch !== null) {
        notice("error", (n === 1 ? "A message you sent was" : n + " messages you sent were") +
          " not confirmed before the connection dropped: once reconnected, " +
          (n === 1 ? "it is shown if it arrived, or put back in the message box." :
            "those that arrived are shown, the others put back in the message box."),
          { error: "unconfirmed" });
      }
    }
    const givenBack = !reconnect || session.epoch === null ? giveBackUnconfirmed() : 0;
    if (givenBack) {
      notice("error", (givenBack === 1 ? "A message you sent was" : givenBack + " messages you sent were") +
        " not confirmed before the connection closed: back in the message box (" +
        (givenBack === 1 ? "it" : "they") + " may have reached the room).", { error: "unsent" });
    }
    if (code === 4400 || code === 4403) {
      // bad room or name, or a room the token does not grant: let the user choose again
      stop();
      showJoin("Can't join: " + (reason || text) + ".");
      return;
    }
    if (code === 4001) {
      // the server wants a (better) token: back to the sign-in step, saying why
      stop();
      forgetToken();
      showJoin(signInReason(reason), { signIn: true });
      return;
    }
    if (!reconnect) {
      session.active = false;
      setStatus("closed", "Closed: " + text);
      setBanner("closed", "Closed: " + text + ".", code === 4003);
      return;
    }
    scheduleReconnect(text);
  }

  // Hypercorn closes with 1009 on a frame over its websocket_max_message_size: the biggest
  // frame still waiting was it. Its text goes back into the box, and the page's idea of the
  // frame limit comes down below it, so that the draft is refused here next time.
  function refusedAsTooLarge() {
    let biggest = null;
    for (const [id, sent] of session.pending) if (!biggest || sent.bytes > biggest[1].bytes) biggest = [id, sent];
    if (!biggest) return;
    session.pending.delete(biggest[0]);
    session.frameLimit = Math.min(session.frameLimit, biggest[1].bytes - 1);
    giveBack([biggest[1].text]);
    notice("error", "The server refused a message as too large (" + NUMBER.format(biggest[1].bytes) +
      " bytes): it is back in the message box.", { error: "too_large" });
  }

  // Unconfirmed text when no resume will tell whether it arrived (the page leaves the
  // room, or will not reconnect): back into the box, since it may not have arrived.
  function giveBackUnconfirmed() {
    clearTimeout(session.settleTimer);
    session.settleTimer = null;
    session.replayTo = null;
    for (const [id, sent] of session.pending) session.unconfirmed.set(id, sent.text);
    session.pending.clear();
    const texts = Array.from(session.unconfirmed.values());
    session.unconfirmed.clear();
    giveBack(texts);
    return texts.length;
  }

  function scheduleReconnect(reason) {
    const exp = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** session.attempt);
    const delay = exp / 2 + Math.random() * (exp / 2); // "equal jitter"
    session.attempt = Math.min(session.attempt + 1, 20);
    session.dropReason = reason;
    session.retryAt = Date.now() + delay;
    session.retryTimer = setTimeout(connect, delay);
    const tick = () => {
      const secs = Math.max(1, Math.ceil((session.retryAt - Date.now()) / 1000));
      setStatus("reconnecting", "Reconnecting in " + secs + "s");
      setBanner("reconnecting", capitalise(reason) + ". Reconnecting in " + secs + "s…", true);
    };
    tick();
    session.countdownTimer = setInterval(tick, 250);
  }

  function capitalise(s) {
    return s ? s[0].toUpperCase() + s.slice(1) : s;
  }

  function clearTimers() {
    clearTimeout(session.retryTimer);
    clearInterval(session.countdownTimer);
    clearTimeout(session.connectTimer);
    session.retryTimer = session.countdownTimer = session.connectTimer = null;
  }

  function retryNow() {
    if (session.ws) return;
    session.active = true;
    session.attempt = 0;
    setBanner(null);
    connect();
  }

  function stop() {
    session.active = false;
    clearTimers();
    giveBackUnconfirmed();
    const ws = session.ws;
    session.ws = null;
    if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000, "left");
  }

  // -- views -------------------------------------------------------------------------------

  function enterRoom(room, name, token) {
    // a signed token's name is the one the server uses: ?name= would be ignored
    const signedAs = tokenName(token);
    if (signedAs) name = null;
    session.room = room;
    session.name = name;
    session.self = signedAs || name;
    session.token = token;
    session.epoch = null;
    session.lastSeq = 0;
    session.seen = new Set();
    session.members = new Map();
    session.count = 0;
    giveBackUnconfirmed();
    session.wasEverOpen = false;
    session.attempt = 0;
    session.active = true;
    el.messages.replaceChildren();
    el.roomName.textContent = room;
    el.roomTitle.hidden = false;
    el.join.hidden = true;
    el.chat.hidden = false;
    el.membersToggle.hidden = false;
    el.app.dataset.view = "chat";
    document.title = "#" + room + " · roomcast";
    renderMembers();
    setBanner(null);

    const params = new URLSearchParams(location.search);
    params.set("room", room);
    if (name) params.set("name", name); else params.delete("name");
    history.replaceState(null, "", location.pathname + "?" + params.toString());
    try {
      if (name) localStorage.setItem("roomcast.name", name);
    } catch (err) { /* storage may be disabled */ }

    connect();
    // on a phone, focusing would throw the keyboard over the conversation
    if (!window.matchMedia("(pointer: coarse)").matches) el.text.focus();
  }

  // -- tokens: from the URL fragment (never sent to a server) or the sign-in step, kept in
  // sessionStorage (this tab only), sent as ?token= on the WebSocket URL, never shown in
  // the address bar.

  const TOKEN_KEY = "roomcast.token";

  function storedToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY);
    } catch (err) {
      return null;
    }
  }

  function keepToken(token) {
    session.token = token || null;
    try {
      if (token) sessionStorage.setItem(TOKEN_KEY, token); else sessionStorage.removeItem(TOKEN_KEY);
    } catch (err) { /* storage may be disabled: the token lives in memory only */ }
  }

  function forgetToken() {
    keepToken(null);
  }

  // The display name a signed token (a JWT) gives, as the server derives it (its "name"
  // claim, else "sub"; NFKC, whitespace collapsed); null for any other token. Read for
  // display only: the server verifies the token.
  function tokenName(token) {
    const parts = typeof token === "string" ? token.split(".") : [];
    if (parts.length !== 3) return null;
    try {
      const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
      const bytes = Uint8Array.from(atob(b64 + "===".slice((b64.length + 3) % 4)), (c) => c.charCodeAt(0));
      const claims = JSON.parse(new TextDecoder().decode(bytes));
      if (!claims || typeof claims.sub !== "string") return null;
      const raw = typeof claims.name === "string" ? claims.name : Array.from(claims.sub).slice(0, MAX_NAME).join("");
      return raw.normalize("NFKC").split(/\s+/).filter(Boolean).join(" ") || null;
    } catch (err) {
      return null;
    }
  }

  // The join form with a signed token: its name replaces the "Display name" field.
  function showIdentity() {
    const signedAs = el.signin.hidden ? null : tokenName(el.tokenInput.value.trim());
    el.nameLabel.hidden = el.nameInput.hidden = Boolean(signedAs);
    el.signedAs.hidden = !signedAs;
    el.signedAs.textContent = signedAs ? "You will appear as " + signedAs + ", the name in your token." : "";
  }

  function signInReason(reason) {
    if (reason === "token expired") return "Your sign-in has expired. Paste a new token to continue.";
    if (!reason || reason === "missing token" || reason === "missing or invalid token") {
      return "This server asks who you are: paste your access token to join.";
    }
    return "The server refused your token (" + reason + "). Paste a valid one.";
  }

  function showJoin(error, options) {
    el.app.dataset.view = "join";
    el.join.hidden = false;
    el.chat.hidden = true;
    el.roomTitle.hidden = true;
    el.membersToggle.hidden = true;
    closeDrawer();
    document.title = "roomcast";
    setStatus("idle", "Not connected");
    if (session.room) el.roomInput.value = session.room;
    if (session.name) el.nameInput.value = session.name;
    el.joinError.hidden = !error;
    el.joinError.textContent = error || "";
    // the token field shows the token this tab keeps (masked), or nothing when none is kept:
    // submitting it empty signs out
    const signIn = Boolean(options && options.signIn);
    if (signIn || session.token) el.signin.hidden = false;
    el.tokenInput.value = session.token || "";
    showIdentity();
    (signIn ? el.tokenInput : el.roomInput).focus();
  }

  function validate(room, name) {
    if (!ROOM_RE.test(room)) return "Room names are 1–64 letters, digits, “_”, “-” or “.”.";
    if (name && (Array.from(name).length > MAX_NAME || /[\u0000-\u001f\u007f]/.test(name))) {
      return "Names are at most " + MAX_NAME + " printable characters.";
    }
    return null;
  }

  function openDrawer() {
    el.app.classList.add("drawer-open");
    el.scrim.hidden = false;
    el.membersToggle.setAttribute("aria-expanded", "true");
  }

  function closeDrawer() {
    el.app.classList.remove("drawer-open");
    el.scrim.hidden = true;
    el.membersToggle.setAttribute("aria-expanded", "false");
  }

  // -- composer ----------------------------------------------------------------------------

  function autosize() {
    el.text.style.height = "auto";
    el.text.style.height = Math.min(el.text.scrollHeight, 160) + "px";
    if (following) scrollToBottom();
  }

  // Why the server would refuse this draft, or null. The frame is measured as it would be
  // sent (JSON, UTF-8); a draft being typed is measured with an id of the usual length.
  function draftProblem(text, frame) {
    if (session.maxText !== null) {
      const chars = characters(text);
      if (chars > session.maxText) {
        return "too long: " + NUMBER.format(chars) + " of " + NUMBER.format(session.maxText) + " characters";
      }
    }
    const bytes = UTF8.encode(frame || JSON.stringify({ text, id: newId() })).length;
    if (bytes > session.frameLimit) {
      return "too long: " + NUMBER.format(bytes) + " of " + NUMBER.format(session.frameLimit) + " bytes";
    }
    return null;
  }

  function showDraftProblem(problem) {
    el.draftHint.hidden = !problem;
    el.draftHint.textContent = problem ? "This message is " + problem + ". Shorten it to send." : "";
    if (problem) el.text.setAttribute("aria-invalid", "true"); else el.text.removeAttribute("aria-invalid");
  }

  function updateSend() {
    const problem = el.text.value.trim() ? draftProblem(el.text.value) : null;
    showDraftProblem(problem);
    el.send.disabled = el.status.dataset.state !== "connected" || !el.text.value.trim() || Boolean(problem);
  }

  function sendMessage() {
    const text = el.text.value;
    const ws = session.ws;
    if (!text.trim() || !ws || ws.readyState !== WebSocket.OPEN || !session.wasOpen) return;
    const id = newId();
    const frame = JSON.stringify({ text, id });
    const problem = draftProblem(text, frame);
    if (problem) {
      showDraftProblem(problem); // and the draft stays in the box
      return;
    }
    session.myIds.add(id);
    if (session.myIds.size > 2000) session.myIds.delete(session.myIds.values().next().value);
    session.pending.set(id, { text, bytes: UTF8.encode(frame).length });
    ws.send(frame);
    el.text.value = "";
    autosize();
    updateSend();
    scrollToBottom();
  }

  // -- wiring ------------------------------------------------------------------------------

  el.joinForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const room = el.roomInput.value.trim() || "general";
    const token = el.signin.hidden ? session.token : el.tokenInput.value.trim() || null;
    const name = tokenName(token) ? null : el.nameInput.value.trim() || null;
    const problem = validate(room, name);
    if (problem) {
      el.joinError.textContent = problem;
      el.joinError.hidden = false;
      return;
    }
    keepToken(token);
    enterRoom(room, name, session.token);
  });

  el.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    sendMessage();
  });

  el.text.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      sendMessage();
    }
  });

  el.tokenInput.addEventListener("input", showIdentity);

  el.text.addEventListener("input", () => {
    autosize();
    updateSend();
  });

  el.retry.addEventListener("click", retryNow);
  const leave = () => {
    stop();
    showJoin(null);
    const params = new URLSearchParams(location.search);
    params.delete("room");
    history.replaceState(null, "", location.pathname + (params.toString() ? "?" + params : ""));
  };
  el.leave.addEventListener("click", leave);
  el.changeRoom.addEventListener("click", leave);
  el.membersToggle.addEventListener("click", () => {
    if (el.app.classList.contains("drawer-open")) closeDrawer(); else openDrawer();
  });
  el.scrim.addEventListener("click", closeDrawer);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") closeDrawer();
  });

  // Waiting out a backoff is pointless once the network is back or the tab is looked at.
  const hurry = () => {
    if (session.active && !session.ws && session.retryTimer) retryNow();
  };
  window.addEventListener("online", hurry);
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") hurry();
  });

  // -- start -------------------------------------------------------------------------------

  const query = new URLSearchParams(location.search);
  const fragment = new URLSearchParams(location.hash.slice(1));
  const handedToken = fragment.get("token") || query.get("token");
  if (handedToken) {
    // take it, then take it out of the address bar (and history) at once
    keepToken(handedToken);
    fragment.delete("token");
    query.delete("token");
    const rest = fragment.toString();
    history.replaceState(null, "", location.pathname + (query.toString() ? "?" + query : "") +
      (rest ? "#" + rest : ""));
  } else {
    session.token = storedToken();
  }
  let storedName = null;
  try {
    storedName = localStorage.getItem("roomcast.name");
  } catch (err) { /* ignore */ }
  el.roomInput.value = query.get("room") || "general";
  el.nameInput.value = query.get("name") || storedName || "";

  if (query.has("room") || query.has("name")) {
    const room = (query.get("room") || "general").trim() || "general";
    const name = tokenName(session.token) ? null : (query.get("name") || "").trim() || null;
    const problem = validate(room, name);
    if (problem) showJoin(problem); else enterRoom(room, name, session.token);
  } else {
    showJoin(null);
  }

  // for tests and debugging
  window.roomcast = { session, stop, retryNow, get following() { return following; } };
})();
