//! Bad input gets its documented answer and the connection (or gateway)
//! stays usable: ids, tokens, handshake, malformed frames.

use std::time::Duration;

use base64::Engine as _;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_without_membership_is_forbidden_and_bad_ids_are_bad_requests() {
    let s = Stack::start().await;
    create_room(&s.gw1.http(), "alice", "private", &[]).await;
    let mut eve = Client::connect(s.gw1.addr, "eve").await;
    eve.send(json!({"type":"join","room":"private"})).await;
    let e = eve.expect("error").await;
    assert_eq!(e["code"], "forbidden");
    assert_eq!(e["ref"], "join");
    eve.send(json!({"type":"send","room":"private","id":"x1","body":"let me in"})).await;
    let e = eve.expect("error").await;
    assert_eq!((e["code"].as_str(), e["ref"].as_str()), (Some("forbidden"), Some("x1")));

    let long = "a".repeat(65);
    for bad in ["a.b", "*", ">", long.as_str(), "", "a b", "chat.>", "é", "a\u{0}b"] {
        eve.send(json!({"type":"join","room":bad})).await;
        let e = eve.expect("error").await;
        assert_eq!(e["code"], "bad_request", "room {bad:?}: {e}");
    }
    for bad in ["a*", "", "x y", long.as_str()] {
        eve.send(json!({"type":"send","room":"private","id":bad,"body":"b"})).await;
        let e = eve.expect("error").await;
        assert_eq!(e["code"], "bad_request", "id {bad:?}: {e}");
    }
    // Still usable.
    eve.send(json!({"type":"ping"})).await;
    eve.expect("pong").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_hello_in_time_closes_4001() {
    let s = Stack::with(&["--hello-timeout", "300ms"], &[]).await;
    let mut c = Client::raw(s.gw1.addr).await;
    let e = c.expect("error").await;
    assert_eq!(e["code"], "unauthorized");
    assert_eq!(c.expect_close().await, Some(4001));
}

fn forge(header: serde_json::Value, claims: serde_json::Value, sig: &str) -> String {
    let b = |v: &serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!("{}.{}.{}", b(&header), b(&claims), sig)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_expired_wrong_key_and_alg_none_tokens_close_4001() {
    let s = Stack::start().await;
    let now = natter::auth::unix_now();
    let expired = {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let c = natter::auth::Claims { sub: "alice".into(), exp: now - 3600, name: None };
        encode(&Header::default(), &c, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
    };
    let wrong_key =
        natter::auth::Signer::hs256("some-other-secret-123456").mint("alice", Duration::from_secs(60), None).unwrap();
    let none = forge(json!({"alg":"none","typ":"JWT"}), json!({"sub":"alice","exp":now+60}), "");
    let bad_sub = natter::auth::Signer::hs256(SECRET).mint("a.>", Duration::from_secs(60), None).unwrap();
    for (what, t) in [
        ("garbage", "not-a-jwt".to_owned()),
        ("expired", expired),
        ("wrong key", wrong_key),
        ("alg none", none),
        ("bad sub", bad_sub),
    ] {
        let mut c = Client::raw(s.gw1.addr).await;
        c.send(json!({"type":"hello","token":t})).await;
        let e = c.expect("error").await;
        assert_eq!(e["code"], "unauthorized", "{what}");
        assert_eq!(c.expect_close().await, Some(4001), "{what}");
    }
    // A first frame that is not hello is refused too.
    let mut c = Client::raw(s.gw1.addr).await;
    c.send(json!({"type":"join","room":"r"})).await;
    assert_eq!(c.expect("error").await["code"], "unauthorized");
    assert_eq!(c.expect_close().await, Some(4001));

    // The Authorization header counts as hello.
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
        "ws://{}/v1/ws",
        s.gw1.addr
    ))
    .unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {}", token("carol")).parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    use futures::StreamExt;
    let w = ws.next().await.unwrap().unwrap();
    let w: serde_json::Value = serde_json::from_str(w.to_text().unwrap()).unwrap();
    assert_eq!((w["type"].as_str(), w["user"].as_str()), (Some("welcome"), Some("carol")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_errors_and_the_connection_stays_usable() {
    let s = Stack::start().await;
    create_room(&s.gw1.http(), "alice", "r", &[]).await;
    let mut c = Client::connect(s.gw1.addr, "alice").await;
    let cases: Vec<(&str, &str, &str)> = vec![
        ("{not json", "bad_request", "frame"),
        ("[1,2,3]", "bad_request", "frame"),
        (r#"{"no":"type"}"#, "bad_request", "frame"),
        (r#"{"type":"dance"}"#, "bad_request", "dance"),
        (r#"{"type":"join","room":5}"#, "bad_request", "join"),
        (r#"{"type":"send","room":"r","id":"m1","body":{"x":1}}"#, "bad_request", "m1"),
        (r#"{"type":"read","room":"r","seq":-1}"#, "bad_request", "read"),
        (r#"{"type":"hello","token":"again"}"#, "bad_request", "hello"),
    ];
    for (frame, code, reference) in cases {
        c.send_text(frame).await;
        let e = c.expect("error").await;
        assert_eq!((e["code"].as_str(), e["ref"].as_str()), (Some(code), Some(reference)), "{frame}: {e}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    c.send_text(&deep).await;
    assert_eq!(c.expect("error").await["code"], "bad_request");
    c.send_raw(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(c.expect("error").await["code"], "bad_request");
    // Unknown fields are ignored.
    c.send(json!({"type":"ping","extra":true})).await;
    c.expect("pong").await;
    c.join("r", None).await;
    c.send_msg("r", "ok-1", "still here").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_the_limit_is_refused_without_hurting_others() {
    let s = Stack::with(&["--max-frame-bytes", "4096"], &[]).await;
    create_room(&s.gw1.http(), "alice", "r", &["bob"]).await;
    let mut bob = Client::connect(s.gw1.addr, "bob").await;
    bob.join("r", None).await;
    let mut alice = Client::connect(s.gw1.addr, "alice").await;
    let huge = json!({"type":"send","room":"r","id":"big","body":"x".repeat(8192)});
    let _ = alice.send_raw(Message::text(huge.to_string())).await;
    // The socket is closed (1009 "message too big"); nothing was stored.
    let code = alice.expect_close().await;
    assert!(matches!(code, Some(1009) | None), "{code:?}");
    let mut alice = Client::connect(s.gw1.addr, "alice").await;
    alice.send_msg("r", "small", "fits").await;
    let got = bob.messages("r", 1).await;
    assert_eq!(got[0]["id"], "small");
}

/// Sends a 1 MiB text frame (the limit is 64 KiB) on a new connection of
/// `user`; returns the frames received before the close, and its code.
async fn one_mib_frame(addr: std::net::SocketAddr, user: &str) -> (Vec<serde_json::Value>, Option<u16>) {
    let mut c = Client::connect(addr, user).await;
    let mut huge = json!({"type":"send","room":"r","id":"huge","body":""}).to_string();
    huge.insert_str(huge.len() - 2, &"x".repeat(1024 * 1024 - huge.len()));
    assert_eq!(huge.len(), 1024 * 1024);
    // The gateway stops reading after the frame header, so the write may fail.
    let _ = c.send_raw(Message::text(huge)).await;
    let mut frames = Vec::new();
    loop {
        match c.next().await {
            Some(Ok(v)) => frames.push(v),
            Some(Err(code)) => return (frames, code),
            None => panic!("no close within {RECV_TIMEOUT:?} after a 1 MiB frame (got {frames:?})"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_mib_frame_gets_too_large_and_others_carry_on() {
    let s = Stack::start().await; // --max-frame-bytes: the default, 64 KiB
    create_room(&s.gw1.http(), "alice", "r", &["bob", "carol"]).await;
    let mut bob = Client::connect(s.gw1.addr, "bob").await;
    bob.join("r", None).await;
    let mut carol = Client::connect(s.gw2.addr, "carol").await;
    carol.join("r", None).await;
    let mut alice = Client::connect(s.gw1.addr, "alice").await;
    alice.join("r", None).await;

    let (frames, code) = one_mib_frame(s.gw1.addr, "alice").await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    let e = &frames[0];
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str(), e["ref"].as_str()),
        (Some("error"), Some("too_large"), Some("frame"))
    );
    // The gateway lingers after the close so that it is read before the
    // socket, with the rest of the frame unread, is reset.
    assert_eq!(code, Some(1009));

    // Nothing was stored or delivered; the other sockets of the same user and
    // of others, on both gateways, carry on.
    alice.send_msg("r", "after", "fine").await;
    for c in [&mut bob, &mut carol] {
        let got = c.messages("r", 1).await;
        assert_eq!(got[0]["id"], "after", "{}", c.user);
        c.send(json!({"type":"ping"})).await;
        c.expect("pong").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_mib_frame_closes_1009() {
    let s = Stack::start().await;
    for _ in 0..3 {
        let (frames, code) = one_mib_frame(s.gw1.addr, "alice").await;
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_eq!(code, Some(1009));
    }
}

/// A text frame whose payload is not UTF-8, as tungstenite's `Message::Text`
/// cannot carry one: raw frames.
fn raw_text(payload: &[u8], fin: bool) -> Message {
    use tokio_tungstenite::tungstenite::protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    };
    Message::Frame(Frame::message(payload.to_vec(), OpCode::Data(Data::Text), fin))
}

fn raw_continuation(payload: &[u8]) -> Message {
    use tokio_tungstenite::tungstenite::protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    };
    Message::Frame(Frame::message(payload.to_vec(), OpCode::Data(Data::Continue), true))
}

/// The invalid-UTF-8 cases, each on a fresh connection.
fn invalid_utf8_cases() -> Vec<(&'static str, Vec<Message>)> {
    vec![
        ("a lone 0xff", vec![raw_text(b"{\"type\":\"ping\",\"x\":\"\xff\"}", true)]),
        ("an overlong '/'", vec![raw_text(b"{\"type\":\"ping\",\"x\":\"\xc0\xaf\"}", true)]),
        ("a UTF-16 surrogate", vec![raw_text(b"{\"type\":\"ping\",\"x\":\"\xed\xa0\x80\"}", true)]),
        ("truncated at the end", vec![raw_text(b"{\"type\":\"ping\"}\xe2\x82", true)]),
        (
            "split across fragments",
            vec![
                raw_text(b"{\"type\":\"send\",\"room\":\"r\",\"id\":\"u8\",\"body\":\"\xe2", false),
                raw_continuation(b"\x28\"}"),
            ],
        ),
    ]
}

/// What the gateway answers to `frames`: the error frames before the close, and the close code.
async fn answer_to(addr: std::net::SocketAddr, frames: Vec<Message>) -> (Vec<serde_json::Value>, Option<u16>) {
    let mut c = Client::connect(addr, "mallory").await;
    for f in frames {
        // The gateway may already be closing; what it answered is what counts.
        let _ = c.send_raw(f).await;
    }
    let mut frames = Vec::new();
    loop {
        match c.next().await {
            Some(Ok(v)) => frames.push(v),
            Some(Err(code)) => return (frames, code),
            None => panic!("no answer to invalid UTF-8 within {RECV_TIMEOUT:?} (got {frames:?})"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_text_ends_only_that_connection() {
    let s = Stack::start().await;
    create_room(&s.gw1.http(), "alice", "r", &["bob", "mallory"]).await;
    let mut bob = Client::connect(s.gw1.addr, "bob").await;
    bob.join("r", None).await;
    let mut alice = Client::connect(s.gw1.addr, "alice").await;
    alice.join("r", None).await;

    // Binary is refused with an error and the connection stays usable, whatever the bytes.
    let mut m = Client::connect(s.gw1.addr, "mallory").await;
    m.send_raw(Message::binary(b"{\"type\":\"ping\",\"x\":\"\xff\xfe\"}".to_vec())).await.unwrap();
    let e = m.expect("error").await;
    assert_eq!((e["code"].as_str(), e["ref"].as_str()), (Some("bad_request"), Some("frame")), "{e}");
    m.send(json!({"type":"ping"})).await;
    m.expect("pong").await;

    // Invalid UTF-8 in a text frame fails the connection (RFC 6455 §8.1):
    // observed, the gateway closes it 1000 (not 1007) without an error frame;
    // nothing is processed (no pong, no send) and no one else notices.
    for (what, frames) in invalid_utf8_cases() {
        let (answers, code) = answer_to(s.gw1.addr, frames).await;
        assert!(answers.iter().all(|v| v["type"] == "error"), "{what}: {answers:?}");
        assert!(matches!(code, Some(1007 | 1000)), "{what}: closed with {code:?}");
    }

    alice.send_msg("r", "after", "fine").await;
    let got = bob.messages("r", 1).await;
    assert_eq!(got[0]["id"], "after");
    bob.send(json!({"type":"ping"})).await;
    bob.expect("pong").await;
    m.send(json!({"type":"ping"})).await;
    m.expect("pong").await;
}

/// RFC 6455 §8.1: invalid UTF-8 in a text frame should close 1007
/// ("invalid frame payload data"), or at least get an error frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_text_closes_1007() {
    let s = Stack::start().await;
    for (what, frames) in invalid_utf8_cases() {
        let (answers, code) = answer_to(s.gw1.addr, frames).await;
        assert!(code == Some(1007) || !answers.is_empty(), "{what}: no error frame, closed with {code:?}");
    }
}
