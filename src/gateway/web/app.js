// natter web client: sign-in, rooms with unread badges, messages with
// scroll-back, typing, presence, read markers, images, and a connection that
// resumes after drops (rejoin with `since`, dedupe by seq). State lives in `s`;
// the DOM is rebuilt from it by the render* functions.

import { Api, ApiError, devToken, tokenUser } from "./api.js";
import { SseTransport, WsTransport } from "./transport.js";
import * as v from "./view.js";

const { $ } = v;
const TYPING_EXPIRE_MS = 6000; // receiver side, after the last active:true
const TYPING_REFRESH_MS = 3000; // sender repeats active:true while typing
const TYPING_IDLE_MS = 4000; // sender says active:false after this pause
const WS_FAILURES_BEFORE_SSE = 3;
const HISTORY_PAGE = 50;

const s = {
  token: null,
  me: null,
  devUser: null, // signed in through /v1/dev/token: a 4001 gets a fresh token
  api: null,
  transport: null,
  rooms: new Map(), // id → room (see newRoom)
  active: null, // id of the room on screen
  presence: new Map(), // user → {status, last_seen}
  watched: new Set(), // users subscribed with presence_sub
  pending: new Map(), // client id → message not yet acked (resent after reconnects)
  typing: { room: null, active: false, sentAt: 0, idle: null },
  images: new Map(), // attachment id → Promise<object URL>
  rendered: new Map(), // seq or client id → <li> of the room on screen
  presencePoll: null,
};

function newRoom(r) {
  return {
    id: r.id, name: r.name || r.id, role: r.role,
    // Highest seq known; a join resumes after it. null: unknown (the server
    // could not tell), then the join takes only live messages.
    lastSeq: Number.isInteger(r.last_seq) ? r.last_seq : null,
    readSeq: r.last_read_seq || 0, // highest seq this user has read
    unread: r.unread || 0,
    msgs: new Map(), // seq → message
    historyLoaded: false, hasOlder: false, loadingOlder: false,
    members: [], readers: new Map(), // user → highest seq read
    typing: new Map(), // user → expiry timer
  };
}

// ---------- sign-in ----------------------------------------------------------

async function boot() {
  const hash = new URLSearchParams(location.hash.slice(1));
  const as = hash.get("as");
  $("signin").addEventListener("submit", onSignIn);
  $("signout").addEventListener("click", () => signOut(""));
  if (as) {
    $("signin-user").value = as;
    await signInAsDevUser(as);
    return;
  }
  const saved = sessionStorage.getItem("natter.token");
  if (saved && tokenUser(saved)) {
    start(saved, sessionStorage.getItem("natter.devUser"));
  } else {
    $("signin-user").focus();
  }
}

async function onSignIn(ev) {
  ev.preventDefault();
  const token = $("signin-token").value.trim();
  if (token) {
    if (!tokenUser(token)) return showSignInError("That is not a JWT.");
    start(token, null);
    return;
  }
  const user = $("signin-user").value.trim();
  if (!user) return showSignInError("Enter a user id.");
  await signInAsDevUser(user);
}

async function signInAsDevUser(user) {
  try {
    start(await devToken(user), user);
  } catch (e) {
    showSignInError(e instanceof ApiError && e.status === 404
      ? "Development sign-in is off on this gateway (start it with --dev), paste a token instead."
      : `Sign-in failed: ${e.message}`);
  }
}

function showSignInError(text) {
  $("signin-error").textContent = text;
}

function signOut(reason) {
  s.transport?.stop();
  clearInterval(s.presencePoll);
  sessionStorage.removeItem("natter.token");
  sessionStorage.removeItem("natter.devUser");
  Object.assign(s, { token: null, me: null, devUser: null, api: null, transport: null, active: null });
  for (const m of [s.rooms, s.presence, s.pending, s.rendered]) m.clear();
  s.watched.clear();
  $("chat-view").hidden = true;
  $("whoami").hidden = true;
  $("signin-view").hidden = false;
  v.showConnection("offline");
  showSignInError(reason);
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);
}

function start(token, devUser) {
  Object.assign(s, { token, devUser, me: tokenUser(token), api: new Api(token) });
  sessionStorage.setItem("natter.token", token);
  if (devUser) sessionStorage.setItem("natter.devUser", devUser);
  $("signin-view").hidden = true;
  $("chat-view").hidden = false;
  $("whoami").hidden = false;
  $("me").textContent = s.me;
  loadRooms();
  const forceSse = new URLSearchParams(location.search).get("transport") === "sse";
  connect(forceSse ? "sse" : "ws");
}

