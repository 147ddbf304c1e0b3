//! Image attachments: upload checks (membership, size, declared type, magic
//! numbers), image messages that must name an attachment of their room, and
//! downloads to members only with cache headers.

use serde_json::{Value, json};

use crate::helpers::*;

pub const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

/// A PNG-looking body of `len` bytes (the gateway checks the signature).
pub fn png(len: usize) -> Vec<u8> {
    let mut b = PNG_MAGIC.to_vec();
    b.extend((0..len.saturating_sub(PNG_MAGIC.len())).map(|i| (i * 31 % 251) as u8));
    b
}

/// POST /v1/rooms/{room}/attachments as `user`: (status, JSON body).
pub async fn upload(base: &str, user: &str, room: &str, content_type: &str, bytes: Vec<u8>) -> (u16, Value) {
    let r = http()
        .post(format!("{base}/v1/rooms/{room}/attachments"))
        .bearer_auth(token(user))
        .header("content-type", content_type)
        .body(bytes)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or_default()
}

async fn send_image(base: &str, user: &str, room: &str, id: &str, attachment: &str) -> (u16, Value) {
    let r = http()
        .post(format!("{base}/v1/rooms/{room}/messages"))
        .bearer_auth(token(user))
        .json(&json!({"id": id, "kind": "image", "attachment": attachment, "body": "caption"}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_checked_and_images_are_sent_and_served_to_members_only() {
    let s = Stack::with(&[], &["--attachment-max-bytes", "1024"]).await;
    let base = s.gw1.http();
    create_room(&base, "alice", "general", &["bob"]).await;
    create_room(&base, "carol", "other", &["alice"]).await;

    // A member uploads a PNG (several object-store chunks).
    let bytes = png(300_000);
    let (st, up) = upload(&base, "alice", "general", "image/png", bytes.clone()).await;
    assert_eq!(st, 201, "{up}");
    assert_eq!((up["size"].as_u64(), up["content_type"].as_str()), (Some(300_000), Some("image/png")));
    let id = up["id"].as_str().unwrap().to_owned();

    // The other image types are recognised too.
    let jpeg = [&[0xFF, 0xD8, 0xFF, 0xE0][..], b"\0\x10JFIF"].concat();
    let webp = b"RIFF\x24\0\0\0WEBPVP8 \0\0".to_vec();
    for (ct, body) in [("image/jpeg", jpeg), ("image/gif", b"GIF87a\x01\0\x01\0".to_vec()), ("image/webp", webp)] {
        let (st, v) = upload(&base, "bob", "general", ct, body).await;
        assert_eq!((st, v["content_type"].as_str()), (201, Some(ct)), "{v}");
    }

    // An image message with it reaches the room with the attachment id.
    let mut bob = Client::connect(s.gw2.addr, "bob").await;
    bob.join("general", None).await;
    let mut alice = Client::connect(s.gw1.addr, "alice").await;
    alice.send(json!({"type":"send","room":"general","id":"img1","kind":"image","attachment":id,"body":"look"})).await;
    assert_eq!(alice.expect("ack").await["id"], "img1");
    let m = bob.messages("general", 1).await.remove(0);
    assert_eq!(
        (m["kind"].as_str(), m["attachment"].as_str(), m["body"].as_str()),
        (Some("image"), Some(&*id), Some("look"))
    );

    // A member downloads the same bytes, with the cache and safety headers.
    let url = format!("{base}/v1/attachments/{id}");
    let r = http().get(&url).bearer_auth(token("bob")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    assert_eq!(h["content-type"], "image/png");
    assert_eq!(h["content-length"], "300000");
    assert_eq!(h["cache-control"], "private, max-age=31536000, immutable");
    assert_eq!(h["x-content-type-options"], "nosniff");
    let etag = h["etag"].to_str().unwrap().to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"') && etag.len() > 2, "{etag}");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &bytes[..]);
    // By token parameter (an <img src>), on the other gateway.
    let r = http().get(format!("{}/v1/attachments/{id}", s.gw2.http())).query(&[("token", token("bob"))]).send().await;
    let r = r.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), 300_000);
    // Revalidation.
    let r = http().get(&url).bearer_auth(token("bob")).header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(r.headers()["etag"], etag.as_str());
    let r = http().get(&url).bearer_auth(token("bob")).header("if-none-match", "\"stale\"").send().await.unwrap();
    assert_eq!(r.status(), 200);

    // Strangers and unknown ids get the same 404; no token is 401.
    let r = http().get(&url).bearer_auth(token("eve")).send().await.unwrap();
    assert_eq!(r.status(), 404, "non-member");
    let r = http().get(format!("{base}/v1/attachments/0123456789abcdef0123456789abcdef")).bearer_auth(token("bob"));
    assert_eq!(r.send().await.unwrap().status(), 404, "unknown id");
    let r = http().get(format!("{base}/v1/attachments/a.b")).bearer_auth(token("bob")).send().await.unwrap();
    assert_eq!(r.status(), 404, "not an id");
    assert_eq!(http().get(&url).send().await.unwrap().status(), 401);

    // Upload refusals.
    let (st, v) = upload(&base, "eve", "general", "image/png", png(100)).await;
    assert_eq!((st, code(&v)), (403, "forbidden"));
    let (st, v) = upload(&s.gw2.http(), "alice", "general", "image/png", png(2048)).await;
    assert_eq!((st, code(&v)), (413, "too_large"), "over --attachment-max-bytes");
    let (st, v) = upload(&s.gw2.http(), "alice", "general", "image/png", png(1024)).await;
    assert_eq!(st, 201, "exactly the limit: {v}");
    let (st, v) = upload(&base, "alice", "general", "text/plain", b"hello".to_vec()).await;
    assert_eq!((st, code(&v)), (415, "unsupported_media_type"));
    let (st, v) = upload(&base, "alice", "general", "image/svg+xml", b"<svg/>".to_vec()).await;
    assert_eq!((st, code(&v)), (415, "unsupported_media_type"));
    let (st, v) = upload(&base, "alice", "general", "image/png", b"GIF89a\x01\0\x01\0".to_vec()).await;
    assert_eq!((st, code(&v)), (415, "unsupported_media_type"), "GIF bytes declared as PNG: {v}");

    // Image messages must name an attachment of their own room.
    let (st, v) = upload(&base, "carol", "other", "image/png", png(64)).await;
    assert_eq!(st, 201);
    let foreign = v["id"].as_str().unwrap().to_owned();
    let (st, v) = send_image(&base, "alice", "general", "x1", &foreign).await;
    assert_eq!((st, code(&v)), (400, "bad_request"), "another room's attachment: {v}");
    let (st, v) = send_image(&base, "alice", "general", "x2", "0123456789abcdef0123456789abcdef").await;
    assert_eq!((st, code(&v)), (400, "bad_request"), "unknown attachment");
    let (st, v) = send_image(&base, "alice", "other", "x3", &foreign).await;
    assert_eq!(st, 201, "its own room: {v}");
    alice.send(json!({"type":"send","room":"general","id":"x4","kind":"image","attachment":foreign})).await;
    let e = alice.expect("error").await;
    assert_eq!((e["code"].as_str(), e["ref"].as_str()), (Some("bad_request"), Some("x4")));
    alice.send(json!({"type":"send","room":"general","id":"x5","kind":"image"})).await;
    assert_eq!(alice.expect("error").await["code"], "bad_request", "image without attachment");
    // Nothing of that reached the room.
    bob.expect_silence(std::time::Duration::from_millis(300)).await;
}

/// The attachments bucket lost while the gateways run (its storage, or
/// deleted by hand): the first upload after it gets 503 `unavailable` while
/// its gateway makes the bucket again, and the retry is stored and served,
/// and can be sent as an image message. The images it held are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attachments_bucket_lost_while_running_is_made_again() {
    let s = Stack::start().await;
    let base = s.gw1.http();
    create_room(&base, "alice", "general", &["bob"]).await;
    let (st, before) = upload(&base, "alice", "general", "image/png", png(1000)).await;
    assert_eq!(st, 201, "{before}");

    let js = async_nats::jetstream::new(async_nats::connect(s.nats.url()).await.unwrap());
    js.delete_object_store("attachments").await.unwrap();
    let (st, refused) = upload(&base, "alice", "general", "image/png", png(2000)).await;
    assert_eq!((st, code(&refused)), (503, "unavailable"), "{refused}");
    let (st, after) = upload(&base, "alice", "general", "image/png", png(2000)).await;
    assert_eq!(st, 201, "the retry is stored: {after}");
    let id = after["id"].as_str().unwrap();
    let r = http().get(format!("{}/v1/attachments/{id}", s.gw2.http())).bearer_auth(token("bob")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), png(2000).as_slice());
    let (st, sent) = send_image(&base, "alice", "general", "img-after", id).await;
    assert_eq!(st, 201, "{sent}");
    let metric = metric(s.gw1.addr, r#"natter_stream_repairs_total{stream="attachments"}"#).await;
    assert_eq!(metric, 1);
}
