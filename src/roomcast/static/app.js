// roomcast browser client: no build step, no dependencies.
//
// Protocol v2 (SPEC.md §9): ONE WebSocket to <prefix>/ws?name=[&token=], offering the
// "roomcast.batch" subprotocol (one or more newline-separated JSON events per frame when
// the server agrees, one event per frame otherwise). The page joins rooms over it with
// {"type":"join","room":R[,"since","epoch"]}; every server event names its room. A room's
// past is read in pages ({"type":"history","room","before","limit","id"}, SPEC §11): the
// newest page after the first welcome, earlier ones as the reader scrolls to the top (the
// scroll position kept, each page's messages put above the oldest one shown, so nothing
// is shown twice), until the server says there is no more ("the beginning of #room").
// Each room keeps its own resume state: messages are deduplicated by seq within the room's epoch, and
// a reconnect joins every room again with its own since/epoch, so nothing is shown twice
// and nothing missed is lost. A welcome with a new epoch means the room's sequence
// restarted. Presence notices are coalesced by the server (README, "Presence"): one
// `system` event can report several joins and leaves, and its `count` and `members` are
// the room as it is now, so the member list is replaced with them rather than patched.
//
// Direct messages are the room dm:A:B (A < B, the two verified user ids): the member list
// gives each member's user id (`people` in welcome and presence notices), so a signed-in
// member has a "Message" button beside every other signed-in member. Opening one tells the
// other user's pages (a `notice` whose data is {"roomcast": "dm", room, user, name}): they
// join the conversation and mark it new in their room list, without switching to it.
//
// Everything user-supplied is rendered with textContent, never as HTML (links in messages
// are <a> elements built from the text, their href only ever http: or https:).
//
// A draft is never dropped: each room keeps its own draft while another is in view; the
// page refuses one the server would refuse (welcome.limits says the longest text;
// FRAME_LIMIT the largest frame) and keeps it in the box; a message the server refuses, or
// that was not confirmed when the connection dropped and is not in the resumed history, is
// put back into its room's box.

"use strict";