/** Token refused (4001 or HTTP 401): dev users get a fresh one, others sign in again. */
async function renewToken() {
  if (!s.devUser) return signOut("Your session ended; sign in again.");
  try {
    s.token = await devToken(s.devUser);
    s.api.token = s.token;
    sessionStorage.setItem("natter.token", s.token);
  } catch (e) {
    signOut(`Your session ended: ${e.message}`);
  }
}

// ---------- transport ----------------------------------------------------------

function connect(kind) {
  s.transport?.stop();
  clearInterval(s.presencePoll);
  const onState = (state, detail) => v.showConnection(state, detail);
  if (kind === "sse") {
    s.transport = new SseTransport({ api: s.api, onFrame, onState });
    // No presence or room events without the socket: poll them.
    s.presencePoll = setInterval(() => { pollPresence(); loadRooms(); }, 15000);
  } else {
    s.transport = new WsTransport({
      token: () => s.token, onFrame, onState,
      onAuthFailed: renewToken,
      onFailures: async (n) => {
        if (n < WS_FAILURES_BEFORE_SSE || navigator.onLine === false) return;
        // The gateway answers HTTP but no socket gets through (a proxy?): fall back.
        const ok = await fetch("/healthz").then((r) => r.ok, () => false);
        if (ok && s.transport?.kind === "ws" && !s.transport.open) connect("sse");
      },
    });
  }
  s.transport.start();
  if (s.active) s.transport.focus(s.active);
}

function send(frame) {
  return s.transport ? s.transport.send(frame) : false;
}

function onFrame(f) {
  switch (f.type) {
    case "welcome": return onWelcome();
    case "message": return onMessage(f);
    case "ack": return onAck(f);
    case "typing": return onTyping(f);
    case "read": return onRead(f);
    case "presence": return onPresence(f);
    case "room_added": return loadRooms();
    case "room_removed": return onRoomRemoved(f.room);
    case "error": return onError(f);
    case "joined": return onJoined(f);
    default: return undefined; // left, pong, refreshed
  }
}

/** (Re)connected: join every room after what we have, watch presence again, resend what was not acked. */
function onWelcome() {
  for (const room of s.rooms.values()) joinRoom(room);
  const users = [...s.watched];
  if (users.length) send({ type: "presence_sub", users });
  if (s.transport.kind === "sse") pollPresence();
  for (const [id, p] of s.pending) if (!p.failed) sendPending(id, p);
}

/**
 * A resume that skipped messages (more than the gateway replays) starts at
 * `truncated_before`: what we hold below it is cut off from what follows,
 * so drop it and let scrolling up page the gap from the history.
 */
function onJoined(f) {
  const room = s.rooms.get(f.room);
  if (!room || f.truncated_before == null) return;
  for (const seq of [...room.msgs.keys()]) {
    if (seq >= f.truncated_before) continue;
    room.msgs.delete(seq);
    if (room.id === s.active) dropRendered(seq);
  }
  room.hasOlder = true;
  if (room.id === s.active) renderMessages(room);
}

function joinRoom(room) {
  send(room.lastSeq === null ? { type: "join", room: room.id } : { type: "join", room: room.id, since: room.lastSeq });
}

// ---------- rooms --------------------------------------------------------------

async function loadRooms() {
  let list;
  try {
    list = await s.api.rooms();
  } catch (e) {
    if (e.status === 401) return renewToken();
    return showRoomError(`Cannot load rooms: ${e.message}`);
  }
  const seen = new Set();
  for (const r of list) {
    seen.add(r.id);
    const old = s.rooms.get(r.id);
    if (!old) {
      const room = newRoom(r);
      s.rooms.set(r.id, room);
      if (s.transport?.current === "online") joinRoom(room);
    } else {
      old.name = r.name || r.id;
      // Without a socket, unread counts come from here.
      if (s.transport?.kind === "sse" && r.id !== s.active) old.unread = r.unread || 0;
    }
  }
  for (const id of [...s.rooms.keys()]) if (!seen.has(id)) onRoomRemoved(id);
  renderRooms();
  // Nothing on screen yet: show the first room.
  if (!s.active && s.rooms.size) openRoom([...s.rooms.values()].sort((a, b) => a.name.localeCompare(b.name))[0].id);
}

function onRoomRemoved(id) {
  s.rooms.delete(id);
  if (s.active === id) {
    s.active = null;
    renderRoom();
  }
  renderRooms();
}

