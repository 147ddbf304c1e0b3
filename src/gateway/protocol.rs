//! Client ↔ gateway frames of docs/protocol.md. Incoming frames are decoded
//! here; outgoing frames (except `message`, which is spliced once per gateway
//! in `bus::envelope`) are encoded here.

use axum::extract::ws::Utf8Bytes;
use serde::{Deserialize, Serialize};

use crate::{bus::envelope::Kind, error::Code};

/// A frame from the client. Ids arrive as text and are parsed by the handler,
/// so that a bad id gets `bad_request` with a precise message.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Hello {
        token: String,
    },
    Join {
        room: String,
        since: Option<u64>,
    },
    Leave {
        room: String,
    },
    Send {
        room: String,
        id: String,
        #[serde(default)]
        body: String,
        #[serde(default)]
        kind: Kind,
        attachment: Option<String>,
    },
    Read {
        room: String,
        seq: u64,
    },
    Typing {
        room: String,
        active: bool,
    },
    Presence {
        status: String,
    },
    PresenceSub {
        users: Vec<String>,
    },
    /// natter addition: stop watching these users.
    PresenceUnsub {
        users: Vec<String>,
    },
    Ping,
    Refresh {
        token: String,
    },
}

const KNOWN: &[&str] = &[
    "hello",
    "join",
    "leave",
    "send",
    "read",
    "typing",
    "presence",
    "presence_sub",
    "presence_unsub",
    "ping",
    "refresh",
];

/// A frame that could not be decoded, with what the error frame needs.
#[derive(Debug)]
pub struct Undecodable {
    pub code: Code,
    /// The client id of a `send`, else the frame type (or "frame").
    pub reference: String,
    pub message: String,
}

#[derive(Deserialize)]
struct Peek {
    #[serde(rename = "type")]
    ty: Option<serde_json::Value>,
    id: Option<serde_json::Value>,
}

pub fn decode(text: &str) -> Result<ClientFrame, Undecodable> {
    match serde_json::from_str::<ClientFrame>(text) {
        Ok(f) => Ok(f),
        Err(err) => {
            let peek = serde_json::from_str::<Peek>(text).ok();
            let ty = peek.as_ref().and_then(|p| p.ty.as_ref()).and_then(|t| t.as_str()).map(str::to_owned);
            let reference = match (&ty, peek.as_ref().and_then(|p| p.id.as_ref()).and_then(|i| i.as_str())) {
                (Some(t), Some(id)) if t == "send" => id.chars().take(64).collect(),
                (Some(t), _) => t.chars().take(32).collect(),
                _ => "frame".to_owned(),
            };
            let message = match (&peek, &ty) {
                (None, _) => format!("not a JSON object: {}", short(&err)),
                (Some(_), None) => "missing \"type\"".to_owned(),
                (Some(_), Some(t)) if !KNOWN.contains(&t.as_str()) => "unknown type".to_owned(),
                (Some(_), Some(_)) => format!("bad fields: {}", short(&err)),
            };
            Err(Undecodable { code: Code::BadRequest, reference, message })
        }
    }
}

fn short(e: &serde_json::Error) -> String {
    let s = e.to_string();
    s.chars().take(160).collect()
}

/// A frame to the client (all but `message`).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Welcome {
        user: &'a str,
        session: &'a str,
        node: &'a str,
        heartbeat_ms: u64,
    },
    Joined {
        room: &'a str,
        last_seq: u64,
    },
    Left {
        room: &'a str,
    },
    Ack {
        id: &'a str,
        room: &'a str,
        seq: u64,
        ts: i64,
    },
    Read {
        room: &'a str,
        user: &'a str,
        seq: u64,
    },
    Pong,
    Refreshed {
        exp: u64,
    },
    Error {
        code: Code,
        #[serde(rename = "ref")]
        reference: &'a str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

/// What an error about `frame` refers to: a send's client id, else the frame type.
pub fn reference(frame: &ClientFrame) -> &str {
    match frame {
        ClientFrame::Send { id, .. } => id.get(..id.len().min(64)).unwrap_or("send"),
        ClientFrame::Hello { .. } => "hello",
        ClientFrame::Ping => "ping",
        ClientFrame::Join { .. } => "join",
        ClientFrame::Leave { .. } => "leave",
        ClientFrame::Read { .. } => "read",
        ClientFrame::Refresh { .. } => "refresh",
        ClientFrame::Typing { .. } => "typing",
        ClientFrame::Presence { .. } => "presence",
        ClientFrame::PresenceSub { .. } => "presence_sub",
        ClientFrame::PresenceUnsub { .. } => "presence_unsub",
    }
}

impl ServerFrame<'_> {
    pub fn encode(&self) -> Utf8Bytes {
        Utf8Bytes::from(serde_json::to_string(self).expect("serialisable"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_known_frames_and_ignores_unknown_fields() {
        let f = decode(r#"{"type":"join","room":"general","since":5,"extra":1}"#).unwrap();
        assert!(matches!(f, ClientFrame::Join { since: Some(5), .. }));
        let f = decode(r#"{"type":"send","room":"r","id":"1","body":"hi"}"#).unwrap();
        assert!(matches!(f, ClientFrame::Send { kind: Kind::Text, .. }));
    }

    #[test]
    fn explains_what_is_wrong() {
        assert_eq!(decode("{nope").unwrap_err().reference, "frame");
        assert_eq!(decode(r#"{"type":"dance"}"#).unwrap_err().message, "unknown type");
        let e = decode(r#"{"type":"send","room":"r","id":"m1","body":5}"#).unwrap_err();
        assert_eq!(e.reference, "m1");
        assert!(e.message.starts_with("bad fields"));
        let deep = "[".repeat(10_000);
        assert_eq!(decode(&deep).unwrap_err().code, Code::BadRequest);
    }
}
