//! The SSE fallback: an SSE reader and a WebSocket client talk both ways, a
//! dropped stream resumes with `Last-Event-ID` losing and repeating nothing,
//! and the stream is refused to strangers, bad room ids and bad tokens.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};

use crate::{assert_eventually, helpers::*};

/// One parsed event of a `text/event-stream`.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).expect("SSE data is JSON")
    }

    pub fn seq(&self) -> u64 {
        self.id.as_deref().expect("message events have an id").parse().expect("id is a seq")
    }
}

/// How the SSE request authenticates.
pub enum Auth<'a> {
    Bearer(&'a str),
    Query(&'a str),
}

/// A reader of one room's event stream.
pub struct SseClient {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl SseClient {
    /// Opens the stream; `Err((status, body))` when the gateway refuses it.
    pub async fn open(url: &str, auth: Auth<'_>, last_event_id: Option<u64>) -> Result<Self, (u16, Value)> {
        // No overall timeout: this response does not end.
        let client = reqwest::Client::new();
        let mut req = match auth {
            Auth::Bearer(token) => client.get(url).bearer_auth(token),
            Auth::Query(token) => client.get(url).query(&[("token", token)]),
        };
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let resp = tokio::time::timeout(RECV_TIMEOUT, req.send()).await.expect("SSE answers in time").unwrap();
        let status = resp.status().as_u16();
        if status != 200 {
            let text = resp.text().await.unwrap_or_default();
            return Err((status, serde_json::from_str(&text).unwrap_or(Value::String(text))));
        }
        let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(ct.starts_with("text/event-stream"), "content type {ct}");
        Ok(Self { resp, buf: Vec::new() })
    }

    /// The next event (keep-alive comments skipped); `None` when the stream
    /// ends or nothing comes within `RECV_TIMEOUT`.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                if let Some(ev) = parse_block(std::str::from_utf8(&block).expect("UTF-8 events")) {
                    return Some(ev);
                }
                continue;
            }
            match tokio::time::timeout(RECV_TIMEOUT, self.resp.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buf.extend_from_slice(&chunk),
                _ => return None,
            }
        }
    }

    /// The next event of type `ty`, skipping others.
    pub async fn expect(&mut self, ty: &str) -> SseEvent {
        loop {
            let ev = self.next().await.unwrap_or_else(|| panic!("no {ty} event"));
            if ev.event == ty {
                return ev;
            }
        }
    }
}

fn parse_block(block: &str) -> Option<SseEvent> {
    let (mut event, mut id, mut data) = (String::from("message"), None, Vec::new());
    let mut any = false;
    for line in block.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "" => continue, // a comment (keep-alive)
            "event" => event = value.to_owned(),
            "id" => id = Some(value.to_owned()),
            "data" => data.push(value.to_owned()),
            _ => continue,
        }
        any = true;
    }
    any.then(|| SseEvent { event, id, data: data.join("\n") })
}

