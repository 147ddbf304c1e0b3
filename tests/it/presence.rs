//! Presence, typing and per-user events across gateways, including a
//! gateway killed with SIGKILL.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{assert_eventually, helpers::*};

/// The next presence frame for `user`, skipping other frames.
async fn presence_of(c: &mut Client, user: &str, within: Duration) -> Value {
    let until = Instant::now() + within;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match c.next_within(left).await {
            Some(Ok(v)) if v["type"] == "presence" && v["user"] == user => return v,
            Some(Ok(_)) => continue,
            other => panic!("{}: no presence for {user} within {within:?}: {other:?}", c.user),
        }
    }
}

async fn watch(c: &mut Client, user: &str) -> Value {
    c.send(json!({"type":"presence_sub","users":[user]})).await;
    presence_of(c, user, Duration::from_secs(5)).await
}

/// bob watches `n` users (`user0`…), who then connect to `addr` one by one;
/// answers their clients once bob has seen each come online.
async fn watched_users_online(bob: &mut Client, addr: std::net::SocketAddr, n: usize) -> Vec<Client> {
    let users: Vec<String> = (0..n).map(|i| format!("user{i}")).collect();
    bob.send(json!({"type":"presence_sub","users":users})).await;
    for _ in &users {
        assert_eq!(bob.expect("presence").await["status"], "offline");
    }
    let mut clients = Vec::new();
    for u in &users {
        clients.push(Client::connect(addr, u).await);
        assert_eq!(presence_of(bob, u, Duration::from_secs(2)).await["status"], "online");
    }
    clients
}

