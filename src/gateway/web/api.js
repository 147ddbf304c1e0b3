// HTTP API of docs/protocol.md: JSON with a Bearer token; errors become
// ApiError with the server's code.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message || code || `HTTP ${status}`);
    this.status = status;
    this.code = code;
  }
}

async function errorOf(res) {
  let code = "", message = "";
  try {
    const body = await res.json();
    code = body?.error?.code ?? "";
    message = body?.error?.message ?? "";
  } catch { /* not JSON */ }
  return new ApiError(res.status, code, message || `${res.status} ${res.statusText}`);
}

/** `POST /v1/dev/token`: a token for `user` (gateways started with --dev only). */
export async function devToken(user) {
  const res = await fetch("/v1/dev/token", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ user }),
  });
  if (!res.ok) throw await errorOf(res);
  return (await res.json()).token;
}

/** The `sub` of a JWT (not verified: the server does that). */
export function tokenUser(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part)).sub || null;
  } catch {
    return null;
  }
}

export class Api {
  constructor(token) {
    this.token = token;
  }

  async request(method, path, body, { raw = false, contentType } = {}) {
    const headers = { Authorization: `Bearer ${this.token}` };
    let payload;
    if (body instanceof Blob) {
      payload = body;
      headers["Content-Type"] = contentType || body.type || "application/octet-stream";
    } else if (body !== undefined) {
      payload = JSON.stringify(body);
      headers["Content-Type"] = "application/json";
    }
    const res = await fetch(path, { method, headers, body: payload });
    if (!res.ok) throw await errorOf(res);
    if (raw) return res;
    return res.status === 204 ? null : res.json();
  }

  rooms() { return this.request("GET", "/v1/rooms").then((r) => r.rooms); }
  createRoom(name, members) { return this.request("POST", "/v1/rooms", { name, members }); }
  addMember(room, user) { return this.request("POST", `/v1/rooms/${enc(room)}/members`, { user }); }
  members(room) { return this.request("GET", `/v1/rooms/${enc(room)}/members`).then((r) => r.members); }

  /** Newest first, `limit` messages older than `before` (all when absent). */
  history(room, before, limit = 50) {
    const q = new URLSearchParams({ limit: String(limit) });
    if (before != null) q.set("before", String(before));
    return this.request("GET", `/v1/rooms/${enc(room)}/messages?${q}`).then((r) => r.messages);
  }

  presence(users) {
    return this.request("GET", `/v1/presence?users=${users.map(enc).join(",")}`).then((r) => r.presence);
  }

  // HTTP counterparts of the socket frames (the SSE transport uses them).
  send(room, msg) { return this.request("POST", `/v1/rooms/${enc(room)}/messages`, msg); }
  read(room, seq) { return this.request("POST", `/v1/rooms/${enc(room)}/read`, { seq }); }

  /** `POST /v1/rooms/{id}/attachments` with the file as the raw body → `{id,size,content_type}`. */
  upload(room, file) {
    return this.request("POST", `/v1/rooms/${enc(room)}/attachments`, file, { contentType: file.type });
  }

  /** The attachment's bytes as a Blob (fetched with the Bearer header). */
  async attachment(id) {
    const res = await this.request("GET", `/v1/attachments/${enc(id)}`, undefined, { raw: true });
    return res.blob();
  }

  /** `GET /v1/rooms/{id}/events` URL for EventSource (which cannot set headers). */
  eventsUrl(room) {
    return `/v1/rooms/${enc(room)}/events?token=${encodeURIComponent(this.token)}`;
  }
}

const enc = encodeURIComponent;
