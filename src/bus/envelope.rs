//! What a room message looks like in the CHAT stream, and how it becomes the
//! client's `message` frame without being parsed again (encode once).

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// `text` (default) or `image`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    #[default]
    Text,
    Image,
}

/// The stored payload. Room and seq are not stored: they are the subject and
/// the stream sequence.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredMessage {
    pub id: String,
    pub from: String,
    pub ts: i64,
    pub body: String,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<String>,
}

/// A message as clients see it (history over HTTP).
#[derive(Debug, Clone, Serialize)]
pub struct MessageView {
    pub room: String,
    pub seq: u64,
    #[serde(flatten)]
    pub msg: StoredMessage,
}

/// The `message` frame for a stored payload: the payload's JSON object with
/// `type`, `room` and `seq` spliced in front. `None` if the payload is not a
/// JSON object (never written by natter).
pub fn message_frame(room: &str, seq: u64, payload: &[u8]) -> Option<Bytes> {
    if payload.len() < 2 || payload[0] != b'{' || payload[payload.len() - 1] != b'}' {
        return None;
    }
    let mut buf = BytesMut::with_capacity(payload.len() + room.len() + 48);
    buf.put_slice(b"{\"type\":\"message\",\"room\":\"");
    buf.put_slice(room.as_bytes()); // a RoomId: no quoting needed
    buf.put_slice(b"\",\"seq\":");
    buf.put_slice(itoa::Buffer::new().format(seq).as_bytes());
    if payload.len() > 2 {
        buf.put_u8(b',');
    }
    buf.put_slice(&payload[1..]);
    Some(buf.freeze())
}

/// The seq of a frame built by [`message_frame`]; `None` for any other frame.
pub fn frame_seq(frame: &[u8]) -> Option<u64> {
    let rest = frame.strip_prefix(b"{\"type\":\"message\",\"room\":\"")?;
    let room_len = rest.iter().position(|&b| b == b'"')?; // a RoomId has no quotes
    let rest = rest[room_len..].strip_prefix(b"\",\"seq\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_is_the_payload_with_type_room_and_seq() {
        let m = StoredMessage {
            id: "c1".into(),
            from: "alice".into(),
            ts: 5,
            body: "hi \"there\"".into(),
            kind: Kind::Text,
            attachment: None,
        };
        let payload = serde_json::to_vec(&m).unwrap();
        let frame = message_frame("general", 42, &payload).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&frame).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["room"], "general");
        assert_eq!(v["seq"], 42);
        assert_eq!(v["body"], "hi \"there\"");
        assert_eq!(v["from"], "alice");
        assert_eq!(frame_seq(&frame), Some(42));
        assert_eq!(frame_seq(b"{\"type\":\"typing\",\"seq\":1}"), None);
        assert_eq!(frame_seq(&message_frame("r", 7, b"{}").unwrap()), Some(7));
        assert!(message_frame("r", 1, b"[1]").is_none());
        assert!(message_frame("r", 1, b"").is_none());
    }
}