/// Watching gateways with one subscription per watched user (the default
/// is one for every user's events).
const PER_USER: &[&str] = &["--presence-subscriptions", "per-user"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_away_and_offline_after_the_grace_reach_another_gateway() {
    online_away_offline(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_away_and_offline_reach_a_gateway_with_per_user_subscriptions() {
    online_away_offline(PER_USER).await;
}

/// bob, on gw2 (started with `watcher`), watches alice on gw1.
async fn online_away_offline(watcher: &[&str]) {
    let s = Stack::with(&["--presence-grace", "1s"], watcher).await;
    let mut bob = Client::connect(s.gw2.addr, "bob").await;
    let first = watch(&mut bob, "alice").await;
    assert_eq!(first["status"], "offline");

    let t = Instant::now();
    let mut alice = Client::connect(s.gw1.addr, "alice").await;
    let p = presence_of(&mut bob, "alice", Duration::from_secs(1)).await;
    assert_eq!(p["status"], "online", "{p}");
    assert!(t.elapsed() < Duration::from_secs(1));

    alice.send(json!({"type":"presence","status":"away"})).await;
    assert_eq!(presence_of(&mut bob, "alice", Duration::from_secs(1)).await["status"], "away");
    alice.send(json!({"type":"presence","status":"online"})).await;
    assert_eq!(presence_of(&mut bob, "alice", Duration::from_secs(1)).await["status"], "online");

    let before_close = natter::bus::envelope::now_ms();
    let closed = Instant::now();
    drop(alice);
    let p = presence_of(&mut bob, "alice", Duration::from_secs(4)).await;
    let after = closed.elapsed();
    assert_eq!(p["status"], "offline", "{p}");
    assert!(after >= Duration::from_millis(900), "offline after {after:?}, before the 1 s grace");
    assert!(p["last_seen"].as_i64().unwrap() >= before_close, "{p}");

    // The HTTP view agrees.
    let v: Value = get_json(format!("{}/v1/presence?users=alice,nobody", s.gw2.http()), "bob").await;
    assert_eq!(v["presence"][0]["status"], "offline", "{v}");
    assert_eq!(v["presence"][1], json!({"user":"nobody","status":"offline","last_seen":0}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_on_two_gateways_aggregate() {
    let s = Stack::with(&["--presence-grace", "500ms"], &["--presence-grace", "500ms"]).await;
    let mut bob = Client::connect(s.gw2.addr, "bob").await;
    watch(&mut bob, "alice").await;
    let mut phone = Client::connect(s.gw1.addr, "alice").await;
    assert_eq!(presence_of(&mut bob, "alice", Duration::from_secs(2)).await["status"], "online");
    let laptop = Client::connect(s.gw2.addr, "alice").await;
    // The phone goes to background: the laptop keeps alice online.
    phone.send(json!({"type":"presence","status":"away"})).await;
    drop(laptop);
    // Only away once the laptop's session is gone (after its grace).
    assert_eq!(presence_of(&mut bob, "alice", Duration::from_secs(3)).await["status"], "away");
    phone.send(json!({"type":"presence","status":"online"})).await;
    assert_eq!(presence_of(&mut bob, "alice", Duration::from_secs(2)).await["status"], "online");
    let laptop = Client::connect(s.gw2.addr, "alice").await;
    drop(phone);
    bob.expect_silence(Duration::from_millis(1500)).await; // still online
    drop(laptop);
    assert_eq!(presence_of(&mut bob, "alice", Duration::from_secs(3)).await["status"], "offline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_within_the_grace_sends_no_offline() {
    let s = Stack::with(&["--presence-grace", "2s"], &["--presence-grace", "2s"]).await;
    let mut bob = Client::connect(s.gw2.addr, "bob").await;
    watch(&mut bob, "alice").await;
    let alice = Client::connect(s.gw1.addr, "alice").await;
    assert_eq!(presence_of(&mut bob, "alice", Duration::from_secs(2)).await["status"], "online");
    drop(alice);
    tokio::time::sleep(Duration::from_millis(300)).await; // a network blip
    let _again = Client::connect(s.gw2.addr, "alice").await; // back, on the other gateway
    bob.expect_silence(Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateways_users_go_offline_by_ttl_alone() {
    killed_gateways_users_go_offline(&[]).await;
}

/// The lease's expiry marker reaches a gateway with per-user subscriptions
/// too (on its lease subscription).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateways_users_go_offline_with_per_user_subscriptions() {
    killed_gateways_users_go_offline(PER_USER).await;
}

async fn killed_gateways_users_go_offline(watcher: &[&str]) {
    let nats = NatsServer::start();
    let db = TestDb::new().await;
    let gw = spawn_gateway(&nats, &db, "gw-watch", watcher).await;
    let mut doomed = GatewayProcess::start(&nats.url(), &db, "gw-doomed", &["--presence-ttl", "2s"]);
    let mut bob = Client::connect(gw.addr, "bob").await;
    let clients = watched_users_online(&mut bob, doomed.addr, 12).await;
    // All stay online across lease refreshes (TTL 2 s, refreshed every ~0.7 s).
    bob.expect_silence(Duration::from_secs(3)).await;
    let killed = Instant::now();
    doomed.kill9();
    let mut offline = std::collections::HashSet::new();
    while offline.len() < clients.len() {
        let left = Duration::from_secs(2 + 2 + 1).saturating_sub(killed.elapsed());
        let p = match bob.next_within(left).await {
            Some(Ok(v)) if v["type"] == "presence" => v,
            Some(Ok(_)) => continue,
            other => panic!("offline for {offline:?} only, then {other:?}"),
        };
        assert_eq!(p["status"], "offline", "{p}");
        assert!(p["last_seen"].as_i64().unwrap() > 0);
        offline.insert(p["user"].as_str().unwrap().to_string());
    }
    assert!(killed.elapsed() <= Duration::from_secs(4), "offline only after {:?}", killed.elapsed());
}

/// The heartbeat refreshes the node's lease, not each user's entry: with
/// 20 users online over several lease periods, the presence stream grows
/// by the lease refreshes alone (before leases, every entry was rewritten
/// every TTL/3: 20 × 3 per period here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heartbeat_writes_one_lease_per_gateway_not_an_entry_per_user() {
    let nats = NatsServer::start();
    let db = TestDb::new().await;
    let gw = spawn_gateway(&nats, &db, "gw-beat", &["--presence-ttl", "3s"]).await;
    let mut bob = Client::connect(gw.addr, "bob").await;
    let clients = watched_users_online(&mut bob, gw.addr, 20).await;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let last_seq = || async { js.get_stream("KV_presence").await.unwrap().info().await.unwrap().state.last_sequence };
    let before = last_seq().await;
    let held = Instant::now();
    // Three lease periods: the users stay online all along.
    bob.expect_silence(Duration::from_secs(9)).await;
    let writes = last_seq().await - before;
    let periods = held.elapsed().as_secs_f64(); // a refresh every TTL/3 = 1 s
    assert!(writes as f64 <= periods + 2.0, "{writes} writes in {:?}: more than the lease's", held.elapsed());
    assert!(writes >= 6, "{writes} writes in {:?}: the lease was not refreshed", held.elapsed());
    drop(clients);
}

/// A gateway killed and started again under the same node id takes a new
/// lease: the users of its previous life stay offline, whether a watcher
/// saw them go or reads them afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_restarted_under_its_node_id_does_not_revive_its_previous_users() {
    let nats = NatsServer::start();
    let db = TestDb::new().await;
    let gw = spawn_gateway(&nats, &db, "gw-watch", &[]).await;
    let mut doomed = GatewayProcess::start(&nats.url(), &db, "gw-again", &["--presence-ttl", "2s"]);
    let mut bob = Client::connect(gw.addr, "bob").await;
    assert_eq!(watch(&mut bob, "alice").await["status"], "offline");
    let _alice = Client::connect(doomed.addr, "alice").await;
    assert_eq!(presence_of(&mut bob, "alice", Duration::from_secs(2)).await["status"], "online");
    doomed.kill9();
    assert_eq!(presence_of(&mut bob, "alice", Duration::from_secs(5)).await["status"], "offline");
    let again = GatewayProcess::start(&nats.url(), &db, "gw-again", &["--presence-ttl", "2s"]);
    let _carol = Client::connect(again.addr, "carol").await; // the new life writes
    bob.expect_silence(Duration::from_secs(3)).await;
    let mut dave = Client::connect(again.addr, "dave").await;
    assert_eq!(watch(&mut dave, "alice").await["status"], "offline");
    let looked_up = get_json(format!("http://{}/v1/presence?users=alice,carol", again.addr), "dave").await;
    assert_eq!(looked_up["presence"][0]["status"], "offline", "{looked_up}");
    assert_eq!(looked_up["presence"][1]["status"], "online", "{looked_up}");
}

/// A draining gateway keeps its lease through the drain window: each of its
/// users stays online until their own socket is closed (the heartbeat used
/// to stop when the drain began, so a lease shorter than the window expired
/// under users still connected).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_gateways_users_stay_online_until_their_sockets_close() {
    const WINDOW: Duration = Duration::from_secs(8);
    let nats = NatsServer::start();
    let db = TestDb::new().await;
    let gw = spawn_gateway(&nats, &db, "gw-watch", &[]).await;
    let args = ["--presence-ttl", "2s", "--presence-grace", "1s", "--drain-window", "8s"];
    let mut draining = GatewayProcess::start(&nats.url(), &db, "gw-draining", &args);
    let mut bob = Client::connect(gw.addr, "bob").await;
    let clients = watched_users_online(&mut bob, draining.addr, 10).await;
    let n = clients.len();
    let closed: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let code = c.expect_close().await;
                (c.user.clone(), code, Instant::now())
            })
        })
        .collect();
    let sigterm_at = Instant::now();
    let terminated = tokio::task::spawn_blocking(move || draining.terminate(WINDOW + Duration::from_secs(2)));
    let mut offline_at = std::collections::HashMap::new();
    while offline_at.len() < n {
        let left = (WINDOW + Duration::from_secs(4)).saturating_sub(sigterm_at.elapsed());
        match bob.next_within(left).await {
            Some(Ok(p)) if p["type"] == "presence" => {
                assert_eq!(p["status"], "offline", "{p}");
                offline_at.insert(p["user"].as_str().unwrap().to_owned(), Instant::now());
            }
            Some(Ok(_)) => continue,
            other => panic!("offline for {:?} only, then {other:?}", offline_at.keys()),
        }
    }
    for c in closed {
        let (user, code, at) = c.await.unwrap();
        assert_eq!(code, Some(1012), "{user}");
        let off = offline_at[&user];
        assert!(off >= at, "{user} shown offline {:?} before their socket closed", at - off);
    }
    assert!(terminated.await.unwrap().is_some_and(|s| s.success()), "exit 0 within the window");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_the_others_never_the_typist_and_stops_on_close() {
    let s = Stack::start().await;
    create_room(&s.gw1.http(), "alice", "r", &["bob", "carol"]).await;
    let mut alice = Client::connect(s.gw1.addr, "alice").await;
    let mut alice2 = Client::connect(s.gw2.addr, "alice").await;
    let mut bob = Client::connect(s.gw2.addr, "bob").await;
    let mut carol = Client::connect(s.gw2.addr, "carol").await;
    for c in [&mut alice, &mut alice2, &mut bob, &mut carol] {
        c.join("r", None).await;
    }
    alice.send(json!({"type":"typing","room":"r","active":true})).await;
    let want = json!({"type":"typing","room":"r","user":"alice","active":true});
    assert_eq!(bob.expect("typing").await, want);
    assert_eq!(carol.expect("typing").await, want);
    alice.expect_silence(Duration::from_millis(300)).await;
    alice2.expect_silence(Duration::from_millis(100)).await;
    // A flood of typing frames is rate limited, not fanned out.
    for _ in 0..50 {
        alice.send(json!({"type":"typing","room":"r","active":true})).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for c in [&mut bob, &mut carol] {
        let mut n = 0;
        while let Some(Ok(v)) = c.next_within(Duration::from_millis(200)).await {
            assert_eq!(v["type"], "typing");
            n += 1;
        }
        assert!(n <= 3, "{n} typing frames passed the limit");
    }
    // Typing into a room one is not in is refused.
    alice.send(json!({"type":"typing","room":"elsewhere","active":true})).await;
    assert_eq!(alice.expect("error").await["code"], "forbidden");
    drop(alice); // mid-typing
    let stop = bob.expect("typing").await;
    assert_eq!(stop, json!({"type":"typing","room":"r","user":"alice","active":false}));
    assert_eq!(carol.expect("typing").await["active"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_reach_the_user_at_once() {
    let s = Stack::start().await;
    create_room(&s.gw1.http(), "alice", "r", &[]).await;
    let mut bob = Client::connect(s.gw2.addr, "bob").await;
    bob.send(json!({"type":"join","room":"r"})).await;
    assert_eq!(bob.expect("error").await["code"], "forbidden");

    let r = http()
        .post(format!("{}/v1/rooms/r/members", s.gw1.http()))
        .bearer_auth(token("alice"))
        .json(&json!({"user":"bob"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let ev = bob.expect("room_added").await;
    assert_eq!((ev["room"].as_str(), ev["by"].as_str()), (Some("r"), Some("alice")));
    bob.join("r", None).await;
    bob.send_msg("r", "b1", "thanks").await;
    bob.messages("r", 1).await;

    let r = http()
        .delete(format!("{}/v1/rooms/r/members/bob", s.gw1.http()))
        .bearer_auth(token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(bob.expect("room_removed").await["room"], "r");
    bob.send(json!({"type":"send","room":"r","id":"b2","body":"still here?"})).await;
    assert_eq!(bob.expect("error").await["code"], "forbidden");
    bob.send(json!({"type":"join","room":"r"})).await;
    assert_eq!(bob.expect("error").await["code"], "forbidden");
    // No longer receives the room.
    let mut alice = Client::connect(s.gw1.addr, "alice").await;
    alice.send_msg("r", "a1", "bye").await;
    bob.expect_silence(Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_sessions_closes_them_everywhere() {
    let s = Stack::start().await;
    let mut a1 = Client::connect(s.gw1.addr, "alice").await;
    let mut a2 = Client::connect(s.gw2.addr, "alice").await;
    let mut bob = Client::connect(s.gw2.addr, "bob").await;
    let r = http().delete(format!("{}/v1/sessions", s.gw1.http())).bearer_auth(token("alice")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(a1.expect_close().await, Some(4001));
    assert_eq!(a2.expect_close().await, Some(4001));
    bob.send(json!({"type":"ping"})).await;
    bob.expect("pong").await;
}

/// A `presence_sub` of the full allowance (1 000 users) in one frame gets a
/// snapshot frame for every user: the gateway splits the batch direct get in
/// requests of 500 (one request of 1 000 filters brought nothing), and the
/// snapshot frames are not dropped as backpressure (they were, past half the
/// outbound queue, whenever the writer was slower than the snapshot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_more_watched_users_than_one_batch_get_arrives_whole() {
    let s = Stack::start().await;
    let _online = Client::connect(s.gw1.addr, "w-7").await;
    let users: Vec<String> = (0..1000).map(|i| format!("w-{i}")).collect();
    let mut watcher = Client::connect(s.gw2.addr, "watcher").await;
    watcher.send(json!({"type":"presence_sub","users":users})).await;
    let mut seen = std::collections::HashMap::new();
    while seen.len() < users.len() {
        let v = watcher.expect("presence").await;
        seen.insert(v["user"].as_str().unwrap().to_owned(), v["status"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen["w-7"], "online");
    assert_eq!(seen["w-8"], "offline");
    assert_eq!(seen.values().filter(|s| *s == "online").count(), 1);
}

/// async-nats lets a JetStream context have a bounded number of publishes
/// unacknowledged (5 000 by default; here 4) and gives a permit back only
/// when its ack future completes. The presence writer keeps polling its acks
/// while a publish waits for a permit: it used to stop, and after a burst of
/// more writes than permits (a heartbeat of more than 5 000 users) it waited
/// for ever, and so did every message send of the gateway, which shares the
/// context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_writes_beyond_the_unacknowledged_publish_limit_are_all_stored() {
    use std::sync::Arc;

    use natter::{
        bus::presence as bus,
        gateway::{
            metrics::Metrics,
            presence::{Presence, PresenceSettings},
        },
        ids::{NodeId, UserId},
    };

    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::ContextBuilder::new().max_ack_inflight(4).build(client.clone());
    bus::ensure_bucket(&js, &nats_settings(nats.url())).await.unwrap();
    let presence = Presence::start(
        js.clone(),
        client.clone(),
        NodeId::parse("n1").unwrap(),
        PresenceSettings { ttl: Duration::from_secs(30), grace: Duration::from_secs(1) },
        nats_settings(nats.url()),
        Arc::new(Metrics::default()),
    );
    let users: Vec<UserId> = (0..50).map(|i| UserId::parse(&format!("u{i}")).unwrap()).collect();
    for (i, u) in users.iter().enumerate() {
        presence.session_started(u, i as u64);
    }
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let stored = bus::snapshot(&client, &users).await.unwrap();
        let online = users.iter().filter(|u| stored.view(u.as_str()).0 == bus::Status::Online).count();
        if online == users.len() {
            break;
        }
        assert!(Instant::now() < until, "{online} of {} entries stored", users.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The context's permits all came back: another publish is acknowledged.
    let ack = js.publish("$KV.presence.u0.n2", "{}".into()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), ack.into_future()).await.expect("ack in time").unwrap();
}

/// The presence bucket lost while the gateways run (its storage wiped, or
/// deleted by hand). The next write of a gateway (its lease refresh) finds
/// it gone; its heartbeat makes it again and writes the entries of all its
/// connected users, which the wipe took: lookups and watchers see them
/// online again, and later changes reach watchers. Nothing restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_bucket_lost_while_running_is_made_again_and_refilled() {
    let args = ["--presence-ttl", "3s"];
    let s = Stack::with(&args, &args).await;
    let mut alice = Client::connect(s.gw1.addr, "alice").await;
    let _carol = Client::connect(s.gw1.addr, "carol").await;
    let mut bob = Client::connect(s.gw2.addr, "bob").await;
    // While the bucket is gone a lookup is 503 `unavailable`.
    let statuses = || async {
        let url = format!("{}/v1/presence?users=alice,carol,bob", s.gw2.http());
        let r = http().get(url).bearer_auth(token("bob")).send().await.unwrap();
        let v: Value = if r.status().is_success() { r.json().await.unwrap() } else { json!({"presence": []}) };
        v["presence"].as_array().unwrap().iter().map(|p| p["status"].as_str().unwrap().to_owned()).collect::<Vec<_>>()
    };
    assert_eventually!(Duration::from_secs(5), statuses().await == ["online"; 3], "all online: {:?}", statuses().await);
    assert_eq!(watch(&mut bob, "alice").await["status"], "online");

    let js = async_nats::jetstream::new(async_nats::connect(s.nats.url()).await.unwrap());
    js.delete_key_value("presence").await.unwrap();
    assert_eventually!(
        Duration::from_secs(10),
        statuses().await == ["online"; 3],
        "every connected user's entry written again: {:?}",
        statuses().await
    );
    let remade = |addr| metric(addr, r#"natter_stream_repairs_total{stream="presence"}"#);
    assert!(remade(s.gw1.addr).await + remade(s.gw2.addr).await >= 1, "counted");
    alice.send(json!({"type":"presence","status":"away"})).await;
    assert_eq!(presence_of(&mut bob, "alice", Duration::from_secs(2)).await["status"], "away");
}
