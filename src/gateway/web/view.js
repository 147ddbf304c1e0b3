// DOM building blocks. Text goes in with textContent only (never innerHTML),
// so message bodies cannot inject markup.

export const $ = (id) => document.getElementById(id);

/** el("li", {class: "x", "data-testid": "y"}, child…) */
export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

export function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

/** "just now", "5 min ago", "3 h ago", or a date. */
export function ago(ms) {
  if (!ms) return "never";
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 45) return "just now";
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(ms).toLocaleDateString();
}

const STATE_TEXT = {
  connecting: "connecting…",
  online: "online",
  reconnecting: "reconnecting…",
  offline: "offline",
};

export function showConnection(state, detail = {}) {
  const p = $("conn");
  p.dataset.state = state;
  p.dataset.transport = detail.transport || "";
  let text = STATE_TEXT[state] || state;
  if (state === "online" && detail.transport === "sse") text = "online (fallback: SSE)";
  if (detail.retryInMs) text = `${state} (retry in ${Math.ceil(detail.retryInMs / 1000)} s)…`;
  p.textContent = text;
}

export function roomItem(room, active, onOpen) {
  const badge = room.unread > 0
    ? el("span", { class: "badge", "data-testid": "unread-badge", text: String(room.unread) },
      el("span", { class: "visually-hidden", text: " unread" }))
    : null;
  return el("li", {},
    el("button", {
      type: "button", "data-testid": "room-item", "data-room": room.id,
      "aria-current": active ? "true" : "false", onclick: onOpen,
    }, el("span", { text: room.name }), badge));
}

/** One message; `mine` ones are styled apart, pending ones carry their client id. */
export function messageItem(m, me, images) {
  const mine = m.from === me;
  const cls = ["msg", mine ? "mine" : "", m.pending ? "pending" : "", m.failed ? "failed" : ""].join(" ").trim();
  const status = m.failed ? ` · not sent: ${m.failed}` : m.pending ? " · sending…" : "";
  const meta = el("div", { class: "meta" },
    el("span", { class: "from", text: mine ? "you" : m.from }),
    el("span", { text: ` · ${clock(m.ts || Date.now())}${status}` }));
  const li = el("li", {
    class: cls, "data-testid": "message", "data-seq": m.seq ?? "", "data-id": m.id, "data-from": m.from,
  }, meta);
  if (m.kind === "image" && m.attachment) {
    const img = el("img", { alt: m.body ? m.body : `image from ${m.from}`, "data-testid": "message-image" });
    images(m.attachment).then((url) => { img.src = url; }, () => {
      img.replaceWith(el("span", { class: "body", text: "[image unavailable]" }));
    });
    li.append(el("figure", {}, img, m.body ? el("figcaption", { class: "body", text: m.body }) : null));
  } else {
    li.append(el("div", { class: "body", "data-testid": "message-body", text: m.body }));
  }
  return li;
}

export function memberItem(user, p, me) {
  const status = user === me ? "online" : p?.status || "unknown";
  const seen = status === "offline" ? ` · last seen ${ago(p?.last_seen)}` : "";
  return el("li", { "data-testid": "presence", "data-user": user, "data-status": status },
    el("span", { class: "dot", "data-status": status, "aria-hidden": "true" }),
    el("span", { text: user === me ? `${user} (you)` : user }),
    el("span", { class: "visually-hidden", text: `: ${status}` }),
    seen ? el("span", {
      class: "last-seen", "data-testid": "last-seen", title: new Date(p.last_seen || 0).toLocaleString(), text: seen,
    }) : null);
}

export function typingText(users) {
  if (users.length === 0) return "";
  if (users.length === 1) return `${users[0]} is typing…`;
  if (users.length <= 3) return `${users.slice(0, -1).join(", ")} and ${users.at(-1)} are typing…`;
  return "Several people are typing…";
}
