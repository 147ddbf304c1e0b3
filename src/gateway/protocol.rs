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
        /// The resume replays from this seq: what it skipped of `(since,
        /// truncated_before)` is paged over HTTP. Absent when nothing was skipped.
        #[serde(skip_serializing_if = "Option::is_none")]
        truncated_before: Option<u64>,
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
        other => type_name(other),
    }
}

/// The frame's `type`.
pub fn type_name(frame: &ClientFrame) -> &'static str {
    match frame {
        ClientFrame::Send { .. } => "send",
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

    mod props {
        use super::*;
        use proptest::prelude::*;
        use serde_json::{Map, Value, json};

        fn config() -> ProptestConfig {
            ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() }
        }

        /// Any JSON value, nested at most `depth` levels.
        fn json_value(depth: u32) -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                any::<String>().prop_map(Value::String),
                prop::sample::select(KNOWN.to_vec()).prop_map(Value::from),
            ];
            leaf.prop_recursive(depth, 64, 8, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                    prop::collection::btree_map(field_name(), inner, 0..8)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// Field names: the protocol's own (so that decoding gets far) and any.
        fn field_name() -> impl Strategy<Value = String> {
            prop_oneof![
                prop::sample::select(vec![
                    "type",
                    "room",
                    "id",
                    "body",
                    "kind",
                    "attachment",
                    "since",
                    "seq",
                    "token",
                    "active",
                    "status",
                    "users",
                ])
                .prop_map(str::to_owned),
                any::<String>(),
            ]
        }

        /// An object with a known (or nearly known) `type` and random fields.
        fn frame_like() -> impl Strategy<Value = Value> {
            let ty = prop_oneof![
                4 => prop::sample::select(KNOWN.to_vec()).prop_map(Value::from),
                1 => json_value(2),
            ];
            (ty, prop::collection::btree_map(field_name(), json_value(3), 0..6)).prop_map(|(ty, fields)| {
                let mut m: Map<String, Value> = fields.into_iter().collect();
                m.insert("type".into(), ty);
                Value::Object(m)
            })
        }

        /// Whatever the input, an error carries what the error frame needs.
        fn check_total(text: &str) -> Result<(), TestCaseError> {
            match decode(text) {
                Ok(f) => {
                    let r = reference(&f);
                    prop_assert!(r.len() <= 64);
                }
                Err(e) => {
                    prop_assert_eq!(e.code, Code::BadRequest);
                    prop_assert!(!e.message.is_empty());
                    prop_assert!(e.message.chars().count() <= 200, "{}", e.message);
                    prop_assert!(e.reference.chars().count() <= 64, "{:?}", e.reference);
                }
            }
            Ok(())
        }

        fn nested(depth: usize, object: bool, inner: &str) -> String {
            let (open, close) = if object { (r#"{"a":"#, "}") } else { ("[", "]") };
            format!("{}{inner}{}", open.repeat(depth), close.repeat(depth))
        }

        /// `{k:v,...}` with the keys in the given order (not serde_json's).
        fn object_in_order(fields: &[(String, Value)]) -> String {
            let parts: Vec<String> = fields.iter().map(|(k, v)| format!("{}:{}", Value::from(k.as_str()), v)).collect();
            format!("{{{}}}", parts.join(","))
        }

        const SEND_FIELDS: &[&str] = &["type", "room", "id", "body", "kind", "attachment"];

        proptest! {
            #![proptest_config(config())]

            #[test]
            fn never_panics_on_arbitrary_text(s in prop_oneof![
                any::<String>(),
                r#"[\[\]{}":,0-9a-z \\.eE+-]{0,200}"#,
                r#"\{"type":"(send|join|hello|read|typing|presence_sub)"[,:"a-z0-9\[\]{} ]{0,100}"#,
            ]) {
                check_total(&s)?;
            }

            #[test]
            fn never_panics_on_arbitrary_json(v in prop_oneof![json_value(6), frame_like()]) {
                check_total(&v.to_string())?;
                check_total(&serde_json::to_string_pretty(&v).unwrap())?;
            }

            #[test]
            fn deep_nesting_is_refused_not_a_crash(
                depth in prop_oneof![1usize..200, 200usize..=10_000, Just(10_000usize)],
                object in any::<bool>(),
                closed in any::<bool>(),
                place in 0..3u8,
            ) {
                let value = match (closed, object) {
                    (true, _) => nested(depth, object, "1"),
                    (false, true) => r#"{"a":"#.repeat(depth),
                    (false, false) => "[".repeat(depth),
                };
                let text = match place {
                    0 => value,
                    1 => format!(r#"{{"type":"ping","extra":{value}}}"#),
                    _ => format!(r#"{{"type":"send","room":"r","id":"m1","body":"b","x":{value}}}"#),
                };
                check_total(&text)?;
                let got = decode(&text);
                match (place, closed) {
                    // A bare array or `{"a":…}` is never a frame.
                    (0, _) | (_, false) => prop_assert!(got.is_err()),
                    // serde_json's recursion limit is 128 levels.
                    (_, true) if depth >= 128 => prop_assert!(got.is_err(), "depth {}", depth),
                    (_, true) if depth <= 100 => prop_assert!(got.is_ok(), "depth {}: {:?}", depth, got.err()),
                    _ => {}
                }
            }

            #[test]
            fn a_send_keeps_its_body_whatever_the_order_and_extra_fields(
                room in "[A-Za-z0-9_-]{1,64}",
                id in "[A-Za-z0-9_.:-]{1,64}",
                body in prop_oneof![any::<String>(), "\\PC{0,300}", Just(String::new())],
                kind in prop::option::of(prop::sample::select(vec![Kind::Text, Kind::Image])),
                attachment in prop::option::of(any::<String>()),
                extra in prop::collection::vec(
                    (any::<String>().prop_filter("not a send field", |k| !SEND_FIELDS.contains(&k.as_str())),
                     json_value(3)),
                    0..4,
                ),
                order in Just((0..16usize).collect::<Vec<_>>()).prop_shuffle(),
            ) {
                let mut fields: Vec<(String, Value)> = vec![
                    ("type".into(), json!("send")),
                    ("room".into(), json!(room)),
                    ("id".into(), json!(id)),
                    ("body".into(), json!(body)),
                ];
                if let Some(k) = kind {
                    fields.push(("kind".into(), serde_json::to_value(k).unwrap()));
                }
                if let Some(a) = &attachment {
                    fields.push(("attachment".into(), json!(a)));
                }
                // Unknown fields, each name once (a JSON object has unique keys).
                for (k, v) in extra {
                    if !fields.iter().any(|(f, _)| *f == k) {
                        fields.push((k, v));
                    }
                }
                // Shuffle: field i goes to the rank of i in the permutation.
                let mut ranked: Vec<(usize, (String, Value))> =
                    fields.into_iter().enumerate().map(|(i, f)| (order[i], f)).collect();
                ranked.sort_by_key(|(rank, _)| *rank);
                let fields: Vec<(String, Value)> = ranked.into_iter().map(|(_, f)| f).collect();
                let text = object_in_order(&fields);

                match decode(&text) {
                    Ok(ClientFrame::Send { room: r, id: i, body: b, kind: k, attachment: a }) => {
                        prop_assert_eq!(b, body);
                        prop_assert_eq!(r, room);
                        prop_assert_eq!(&i, &id);
                        prop_assert_eq!(k, kind.unwrap_or(Kind::Text));
                        prop_assert_eq!(a, attachment);
                        let f = decode(&text).unwrap();
                        prop_assert_eq!(reference(&f), id.as_str());
                    }
                    other => prop_assert!(false, "{} decoded as {:?}", text, other),
                }
            }

            #[test]
            fn unknown_fields_are_ignored_in_every_frame(
                extra in prop::collection::btree_map(
                    any::<String>().prop_filter("not a protocol field", |k| {
                        !["type", "room", "id", "body", "kind", "attachment", "since", "seq", "token", "active",
                          "status", "users"].contains(&k.as_str())
                    }),
                    json_value(3),
                    1..5,
                ),
                which in 0..11usize,
            ) {
                let base = [
                    json!({"type":"hello","token":"t"}),
                    json!({"type":"join","room":"r","since":3}),
                    json!({"type":"leave","room":"r"}),
                    json!({"type":"send","room":"r","id":"m","body":"b"}),
                    json!({"type":"read","room":"r","seq":1}),
                    json!({"type":"typing","room":"r","active":true}),
                    json!({"type":"presence","status":"away"}),
                    json!({"type":"presence_sub","users":["a"]}),
                    json!({"type":"presence_unsub","users":["a"]}),
                    json!({"type":"ping"}),
                    json!({"type":"refresh","token":"t"}),
                ];
                let mut v = base[which].clone();
                let plain = format!("{:?}", decode(&v.to_string()).expect("base frame decodes"));
                for (k, x) in extra {
                    v[k] = x;
                }
                match decode(&v.to_string()) {
                    Ok(f) => prop_assert_eq!(format!("{:?}", f), plain),
                    Err(e) => prop_assert!(false, "{}: {:?}", v, e),
                }
            }
        }
    }
}
