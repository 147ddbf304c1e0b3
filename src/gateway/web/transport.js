// How frames travel: a WebSocket (the normal case) or, when WebSockets cannot
// connect, Server-Sent Events plus HTTP POSTs. Both report a connection state
// ("connecting" | "online" | "reconnecting" | "offline") and hand every server
// frame to `onFrame`, in the shapes of docs/protocol.md.

/** Exponential backoff with jitter: between half and all of min(cap, base·2^n). */
export function backoffDelay(attempt, base = 500, cap = 30000) {
  const d = Math.min(cap, base * 2 ** Math.min(attempt, 16));
  return Math.round(d / 2 + Math.random() * (d / 2));
}

export class WsTransport {
  /**
   * @param {object} o
   * @param {() => string} o.token       the current token (read at each connect)
   * @param {(f: object) => void} o.onFrame
   * @param {(state: string, detail?: object) => void} o.onState
   * @param {(code: number) => void} o.onAuthFailed   close 4001: get a new token (the retry uses it)
   * @param {(failures: number) => void} o.onFailures consecutive attempts that never got `welcome`
   */
  constructor(o) {
    Object.assign(this, o);
    this.kind = "ws";
    this.ws = null;
    this.open = false; // welcome received on the current socket
    this.attempt = 0;
    this.failures = 0;
    this.everOnline = false;
    this.timer = null;
    this.stopped = true;
    this.lastRx = 0;
    this.heartbeat = null;
    this.onOnline = () => this.reconnectNow();
    this.onOffline = () => this.dropForOffline();
  }

  start() {
    this.stopped = false;
    window.addEventListener("online", this.onOnline);
    window.addEventListener("offline", this.onOffline);
    if (navigator.onLine === false) this.state("offline");
    else this.connect();
  }

  stop() {
    this.stopped = true;
    window.removeEventListener("online", this.onOnline);
    window.removeEventListener("offline", this.onOffline);
    clearTimeout(this.timer);
    this.discard(1000, "bye");
  }

  state(s, detail) {
    this.current = s;
    this.onState(s, { transport: "ws", ...detail });
  }

