//! The REST API: rooms, members, history, send with dedupe, health.

use serde_json::{Value, json};

use crate::helpers::*;

async fn call(method: reqwest::Method, url: String, user: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let mut r = http().request(method, url);
    if let Some(u) = user {
        r = r.bearer_auth(token(u));
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_members_history_and_http_send() {
    use reqwest::Method as M;
    let s = Stack::start().await;
    let base = s.gw1.http();

    let (st, v) = call(
        M::POST,
        format!("{base}/v1/rooms"),
        Some("alice"),
        Some(json!({"id":"team","name":"Team","members":["bob"]})),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["members"], json!(["alice", "bob"]));
    let (st, v) =
        call(M::POST, format!("{base}/v1/rooms"), Some("alice"), Some(json!({"id":"team","name":"again"}))).await;
    assert_eq!((st, v["error"]["code"].as_str()), (409, Some("conflict")));
    let (st, v) = call(M::POST, format!("{base}/v1/rooms"), Some("alice"), Some(json!({"name":"no id"}))).await;
    assert_eq!(st, 201);
    assert!(natter::ids::RoomId::parse(v["id"].as_str().unwrap()).is_ok());
    let (st, v) = call(M::POST, format!("{base}/v1/rooms"), Some("alice"), Some(json!({"id":"a.b"}))).await;
    assert_eq!((st, v["error"]["code"].as_str()), (400, Some("bad_request")));
    let (st, _) = call(M::POST, format!("{base}/v1/rooms"), None, Some(json!({"id":"x"}))).await;
    assert_eq!(st, 401);
    let (st, v) = call(M::POST, format!("{base}/v1/rooms"), Some("alice"), Some(json!("not an object"))).await;
    assert_eq!((st, v["error"]["code"].as_str()), (400, Some("bad_request")));

    // Members: only the owner adds; bob cannot add carol.
    let (st, _) =
        call(M::POST, format!("{base}/v1/rooms/team/members"), Some("bob"), Some(json!({"user":"carol"}))).await;
    assert_eq!(st, 403);
    let (st, _) =
        call(M::POST, format!("{base}/v1/rooms/team/members"), Some("alice"), Some(json!({"user":"carol"}))).await;
    assert_eq!(st, 201);
    let (st, v) = call(M::GET, format!("{base}/v1/rooms/team/members"), Some("carol"), None).await;
    assert_eq!((st, v["members"].clone()), (200, json!(["alice", "bob", "carol"])));
    let (st, _) = call(M::GET, format!("{base}/v1/rooms/team/members"), Some("eve"), None).await;
    assert_eq!(st, 403);
    let (st, _) = call(M::GET, format!("{base}/v1/rooms/nope/members"), Some("eve"), None).await;
    assert_eq!(st, 404);

    // Send over HTTP (on the other gateway) with dedupe.
    let base2 = s.gw2.http();
    let mut seqs = Vec::new();
    for n in 0..30 {
        let (st, v) = call(
            M::POST,
            format!("{base2}/v1/rooms/team/messages"),
            Some("carol"),
            Some(json!({"id":format!("c{n}"),"body":format!("n{n}")})),
        )
        .await;
        assert_eq!(st, 201, "{v}");
        assert_eq!(v["duplicate"], false);
        seqs.push(v["seq"].as_u64().unwrap());
    }
    let (st, v) =
        call(M::POST, format!("{base2}/v1/rooms/team/messages"), Some("carol"), Some(json!({"id":"c3","body":"n3"})))
            .await;
    assert_eq!((st, v["duplicate"].as_bool(), v["seq"].as_u64()), (200, Some(true), Some(seqs[3])));
    let (st, _) =
        call(M::POST, format!("{base2}/v1/rooms/team/messages"), Some("eve"), Some(json!({"id":"e1","body":"x"})))
            .await;
    assert_eq!(st, 403);

    // History: newest first, paged with `before`.
    let (st, v) = call(M::GET, format!("{base}/v1/rooms/team/messages?limit=10"), Some("bob"), None).await;
    assert_eq!(st, 200);
    let page: Vec<u64> = v["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(page, seqs.iter().rev().take(10).copied().collect::<Vec<_>>());
    assert_eq!(v["messages"][0]["body"], "n29");
    assert_eq!(v["messages"][0]["from"], "carol");
    let (_, v) =
        call(M::GET, format!("{base}/v1/rooms/team/messages?limit=50&before={}", seqs[5]), Some("bob"), None).await;
    let page: Vec<u64> = v["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(page, seqs[..5].iter().rev().copied().collect::<Vec<_>>());
    let (st, _) = call(M::GET, format!("{base}/v1/rooms/team/messages"), Some("eve"), None).await;
    assert_eq!(st, 403);

    // Read marker over HTTP, then the room list shows it with last_seq.
    let (st, _) = call(M::POST, format!("{base}/v1/rooms/team/read"), Some("bob"), Some(json!({"seq":seqs[9]}))).await;
    assert_eq!(st, 200);
    let (st, v) = call(M::GET, format!("{base}/v1/rooms"), Some("bob"), None).await;
    assert_eq!(st, 200);
    let team = v["rooms"].as_array().unwrap().iter().find(|r| r["id"] == "team").unwrap().clone();
    assert_eq!(team["last_read_seq"].as_u64(), Some(seqs[9]));
    assert_eq!(team["last_seq"].as_u64(), Some(seqs[29]));
    assert_eq!(team["role"], "member");

    // Removal: bob leaves himself; alice removes carol; carol can no longer send.
    let (st, _) = call(M::DELETE, format!("{base}/v1/rooms/team/members/bob"), Some("bob"), None).await;
    assert_eq!(st, 204);
    let (st, _) = call(M::DELETE, format!("{base}/v1/rooms/team/members/carol"), Some("bob"), None).await;
    assert_eq!(st, 403);
    let (st, _) = call(M::DELETE, format!("{base}/v1/rooms/team/members/carol"), Some("alice"), None).await;
    assert_eq!(st, 204);
    let (st, _) =
        call(M::POST, format!("{base}/v1/rooms/team/messages"), Some("carol"), Some(json!({"id":"late","body":"x"})))
            .await;
    assert_eq!(st, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness() {
    let s = Stack::start().await;
    let (st, _) = call(reqwest::Method::GET, format!("{}/healthz", s.gw1.http()), None, None).await;
    assert_eq!(st, 200);
    let (st, v) = call(reqwest::Method::GET, format!("{}/readyz", s.gw1.http()), None, None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["nats"], true);
}

/// Membership lookups that miss the cache are answered in batches: many at
/// once cost a few queries, each gets its own answer, and a database error
/// reaches every waiter as `unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_lookups_are_batched_and_each_gets_its_answer() {
    use std::time::Duration;

    use natter::{
        db::rooms,
        gateway::membership::Membership,
        ids::{RoomId, UserId},
    };

    let db = TestDb::new().await;
    let pool = db.pool().await;
    let room = |i: usize| RoomId::parse(&format!("r{i}")).unwrap();
    let user = |i: usize| UserId::parse(&format!("u{i}")).unwrap();
    // Room r<i> has members u<i>..u<i+4>.
    for i in 0..50 {
        let members: Vec<UserId> = (i..i + 5).map(user).collect();
        assert!(rooms::create(&pool, &room(i), "r", &members[0], &members).await.unwrap());
    }
    let membership = Membership::new(Duration::from_secs(30), pool.clone());
    let asks: Vec<(usize, usize)> = (0..50).flat_map(|r| (0..60).step_by(3).map(move |u| (r, u))).collect();
    let answers = futures::future::join_all(asks.iter().map(|&(r, u)| {
        let membership = &membership;
        async move { membership.is_member(&room(r), &user(u)).await.unwrap() }
    }))
    .await;
    for (&(r, u), member) in asks.iter().zip(answers) {
        assert_eq!(member, (r..r + 5).contains(&u), "r{r}, u{u}");
    }
    let queries = membership.queries();
    assert!(queries >= 1 && queries <= asks.len() as u64 / 10, "{queries} queries for {} lookups", asks.len());

    // A positive answer is cached; a negative one is asked again.
    membership.is_member(&room(0), &user(0)).await.unwrap();
    assert_eq!(membership.queries(), queries);
    assert!(!membership.is_member(&room(0), &user(40)).await.unwrap());
    assert_eq!(membership.queries(), queries + 1);

    // The database gone: every waiter is told, none hangs.
    pool.close().await;
    let failed = futures::future::join_all((0..20).map(|u| {
        let membership = &membership;
        async move { membership.is_member(&room(1), &user(u + 100)).await }
    }))
    .await;
    for r in failed {
        let e = r.expect_err("no database");
        assert_eq!(e.code, natter::error::Code::Unavailable, "{e:?}");
    }
}
