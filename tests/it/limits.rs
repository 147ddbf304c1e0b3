//! Abuse limits, idle connections, origins and token lifetime on a live
//! connection, against a real gateway.

use std::{collections::HashSet, time::Duration};

use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::{assert_eventually, helpers::*};

/// Reads frames for up to `t`, returning them and the close code if closed.
async fn drain(c: &mut Client, t: Duration) -> (Vec<Value>, Option<Option<u16>>) {
    let until = tokio::time::Instant::now() + t;
    let mut got = Vec::new();
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        match c.next_within(left.max(Duration::from_millis(1))).await {
            Some(Ok(v)) => got.push(v),
            Some(Err(code)) => return (got, Some(code)),
            None => return (got, None),
        }
        if tokio::time::Instant::now() >= until {
            return (got, None);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_over_the_limit_are_refused_with_a_wait_and_nothing_refused_is_stored() {
    let s = Stack::with(&["--limit-sends-per-sec", "5"], &[]).await;
    create_room(&s.gw1.http(), "alice", "general", &[]).await;
    let mut alice = Client::connect(s.gw1.addr, "alice").await;
    for i in 0..30 {
        alice.send(json!({"type": "send", "room": "general", "id": format!("m{i}"), "body": "x"})).await;
    }
    let (frames, closed) = drain(&mut alice, Duration::from_secs(2)).await;
    assert!(closed.is_none(), "30 sends is not abuse: {closed:?}");
    let acked: HashSet<String> =
        frames.iter().filter(|f| f["type"] == "ack").map(|f| f["id"].as_str().unwrap().to_owned()).collect();
    let refused: Vec<&Value> = frames.iter().filter(|f| f["code"] == "rate_limited").collect();
    assert_eq!(acked.len() + refused.len(), 30, "every send is answered: {frames:?}");
    assert!((5..=12).contains(&acked.len()), "about the burst (10) gets through: {}", acked.len());
    for r in &refused {
        assert!(r["ref"].as_str().unwrap().starts_with('m'), "the ref is the send's id: {r}");
        let wait = r["retry_after_ms"].as_u64().expect("retry_after_ms");
        assert!((1..=1000).contains(&wait), "{r}");
    }
    // What was refused was not stored; resent later with the same id, it is.
    let h: Value = get_json(format!("{}/v1/rooms/general/messages?limit=100", s.gw1.http()), "alice").await;
    let stored: HashSet<String> =
        h["messages"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(stored, acked, "stored = acked, nothing else");
    let first_refused = refused[0]["ref"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(refused[0]["retry_after_ms"].as_u64().unwrap() + 300)).await;
    alice.send_msg("general", &first_refused, "x").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_flood_is_cut_off_with_4029_and_others_do_not_notice() {
    let s = Stack::with(&["--limit-frames-per-sec", "50", "--limit-abuse-strikes", "100"], &[]).await;
    create_room(&s.gw1.http(), "alice", "general", &["bob"]).await;
    let mut bob = Client::connect(s.gw1.addr, "bob").await;
    bob.join("general", None).await;
    let mut alice = Client::connect(s.gw1.addr, "alice").await;

    let flood = tokio::spawn(async move {
        // 10 000 frames as fast as the socket takes them, reading as we go.
        for _ in 0..10_000 {
            if alice.send_raw(tokio_tungstenite::tungstenite::Message::text(r#"{"type":"ping"}"#)).await.is_err() {
                break;
            }
        }
        let (frames, closed) = drain(&mut alice, Duration::from_secs(10)).await;
        (frames, closed)
    });
    // Meanwhile bob's round trips stay quick.
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let t = std::time::Instant::now();
        bob.send_msg("general", &format!("b{i}"), "still here").await;
        worst = worst.max(t.elapsed());
    }
    let (frames, closed) = flood.await.unwrap();
    assert_eq!(closed, Some(Some(4029)), "sustained abuse closes 4029");
    assert!(frames.iter().any(|f| f["code"] == "rate_limited" && f["retry_after_ms"].as_u64().is_some()));
    let pongs = frames.iter().filter(|f| f["type"] == "pong").count();
    assert!(pongs <= 200, "at most the allowance was served: {pongs}");
    assert!(worst < Duration::from_secs(1), "a neighbour's flood does not slow bob: worst {worst:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_user_and_rooms_per_connection_are_capped() {
    let s = Stack::with(&["--limit-conns-per-user", "2", "--limit-rooms-per-conn", "2"], &[]).await;
    for r in ["r1", "r2", "r3"] {
        create_room(&s.gw1.http(), "alice", r, &[]).await;
    }
    let mut a1 = Client::connect(s.gw1.addr, "alice").await;
    let _a2 = Client::connect(s.gw1.addr, "alice").await;
    let mut a3 = Client::raw(s.gw1.addr).await;
    a3.send(json!({"type": "hello", "token": token("alice")})).await;
    let e = a3.recv().await;
    assert_eq!(e["code"], "rate_limited", "{e}");
    assert_eq!(a3.expect_close().await, Some(4029));
    // The other gateway counts its own connections.
    let _elsewhere = Client::connect(s.gw2.addr, "alice").await;

    a1.join("r1", None).await;
    a1.join("r2", None).await;
    a1.send(json!({"type": "join", "room": "r3"})).await;
    let e = a1.expect("error").await;
    assert_eq!(e["code"], "too_large", "{e}");
    a1.send(json!({"type": "leave", "room": "r1"})).await;
    a1.expect("left").await;
    a1.join("r3", None).await;
    // A closed connection gives its slot back.
    drop(a1);
    assert_eventually!(
        Duration::from_secs(5),
        {
            let mut c = Client::raw(s.gw1.addr).await;
            c.send(json!({"type": "hello", "token": token("alice")})).await;
            c.recv().await["type"] == "welcome"
        },
        "a slot is free again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_calls_per_token_are_limited_with_retry_after() {
    let s = Stack::with(&["--limit-http-per-token-per-sec", "5"], &[]).await;
    let mut codes = Vec::new();
    let mut last = None;
    for _ in 0..20 {
        let r = http().get(format!("{}/v1/rooms", s.gw1.http())).bearer_auth(token("alice")).send().await.unwrap();
        codes.push(r.status().as_u16());
        if r.status() == 429 {
            let after = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
            last = Some((after, r.json::<Value>().await.unwrap()));
        }
    }
    assert!(codes.iter().filter(|c| **c == 200).count() >= 5, "{codes:?}");
    assert!(codes.contains(&429), "{codes:?}");
    let (after, body) = last.unwrap();
    assert_eq!(after.as_deref(), Some("1"));
    assert_eq!(body["error"]["code"], "rate_limited");
    assert!(body["error"]["retry_after_ms"].as_u64().is_some());
    // Another user is not affected.
    let r = http().get(format!("{}/v1/rooms", s.gw1.http())).bearer_auth(token("bob")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

async fn upgrade_with_origin(addr: std::net::SocketAddr, origin: Option<&str>) -> Result<(), u16> {
    let mut req = format!("ws://{addr}/v1/ws").into_client_request().unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("origin", o.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => Ok(()),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("unexpected upgrade failure: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_origins_are_checked_against_the_allow_list() {
    let s = Stack::with(&["--allowed-origins", "https://chat.example.com"], &[]).await;
    assert_eq!(upgrade_with_origin(s.gw1.addr, Some("https://chat.example.com")).await, Ok(()));
    assert_eq!(upgrade_with_origin(s.gw1.addr, Some("https://evil.example.net")).await, Err(403));
    assert_eq!(upgrade_with_origin(s.gw1.addr, None).await, Ok(()), "native clients send no Origin");
    // No list: any origin.
    assert_eq!(upgrade_with_origin(s.gw2.addr, Some("https://evil.example.net")).await, Ok(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_after_the_idle_timeout_a_talking_one_is_not() {
    let s = Stack::with(&["--idle-timeout", "1s"], &[]).await;
    let mut silent = Client::connect(s.gw1.addr, "alice").await;
    let mut talking = Client::connect(s.gw1.addr, "bob").await;
    let started = std::time::Instant::now();
    for _ in 0..8 {
        talking.send(json!({"type": "ping"})).await;
        assert_eq!(talking.recv().await["type"], "pong");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(started.elapsed() > Duration::from_millis(1900));
    assert_eq!(silent.expect_close().await, Some(1001), "idle: closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_pings_every_heartbeat_and_a_silent_client_answering_them_outlives_the_idle_timeout() {
    let s = Stack::with(&["--idle-timeout", "1s", "--heartbeat", "250ms"], &[]).await;
    let mut quiet = Client::connect(s.gw1.addr, "alice").await;
    let (pings, closed) = quiet.pings_within(Duration::from_millis(2500)).await;
    assert_eq!(closed, None, "its pongs count as heard");
    assert!((6..=16).contains(&pings), "about one ping per heartbeat in 2.5 s: {pings}");
    quiet.send(json!({"type": "ping"})).await;
    assert_eq!(quiet.expect("pong").await["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expiring_on_a_live_connection_closes_it_4001_unless_refreshed() {
    let s = Stack::start().await;
    let short = |user: &str, secs: u64| {
        natter::auth::Signer::hs256(SECRET).mint(user, Duration::from_secs(secs), None).unwrap()
    };
    let mut a = Client::raw(s.gw1.addr).await;
    a.send(json!({"type": "hello", "token": short("alice", 2)})).await;
    assert_eq!(a.recv().await["type"], "welcome");
    let mut b = Client::raw(s.gw1.addr).await;
    b.send(json!({"type": "hello", "token": short("bob", 2)})).await;
    assert_eq!(b.recv().await["type"], "welcome");
    // bob refreshes in time; a refresh with another user's token is refused.
    b.send(json!({"type": "refresh", "token": token("alice")})).await;
    let e = b.expect("error").await;
    assert_eq!(e["code"], "forbidden");
    b.send(json!({"type": "refresh", "token": short("bob", 60)})).await;
    assert!(b.expect("refreshed").await["exp"].as_u64().unwrap() > natter::auth::unix_now() + 30);

    let e = a.expect("error").await;
    assert_eq!(e["code"], "unauthorized", "{e}");
    assert_eq!(a.expect_close().await, Some(4001));
    b.send(json!({"type": "ping"})).await;
    assert_eq!(b.expect("pong").await["type"], "pong", "the refreshed connection lives on");
}
