//! `bench floor-server`: the least a chat server can do per delivery, to
//! measure natter against on the same machine, client and scenario.
//!
//! It speaks just enough of the protocol for `bench fanout` and the reference
//! peers' Node client (`POST /v1/rooms`, `GET /readyz`, the WebSocket
//! upgrade, `hello`, `join`, `send`, `ping`) and does per
//! message what any server that fans out over WebSocket must: encode the
//! `message` frame once and write it to each member's socket, one `write`
//! per delivery, straight from the task that read the `send` (no queue, no
//! wakeup of another task). No broker, no log, no authentication, no
//! presence, one process: it is a floor, not a server. What natter spends
//! per delivery above it is natter's own; what the floor spends is the
//! kernel's send and wakeup, which any design that writes each delivery to
//! its own socket pays.
//!
//! Loopback only; it exits by itself after `--exit-after`.

use std::{
    collections::HashMap,
    io::ErrorKind,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use base64::Engine;
use clap::Args;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Args)]
pub struct FloorArgs {
    /// Address to listen on (loopback only).
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// Exit after this long, whatever is connected.
    #[arg(long, default_value = "10m", value_parser = crate::config::parse_duration)]
    pub exit_after: Duration,
}

/// Client frames and HTTP heads above this are refused (the connection closes).
const MAX_INPUT: usize = 1 << 20;

pub async fn serve(a: FloorArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.listen.ip().is_loopback(), "floor-server: loopback addresses only");
    let listener = TcpListener::bind(a.listen).await.with_context(|| format!("bind {}", a.listen))?;
    eprintln!("floor-server: listening on {} for {:?}", a.listen, a.exit_after);
    let rooms: Rooms = Arc::default();
    let accept = async {
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let conn = Arc::new(Conn { stream, pending: Mutex::default(), closed: AtomicBool::new(false) });
            let rooms = rooms.clone();
            tokio::spawn(async move {
                let _ = session(&conn, &rooms).await;
                conn.closed.store(true, Relaxed);
            });
        }
    };
    tokio::select! {
        r = accept => r,
        () = tokio::time::sleep(a.exit_after) => Ok(()),
    }
}

type Rooms = Arc<Mutex<HashMap<String, Room>>>;

#[derive(Default)]
struct Room {
    seq: u64,
    members: Vec<Arc<Conn>>,
}

struct Conn {
    stream: TcpStream,
    /// Bytes the socket did not take; a flusher task owns writing them.
    pending: Mutex<Vec<u8>>,
    closed: AtomicBool,
}