  connect() {
    clearTimeout(this.timer);
    this.discard(1000, "reconnect");
    this.state(this.everOnline ? "reconnecting" : "connecting");
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/ws`;
    const ws = new WebSocket(url);
    this.ws = ws;
    let welcomed = false;
    ws.onopen = () => ws.send(JSON.stringify({ type: "hello", token: this.token() }));
    ws.onmessage = (ev) => {
      this.lastRx = Date.now();
      let f;
      try { f = JSON.parse(ev.data); } catch { return; }
      if (f.type === "welcome") {
        welcomed = true;
        this.open = true;
        this.attempt = 0;
        this.failures = 0;
        this.everOnline = true;
        this.startHeartbeat(f.heartbeat_ms);
        this.state("online", { node: f.node });
      }
      this.onFrame(f);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return; // a socket we already let go of
      this.ws = null;
      this.open = false;
      clearInterval(this.heartbeat);
      if (this.stopped) return;
      if (!welcomed) this.onFailures(++this.failures);
      // 4001: the app gets a new token meanwhile (read at the next connect).
      if (ev.code === 4001) this.onAuthFailed(ev.code);
      this.schedule(ev.code === 4029 ? 10000 : 0);
    };
  }

  /** Waits (backoff with jitter, at least `floor` ms) and connects again; offline: waits for `online`. */
  schedule(floor = 0) {
    if (this.stopped) return;
    clearTimeout(this.timer);
    if (navigator.onLine === false) {
      this.state("offline");
      return;
    }
    const delay = Math.max(floor, backoffDelay(this.attempt++));
    this.state(this.everOnline ? "reconnecting" : "connecting", { retryInMs: delay });
    this.timer = setTimeout(() => this.connect(), delay);
  }

  /** The network is back (or a new token is there): connect now, backoff reset. */
  reconnectNow() {
    if (this.stopped || this.open) return;
    this.attempt = 0;
    this.connect();
  }

  /** The browser went offline: let the socket go at once rather than wait for TCP to notice. */
  dropForOffline() {
    if (this.stopped) return;
    clearTimeout(this.timer);
    this.discard(1000, "offline");
    this.state("offline");
  }

  discard(code, reason) {
    const ws = this.ws;
    this.ws = null;
    this.open = false;
    clearInterval(this.heartbeat);
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try { ws.close(code, reason); } catch { /* already closed */ }
    }
  }

  /** Client pings every heartbeat; silence for two of them (plus slack) means a dead socket. */
  startHeartbeat(ms) {
    const every = Math.max(5000, ms || 25000);
    this.lastRx = Date.now();
    clearInterval(this.heartbeat);
    this.heartbeat = setInterval(() => {
      if (!this.open) return;
      if (Date.now() - this.lastRx > 2 * every + 5000) {
        this.discard(4000, "silent");
        this.schedule();
        return;
      }
      this.send({ type: "ping" });
    }, every);
  }

  /** Sends a frame; false when not connected (the caller keeps it for later). */
  send(frame) {
    if (!this.open || !this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  focus() { /* every joined room is live on the socket */ }
}

/**
 * Fallback without WebSocket: one EventSource for the room on screen
 * (`GET /v1/rooms/{id}/events?token=`, events message/typing/read, resumed by
 * the browser with Last-Event-ID), and frames sent as HTTP requests.
 */
export class SseTransport {
  constructor({ api, onFrame, onState }) {
    Object.assign(this, { api, onFrame, onState });
    this.kind = "sse";
    this.es = null;
    this.room = null;
    this.attempt = 0;
    this.timer = null;
    this.stopped = true;
    this.open = false;
  }

  start() {
    this.stopped = false;
    this.state("connecting");
    // No socket welcome: the app treats this as one (rejoin, resend).
    queueMicrotask(() => {
      this.onFrame({ type: "welcome", transport: "sse" });
      if (!this.room) this.state("online"); // nothing to stream until a room is open
    });
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.es) this.es.close();
    this.es = null;
  }

  state(s, detail) {
    this.current = s;
    this.onState(s, { transport: "sse", ...detail });
  }

  /** Streams `room` (the one on screen) instead of the previous one. */
  focus(room) {
    if (this.stopped || room === this.room) return;
    this.room = room;
    this.subscribe();
  }

  subscribe() {
    clearTimeout(this.timer);
    if (this.es) this.es.close();
    this.es = null;
    this.open = false;
    if (!this.room) {
      this.state("online");
      return;
    }
    const room = this.room;
    const es = new EventSource(this.api.eventsUrl(room));
    this.es = es;
    const relay = (type) => (ev) => {
      let data;
      try { data = JSON.parse(ev.data); } catch { return; }
      this.onFrame({ room, ...data, type });
    };
    es.addEventListener("message", relay("message"));
    es.addEventListener("typing", relay("typing"));
    es.addEventListener("read", relay("read"));
    es.addEventListener("joined", relay("joined")); // only when the resume skipped messages
    es.onopen = () => {
      this.attempt = 0;
      this.open = true;
      this.state("online");
    };
    es.onerror = () => {
      this.open = false;
      if (es.readyState === EventSource.CLOSED) {
        // The browser gave up (e.g. an HTTP error): try again ourselves.
        const delay = backoffDelay(this.attempt++);
        this.state(navigator.onLine === false ? "offline" : "reconnecting", { retryInMs: delay });
        this.timer = setTimeout(() => this.subscribe(), delay);
      } else {
        this.state(navigator.onLine === false ? "offline" : "reconnecting");
      }
    };
  }

  /** The socket frames the app sends, as HTTP requests; replies come back as frames. */
  send(frame) {
    if (this.stopped) return false;
    const { room } = frame;
    switch (frame.type) {
      case "send":
        this.api
          .send(room, { id: frame.id, body: frame.body, kind: frame.kind, attachment: frame.attachment })
          .then((r) => this.onFrame({ type: "ack", id: frame.id, room, seq: r.seq, ts: r.ts }))
          .catch((e) => this.onFrame({ type: "error", ref: frame.id, code: e.code || "internal", message: e.message }));
        return true;
      case "read":
        this.api.read(room, frame.seq).catch(() => {});
        return true;
      default:
        // join: the stream of the focused room covers it; typing and
        // presence_sub have no HTTP form (presence is polled by the app).
        return true;
    }
  }
}
