//! Room messaging across gateways: order, no loss, no duplicates, dedupe,
//! resume with `since`, and gap repair.

use std::collections::HashSet;

use serde_json::json;

use crate::{assert_eventually, helpers::*};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_each_side_sees_the_other_in_order_once() {
    let s = Stack::start().await;
    create_room(&s.gw1.http(), "alice", "general", &["bob"]).await;
    let mut alice = Client::connect(s.gw1.addr, "alice").await;
    let mut bob = Client::connect(s.gw2.addr, "bob").await;
    assert_eq!(alice.join("general", None).await, 0);
    assert_eq!(bob.join("general", None).await, 0);

    let s1 = alice.send_msg("general", "a1", "hello bob").await;
    let got = bob.messages("general", 1).await;
    assert_eq!(got[0]["seq"], s1);
    assert_eq!(got[0]["from"], "alice");
    assert_eq!(got[0]["body"], "hello bob");
    assert_eq!(got[0]["id"], "a1");
    assert!(got[0]["ts"].as_i64().unwrap() > 0);

    let s2 = bob.send_msg("general", "b1", "hi alice").await;
    // alice gets her own message once, then bob's.
    let got = alice.messages("general", 2).await;
    assert_eq!(seqs_in_order(&got), vec![s1, s2]);
    assert_eq!(got[1]["from"], "bob");
    alice.expect_silence(std::time::Duration::from_millis(300)).await;
    // bob gets his own message once too.
    let got = bob.messages("general", 1).await;
    assert_eq!(got[0]["seq"], s2);
    bob.expect_silence(std::time::Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_messages_from_five_senders_reach_every_member_in_order() {
    let s = Stack::start().await;
    let members = ["m1", "m2", "m3", "m4", "s1", "s2", "s3", "s4", "s5"];
    create_room(&s.gw1.http(), "owner", "busy", &members).await;
    let gws = [s.gw1.addr, s.gw2.addr];
    let mut readers = Vec::new();
    for (i, m) in ["m1", "m2", "m3", "m4"].iter().enumerate() {
        let mut c = Client::connect(gws[i % 2], m).await;
        c.join("busy", None).await;
        readers.push(c);
    }
    let mut senders = Vec::new();
    for (i, u) in ["s1", "s2", "s3", "s4", "s5"].iter().enumerate() {
        let mut c = Client::connect(gws[i % 2], u).await;
        c.join("busy", None).await;
        senders.push(c);
    }
    // Each sender fires 200 sends without waiting for acks.
    let mut tasks = Vec::new();
    for (i, mut c) in senders.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            for n in 0..200 {
                c.send(json!({"type":"send","room":"busy","id":format!("s{i}-{n}"),"body":format!("{i}/{n}")})).await;
            }
            let mut acks = 0;
            let mut msgs = 0;
            while acks < 200 || msgs < 1000 {
                let v = c.recv().await;
                match v["type"].as_str().unwrap() {
                    "ack" => acks += 1,
                    "message" => msgs += 1,
                    other => panic!("unexpected {other}: {v}"),
                }
            }
            (acks, msgs)
        }));
    }
    for mut r in readers {
        let got = r.messages("busy", 1000).await;
        let seqs = seqs_in_order(&got);
        assert_eq!(seqs.iter().collect::<HashSet<_>>().len(), 1000);
        // Per sender, bodies arrive in the order they were sent.
        for i in 0..5 {
            let mine: Vec<u64> = got
                .iter()
                .filter(|m| m["id"].as_str().unwrap().starts_with(&format!("s{i}-")))
                .map(|m| m["body"].as_str().unwrap().split('/').nth(1).unwrap().parse().unwrap())
                .collect();
            assert_eq!(mine, (0..200).collect::<Vec<u64>>());
        }
        r.expect_silence(std::time::Duration::from_millis(200)).await;
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), (200, 1000));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_client_id_returns_the_same_seq_and_stores_once() {
    let s = Stack::start().await;
    create_room(&s.gw1.http(), "alice", "r", &["bob"]).await;
    let mut alice = Client::connect(s.gw1.addr, "alice").await;
    let mut bob = Client::connect(s.gw2.addr, "bob").await;
    bob.join("r", None).await;
    let first = alice.send_msg("r", "same-id", "once").await;
    let again = alice.send_msg("r", "same-id", "once").await;
    assert_eq!(first, again);
    // Another user may use the same client id: it is a different message.
    let bobs = bob.send_msg("r", "same-id", "mine").await;
    assert_ne!(bobs, first);
    let got = bob.messages("r", 2).await;
    assert_eq!(seqs_in_order(&got), vec![first, bobs]);
    bob.expect_silence(std::time::Duration::from_millis(300)).await;

    let hist: serde_json::Value = get_json(format!("{}/v1/rooms/r/messages", s.gw1.http()), "alice").await;
    let msgs = hist["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2, "{hist}");

    // The same client id in another room is another message (clients that
    // number their sends per room), and a resend there dedupes there.
    create_room(&s.gw1.http(), "alice", "r2", &["bob"]).await;
    bob.join("r2", None).await;
    let elsewhere = alice.send_msg("r2", "same-id", "in r2").await;
    assert!(elsewhere > bobs, "stored in r2: {elsewhere}");
    assert_eq!(alice.send_msg("r2", "same-id", "in r2").await, elsewhere);
    let got = bob.messages("r2", 1).await;
    assert_eq!((got[0]["seq"].as_u64(), got[0]["body"].as_str()), (Some(elsewhere), Some("in r2")));
    bob.expect_silence(std::time::Duration::from_millis(300)).await;
    assert_eq!(alice.send_msg("r", "same-id", "once").await, first, "r's message is still r's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_with_since_replays_the_missed_then_goes_live_without_gap_or_dupe() {
    reconnect_with_since(Stack::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_with_since_holds_its_seam_with_a_shared_subscription() {
    reconnect_with_since(Stack::with(SHARED, SHARED).await).await;
}

/// Gateways that receive every room's live traffic on one subscription.
const SHARED: &[&str] = &["--room-subscriptions", "shared"];

async fn reconnect_with_since(s: Stack) {
    create_room(&s.gw1.http(), "alice", "r", &["bob"]).await;
    let mut bob = Client::connect(s.gw2.addr, "bob").await;
    bob.join("r", None).await;
    let mut alice = Client::connect(s.gw1.addr, "alice").await;
    let seen = alice.send_msg("r", "m0", "before").await;
    assert_eq!(bob.messages("r", 1).await[0]["seq"], seen);
    drop(bob);

    for n in 1..=200 {
        alice.send(json!({"type":"send","room":"r","id":format!("m{n}"),"body":n.to_string()})).await;
    }
    // While bob rejoins, alice keeps sending: the seam must hold.
    let sender = tokio::spawn(async move {
        for n in 201..=300 {
            alice.send(json!({"type":"send","room":"r","id":format!("m{n}"),"body":n.to_string()})).await;
        }
        let mut acks = 0;
        while acks < 300 {
            if alice.recv().await["type"] == "ack" {
                acks += 1;
            }
        }
    });
    let mut bob = Client::connect(s.gw2.addr, "bob").await;
    let last = bob.join("r", Some(seen)).await;
    assert!(last >= seen);
    let got = bob.messages("r", 300).await;
    seqs_in_order(&got);
    let bodies: Vec<u64> = got.iter().map(|m| m["body"].as_str().unwrap().parse().unwrap()).collect();
    assert_eq!(bodies, (1..=300).collect::<Vec<u64>>());
    sender.await.unwrap();
    bob.expect_silence(std::time::Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_live_deliveries_are_repaired_from_the_stream() {
    // gw2 drops every third republished message before gap detection.
    lost_live_deliveries_repaired(Stack::with(&[], &["--fault-drop-live-every", "3"]).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_live_deliveries_are_repaired_with_a_shared_subscription() {
    let gw2 = [SHARED, &["--fault-drop-live-every", "3"]].concat();
    lost_live_deliveries_repaired(Stack::with(SHARED, &gw2).await).await;
}

async fn lost_live_deliveries_repaired(s: Stack) {
    create_room(&s.gw1.http(), "alice", "r", &["bob"]).await;
    let mut bob = Client::connect(s.gw2.addr, "bob").await;
    bob.join("r", None).await;
    let mut alice = Client::connect(s.gw1.addr, "alice").await;
    for n in 0..60 {
        alice.send(json!({"type":"send","room":"r","id":format!("m{n}"),"body":n.to_string()})).await;
    }
    // 60 is a multiple of 3: the last delivery is dropped too, and only the
    // tail check can find it.
    let got = bob.messages("r", 60).await;
    seqs_in_order(&got);
    let bodies: Vec<u64> = got.iter().map(|m| m["body"].as_str().unwrap().parse().unwrap()).collect();
    assert_eq!(bodies, (0..60).collect::<Vec<u64>>());
    bob.expect_silence(std::time::Duration::from_millis(1200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_stops_delivery_and_read_markers_reach_the_others() {
    let s = Stack::start().await;
    create_room(&s.gw1.http(), "alice", "r", &["bob"]).await;
    let mut alice = Client::connect(s.gw1.addr, "alice").await;
    let mut bob = Client::connect(s.gw2.addr, "bob").await;
    alice.join("r", None).await;
    bob.join("r", None).await;
    let seq = alice.send_msg("r", "x", "hi").await;
    alice.messages("r", 1).await;
    bob.messages("r", 1).await;

    bob.send(json!({"type":"read","room":"r","seq":seq})).await;
    let read = alice.expect("read").await;
    assert_eq!(read, json!({"type":"read","room":"r","user":"bob","seq":seq}));
    bob.expect_silence(std::time::Duration::from_millis(300)).await; // not echoed to bob
    let pool = s.db.pool().await;
    let stored: i64 = sqlx::query_scalar("SELECT last_read_seq FROM room_members WHERE room_id='r' AND user_id='bob'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored as u64, seq);
    // A read marker never moves back.
    bob.send(json!({"type":"read","room":"r","seq":0})).await;
    assert_eq!(alice.expect("read").await["seq"], seq);

    bob.send(json!({"type":"leave","room":"r"})).await;
    assert_eq!(bob.expect("left").await["room"], "r");
    alice.send_msg("r", "y", "gone?").await;
    bob.expect_silence(std::time::Duration::from_millis(500)).await;
}

/// With one subscription for every room, each room's task still gets its
/// room's messages, typing and read markers, and nothing of other rooms; a
/// gateway drops (and counts) the traffic of rooms it has no member of.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscription_routes_each_rooms_traffic_to_its_members_only() {
    let s = Stack::with(SHARED, SHARED).await;
    create_room(&s.gw1.http(), "alice", "r", &["bob"]).await;
    create_room(&s.gw1.http(), "carol", "elsewhere", &["dave"]).await;
    let mut alice = Client::connect(s.gw1.addr, "alice").await;
    let mut bob = Client::connect(s.gw2.addr, "bob").await;
    let mut carol = Client::connect(s.gw1.addr, "carol").await;
    let mut dave = Client::connect(s.gw1.addr, "dave").await;
    alice.join("r", None).await;
    bob.join("r", None).await;
    carol.join("elsewhere", None).await;
    dave.join("elsewhere", None).await;
    let unrouted_before = metric(s.gw2.addr, "natter_live_unrouted_total").await;

    let seq = alice.send_msg("r", "a1", "to bob").await;
    let other = carol.send_msg("elsewhere", "c1", "to dave").await;
    carol.send(json!({"type":"typing","room":"elsewhere","active":true})).await;
    let got = bob.messages("r", 1).await;
    assert_eq!((got[0]["seq"].as_u64(), got[0]["body"].as_str()), (Some(seq), Some("to bob")));
    assert_eq!(alice.messages("r", 1).await[0]["seq"], seq, "the sender gets its own message");
    let got = dave.messages("elsewhere", 1).await;
    assert_eq!((got[0]["seq"].as_u64(), got[0]["body"].as_str()), (Some(other), Some("to dave")));
    assert_eq!(dave.expect("typing").await["user"], "carol");

    alice.send(json!({"type":"typing","room":"r","active":true})).await;
    assert_eq!(bob.expect("typing").await, json!({"type":"typing","room":"r","user":"alice","active":true}));
    bob.send(json!({"type":"read","room":"r","seq":seq})).await;
    assert_eq!(alice.expect("read").await, json!({"type":"read","room":"r","user":"bob","seq":seq}));
    alice.expect_silence(std::time::Duration::from_millis(300)).await;
    carol.messages("elsewhere", 1).await;
    carol.expect_silence(std::time::Duration::from_millis(300)).await;
    bob.expect_silence(std::time::Duration::from_millis(300)).await;
    // gw2 has no member of "elsewhere": its message and typing were dropped there.
    assert_eventually!(
        std::time::Duration::from_secs(5),
        metric(s.gw2.addr, "natter_live_unrouted_total").await >= unrouted_before + 2,
        "gw2 counts the traffic of rooms it has no member of"
    );

    // After bob leaves, gw2 has no room task for "r": nothing reaches bob.
    bob.send(json!({"type":"leave","room":"r"})).await;
    bob.expect("left").await;
    alice.send_msg("r", "a2", "gone?").await;
    bob.expect_silence(std::time::Duration::from_millis(500)).await;
}
