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
use clap::Args;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tungstenite::protocol::frame::{
    Frame, FrameHeader,
    coding::{Control, Data, OpCode},
};

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
                        OpCode::Data(Data::Text) => on_text(conn, rooms, &mut user, &payload)?,
                        OpCode::Control(Control::Close) => {
                            conn.deliver(&encode(Frame::close(None)));
                            return Ok(());
                        }
                        OpCode::Control(Control::Ping) => conn.deliver(&encode(Frame::pong(payload))),
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
            let frame = encode(text(message));
            room.members.retain(|m| !m.closed.load(Relaxed));
            for m in &room.members {
                m.deliver(&frame);
            }
            json!({"type": "ack", "id": f.id, "room": f.room, "seq": room.seq, "ts": ts})
        }
        "ping" => json!({"type": "pong"}),
        other => json!({"type": "error", "code": "bad_request", "message": format!("floor-server: no {other:?}")}),
    };
    conn.deliver(&encode(text(reply)));
    Ok(())
}

/// The `sub` of a JWT, unverified (the floor authenticates nobody).
fn token_subject(token: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Claims {
        sub: String,
    }
    jsonwebtoken::dangerous::insecure_decode_claims::<Claims>(token).ok().map(|c| c.sub)
}

/// One complete client frame at the start of `buf`: (opcode, unmasked
/// payload, bytes used). Fragmented messages are not needed by the load
/// generator and are refused.
fn ws_frame(buf: &[u8]) -> anyhow::Result<Option<(OpCode, Vec<u8>, usize)>> {
    let mut cursor = std::io::Cursor::new(buf);
    let Some((header, len)) = FrameHeader::parse(&mut cursor)? else {
        return Ok(None);
    };
    anyhow::ensure!(header.is_final, "fragmented frames are not supported");
    let mask = header.mask.context("client frames must be masked")?;
    let len = usize::try_from(len)?;
    anyhow::ensure!(len <= MAX_INPUT, "frame too large");
    let at = cursor.position() as usize;
    if buf.len() < at + len {
        return Ok(None);
    }
    let payload = buf[at..at + len].iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
    Ok(Some((header.opcode, payload, at + len)))
}

/// A final text frame of `v`'s JSON.
fn text(v: serde_json::Value) -> Frame {
    Frame::message(v.to_string(), OpCode::Data(Data::Text), true)
}

/// The bytes of a server frame (unmasked).
fn encode(frame: Frame) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.len());
    frame.format(&mut out).expect("a Vec takes every write");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame as a client writes it: masked.
    fn masked(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut f = Frame::message(payload.to_vec(), opcode, true);
        f.header_mut().mask = Some([1, 2, 3, 4]);
        encode(f)
    }

    #[test]
    fn frames_read_back_what_was_written_at_every_length_form() {
        let text = OpCode::Data(Data::Text);
        for len in [0, 125, 126, 65_535, 65_536] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut buf = masked(text, &payload);
            let whole = buf.len();
            buf.extend_from_slice(&masked(OpCode::Data(Data::Binary), b"next"));
            let (op, got, used) = ws_frame(&buf).unwrap().unwrap();
            assert_eq!((op, used), (text, whole), "length {len}");
            assert_eq!(got, payload);
            // A frame cut anywhere is incomplete, not an error.
            assert!(ws_frame(&buf[..whole - 1]).unwrap().is_none());
        }
        assert!(ws_frame(&encode(Frame::message("unmasked", text, true))).is_err());
        let mut fragment = masked(text, b"part");
        fragment[0] &= 0x7f; // not final
        assert!(ws_frame(&fragment).is_err());
    }

    #[test]
    fn the_subject_comes_from_the_token() {
        let signer = crate::auth::Signer::hs256("floor-test-secret-floor-test-secret");
        let token = signer.mint("alice", Duration::from_secs(60), None).unwrap();
        assert_eq!(token_subject(&token).as_deref(), Some("alice"));
        assert_eq!(token_subject("not a token"), None);
    }
}