async function openRoom(id) {
  const room = s.rooms.get(id);
  if (!room) return;
  stopTyping();
  s.active = id;
  s.transport?.focus(id);
  renderRooms();
  renderRoom();
  const jobs = [loadMembers(room)];
  if (!room.historyLoaded) jobs.push(loadOlder(room, true));
  await Promise.all(jobs);
  markRead();
}

async function loadMembers(room) {
  try {
    room.members = await s.api.members(room.id);
  } catch (e) {
    return showRoomError(`Cannot load members: ${e.message}`);
  }
  watch(room.members);
  if (s.active === room.id) renderMembers();
}

/** Watches presence of users not watched yet (initial state via GET, updates via presence_sub). */
async function watch(users) {
  const fresh = users.filter((u) => u !== s.me && !s.watched.has(u));
  if (!fresh.length) return;
  for (const u of fresh) s.watched.add(u);
  send({ type: "presence_sub", users: fresh });
  await pollPresence(fresh);
}

async function pollPresence(users = [...s.watched]) {
  if (!users.length || !s.api) return;
  try {
    for (const p of await s.api.presence(users)) s.presence.set(p.user, p);
    renderMembers();
  } catch { /* the socket's frames or the next poll will do */ }
}

/** First page (`initial`) or the page before the oldest message we hold. */
async function loadOlder(room, initial = false) {
  if (room.loadingOlder) return;
  room.loadingOlder = true;
  const seqs = [...room.msgs.keys()];
  const before = initial || !seqs.length ? null : Math.min(...seqs);
  try {
    const page = await s.api.history(room.id, before, HISTORY_PAGE);
    const scroller = $("scroller");
    const fromBottom = scroller.scrollHeight - scroller.scrollTop;
    for (const m of page) addMessage(room, m, { history: true });
    room.historyLoaded = true;
    room.hasOlder = page.length === HISTORY_PAGE;
    if (s.active === room.id) {
      renderMessages(room);
      // Keep the view where it was when older messages go on top.
      scroller.scrollTop = initial ? scroller.scrollHeight : scroller.scrollHeight - fromBottom;
    }
  } catch (e) {
    showRoomError(`Cannot load messages: ${e.message}`);
  } finally {
    room.loadingOlder = false;
  }
}

// ---------- messages --------------------------------------------------------------

/** Stores a message unless its seq is known (replays after a resume are dropped here). */
function addMessage(room, m, { history = false } = {}) {
  if (room.msgs.has(m.seq)) return false;
  room.msgs.set(m.seq, m);
  if (!history && m.seq > (room.lastSeq ?? 0)) room.lastSeq = m.seq;
  if (m.from === s.me && s.pending.delete(m.id)) dropRendered(m.id);
  if (!history && m.from !== s.me) {
    clearTyping(room, m.from);
    if (m.seq > room.readSeq && !(room.id === s.active && looking())) room.unread += 1;
  }
  return true;
}

function onMessage(m) {
  const room = s.rooms.get(m.room);
  if (!room) return loadRooms();
  if (!addMessage(room, m)) return undefined;
  if (room.id === s.active) {
    const atBottom = nearBottom();
    renderMessages(room);
    if (atBottom || m.from === s.me) scrollToBottom();
    markRead();
  } else {
    renderRooms();
  }
  return undefined;
}

function onAck(a) {
  const p = s.pending.get(a.id);
  const room = s.rooms.get(a.room);
  if (!p || !room) return;
  s.pending.delete(a.id);
  dropRendered(a.id);
  addMessage(room, { ...p, seq: a.seq, ts: a.ts, pending: false });
  if (a.seq > (room.lastSeq ?? 0)) room.lastSeq = a.seq;
  // Our own message counts as read by us.
  room.readSeq = Math.max(room.readSeq, a.seq);
  if (room.id === s.active) {
    renderMessages(room);
    scrollToBottom();
  }
}

function onError(f) {
  const p = s.pending.get(f.ref);
  if (p) {
    if (f.code === "rate_limited") {
      setTimeout(() => sendPending(f.ref, p), f.retry_after_ms || 1000);
      return;
    }
    p.failed = f.message || f.code;
    if (p.room === s.active) renderMessages(s.rooms.get(p.room));
    return;
  }
  if (f.code === "unauthorized") return;
  showRoomError(`${f.ref}: ${f.message || f.code}`);
}

