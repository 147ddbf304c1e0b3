//! A WebSocket test client speaking the protocol, and small HTTP helpers.

use std::{net::SocketAddr, time::Duration};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

use super::token;

pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub user: String,
    /// Frames read while waiting for something else (e.g. an ack), in order.
    backlog: std::collections::VecDeque<Value>,
}

impl Client {
    /// Connects without authenticating.
    pub async fn raw(addr: SocketAddr) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws")).await.expect("ws connect");
        Self { ws, user: String::new(), backlog: Default::default() }
    }

    /// Connects and says hello as `user`; returns after `welcome`.
    pub async fn connect(addr: SocketAddr, user: &str) -> Self {
        let mut c = Self::raw(addr).await;
        c.user = user.to_owned();
        c.send(json!({"type":"hello","token": token(user)})).await;
        let w = c.recv().await;
        assert_eq!(w["type"], "welcome", "{w}");
        assert_eq!(w["user"], user);
        c
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.expect("ws send");
    }

    pub async fn send_text(&mut self, t: &str) {
        self.ws.send(Message::text(t.to_owned())).await.expect("ws send");
    }

    pub async fn send_raw(&mut self, m: Message) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        self.ws.send(m).await
    }

    /// The next data frame as JSON (control frames skipped); panics on close or timeout.
    pub async fn recv(&mut self) -> Value {
        match self.next().await {
            Some(Ok(v)) => v,
            Some(Err(code)) => panic!("{}: closed with {code:?} while a frame was expected", self.user),
            None => panic!("{}: no frame within {RECV_TIMEOUT:?}", self.user),
        }
    }

    /// `Some(Ok(frame))`, `Some(Err(close code))` at close, `None` on timeout.
    pub async fn next(&mut self) -> Option<Result<Value, Option<u16>>> {
        self.next_within(RECV_TIMEOUT).await
    }

    pub async fn next_within(&mut self, t: Duration) -> Option<Result<Value, Option<u16>>> {
        if let Some(v) = self.backlog.pop_front() {
            return Some(Ok(v));
        }
        loop {
            let m = match tokio::time::timeout(t, self.ws.next()).await {
                Err(_) => return None,
                Ok(None) => return Some(Err(None)),
                Ok(Some(Err(_))) => return Some(Err(None)),
                Ok(Some(Ok(m))) => m,
            };
            match m {
                Message::Text(t) => {
                    return Some(Ok(serde_json::from_str(&t).expect("server sends JSON")));
                }
                Message::Close(f) => return Some(Err(f.map(|f| u16::from(f.code)))),
                _ => continue,
            }
        }
    }

    /// Reads for `t` (answering pings, as WebSocket clients do): the pings
    /// seen, and the close code if the server closed meanwhile. Panics on a
    /// data frame.
    pub async fn pings_within(&mut self, t: Duration) -> (usize, Option<Option<u16>>) {
        let until = tokio::time::Instant::now() + t;
        let mut pings = 0;
        loop {
            match tokio::time::timeout_at(until, self.ws.next()).await {
                Err(_) => return (pings, None),
                Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
                Ok(Some(Ok(Message::Close(f)))) => return (pings, Some(f.map(|f| u16::from(f.code)))),
                Ok(None | Some(Err(_))) => return (pings, Some(None)),
                Ok(Some(Ok(m))) => panic!("{}: unexpected frame {m:?}", self.user),
            }
        }
    }

    /// Reads until the close frame and returns its code.
    pub async fn expect_close(&mut self) -> Option<u16> {
        loop {
            match self.next().await {
                Some(Ok(_)) => continue,
                Some(Err(code)) => return code,
                None => panic!("{}: no close within {RECV_TIMEOUT:?}", self.user),
            }
        }
    }

    /// The next frame, which must be of type `ty`.
    /// A `room_added` / `room_removed` notice is skipped unless it is the
    /// type expected: one about a room made just before the connection may
    /// still be in flight when it starts (the protocol allows them any time).
    pub async fn expect(&mut self, ty: &str) -> Value {
        loop {
            let v = self.recv().await;
            let notice = v["type"] == "room_added" || v["type"] == "room_removed";
            if notice && v["type"] != ty {
                continue;
            }
            assert_eq!(v["type"], ty, "{}: expected {ty}, got {v}", self.user);
            return v;
        }
    }

    pub async fn join(&mut self, room: &str, since: Option<u64>) -> u64 {
        let mut f = json!({"type":"join","room":room});
        if let Some(s) = since {
            f["since"] = json!(s);
        }
        self.send(f).await;
        let j = self.expect("joined").await;
        assert_eq!(j["room"], room);
        j["last_seq"].as_u64().unwrap()
    }

    /// Sends a message and waits for its ack; frames that arrive first stay
    /// queued for the next reads.
    pub async fn send_msg(&mut self, room: &str, id: &str, body: &str) -> u64 {
        self.send(json!({"type":"send","room":room,"id":id,"body":body})).await;
        let mut other = Vec::new();
        let seq = loop {
            let v = self.recv().await;
            if v["type"] == "ack" && v["id"] == id {
                break v["seq"].as_u64().unwrap();
            }
            assert_ne!(v["type"], "error", "send {id} failed: {v}");
            other.push(v);
        };
        // Keep order: the frames read here come before any backlog left.
        for v in other.into_iter().rev() {
            self.backlog.push_front(v);
        }
        seq
    }

    /// Collects `n` message frames for `room` (other frames are skipped).
    pub async fn messages(&mut self, room: &str, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let v = match self.next().await {
                Some(Ok(v)) => v,
                Some(Err(code)) => panic!("{}: closed {code:?} after {} of {n} messages", self.user, out.len()),
                None => panic!("{}: only {} of {n} messages arrived", self.user, out.len()),
            };
            if v["type"] == "message" && v["room"] == room {
                out.push(v);
            }
        }
        out
    }

    /// Asserts nothing but control frames arrive for `t`.
    pub async fn expect_silence(&mut self, t: Duration) {
        if let Some(Ok(v)) = self.next_within(t).await {
            panic!("{}: expected silence, got {v}", self.user);
        }
    }
}

/// Asserts seqs strictly increase and returns them.
pub fn seqs_in_order(msgs: &[Value]) -> Vec<u64> {
    let seqs: Vec<u64> = msgs.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "out of order or duplicated: {seqs:?}");
    seqs
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap()
}

/// GET `url` as `user`; panics unless 2xx; the JSON body.
pub async fn get_json(url: String, user: &str) -> Value {
    let r = http().get(url).bearer_auth(token(user)).send().await.unwrap();
    assert!(r.status().is_success(), "GET: {}", r.status());
    r.json().await.unwrap()
}

/// POST /v1/rooms as `owner`; panics unless 201.
pub async fn create_room(base: &str, owner: &str, id: &str, members: &[&str]) {
    let r = http()
        .post(format!("{base}/v1/rooms"))
        .bearer_auth(token(owner))
        .json(&json!({"id": id, "name": id, "members": members}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    assert_eq!(status, 201, "create room {id}: {}", r.text().await.unwrap());
}

/// `POST /v1/rooms/{room}/messages` as `user`; the stored seq.
pub async fn post_message(base: &str, user: &str, room: &str, id: &str, body: &str) -> u64 {
    let r = http()
        .post(format!("{base}/v1/rooms/{room}/messages"))
        .bearer_auth(token(user))
        .json(&serde_json::json!({"id": id, "body": body}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "send {id}: {}", r.status());
    r.json::<Value>().await.unwrap()["seq"].as_u64().unwrap()
}