impl Conn {
    /// Writes `frame` now if nothing is queued (one `write`), else queues it
    /// behind what is, so frames stay in order and none is lost.
    fn deliver(self: &Arc<Self>, frame: &[u8]) {
        if self.closed.load(Relaxed) {
            return;
        }
        let mut pending = self.pending.lock();
        if !pending.is_empty() {
            pending.extend_from_slice(frame);
            return;
        }
        let written = match self.stream.try_write(frame) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
            Err(_) => return,
        };
        if written < frame.len() {
            pending.extend_from_slice(&frame[written..]);
            tokio::spawn(self.clone().flush());
        }
    }

    async fn flush(self: Arc<Self>) {
        loop {
            if self.stream.writable().await.is_err() {
                return;
            }
            let mut pending = self.pending.lock();
            match self.stream.try_write(&pending) {
                Ok(n) => {
                    pending.drain(..n);
                    if pending.is_empty() {
                        return;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }
}

/// One connection: HTTP requests until a WebSocket upgrade, then frames.
async fn session(conn: &Arc<Conn>, rooms: &Rooms) -> anyhow::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    let mut user = String::new();
    let mut upgraded = false;
    loop {
        // Everything complete in the buffer first, then read more.
        let used = if upgraded {
            match ws_frame(&buf)? {
                Some((opcode, payload, used)) => {
                    match opcode {
                        0x1 => on_text(conn, rooms, &mut user, &payload)?,
                        0x8 => {
                            conn.deliver(&[0x88, 0x00]);
                            return Ok(());
                        }
                        0x9 => conn.deliver(&ws_encode(0xA, &payload)),
                        _ => {}
                    }
                    used
                }
                None => 0,
            }
        } else {
            match http_request(conn, rooms, &buf)? {
                Some((used, upgrade)) => {
                    upgraded = upgrade;
                    used
                }
                None => 0,
            }
        };
        if used > 0 {
            buf.drain(..used);
            continue;
        }
        anyhow::ensure!(buf.len() < MAX_INPUT, "input too large");
        conn.stream.readable().await?;
        match conn.stream.try_read_buf(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Answers one complete HTTP request in `buf`: `POST /v1/rooms` is 201, a
/// WebSocket upgrade is 101. Returns the bytes used and whether it upgraded.
fn http_request(conn: &Arc<Conn>, rooms: &Rooms, buf: &[u8]) -> anyhow::Result<Option<(usize, bool)>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(head) = req.parse(buf)? else {
        return Ok(None);
    };
    let header = |name: &str| req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
    if let Some(key) = header("sec-websocket-key") {
        let accept = tungstenite::handshake::derive_accept_key(key);
        let head_out = format!(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
        );
        conn.deliver(head_out.as_bytes());
        return Ok(Some((head, true)));
    }
    let length: usize = header("content-length")
        .map(|v| std::str::from_utf8(v).unwrap_or("0").trim().parse())
        .transpose()?
        .unwrap_or(0);
    if buf.len() < head + length {
        return Ok(None);
    }
    let (status, body) = match (req.method, req.path) {
        (Some("POST"), Some("/v1/rooms")) => {
            #[derive(Deserialize)]
            struct Create {
                id: String,
            }
            let c: Create = serde_json::from_slice(&buf[head..head + length])?;
            rooms.lock().entry(c.id.clone()).or_default();
            ("201 Created", json!({ "id": c.id }).to_string())
        }
        (Some("GET"), Some("/readyz")) => ("200 OK", json!({ "status": "ready" }).to_string()),
        _ => ("404 Not Found", json!({ "error": "not_found" }).to_string()),
    };
    let out =
        format!("HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    conn.deliver(out.as_bytes());
    Ok(Some((head + length, false)))
}

#[derive(Deserialize)]
struct ClientFrame {
    #[serde(rename = "type")]
    ty: String,
    #[serde(default)]
    token: String,
    #[serde(default)]
    room: String,
    #[serde(default)]
    id: String,
    #[serde(default)]
    body: String,
}

fn on_text(conn: &Arc<Conn>, rooms: &Rooms, user: &mut String, payload: &[u8]) -> anyhow::Result<()> {
    let f: ClientFrame = serde_json::from_slice(payload)?;
    let reply = match f.ty.as_str() {
        "hello" => {
            *user = token_subject(&f.token).unwrap_or_else(|| "anonymous".into());
            json!({"type": "welcome", "user": user, "session": "floor", "node": "floor", "heartbeat_ms": 25000})
        }
        "join" => {
            let mut rooms = rooms.lock();
            let room = rooms.entry(f.room.clone()).or_default();
            if !room.members.iter().any(|m| Arc::ptr_eq(m, conn)) {
                room.members.push(conn.clone());
            }
            json!({"type": "joined", "room": f.room, "last_seq": room.seq})
        }
        "send" => {
            let ts = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            let mut rooms = rooms.lock();
            let room = rooms.entry(f.room.clone()).or_default();
            room.seq += 1;
            let message = json!({
                "type": "message", "room": f.room, "seq": room.seq, "id": f.id,
                "from": user, "ts": ts, "body": f.body, "kind": "text",
            });
            // Encoded once, written to every member.
            let frame = ws_encode(0x1, message.to_string().as_bytes());
            room.members.retain(|m| !m.closed.load(Relaxed));
            for m in &room.members {
                m.deliver(&frame);
            }
            json!({"type": "ack", "id": f.id, "room": f.room, "seq": room.seq, "ts": ts})
        }
        "ping" => json!({"type": "pong"}),
        other => json!({"type": "error", "code": "bad_request", "message": format!("floor-server: no {other:?}")}),
    };
    conn.deliver(&ws_encode(0x1, reply.to_string().as_bytes()));
    Ok(())
}

/// The `sub` of a JWT, unverified (the floor authenticates nobody).
fn token_subject(token: &str) -> Option<String> {
    let claims = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(claims).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v["sub"].as_str().map(String::from)
}

/// One complete client frame at the start of `buf`: (opcode, unmasked
/// payload, bytes used). Fragmented messages are not needed by the load
/// generator and are refused.
fn ws_frame(buf: &[u8]) -> anyhow::Result<Option<(u8, Vec<u8>, usize)>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    anyhow::ensure!(buf[0] & 0x80 != 0, "fragmented frames are not supported");
    anyhow::ensure!(buf[1] & 0x80 != 0, "client frames must be masked");
    let (len, mut at) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into()?) as usize, 10),
        126 | 127 => return Ok(None),
        n => (n as usize, 2),
    };
    anyhow::ensure!(len <= MAX_INPUT, "frame too large");
    if buf.len() < at + 4 + len {
        return Ok(None);
    }
    let mask = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
    at += 4;
    let payload = buf[at..at + len].iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
    Ok(Some((buf[0] & 0x0f, payload, at + len)))
}

/// A server frame (unmasked, final) with `opcode` around `payload`.
fn ws_encode(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 10);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= u16::MAX as usize => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame as a client writes it: masked.
    fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut f = ws_encode(opcode, payload);
        let at = f.len() - payload.len();
        f[1] |= 0x80;
        f.splice(at..at, mask);
        for (i, b) in f[at + 4..].iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
        f
    }

    #[test]
    fn frames_read_back_what_was_written_at_every_length_form() {
        for len in [0, 125, 126, 65_535, 65_536] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut buf = masked(0x1, &payload);
            let whole = buf.len();
            buf.extend_from_slice(&masked(0x9, b"next"));
            let (op, got, used) = ws_frame(&buf).unwrap().unwrap();
            assert_eq!((op, used), (0x1, whole), "length {len}");
            assert_eq!(got, payload);
            // A frame cut anywhere is incomplete, not an error.
            assert!(ws_frame(&buf[..whole - 1]).unwrap().is_none());
        }
        assert!(ws_frame(&ws_encode(0x1, b"unmasked")).is_err());
    }

    #[test]
    fn the_subject_comes_from_the_token() {
        let signer = crate::auth::Signer::hs256("floor-test-secret-floor-test-secret");
        let token = signer.mint("alice", Duration::from_secs(60), None).unwrap();
        assert_eq!(token_subject(&token).as_deref(), Some("alice"));
        assert_eq!(token_subject("not a token"), None);
    }
}