function newId() {
  const b = crypto.getRandomValues(new Uint8Array(12));
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

/** Shows the message at once (pending) and sends it; unacked ones are resent after a reconnect. */
function sendMessage(body, kind = "text", attachment = undefined) {
  const room = s.rooms.get(s.active);
  if (!room) return;
  const id = newId();
  const p = { room: room.id, id, from: s.me, ts: Date.now(), body, kind, attachment, pending: true };
  s.pending.set(id, p);
  sendPending(id, p);
  renderMessages(room);
  scrollToBottom();
}

function sendPending(id, p) {
  if (!s.pending.has(id)) return;
  send({ type: "send", room: p.room, id, body: p.body, kind: p.kind, attachment: p.attachment });
}

// ---------- typing -------------------------------------------------------------

function onComposerInput() {
  const text = $("composer-input").value;
  if (!text.trim()) return stopTyping();
  const t = s.typing;
  const now = Date.now();
  if (!t.active || t.room !== s.active || now - t.sentAt > TYPING_REFRESH_MS) {
    if (t.active && t.room !== s.active) stopTyping();
    send({ type: "typing", room: s.active, active: true });
    Object.assign(t, { room: s.active, active: true, sentAt: now });
  }
  clearTimeout(t.idle);
  t.idle = setTimeout(stopTyping, TYPING_IDLE_MS);
  return undefined;
}

function stopTyping() {
  const t = s.typing;
  clearTimeout(t.idle);
  if (t.active && t.room) send({ type: "typing", room: t.room, active: false });
  t.active = false;
}

function onTyping(f) {
  const room = s.rooms.get(f.room);
  if (!room || f.user === s.me) return;
  clearTyping(room, f.user);
  if (f.active) room.typing.set(f.user, setTimeout(() => clearTyping(room, f.user), TYPING_EXPIRE_MS));
  if (room.id === s.active) renderTyping();
}

function clearTyping(room, user) {
  const timer = room.typing.get(user);
  if (timer === undefined) return;
  clearTimeout(timer);
  room.typing.delete(user);
  if (room.id === s.active) renderTyping();
}

// ---------- read markers and presence ---------------------------------------------------

function looking() {
  return document.visibilityState === "visible" && document.hasFocus() && nearBottom();
}

/** Sends `read` for the newest message when the room is on screen and scrolled to the end. */
function markRead() {
  const room = s.rooms.get(s.active);
  if (!room || !looking()) return;
  const newest = Math.max(0, ...room.msgs.keys());
  if (newest > room.readSeq) {
    room.readSeq = newest;
    send({ type: "read", room: room.id, seq: newest });
  }
  if (room.unread) {
    room.unread = 0;
    renderRooms();
  }
}

function onRead(f) {
  const room = s.rooms.get(f.room);
  if (!room) return;
  if (f.user === s.me) {
    // Read on another device.
    room.readSeq = Math.max(room.readSeq, f.seq);
    room.unread = 0;
    return renderRooms();
  }
  room.readers.set(f.user, Math.max(room.readers.get(f.user) || 0, f.seq));
  if (room.id === s.active) renderSeen(room);
  return undefined;
}

function onPresence(f) {
  s.presence.set(f.user, { status: f.status, last_seen: f.last_seen });
  renderMembers();
}

// ---------- rendering -----------------------------------------------------------

function renderRooms() {
  const ul = $("rooms");
  ul.replaceChildren(...[...s.rooms.values()]
    .sort((a, b) => a.name.localeCompare(b.name))
    .map((r) => v.roomItem(r, r.id === s.active, () => openRoom(r.id))));
}

function renderRoom() {
  const room = s.rooms.get(s.active);
  $("room-title").textContent = room ? room.name : "No room selected";
  $("composer").hidden = !room;
  $("add-member").hidden = !room || room.role !== "owner";
  showRoomError("");
  s.rendered.clear();
  $("messages").replaceChildren();
  renderMembers();
  renderTyping();
  if (room) renderMessages(room);
  else $("older").hidden = true;
}

/** Adds the <li> of messages not on screen yet, in seq order, then the pending ones. */
function renderMessages(room) {
  if (!room || room.id !== s.active) return;
  const ol = $("messages");
  for (const [key, li] of s.rendered) {
    // Pending and failed ones are redrawn (their state changes).
    if (typeof key === "string") { li.remove(); s.rendered.delete(key); }
  }
  const seqs = [...room.msgs.keys()].sort((a, b) => a - b);
  let next = null; // the rendered <li> after which the next one goes
  for (const seq of seqs) {
    let li = s.rendered.get(seq);
    if (!li) {
      li = v.messageItem(room.msgs.get(seq), s.me, image);
      if (next) next.after(li); else ol.prepend(li);
      s.rendered.set(seq, li);
    }
    next = li;
  }
  for (const [id, p] of s.pending) {
    if (p.room !== room.id) continue;
    const li = v.messageItem(p, s.me, image);
    ol.append(li);
    s.rendered.set(id, li);
  }
  $("older").hidden = !room.hasOlder;
  renderSeen(room);
}

function dropRendered(key) {
  s.rendered.get(key)?.remove();
  s.rendered.delete(key);
}

/** "Seen by X" under the newest message each other member has read. */
function renderSeen(room) {
  for (const e of $("messages").querySelectorAll(".seen")) e.remove();
  const seqs = [...room.msgs.keys()].sort((a, b) => a - b);
  const at = new Map(); // seq → readers
  for (const [user, read] of room.readers) {
    let target = null;
    for (const seq of seqs) if (seq <= read) target = seq;
    if (target !== null) at.set(target, [...(at.get(target) || []), user]);
  }
  for (const [seq, users] of at) {
    s.rendered.get(seq)?.append(v.el("p", { class: "seen", "data-testid": "seen", text: `Seen by ${users.sort().join(", ")}` }));
  }
}

function renderTyping() {
  const room = s.rooms.get(s.active);
  $("typing").textContent = room ? v.typingText([...room.typing.keys()].sort()) : "";
}

function renderMembers() {
  const room = s.rooms.get(s.active);
  const ul = $("members");
  if (!room) return ul.replaceChildren();
  ul.replaceChildren(...room.members.map((u) => v.memberItem(u, s.presence.get(u), s.me)));
  return undefined;
}

function showRoomError(text) {
  $("room-error").textContent = text;
}

function image(id) {
  if (!s.images.has(id)) {
    s.images.set(id, s.api.attachment(id).then((blob) => URL.createObjectURL(blob)));
  }
  return s.images.get(id);
}

function nearBottom() {
  const e = $("scroller");
  return e.scrollTop + e.clientHeight >= e.scrollHeight - 40;
}

function scrollToBottom() {
  const e = $("scroller");
  e.scrollTop = e.scrollHeight;
}

// ---------- forms and events ------------------------------------------------------

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const input = $("composer-input");
  const body = input.value.trim();
  if (!body) return;
  input.value = "";
  stopTyping();
  sendMessage(body);
});