pub fn events_url(base: &str, room: &str) -> String {
    format!("{base}/v1/rooms/{room}/events")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_reader_and_websocket_client_exchange_messages_in_order() {
    let s = Stack::start().await;
    let base = s.gw1.http();
    create_room(&base, "alice", "general", &["bob"]).await;
    let mut bob = Client::connect(s.gw2.addr, "bob").await;
    bob.join("general", None).await;
    // EventSource cannot set headers: the token rides in the query.
    let alice_token = token("alice");
    let mut alice = SseClient::open(&events_url(&base, "general"), Auth::Query(&alice_token), None).await.unwrap();

    let mut seqs = Vec::new();
    for n in 0..5 {
        // alice sends over HTTP; bob's WebSocket and alice's stream both see it.
        let a = post_message(&base, "alice", "general", &format!("a{n}"), &format!("from alice {n}")).await;
        let on_ws = bob.messages("general", 1).await.remove(0);
        let on_sse = alice.expect("message").await;
        assert_eq!(on_sse.seq(), a);
        assert_eq!(on_sse.json(), on_ws, "SSE data is the WebSocket message frame");
        assert_eq!(on_sse.json()["from"], "alice");
        // bob answers over WebSocket.
        let b = bob.send_msg("general", &format!("b{n}"), &format!("from bob {n}")).await;
        assert_eq!(bob.messages("general", 1).await[0]["seq"], b);
        let on_sse = alice.expect("message").await;
        assert_eq!((on_sse.seq(), on_sse.json()["from"].as_str()), (b, Some("bob")));
        assert_eq!(on_sse.json()["body"], format!("from bob {n}"));
        seqs.extend([a, b]);
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    // Typing and read markers of others arrive as their own events, without ids.
    bob.send(json!({"type":"typing","room":"general","active":true})).await;
    let typing = alice.next().await.expect("typing event");
    assert_eq!((typing.event.as_str(), typing.id.as_deref()), ("typing", None));
    assert_eq!((typing.json()["user"].as_str(), typing.json()["active"].as_bool()), (Some("bob"), Some(true)));
    bob.send(json!({"type":"read","room":"general","seq":seqs[9]})).await;
    let read = alice.expect("read").await;
    assert_eq!(read.id, None);
    assert_eq!((read.json()["user"].as_str(), read.json()["seq"].as_u64()), (Some("bob"), Some(seqs[9])));

    // `?since=` replays what came after it, then goes live.
    let url = format!("{}?since={}", events_url(&s.gw2.http(), "general"), seqs[6]);
    let mut again = SseClient::open(&url, Auth::Bearer(&alice_token), None).await.unwrap();
    let replayed: Vec<u64> =
        [again.expect("message").await, again.expect("message").await, again.expect("message").await]
            .iter()
            .map(SseEvent::seq)
            .collect();
    assert_eq!(replayed, seqs[7..10]);
    let live = post_message(&base, "alice", "general", "a-live", "live").await;
    assert_eq!(again.expect("message").await.seq(), live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_sse_stream_resumes_with_last_event_id_missing_and_repeating_nothing() {
    const N: u64 = 200;
    let s = Stack::start().await;
    let base = s.gw1.http();
    create_room(&base, "alice", "busy", &["bob"]).await;
    let url = events_url(&base, "busy");
    let bob_token = token("bob");
    let mut reader = SseClient::open(&url, Auth::Bearer(&bob_token), None).await.unwrap();

    // alice keeps sending over WebSocket (the other gateway) the whole time.
    let sent = Arc::new(AtomicU64::new(0));
    let mut alice = Client::connect(s.gw2.addr, "alice").await;
    let progress = sent.clone();
    let sender = tokio::spawn(async move {
        let mut seqs = Vec::new();
        for n in 0..N {
            seqs.push(alice.send_msg("busy", &format!("m{n}"), &format!("n{n}")).await);
            progress.store(n + 1, Ordering::Release);
            tokio::time::sleep(Duration::from_millis(5)).await; // pacing: a conversation, not a burst
        }
        seqs
    });

    let mut seen = Vec::new();
    while seen.len() < 60 {
        seen.push(reader.expect("message").await.seq());
    }
    let at_drop = sent.load(Ordering::Acquire);
    drop(reader);
    // Messages keep flowing while the reader is away.
    assert_eventually!(Duration::from_secs(10), sent.load(Ordering::Acquire) >= at_drop + 20, "sender stalled");
    let last = *seen.last().unwrap();
    let mut reader = SseClient::open(&url, Auth::Bearer(&bob_token), Some(last)).await.unwrap();
    while (seen.len() as u64) < N {
        match reader.next().await {
            Some(ev) if ev.event == "message" => seen.push(ev.seq()),
            Some(_) => {}
            None => panic!("stream ended after {} of {N} messages", seen.len()),
        }
    }
    let acked = sender.await.unwrap();
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "out of order or repeated: {seen:?}");
    assert_eq!(seen, acked, "every acked message exactly once, in order");
    assert_eq!(seen, (1..=N).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_is_refused_to_non_members_bad_room_ids_and_bad_tokens() {
    let s = Stack::with(&["--limit-conns-per-user", "2"], &[]).await;
    let base = s.gw1.http();
    create_room(&base, "alice", "general", &[]).await;
    let url = events_url(&base, "general");
    let code = |r: Result<SseClient, (u16, Value)>| match r {
        Ok(_) => panic!("stream opened"),
        Err((status, body)) => (status, body["error"]["code"].as_str().unwrap_or_default().to_owned()),
    };

    let eve = token("eve");
    assert_eq!(code(SseClient::open(&url, Auth::Bearer(&eve), None).await), (403, "forbidden".into()));
    assert_eq!(code(SseClient::open(&url, Auth::Query(&eve), None).await), (403, "forbidden".into()));
    let alice = token("alice");
    for bad in ["a.b", "a*", "a%3Eb", "general.x"] {
        let r = SseClient::open(&events_url(&base, bad), Auth::Bearer(&alice), None).await;
        assert_eq!(code(r), (400, "bad_request".into()), "room {bad}");
    }
    let r = SseClient::open(&format!("{url}?since=soon"), Auth::Bearer(&alice), None).await;
    assert_eq!(code(r), (400, "bad_request".into()));

    let r = reqwest::Client::new().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401, "no token");
    let forged = natter::auth::Signer::hs256("not-the-secret").mint("alice", Duration::from_secs(600), None).unwrap();
    assert_eq!(code(SseClient::open(&url, Auth::Bearer(&forged), None).await), (401, "unauthorized".into()));
    assert_eq!(code(SseClient::open(&url, Auth::Query(&forged), None).await), (401, "unauthorized".into()));
    assert_eq!(code(SseClient::open(&url, Auth::Query("garbage"), None).await), (401, "unauthorized".into()));

    // The member gets her streams, as many as her connection limit allows.
    let _one = SseClient::open(&url, Auth::Query(&alice), None).await.unwrap();
    let _two = SseClient::open(&url, Auth::Bearer(&alice), None).await.unwrap();
    assert_eq!(code(SseClient::open(&url, Auth::Bearer(&alice), None).await), (429, "rate_limited".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sse_reader_is_cut_off_without_slowing_the_room_and_resumes_losslessly() {
    const N: usize = 200;
    // Small queues, so that a reader that stops reading overflows quickly once
    // the socket buffers are full (a few MiB on loopback).
    let s = Stack::with(&["--outbound-queue", "16", "--outbound-bytes", "131072"], &[]).await;
    let base = s.gw1.http();
    create_room(&base, "alice", "big", &["bob", "carol"]).await;
    let url = events_url(&base, "big");
    let bob_token = token("bob");
    let mut stalled = SseClient::open(&url, Auth::Bearer(&bob_token), None).await.unwrap();
    let mut carol = Client::connect(s.gw1.addr, "carol").await;
    carol.join("big", None).await;

    // ~12 MB of messages while bob does not read.
    let mut alice = Client::connect(s.gw2.addr, "alice").await;
    let filler = "x".repeat(60_000);
    let mut acked = Vec::new();
    for n in 0..N {
        let seq = alice.send_msg("big", &format!("m{n}"), &filler).await;
        acked.push(seq);
        // The room task never waits for bob: carol, on the same gateway and
        // with the same small queue, gets each message as it is sent.
        assert_eq!(carol.messages("big", 1).await[0]["seq"], seq);
    }

    // bob reads what reached him, the stream ends, he resumes from his last id.
    let mut seen = Vec::new();
    while let Some(ev) = stalled.next().await {
        seen.push(ev.seq());
    }
    assert!(seen.len() < N, "the stalled stream should have ended early");
    let metrics = http().get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("natter_slow_consumer_closes_total 1"), "bob's stream was cut off as a slow consumer");
    let mut resumed = SseClient::open(&url, Auth::Bearer(&bob_token), seen.last().copied()).await.unwrap();
    while seen.len() < N {
        seen.push(resumed.expect("message").await.seq());
    }
    assert_eq!(seen, acked, "every message once, in order, across the cut");
}