(() => {
  // The server's address, mount prefix included: this script is <prefix>/static/app.js.
  const BASE = new URL("../", document.currentScript.src);
  const BATCH = "roomcast.batch";
  const ROOM_RE = /^[A-Za-z0-9_.\-]{1,64}$/;
  const DM_RE = /^dm:([^:]+):([^:]+)$/;
  const MAX_NAME = 32;
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_CAP_MS = 10000;
  const CONNECT_TIMEOUT_MS = 10000;
  const MAX_RENDERED = 500; // messages kept in the DOM, per room, while following the end
  const PAGE_SIZE = 50; // messages per scrollback page
  const LOAD_EARLIER_PX = 120; // this close to the top of a room's list, load earlier messages
  const PAGE_RETRY_MS = 1000; // after a page was refused (its rate limit) or lost
  // Hypercorn's websocket_max_message_size as roomcast runs it (hypercorn.toml): a bigger
  // frame is closed with 1009. The app cannot know the server's real value when mounted
  // elsewhere; a 1009 lowers the page's idea of it.
  const FRAME_LIMIT = 65536;
  const SETTLE_TIMEOUT_MS = 5000; // most a resume's replay may take to show what arrived
  const URL_RE = /\bhttps?:\/\/[^\s<>"'`]+/gi;
  const GROUP_WINDOW_MS = 5 * 60 * 1000;
  // The server relays at most one typing event a second per member and room, and drops
  // (does not delay) one that comes sooner: a little more than a second apart, so that
  // network jitter does not make one look early.
  const TYPING_EVERY_MS = 1100;
  const TYPING_SHOWN_MS = 3000; // "X is typing" lasts this long after their last event
  const ROOMS_KEY = "roomcast.rooms";
  const TOKEN_KEY = "roomcast.token";

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
    not_member: "You are not in this room any more.",
  };

  // a join refused for a reason that waiting will not change: the room is dropped
  const JOIN_REFUSED = new Set(["forbidden", "bad_room", "name_taken", "too_many_rooms"]);
  // a join refused for now: the room stays, with a banner and "Retry now"
  const JOIN_LATER = new Set(["room_full", "unavailable"]);

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
    roomSigil: $("room-sigil"),
    roomName: $("room-name"),
    status: $("status"),
    statusText: $("status-text"),
    banner: $("banner"),
    bannerText: $("banner-text"),
    retry: $("retry"),
    changeRoom: $("change-room"),
    conversation: document.querySelector(".conversation"),
    messages: $("messages"), // the list of the room in view (each room has its own)
    typing: $("typing"),
    composer: $("composer"),
    text: $("text"),
    draftHint: $("draft-hint"),
    send: $("send"),
    members: $("members"),
    membersMore: $("members-more"),
    dmHint: $("dm-hint"),
    count: $("count"),
    membersToggle: $("members-toggle"),
    membersToggleCount: $("members-toggle-count"),
    roomsToggle: $("rooms-toggle"),
    roomsToggleUnread: $("rooms-toggle-unread"),
    roomsPane: $("rooms-pane"),
    roomList: $("rooms"),
    dmList: $("dms"),
    dmsHead: $("dms-head"),
    addRoomForm: $("add-room-form"),
    addRoomInput: $("add-room-input"),
    addRoomError: $("add-room-error"),
    sidebar: $("sidebar"),
    scrim: $("scrim"),
    leave: $("leave"),
  };

  // -- state -------------------------------------------------------------------------------

  // The connection, shared by every room.
  const session = {
    name: null, // the name asked for with ?name= (null with a signed token: its name wins)
    self: null, // the name this page appears as
    user: null, // the verified user id of a signed token (sub), null when anonymous
    token: null,
    ws: null,
    active: false, // the user wants to be connected (in some room)
    wasOpen: false, // the current socket opened
    wasEverOpen: false, // some socket of this visit opened
    attempt: 0, // reconnect attempts since the last open
    retryTimer: null,
    countdownTimer: null,
    connectTimer: null,
    retryAt: 0,
    dropReason: "",
    myIds: new Set(),
    pending: new Map(), // id -> {room, text, bytes} of sent messages not yet acked or seen
    frameLimit: FRAME_LIMIT,
    current: null, // the room in view
    // the current room's resume state and limit, under the names one-room tests know
    get epoch() { return session.current ? session.current.epoch : null; },
    get maxText() { return session.current ? session.current.maxText : null; },
    set maxText(value) { if (session.current) session.current.maxText = value; },
  };

  const rooms = new Map(); // name -> room state, in the order joined
  const userNames = new Map(); // verified user id -> display name last seen
  const typingSent = new Map(); // room name -> when this page last sent `typing` there

  function newRoom(name) {
    const dm = dmPeer(name);
    const list = node("ol", "messages");
    list.setAttribute("aria-live", "polite");
    list.setAttribute("aria-relevant", "additions");
    const room = {
      name,
      dm, // the other user's id in a direct-message room
      state: "idle", // idle | joining | joined | waiting (refused for now) | left
      everJoined: false, // some welcome reached this page in this visit
      epoch: null,
      lastSeq: 0,
      seen: new Set(),
      resuming: false, // the current join asked for since/epoch of a previous run
      restartedNow: false, // this join's welcome showed a new epoch
      historyTo: 0, // seqs up to this one were history when first joined: not unread
      members: new Map(), // display name -> how many members use it
      count: 0,
      users: new Map(), // display name -> verified user id, as learned from events
      unconfirmed: new Map(), // id -> text: sent before a drop, not confirmed
      replayTo: null,
      settleTimer: null,
      maxText: null,
      unread: 0,
      opened: false, // the other user opened this conversation and it was not looked at yet
      draft: "",
      typing: new Map(), // user id or name -> {name, until}
      problem: null, // {text, retry} while refused
      list,
      following: true,
      pageId: null, // the history request waiting for its page, if any
      pageRetry: null, // timer: ask again after a refusal
      beginning: false, // the list shows the room's first message (no more to load)
    };
    // Whether the list follows new messages: true until the reader scrolls up, and again
    // once they scroll back down. Decided by the reader's scrolling, not re-measured when
    // a message arrives: a growing message box shrinks the list and would otherwise look
    // like "scrolled up".
    list.addEventListener("scroll", () => {
      room.following = nearBottom(list);
      if (list.scrollTop < LOAD_EARLIER_PX) loadEarlier(room);
    });
    new ResizeObserver(() => { if (room.following) scrollToBottom(list); }).observe(list);
    return room;
  }

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

  function nearBottom(list) {
    return list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  }

  function scrollToBottom(list) {
    list.scrollTop = list.scrollHeight;
  }

  // Add an item at the end. While the reader follows the end, the list keeps at most
  // MAX_RENDERED items (scrolled-back pages stay while they read them; what is dropped
  // from the top is loaded again if they scroll back up).
  function append(room, item) {
    const list = room.list;
    list.appendChild(item);
    if (!room.following) return;
    while (list.childElementCount > MAX_RENDERED) {
      if (list.firstElementChild.dataset.kind === "beginning") room.beginning = false;
      list.firstElementChild.remove();
    }
    scrollToBottom(list);
  }

  function capitalise(s) {
    return s ? s[0].toUpperCase() + s.slice(1) : s;
  }

  // The other user of a direct-message room this page's user is in, else null.
  function dmPeer(name) {
    const match = DM_RE.exec(name);
    if (!match || !(match[1] < match[2])) return null;
    if (session.user === match[1]) return match[2];
    if (session.user === match[2]) return match[1];
    return match[1] === match[2] ? null : match[2];
  }

  function dmRoom(a, b) {
    return a < b ? "dm:" + a + ":" + b : "dm:" + b + ":" + a;
  }

  function validRoom(name) {
    return ROOM_RE.test(name) || DM_RE.test(name);
  }

  // What the room is called on the page: "#lobby", or the other person's name for a DM.
  function title(room) {
    if (!room.dm) return room.name;
    for (const name of room.members.keys()) if (name !== session.self) return name;
    return userNames.get(room.dm) || storedDmName(room.name) || room.dm;
  }

  // -- rendering ---------------------------------------------------------------------------

  function notice(room, kind, text, extra) {
    if (!room) return null;
    const li = node("li", "notice " + kind);
    li.dataset.kind = kind;
    if (extra) for (const [k, v] of Object.entries(extra)) li.dataset[k] = v;
    li.appendChild(node("span", "notice-text", text));
    append(room, li);
    return li;
  }

  function renderMessage(room, ev) {
    append(room, messageItem(room, ev, room.list.lastElementChild));
  }

  // A message's list item; `prev` is the item it will follow (for grouping).
  function messageItem(room, ev, prev) {
    const sender = typeof ev.from === "string" && ev.from ? ev.from : null;
    const mine = typeof ev.id === "string" && session.myIds.has(ev.id);
    const li = node("li", "message" + (mine ? " mine" : ""));
    li.dataset.seq = String(ev.seq);
    li.dataset.epoch = room.epoch || "";
    li.dataset.from = sender || "";
    li.dataset.ts = String(ev.ts || "");
    if (typeof ev.id === "string") li.dataset.id = ev.id;

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
    return li;
  }

  // -- scrollback ----------------------------------------------------------------------------

  // The oldest message shown of the room's current run, or null.
  function earliestShown(room) {
    const first = room.list.querySelector("li.message");
    return first && first.dataset.epoch === (room.epoch || "") ? Number(first.dataset.seq) : null;
  }

  // Ask for the page before the oldest message shown (the newest page when none is), unless
  // one is on its way, the beginning is shown, or the top of the list is an earlier run.
  function loadEarlier(room) {
    if (room.pageId !== null || room.beginning || room.state !== "joined" || !room.epoch) return;
    const first = room.list.querySelector("li.message");
    if (first && first.dataset.epoch !== room.epoch) return;
    clearTimeout(room.pageRetry);
    room.pageRetry = null;
    const before = first ? Number(first.dataset.seq) : room.lastSeq + 1;
    if (before <= 1) return showBeginning(room);
    const id = "page-" + newId();
    if (sendCommand({ type: "history", room: room.name, before, limit: PAGE_SIZE, id })) room.pageId = id;
  }

  function onHistory(room, ev) {
    if (ev.id !== room.pageId) return; // an answer to a request given up (a drop, a restart)
    room.pageId = null;
    if (ev.epoch !== room.epoch) return; // another run of the room: its seqs are not ours
    const shown = earliestShown(room);
    const earlier = (Array.isArray(ev.messages) ? ev.messages : []).filter((m) =>
      m && Number.isInteger(m.seq) && (shown === null ? m.seq <= room.lastSeq : m.seq < shown));
    prependMessages(room, earlier);
    if (!ev.more) showBeginning(room);
    else if (wantsEarlier(room)) loadEarlier(room); // the view is not full yet
  }

  // Whether the room in view shows the top of its list (a list not in view has no layout:
  // it is filled when shown).
  function wantsEarlier(room) {
    return room === session.current && room.list.scrollTop < LOAD_EARLIER_PX;
  }

  // Put a page (seq order) above what is shown, keeping what the reader looks at in place.
  function prependMessages(room, messages) {
    if (!messages.length) return;
    const list = room.list;
    const fromBottom = list.scrollHeight - list.scrollTop;
    const fragment = document.createDocumentFragment();
    let prev = null;
    for (const ev of messages) {
      learnUser(room, ev.from, ev.user);
      prev = messageItem(room, ev, prev);
      fragment.appendChild(prev);
    }
    const next = list.firstElementChild;
    list.insertBefore(fragment, next);
    // (measured before: a message that now continues the page's last one loses its header
    // line, and its text stays where the reader saw it)
    if (next && next.classList.contains("message") && next.dataset.from === prev.dataset.from &&
        next.classList.contains("mine") === prev.classList.contains("mine") &&
        Math.abs(Number(next.dataset.ts) - Number(prev.dataset.ts)) < GROUP_WINDOW_MS) {
      next.classList.add("cont");
    }
    if (room.following) scrollToBottom(list);
    else list.scrollTop = list.scrollHeight - fromBottom;
  }

  function showBeginning(room) {
    room.beginning = true;
    if (room.list.firstElementChild && room.list.firstElementChild.dataset.kind === "beginning") return;
    const li = node("li", "notice beginning");
    li.dataset.kind = "beginning";
    li.appendChild(node("span", "notice-text", "This is the beginning of " + (room.dm ? "your conversation with " + title(room) : "#" + room.name) + "."));
    const list = room.list;
    const fromBottom = list.scrollHeight - list.scrollTop;
    list.insertBefore(li, list.firstElementChild);
    if (room.following) scrollToBottom(list);
    else list.scrollTop = list.scrollHeight - fromBottom;
  }

  // A page refused (its rate limit, an outage) or lost with the connection: ask again later.
  function retryEarlier(room) {
    room.pageId = null;
    clearTimeout(room.pageRetry);
    room.pageRetry = setTimeout(() => {
      room.pageRetry = null;
      if (wantsEarlier(room)) loadEarlier(room);
    }, PAGE_RETRY_MS);
  }

  function renderMembers() {
    const room = session.current;
    el.members.replaceChildren();
    if (!room) return;
    let named = 0;
    const me = session.self;
    const entries = Array.from(room.members.entries());
    // me first, then everyone else in join order
    entries.sort((a, b) => (b[0] === me) - (a[0] === me));
    let unknownUsers = 0;
    for (const [name, n] of entries) {
      named += n;
      const li = node("li", "member");
      li.dataset.name = name;
      li.appendChild(avatar(name));
      li.appendChild(node("span", "member-name", name));
      if (name === me) li.appendChild(node("span", "you", "you"));
      if (n > 1) li.appendChild(node("span", "multi", "×" + n));
      const user = room.users.get(name);
      if (name !== me && !room.dm && session.user) {
        if (user && user !== session.user) {
          const button = node("button", "dm-button", "Message");
          button.type = "button";
          button.dataset.user = user;
          button.title = "Direct message " + name;
          button.addEventListener("click", () => openDm(user, name));
          li.appendChild(button);
        } else if (!user) {
          unknownUsers++;
        }
      }
      el.members.appendChild(li);
    }
    const others = Math.max(0, room.count - named);
    el.membersMore.hidden = others === 0;
    // the server names at most 100 members; the rest, and anyone without a name, are counted
    el.membersMore.textContent = others === 0 ? "" : "+ " + others + (others === 1 ? " other" : " others");
    el.count.textContent = String(room.count);
    el.membersToggleCount.textContent = String(room.count);
    // direct messages are between verified users: say why there is no "Message" button
    let hint = "";
    if (room.dm) hint = "";
    else if (!session.user) hint = "Sign in with a token to send direct messages.";
    else if (unknownUsers) hint = "Members who are not signed in cannot get direct messages.";
    el.dmHint.hidden = !hint;
    el.dmHint.textContent = hint;
  }

  function renderRoomList() {
    const lists = { rooms: [], dms: [] };
    for (const room of rooms.values()) {
      const li = node("li", "room-item" + (room === session.current ? " current" : ""));
      li.dataset.room = room.name;
      li.dataset.state = room.state;
      const button = node("button", "room-link");
      button.type = "button";
      if (room === session.current) button.setAttribute("aria-current", "page");
      if (room.dm) button.appendChild(avatar(title(room)));
      else button.appendChild(node("span", "hash", "#"));
      button.appendChild(node("span", "room-label", title(room)));
      if (room.unread) {
        const badge = node("span", "unread", room.unread > 99 ? "99+" : room.unread);
        badge.title = room.unread + " unread";
        button.appendChild(badge);
      } else if (room.opened) {
        const badge = node("span", "unread", "new");
        badge.title = title(room) + " started this conversation";
        button.appendChild(badge);
      }
      button.addEventListener("click", () => { showRoom(room); closeDrawer(); });
      li.appendChild(button);
      (room.dm ? lists.dms : lists.rooms).push(li);
    }
    el.roomList.replaceChildren(...lists.rooms);
    el.dmList.replaceChildren(...lists.dms);
    el.dmsHead.hidden = lists.dms.length === 0;
    // (a conversation someone opened, with nothing in it yet, counts as one)
    const unread = Array.from(rooms.values()).reduce((sum, room) => sum + (room.unread || (room.opened ? 1 : 0)), 0);
    el.roomsToggleUnread.hidden = unread === 0;
    el.roomsToggleUnread.textContent = unread > 99 ? "99+" : String(unread);
    const here = session.current;
    document.title = (unread ? "(" + unread + ") " : "") +
      (here ? (here.dm ? title(here) : "#" + here.name) + " · " : "") + "roomcast";
  }

  function renderTitle() {
    const room = session.current;
    if (!room) return;
    el.roomSigil.textContent = room.dm ? "@" : "#";
    el.roomName.textContent = title(room);
  }

  function renderTyping() {
    const room = session.current;
    const now = Date.now();
    const names = [];
    if (room) {
      for (const [key, typing] of room.typing) {
        if (typing.until <= now) room.typing.delete(key); else names.push(typing.name || "Someone");
      }
    }
    let text = "";
    if (names.length === 1) text = names[0] + " is typing…";
    else if (names.length === 2) text = names[0] + " and " + names[1] + " are typing…";
    else if (names.length > 2) text = "Several people are typing…";
    if (el.typing.textContent !== text) el.typing.textContent = text;
  }
  setInterval(renderTyping, 500);

  function setStatus(state, text) {
    el.status.dataset.state = state;
    el.statusText.textContent = text;
    el.status.title = text;
    el.app.dataset.connection = state;
    updateComposer();
  }

  function updateComposer() {
    const room = session.current;
    updateSend();
    const connected = el.status.dataset.state === "connected";
    el.text.placeholder = connected && room && room.state === "joined"
      ? "Message " + (room.dm ? title(room) : "#" + room.name)
      : el.status.dataset.state === "closed" ? "Not connected" : "Waiting for the connection…";
  }

  // The banner says what is wrong with the connection, or else with the room in view.
  function renderBanner() {
    const room = session.current;
    if (el.banner.dataset.kind === "reconnecting" || el.banner.dataset.kind === "connection") return;
    if (room && room.problem) setBanner("closed", room.problem.text, room.problem.retry, "room");
    else setBanner(null);
  }

  function setBanner(kind, text, showRetry, owner) {
    if (!kind) {
      el.banner.hidden = true;
      el.banner.dataset.kind = "";
      return;
    }
    el.banner.hidden = false;
    el.banner.dataset.kind = owner === "room" ? "room" : kind === "closed" ? "connection" : kind;
    el.banner.dataset.style = kind;
    el.bannerText.textContent = text;
    el.retry.hidden = !showRetry;
    el.changeRoom.hidden = kind !== "closed";
  }

  function clearConnectionBanner() {
    if (el.banner.dataset.kind !== "room") el.banner.dataset.kind = "";
    renderBanner();
  }

  // -- protocol ----------------------------------------------------------------------------

  function chatUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const params = new URLSearchParams();
    if (session.name) params.set("name", session.name); // never with a signed token
    if (session.token) params.set("token", session.token);
    const query = params.toString();
    const url = new URL("ws" + (query ? "?" + query : ""), BASE);
    url.protocol = scheme;
    return url.toString();
  }

  function sendCommand(command) {
    const ws = session.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(command));
    return true;
  }

  // Join (or, after a drop, rejoin) a room: since/epoch resume its own run; a first
  // join asks for no replay: the room's recent history comes as its newest page.
  function sendJoin(room) {
    room.resuming = room.epoch !== null;
    room.pageId = null; // a page asked for on an earlier connection is not coming
    const command = { type: "join", room: room.name };
    if (room.epoch) Object.assign(command, { since: room.lastSeq, epoch: room.epoch });
    if (sendCommand(command)) room.state = "joining";
  }

  function handleEvent(ev) {
    if (!ev || typeof ev !== "object") return;
    const room = typeof ev.room === "string" ? rooms.get(ev.room) : undefined;
    switch (ev.type) {
      case "welcome": return room && onWelcome(room, ev);
      case "message": return room && onMessage(room, ev);
      case "system": return room && onSystem(room, ev);
      case "typing": return room && onTyping(room, ev);
      case "ack": return onAck(ev);
      case "left": return onLeft(ev);
      case "history": return room && onHistory(room, ev);
      case "error": return onError(room, ev);
      case "notice": return onNotice(ev.data);
      default: return undefined;
    }
  }

  function onWelcome(room, ev) {
    const reconnect = room.everJoined;
    room.restartedNow = false;
    room.state = "joined";
    room.problem = null;
    if (room.epoch !== null && ev.epoch !== room.epoch) {
      // The room's sequence started again (e.g. the server restarted): old seqs mean
      // nothing now, so forget them or new messages would look like duplicates.
      room.seen.clear();
      room.lastSeq = 0;
      room.restartedNow = true;
      room.beginning = false;
      notice(room, "restart", "The room's history restarted (the server was restarted). Messages sent while you were away may be missing.");
    }
    if (!room.everJoined) room.historyTo = Number(ev.seq) || 0;
    const firstPage = !room.resuming; // joined without a replay: show the newest page
    if (firstPage) room.lastSeq = Math.max(room.lastSeq, Number(ev.seq) || 0);
    room.epoch = typeof ev.epoch === "string" ? ev.epoch : null;
    const limits = ev.limits && typeof ev.limits === "object" ? ev.limits : {};
    room.maxText = Number.isInteger(limits.text) && limits.text > 0 ? limits.text : null;
    setMembers(room, ev.members, ev.people);
    room.count = Number(ev.count) || 0;
    room.everJoined = true;
    session.attempt = 0; // a drop from here on starts the backoff afresh
    if (reconnect) notice(room, "info", "Reconnected to " + (room.dm ? title(room) : "#" + room.name) + ".");
    if (room.dm) rememberDmName(room);
    awaitReplay(room, Number(ev.seq));
    markConnected();
    roomChanged(room);
    if (firstPage || wantsEarlier(room)) loadEarlier(room);
  }

  // The room's member list as the server gives it: names, and the same people with their
  // user ids (anonymous members have none, and no "Message" button).
  function setMembers(room, list, people) {
    room.members = new Map();
    for (const n of names(list)) room.members.set(n, (room.members.get(n) || 0) + 1);
    if (!Array.isArray(people)) return;
    for (const person of people) {
      if (person && typeof person === "object") learnUser(room, person.name, person.user);
    }
  }

  // Another user opened a direct conversation with us (roomcast's own notice, told apart
  // from the application's by its "roomcast" member, which the server reserves): join it,
  // in the background, and mark it new until it is looked at.
  function onNotice(data) {
    if (!data || typeof data !== "object" || data.roomcast !== "dm") return;
    const peer = data.user;
    if (!session.user || typeof peer !== "string" || data.room !== dmRoom(session.user, peer)) return;
    if (typeof data.name === "string" && data.name) {
      userNames.set(peer, data.name);
      rememberDmName({ name: data.room, dm: peer, members: new Map() }, data.name);
    }
    if (rooms.has(data.room)) return; // already in the list: nothing is new
    const room = joinRoom(data.room, { show: false });
    room.opened = true;
    renderRoomList();
  }

  // What was sent but not confirmed before a drop is known once the resume's replay has
  // caught up with the welcome's seq: what it did not hold never reached the room.
  function awaitReplay(room, seq) {
    if (!room.unconfirmed.size) return;
    if (room.restartedNow || !room.resuming || !Number.isInteger(seq) || room.lastSeq >= seq) {
      settleUnconfirmed(room);
      return;
    }
    room.replayTo = seq;
    clearTimeout(room.settleTimer);
    room.settleTimer = setTimeout(() => settleUnconfirmed(room), SETTLE_TIMEOUT_MS);
  }

  function settleUnconfirmed(room) {
    clearTimeout(room.settleTimer);
    room.settleTimer = null;
    room.replayTo = null;
    const texts = Array.from(room.unconfirmed.values());
    room.unconfirmed.clear();
    if (!texts.length) return;
    giveBack(room, texts);
    notice(room, "error", (texts.length === 1 ? "A message you sent was" : texts.length + " messages you sent were") +
      " not confirmed before the connection dropped and " + (texts.length === 1 ? "is" : "are") +
      " not in the room's history: back in the message box, to send again.", { error: "unsent" });
  }

  // Put refused or undelivered text back into its room's box, after whatever is there.
  function giveBack(room, texts) {
    const back = texts.filter((t) => typeof t === "string" && t.trim());
    if (!back.length || !room) return;
    if (room === session.current) {
      el.text.value = [el.text.value, ...back].filter((t) => t.trim()).join("\n");
      autosize();
      updateSend();
    } else {
      room.draft = [room.draft, ...back].filter((t) => t.trim()).join("\n");
    }
  }

  function learnUser(room, name, user) {
    if (typeof name !== "string" || !name || typeof user !== "string" || !user) return false;
    userNames.set(user, name);
    if (room.users.get(name) === user) return false;
    room.users.set(name, user);
    return true;
  }

  function onMessage(room, ev) {
    const seq = Number(ev.seq);
    if (!Number.isInteger(seq)) return;
    let changed = learnUser(room, ev.from, ev.user);
    if (typeof ev.id === "string" && session.myIds.has(ev.id)) {
      room.unconfirmed.delete(ev.id); // it did arrive
      if (typeof ev.from === "string" && ev.from && ev.from !== session.self) {
        session.self = ev.from; // the server's word on who this page is
        changed = true;
      }
    }
    if (room.replayTo !== null && seq >= room.replayTo) settleUnconfirmed(room);
    if (typeof ev.id === "string") session.pending.delete(ev.id);
    if (room.seen.has(seq)) {
      if (changed && room === session.current) renderMembers();
      return; // already shown in this epoch (resume overlap)
    }
    room.seen.add(seq);
    if (room.seen.size > 4 * MAX_RENDERED) {
      // seqs only grow; forget the oldest ones
      const it = room.seen.values();
      for (let i = 0; i < MAX_RENDERED; i++) room.seen.delete(it.next().value);
    }
    if (seq > room.lastSeq) room.lastSeq = seq;
    // whoever wrote has stopped typing
    room.typing.delete(typeof ev.user === "string" && ev.user ? ev.user : ev.from);
    renderMessage(room, ev);
    const mine = typeof ev.id === "string" && session.myIds.has(ev.id);
    const history = room.restartedNow ? false : room.epoch && seq <= room.historyTo && !room.resuming;
    if (!mine && !history && room !== session.current) {
      room.unread++;
      renderRoomList();
    }
    if (room === session.current) {
      if (changed) renderMembers();
      renderTyping();
    }
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

  function onSystem(room, ev) {
    const name = typeof ev.name === "string" && ev.name ? ev.name : null;
    // what changed: a coalesced notice lists names and totals; a single-change one (older
    // servers) has only `event` and `name`
    const joined = Array.isArray(ev.joined) ? names(ev.joined) : ev.event === "join" && name ? [name] : [];
    const left = Array.isArray(ev.left) ? names(ev.left) : ev.event === "leave" && name ? [name] : [];
    const joins = typeof ev.joins === "number" ? ev.joins : ev.event === "join" ? 1 : 0;
    const leaves = typeof ev.leaves === "number" ? ev.leaves : ev.event === "leave" ? 1 : 0;
    if (Array.isArray(ev.members)) {
      setMembers(room, ev.members, ev.people);
    } else {
      for (const n of joined) room.members.set(n, (room.members.get(n) || 0) + 1);
      for (const n of left) {
        const k = room.members.get(n) || 0;
        if (k <= 1) room.members.delete(n); else room.members.set(n, k - 1);
      }
    }
    if (typeof ev.count === "number") room.count = ev.count;
    if (ev.event === "join") learnUser(room, name, ev.user); // a single join names its user
    for (const n of left) {
      const user = room.users.get(n);
      room.typing.delete(user || n);
    }
    const parts = [];
    if (joins > 0) parts.push(who(joined, joins) + " joined");
    if (leaves > 0) parts.push(who(left, leaves) + " left");
    if (parts.length) {
      notice(room, "system", parts.join(", "), { event: String(ev.event || "") });
    } else if (typeof ev.message === "string") {
      notice(room, "system", ev.message);
    }
    if (room.dm) rememberDmName(room);
    roomChanged(room);
  }

  function onTyping(room, ev) {
    const name = typeof ev.name === "string" && ev.name ? ev.name : null;
    const user = typeof ev.user === "string" && ev.user ? ev.user : null;
    if ((user && user === session.user) || (!user && name && name === session.self)) return;
    const changed = learnUser(room, name, user);
    room.typing.set(user || name || "?", { name, until: Date.now() + TYPING_SHOWN_MS });
    if (room === session.current) {
      renderTyping();
      if (changed) renderMembers();
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
        refused.push(sent);
      }
      for (const sent of refused) {
        const room = rooms.get(sent.room);
        giveBack(room, [sent.text]);
        notice(room, "error", "The server did not take a message you sent: it is back in the message box.", { error: "unsent" });
      }
    }
  }

  // The server ended a membership: our own leave (1000, already gone from the list), or a
  // grant withdrawn (4403), or another reason a one-room connection would have closed for.
  function onLeft(ev) {
    const room = typeof ev.room === "string" ? rooms.get(ev.room) : undefined;
    const code = Number(ev.code);
    if (!room || code === 1000) return;
    const known = CLOSE_CODES[code];
    const reason = typeof ev.reason === "string" && ev.reason ? ev.reason : known ? known[0] : "code " + code;
    giveBackPending(room);
    if (code === 4403 || code === 4400 || code === 4001) {
      dropRoom(room, "You left " + label(room) + ": " + reason + ".");
      return;
    }
    room.state = "waiting";
    room.problem = { text: "Not in " + label(room) + ": " + reason + ".", retry: true };
    notice(room, "disconnect", "Left by the server: " + reason + ".", { code: String(code) });
    roomChanged(room);
  }

  function label(room) {
    return room.dm ? "the conversation with " + title(room) : "#" + room.name;
  }

  function onError(room, ev) {
    const code = String(ev.error || "");
    if (room && typeof ev.id === "string" && ev.id === room.pageId) return retryEarlier(room);
    if (code === "history_gap") {
      // A fresh join asks for since=0 only to show recent history: a trimmed history is
      // not news then; after a restart the restart notice already says so.
      if (room && room.resuming && !room.restartedNow) {
        notice(room, "gap", "Some messages may be missing: the room no longer has everything sent while you were disconnected.");
      }
      return;
    }
    if (room && room.state === "joining" && typeof ev.id !== "string") {
      onJoinRefused(room, code, typeof ev.message === "string" ? ev.message : code);
      return;
    }
    const target = typeof ev.id === "string" && session.pending.has(ev.id)
      ? session.pending.get(ev.id) : null;
    let where = room || (target && rooms.get(target.room)) || session.current;
    if (["too_long", "rate_limited", "bad_id", "not_member", "unavailable"].includes(code)) {
      // a refusal names the message it answers; without an id, the oldest one waiting;
      // its text goes back into the box to be shortened or sent again
      const id = target ? ev.id : ["too_long", "rate_limited", "bad_id"].includes(code)
        ? session.pending.keys().next().value : undefined;
      if (id !== undefined) {
        const sent = session.pending.get(id);
        where = rooms.get(sent.room) || where;
        giveBack(where, [sent.text]);
        session.pending.delete(id);
      }
    }
    if (!where) return;
    const last = where.list.lastElementChild;
    if (code === "rate_limited" && last && last.dataset.error === "rate_limited") {
      return; // one notice for a burst of refusals, not one per message
    }
    const known = ERROR_TEXT[code];
    const text = known || "The server refused that";
    // the server's own words add the specifics (e.g. "message is 4200 characters; the limit
    // is 4000"); a rate-limit notice needs none
    const detail = code !== "rate_limited" && typeof ev.message === "string" && ev.message
      ? (known ? " (" + ev.message + ")" : ": " + ev.message) : "";
    const back = ["too_long", "rate_limited"].includes(code) ? " What was refused is back in the message box." : "";
    notice(where, "error", text + detail + back, { error: code });
  }

  // A join the server refused: a room this page was never in is dropped, saying why; one
  // it was in (a resume) or that may have room later waits, with "Retry now".
  function onJoinRefused(room, code, message) {
    markConnected();
    if (code === "already_member") {
      room.state = "joined";
      return;
    }
    if (code === "bad_request" && room.epoch) {
      // the server does not take this resume point: start the room afresh
      room.epoch = null;
      room.lastSeq = 0;
      room.seen.clear();
      sendJoin(room);
      return;
    }
    const reason = code === "room_full" ? "the room is full" : message;
    if (JOIN_REFUSED.has(code) || (!room.everJoined && !JOIN_LATER.has(code))) {
      dropRoom(room, "Can't join " + label(room) + ": " + reason + ".");
      return;
    }
    room.state = "waiting";
    room.problem = { text: "Can't join " + label(room) + ": " + reason + ".", retry: true };
    roomChanged(room);
  }

  // -- connection lifecycle ----------------------------------------------------------------

  function connect() {
    clearTimers();
    if (!session.active) return;
    session.wasOpen = false;
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

    ws.onopen = () => {
      if (session.ws !== ws) return;
      clearTimeout(session.connectTimer);
      session.wasOpen = true;
      session.wasEverOpen = true;
      for (const room of rooms.values()) sendJoin(room);
      if (!rooms.size) markConnected();
    };
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

  // "Connected" once the server has answered a join on this socket: until then nothing
  // can be sent anywhere.
  function markConnected() {
    if (el.status.dataset.state === "connected" || !session.wasOpen) return;
    setStatus("connected", "Connected");
    clearConnectionBanner();
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
    if (code === 1009) refusedAsTooLarge();
    // sent, but neither acked nor seen: the server may or may not have it. A resume
    // tells which (awaitReplay); without one, the text goes back into the box now.
    for (const [id, sent] of session.pending) {
      const room = rooms.get(sent.room);
      if (room) room.unconfirmed.set(id, sent.text);
    }
    session.pending.clear();
    for (const room of rooms.values()) {
      if (room.state !== "waiting") room.state = "idle";
      room.typing.clear();
      if (hadSession) notice(room, "disconnect", "Disconnected: " + text + ".", { code: String(code) });
      // a replay cut short says nothing: the next welcome starts the wait again
      clearTimeout(room.settleTimer);
      room.settleTimer = null;
      room.replayTo = null;
      const n = room.unconfirmed.size;
      if (!n) continue;
      if (reconnect && room.epoch !== null) {
        notice(room, "error", (n === 1 ? "A message you sent was" : n + " messages you sent were") +
          " not confirmed before the connection dropped: once reconnected, " +
          (n === 1 ? "it is shown if it arrived, or put back in the message box." :
            "those that arrived are shown, the others put back in the message box."),
          { error: "unconfirmed" });
      } else {
        const givenBack = giveBackUnconfirmed(room);
        notice(room, "error", (givenBack === 1 ? "A message you sent was" : givenBack + " messages you sent were") +
          " not confirmed before the connection closed: back in the message box (" +
          (givenBack === 1 ? "it" : "they") + " may have reached the room).", { error: "unsent" });
      }
    }
    renderTyping();
    if (code === 4400 || code === 4403) {
      // a name the server refuses: let the user choose again
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
      setBanner("closed", "Closed: " + text + ".", true);
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
    const room = rooms.get(biggest[1].room);
    giveBack(room, [biggest[1].text]);
    notice(room, "error", "The server refused a message as too large (" + NUMBER.format(biggest[1].bytes) +
      " bytes): it is back in the message box.", { error: "too_large" });
  }

  // Unconfirmed text of a room when no resume will tell whether it arrived (the page
  // leaves, or will not reconnect): back into the box, since it may not have arrived.
  function giveBackUnconfirmed(room) {
    clearTimeout(room.settleTimer);
    room.settleTimer = null;
    room.replayTo = null;
    const texts = Array.from(room.unconfirmed.values());
    room.unconfirmed.clear();
    giveBack(room, texts);
    return texts.length;
  }

  // What a room still waits to hear about, when it will hear no more (it was left).
  function giveBackPending(room) {
    for (const [id, sent] of session.pending) {
      if (sent.room !== room.name) continue;
      session.pending.delete(id);
      room.unconfirmed.set(id, sent.text);
    }
    return giveBackUnconfirmed(room);
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

  function clearTimers() {
    clearTimeout(session.retryTimer);
    clearInterval(session.countdownTimer);
    clearTimeout(session.connectTimer);
    session.retryTimer = session.countdownTimer = session.connectTimer = null;
  }

  // "Retry now": the connection if it is down, else the room in view if it waits.
  function retryNow() {
    if (session.ws) {
      const room = session.current;
      if (room && room.state === "waiting" && session.wasOpen) {
        room.problem = null;
        sendJoin(room);
        roomChanged(room);
      }
      return;
    }
    session.active = true;
    session.attempt = 0;
    el.banner.dataset.kind = "";
    setBanner(null);
    connect();
  }

  function stop() {
    session.active = false;
    clearTimers();
    for (const room of rooms.values()) giveBackPending(room);
    const ws = session.ws;
    session.ws = null;
    if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000, "left");
  }

  // -- rooms -------------------------------------------------------------------------------

  // Join a room (or show it, if already joined).
  function joinRoom(name, options) {
    let room = rooms.get(name);
    if (!room) {
      room = newRoom(name);
      rooms.set(name, room);
      if (session.wasOpen) sendJoin(room);
    }
    if (!options || options.show !== false) showRoom(room);
    saveRooms();
    renderRoomList();
    return room;
  }

  function showRoom(room) {
    const previous = session.current;
    if (previous && previous !== room) previous.draft = el.text.value;
    session.current = room;
    room.unread = 0;
    room.opened = false;
    if (el.messages !== room.list) {
      el.messages.removeAttribute("id");
      room.list.id = "messages";
      el.messages.replaceWith(room.list);
      el.messages = room.list;
    }
    if (previous !== room) {
      el.text.value = room.draft;
      room.draft = "";
      autosize();
    }
    el.roomTitle.hidden = false;
    el.join.hidden = true;
    el.chat.hidden = false;
    el.membersToggle.hidden = false;
    el.roomsToggle.hidden = false;
    el.app.dataset.view = "chat";
    renderTitle();
    renderMembers();
    renderRoomList();
    renderTyping();
    renderBanner();
    updateComposer();
    saveRooms();
    if (room.following) scrollToBottom(room.list);
    if (wantsEarlier(room)) loadEarlier(room);
    // on a phone, focusing would throw the keyboard over the conversation
    if (!window.matchMedia("(pointer: coarse)").matches) el.text.focus();
  }

  // Something about a room changed: redraw what shows it.
  function roomChanged(room) {
    if (room === session.current) {
      renderTitle();
      renderMembers();
      renderBanner();
      updateComposer();
    }
    renderRoomList();
  }

  // The user leaves a room: the server is told, the page shows the next one (or the join
  // form, and the connection closes, when it was the last).
  function leaveRoom(room) {
    if (!room) return;
    sendCommand({ type: "leave", room: room.name });
    giveBackPending(room);
    removeRoom(room);
    if (!rooms.size) {
      stop();
      showJoin(null);
    }
  }

  // A room the server will not have us in: dropped, the reason shown where the user is.
  function dropRoom(room, why) {
    removeRoom(room);
    if (!rooms.size) {
      stop();
      showJoin(why);
      return;
    }
    el.addRoomError.textContent = why;
    el.addRoomError.hidden = false;
    notice(session.current, "error", why, { error: "left" });
  }

  function removeRoom(room) {
    rooms.delete(room.name);
    clearTimeout(room.settleTimer);
    if (session.current === room) {
      session.current = null;
      const next = Array.from(rooms.values()).pop();
      if (next) showRoom(next);
    }
    saveRooms();
    renderRoomList();
  }

  function openDm(user, name) {
    if (!session.user || user === session.user) return;
    userNames.set(user, name);
    const roomName = dmRoom(session.user, user);
    rememberDmName({ name: roomName, dm: user, members: new Map() }, name);
    joinRoom(roomName);
    closeDrawer();
  }

  // -- what survives a reload: the joined rooms (address bar and sessionStorage), the
  // names of DM partners (sessionStorage)

  function saveRooms() {
    const names = Array.from(rooms.keys());
    const current = session.current ? session.current.name : null;
    const params = new URLSearchParams(location.search);
    if (current) params.set("room", current); else params.delete("room");
    if (names.length > 1) params.set("rooms", names.join(",")); else params.delete("rooms");
    if (session.name) params.set("name", session.name); else params.delete("name");
    const query = params.toString();
    history.replaceState(null, "", location.pathname + (query ? "?" + query : "") + location.hash);
    try {
      sessionStorage.setItem(ROOMS_KEY, JSON.stringify({ rooms: names, current }));
    } catch (err) { /* storage may be disabled: the address bar still has them */ }
  }

  function storedRooms() {
    try {
      const saved = JSON.parse(sessionStorage.getItem(ROOMS_KEY) || "null");
      if (saved && Array.isArray(saved.rooms)) return saved;
    } catch (err) { /* ignore */ }
    return null;
  }

  function dmNames() {
    try {
      return JSON.parse(sessionStorage.getItem("roomcast.dmNames") || "{}") || {};
    } catch (err) {
      return {};
    }
  }

  function storedDmName(roomName) {
    const name = dmNames()[roomName];
    return typeof name === "string" ? name : null;
  }

  function rememberDmName(room, name) {
    const known = name || title(room);
    if (!known || known === room.dm) return;
    const all = dmNames();
    if (all[room.name] === known) return;
    all[room.name] = known;
    try {
      sessionStorage.setItem("roomcast.dmNames", JSON.stringify(all));
    } catch (err) { /* ignore */ }
  }

  // -- views -------------------------------------------------------------------------------

  // Connect as this name/token and join these rooms, showing `current`.
  function enterRooms(roomNames, current, name, token) {
    // a signed token's name is the one the server uses: ?name= would be ignored
    const signedAs = tokenName(token);
    if (signedAs) name = null;
    session.name = name;
    session.self = signedAs || name;
    session.user = tokenUser(token);
    session.token = token;
    session.wasEverOpen = false;
    session.attempt = 0;
    session.active = true;
    session.current = null;
    rooms.clear();
    el.addRoomError.hidden = true;
    setBanner(null);
    for (const room of roomNames) if (!rooms.has(room)) rooms.set(room, newRoom(room));
    try {
      if (name) localStorage.setItem("roomcast.name", name);
    } catch (err) { /* storage may be disabled */ }
    showRoom(rooms.get(current) || rooms.values().next().value);
    connect();
  }

  // -- tokens: from the URL fragment (never sent to a server) or the sign-in step, kept in
  // sessionStorage (this tab only), sent as ?token= on the WebSocket URL, never shown in
  // the address bar.

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

  // The claims of a signed token (a JWT), or null. Read for display only: the server
  // verifies the token.
  function tokenClaims(token) {
    const parts = typeof token === "string" ? token.split(".") : [];
    if (parts.length !== 3) return null;
    try {
      const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
      const bytes = Uint8Array.from(atob(b64 + "===".slice((b64.length + 3) % 4)), (c) => c.charCodeAt(0));
      const claims = JSON.parse(new TextDecoder().decode(bytes));
      return claims && typeof claims.sub === "string" ? claims : null;
    } catch (err) {
      return null;
    }
  }

  // The display name a signed token gives, as the server derives it (its "name" claim,
  // else "sub"; NFKC, whitespace collapsed); null for any other token.
  function tokenName(token) {
    const claims = tokenClaims(token);
    if (!claims) return null;
    const raw = typeof claims.name === "string" ? claims.name : Array.from(claims.sub).slice(0, MAX_NAME).join("");
    return raw.normalize("NFKC").split(/\s+/).filter(Boolean).join(" ") || null;
  }

  // The verified user id a signed token gives (its "sub"): the id in DM room names.
  function tokenUser(token) {
    const claims = tokenClaims(token);
    return claims ? claims.sub : null;
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
    const lastRoom = session.current ? session.current.name : null;
    for (const room of rooms.values()) clearTimeout(room.settleTimer);
    rooms.clear();
    session.current = null;
    saveRooms();
    el.app.dataset.view = "join";
    el.join.hidden = false;
    el.chat.hidden = true;
    el.roomTitle.hidden = true;
    el.membersToggle.hidden = true;
    el.roomsToggle.hidden = true;
    closeDrawer();
    document.title = "roomcast";
    setStatus("idle", "Not connected");
    if (lastRoom && !lastRoom.startsWith("dm:")) el.roomInput.value = lastRoom;
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
    if (!validRoom(room)) return "Room names are 1–64 letters, digits, “_”, “-” or “.”.";
    if (name && (Array.from(name).length > MAX_NAME || /[\u0000-\u001f\u007f]/.test(name))) {
      return "Names are at most " + MAX_NAME + " printable characters.";
    }
    return null;
  }

  function openDrawer(which) {
    closeDrawer();
    el.app.classList.add(which === "rooms" ? "rooms-open" : "drawer-open");
    el.scrim.hidden = false;
    (which === "rooms" ? el.roomsToggle : el.membersToggle).setAttribute("aria-expanded", "true");
  }

  function closeDrawer() {
    el.app.classList.remove("drawer-open", "rooms-open");
    el.scrim.hidden = true;
    el.membersToggle.setAttribute("aria-expanded", "false");
    el.roomsToggle.setAttribute("aria-expanded", "false");
  }

  // -- composer ----------------------------------------------------------------------------

  function autosize() {
    el.text.style.height = "auto";
    el.text.style.height = Math.min(el.text.scrollHeight, 160) + "px";
    if (session.current && session.current.following) scrollToBottom(session.current.list);
  }

  function messageFrame(room, text, id) {
    return JSON.stringify({ type: "message", room: room.name, text, id });
  }

  // Why the server would refuse this draft, or null. The frame is measured as it would be
  // sent (JSON, UTF-8); a draft being typed is measured with an id of the usual length.
  function draftProblem(room, text, frame) {
    if (room.maxText !== null) {
      const chars = characters(text);
      if (chars > room.maxText) {
        return "too long: " + NUMBER.format(chars) + " of " + NUMBER.format(room.maxText) + " characters";
      }
    }
    const bytes = UTF8.encode(frame || messageFrame(room, text, newId())).length;
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
    const room = session.current;
    const problem = room && el.text.value.trim() ? draftProblem(room, el.text.value) : null;
    showDraftProblem(problem);
    el.send.disabled = el.status.dataset.state !== "connected" || !room || room.state !== "joined" ||
      !el.text.value.trim() || Boolean(problem);
  }

  function sendMessage() {
    const text = el.text.value;
    const room = session.current;
    const ws = session.ws;
    if (!room || room.state !== "joined" || !text.trim() || !ws || ws.readyState !== WebSocket.OPEN) return;
    const id = newId();
    const frame = messageFrame(room, text, id);
    const problem = draftProblem(room, text, frame);
    if (problem) {
      showDraftProblem(problem); // and the draft stays in the box
      return;
    }
    session.myIds.add(id);
    if (session.myIds.size > 2000) session.myIds.delete(session.myIds.values().next().value);
    session.pending.set(id, { room: room.name, text, bytes: UTF8.encode(frame).length });
    ws.send(frame);
    el.text.value = "";
    autosize();
    updateSend();
    room.following = true;
    scrollToBottom(room.list);
  }

  // The others see "X is typing" for a few seconds after each typing event; one a second
  // keeps it up while the user types (the server relays no more than that anyway).
  function sendTyping() {
    const room = session.current;
    if (!room || room.state !== "joined" || !el.text.value.trim()) return;
    const now = Date.now();
    if (now - (typingSent.get(room.name) || 0) < TYPING_EVERY_MS) return;
    if (sendCommand({ type: "typing", room: room.name })) typingSent.set(room.name, now);
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
    enterRooms([room], room, name, session.token);
  });

  el.addRoomForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const room = el.addRoomInput.value.trim().replace(/^#/, "");
    const problem = room ? validate(room, null) : "Type a room name to join it.";
    el.addRoomError.hidden = !problem;
    el.addRoomError.textContent = problem || "";
    if (problem) return;
    el.addRoomInput.value = "";
    joinRoom(room);
    closeDrawer();
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
    sendTyping();
  });

  el.retry.addEventListener("click", retryNow);
  el.leave.addEventListener("click", () => {
    closeDrawer();
    leaveRoom(session.current);
  });
  el.changeRoom.addEventListener("click", () => {
    const room = session.current;
    if (room && room.problem) {
      leaveRoom(room); // the room that refused us
    } else {
      stop();
      showJoin(null);
    }
  });
  el.membersToggle.addEventListener("click", () => {
    if (el.app.classList.contains("drawer-open")) closeDrawer(); else openDrawer("members");
  });
  el.roomsToggle.addEventListener("click", () => {
    if (el.app.classList.contains("rooms-open")) closeDrawer(); else openDrawer("rooms");
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

  // the rooms to be in: the address bar's, else (the same tab, a bare address) the ones kept
  const saved = storedRooms();
  let wanted = (query.get("rooms") || "").split(",").map((r) => r.trim()).filter(Boolean);
  let current = (query.get("room") || "").trim();
  if (!wanted.length && !current && saved && saved.rooms.length && !query.has("name")) {
    wanted = saved.rooms;
    current = saved.current || "";
  }
  if (wanted.length || query.has("room") || query.has("name")) {
    current = current || wanted[0] || "general";
    if (!wanted.includes(current)) wanted.push(current);
    const name = tokenName(session.token) ? null : (query.get("name") || "").trim() || null;
    const problem = wanted.map((room) => validate(room, name)).find(Boolean);
    if (problem) showJoin(problem); else enterRooms(wanted, current, name, session.token);
  } else {
    showJoin(null);
  }

  // for tests and debugging
  window.roomcast = {
    session,
    rooms,
    room: (name) => rooms.get(name) || null,
    stop,
    retryNow,
    get following() { return session.current ? session.current.following : true; },
  };
})();