$("composer-input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});
$("composer-input").addEventListener("input", onComposerInput);
$("composer-input").addEventListener("blur", stopTyping);

$("attach").addEventListener("change", async (ev) => {
  const file = ev.target.files[0];
  ev.target.value = "";
  if (!file || !s.active) return;
  const caption = $("composer-input").value.trim();
  try {
    const a = await s.api.upload(s.active, file);
    $("composer-input").value = "";
    sendMessage(caption, "image", a.id);
  } catch (e) {
    showRoomError(`Upload failed: ${e.message}`);
  }
});

$("new-room").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const name = $("new-room-name").value.trim();
  const members = $("new-room-members").value.split(",").map((m) => m.trim()).filter(Boolean);
  try {
    const r = await s.api.createRoom(name, members);
    $("new-room-name").value = "";
    $("new-room-members").value = "";
    await loadRooms();
    if (!s.rooms.has(r.id)) s.rooms.set(r.id, newRoom({ ...r, role: "owner" }));
    await openRoom(r.id);
    $("composer-input").focus();
  } catch (e) {
    showRoomError(`Cannot create the room: ${e.message}`);
  }
});

$("add-member").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const room = s.rooms.get(s.active);
  const user = $("add-member-user").value.trim();
  if (!room || !user) return;
  try {
    await s.api.addMember(room.id, user);
    $("add-member-user").value = "";
    await loadMembers(room);
  } catch (e) {
    showRoomError(`Cannot add ${user}: ${e.message}`);
  }
});

$("older").addEventListener("click", () => {
  const room = s.rooms.get(s.active);
  if (room) loadOlder(room);
});

$("scroller").addEventListener("scroll", () => {
  const room = s.rooms.get(s.active);
  if (!room) return;
  if ($("scroller").scrollTop < 40 && room.hasOlder) loadOlder(room);
  markRead();
});

window.addEventListener("focus", markRead);
document.addEventListener("visibilitychange", markRead);
// "last seen 3 min ago" ages.
setInterval(renderMembers, 30000);

boot();
