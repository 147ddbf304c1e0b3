//! NATS going away under a gateway: connections stay, sends are refused with a
//! clear error (never acked), and everything recovers when it is back.

use std::time::Duration;

use serde_json::{Value, json};

use crate::{assert_eventually, helpers::*};

async fn ready(base: &str) -> (u16, Value) {
    let r = http().get(format!("{base}/readyz")).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_keeps_connections_refuses_sends_meanwhile_and_recovers() {
    nats_restart(Stack::start().await).await;
}

/// The gateways' shared subscriptions come back with the connection too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_recovers_with_shared_subscriptions() {
    presence_flows_after_a_restart(&["--room-subscriptions", "shared", "--presence-subscriptions", "shared"]).await;
}

/// And so do per-user presence subscriptions, with the lease subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_recovers_with_per_user_presence_subscriptions() {
    presence_flows_after_a_restart(&["--presence-subscriptions", "per-user"]).await;
}

async fn presence_flows_after_a_restart(args: &[&str]) {
    let mut s = Stack::with(args, args).await;
    let mut carol = Client::connect(s.gw2.addr, "carol").await;
    carol.send(json!({"type": "presence_sub", "users": ["dave"]})).await;
    assert_eq!(carol.expect("presence").await["status"], "offline");
    s = nats_restart(s).await;
    // Presence events flow again.
    let _dave = Client::connect(s.gw1.addr, "dave").await;
    let p = carol.expect("presence").await;
    assert_eq!((p["user"].as_str(), p["status"].as_str()), (Some("dave"), Some("online")), "{p}");
}

/// Presence changes whose writes fail reach the store once JetStream is
/// back. Entries are written on change only, so a lost write would
/// otherwise stand: a user who connected shown offline, one who left shown
/// online for as long as their gateway's lease lives. (A plain NATS restart
/// loses nothing: async-nats holds the writes and sends them on reconnect.
/// Here NATS comes back without JetStream first, so they are refused.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_writes_refused_in_an_outage_are_stored_once_jetstream_is_back() {
    let args = ["--presence-ttl", "3s", "--presence-grace", "1s"];
    let mut s = Stack::with(&args, &args).await;
    let frank = Client::connect(s.gw1.addr, "frank").await;
    let mut carol = Client::connect(s.gw2.addr, "carol").await;
    carol.send(json!({"type": "presence_sub", "users": ["frank"]})).await;
    assert_eventually!(Duration::from_secs(5), carol.expect("presence").await["status"] == "online", "frank online");

    s.nats.kill();
    assert_eventually!(Duration::from_secs(5), ready(&s.gw1.http()).await.0 == 503, "readyz reflects the outage");
    s.nats.restart_without_jetstream();
    assert_eventually!(Duration::from_secs(15), ready(&s.gw1.http()).await.0 == 200, "core NATS is back");
    let _erin = Client::connect(s.gw1.addr, "erin").await; // her entry is refused
    drop(frank); // and so is his offline record, after the grace
    // Only their writes go through gw1: erin's at once, frank's after the grace.
    let unstored = || metric(s.gw1.addr, "natter_presence_unstored_users");
    assert_eventually!(Duration::from_secs(10), unstored().await == 2, "both writes refused: {}", unstored().await);
    s.nats.restart();

    // As a client that looks now would see them.
    let statuses = || async {
        let p = get_json(format!("{}/v1/presence?users=erin,frank", s.gw2.http()), "carol").await;
        (p["presence"][0]["status"].clone(), p["presence"][1]["status"].clone())
    };
    let expected = (json!("online"), json!("offline"));
    assert_eventually!(Duration::from_secs(20), statuses().await == expected, "{:?}", statuses().await);
}

/// Kills and restarts nats-server under two clients in a room; answers the
/// stack, running again.
async fn nats_restart(mut s: Stack) -> Stack {
    create_room(&s.gw1.http(), "alice", "general", &["bob"]).await;
    let mut alice = Client::connect(s.gw1.addr, "alice").await;
    let mut bob = Client::connect(s.gw2.addr, "bob").await;
    alice.join("general", None).await;
    bob.join("general", None).await;
    let first = alice.send_msg("general", "m1", "before").await;

    s.nats.kill();
    assert_eventually!(Duration::from_secs(5), ready(&s.gw1.http()).await.0 == 503, "readyz reflects the outage");
    assert_eq!(ready(&s.gw1.http()).await.1["nats"], false);
    alice.send(json!({"type": "send", "room": "general", "id": "m2", "body": "during"})).await;
    let answer = loop {
        let v = alice.recv().await;
        if v["type"] == "ack" || v["type"] == "error" {
            break v;
        }
    };
    assert_eq!(answer["type"], "error", "no ack for what was not stored: {answer}");
    assert_eq!(answer["code"], "unavailable", "{answer}");
    assert_eq!(answer["ref"], "m2");
    alice.send(json!({"type": "ping"})).await;
    assert_eq!(alice.expect("pong").await["type"], "pong", "the connection stays open");

    s.nats.restart();
    assert_eventually!(Duration::from_secs(15), ready(&s.gw1.http()).await.0 == 200, "ready again");
    // The refused message is resent with the same id and stored once.
    let second = alice.send_msg("general", "m2", "during").await;
    assert!(second > first);
    let got = bob.messages("general", 2).await;
    assert_eq!(seqs_in_order(&got), vec![first, second], "bob got both, in order, once");
    bob.expect_silence(Duration::from_millis(500)).await;
    s
}
