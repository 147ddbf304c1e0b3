//! The notifier against real NATS, real PostgreSQL and the push emulator over
//! real HTTP: unread counts, APNS and FCM pushes, provider errors, crashes,
//! replicas, dead letters and the archive.

use std::{collections::HashSet, time::Duration};

use serde_json::{Value, json};

use crate::{assert_eventually, helpers::*};

const IPHONE: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
const ANDROID: &str = "fcm-token_bob:APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx";

async fn register(base: &str, user: &str, platform: &str, device: &str) {
    let r = http()
        .post(format!("{base}/v1/devices"))
        .bearer_auth(token(user))
        .json(&json!({"platform": platform, "token": device}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "device registration: {}", r.status());
}

async fn unread_total(base: &str, user: &str) -> i64 {
    get_json(format!("{base}/v1/unread"), user).await["total"].as_i64().unwrap()
}

async fn devices_of(base: &str, user: &str) -> Vec<String> {
    let v = get_json(format!("{base}/v1/devices"), user).await;
    v["devices"].as_array().unwrap().iter().map(|d| d["token"].as_str().unwrap().to_owned()).collect()
}

fn apns_badge(req: &Value) -> i64 {
    req["body"]["aps"]["badge"].as_i64().unwrap_or(-1)
}

/// NATS, PostgreSQL, two gateways, the emulator and one notifier.
struct PushStack {
    s: Stack,
    emu: TestEmulator,
    notifier: TestNotifier,
}

impl PushStack {
    async fn start(notifier_extra: &[&str]) -> Self {
        let s = Stack::start().await;
        let emu = TestEmulator::start(&[]).await;
        let notifier = spawn_notifier(&s.nats, &s.db, &emu, notifier_extra).await;
        Self { s, emu, notifier }
    }

    fn base(&self) -> String {
        self.s.gw1.http()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_member_gets_apns_and_fcm_pushes_and_unread_counts_online_member_does_not() {
    let p = PushStack::start(&[]).await;
    let base = p.base();
    create_room(&base, "alice", "general", &["bob", "carol"]).await;
    register(&base, "bob", "apns", IPHONE).await;
    register(&base, "bob", "fcm", ANDROID).await;
    register(&base, "carol", "fcm", "carol-phone").await;
    let mut alice = Client::connect(p.s.gw1.addr, "alice").await;
    alice.join("general", None).await;

    for i in 1..=3 {
        post_message(&base, "alice", "general", &format!("m{i}"), &format!("hello {i}")).await;
    }
    assert_eventually!(
        Duration::from_secs(10),
        p.emu.delivered_to(IPHONE).await.len() == 3 && p.emu.delivered_to(ANDROID).await.len() == 3,
        "3 APNS and 3 FCM pushes for bob: {:#?}",
        p.emu.requests().await
    );
    let apns = p.emu.delivered_to(IPHONE).await;
    for r in &apns {
        assert_eq!(r["provider"], "apns");
        assert_eq!(r["headers"]["apns-topic"], "dev.natter.app");
        assert_eq!(r["headers"]["apns-push-type"], "alert");
        assert_eq!(r["headers"]["apns-collapse-id"], "general");
        assert!(r["headers"]["authorization"].as_str().unwrap().to_lowercase().starts_with("bearer "));
        assert_eq!(r["body"]["aps"]["thread-id"], "general");
    }
    let bodies: HashSet<String> =
        apns.iter().map(|r| r["body"]["aps"]["alert"]["body"].as_str().unwrap_or_default().to_owned()).collect();
    assert_eq!(bodies, HashSet::from(["hello 1".to_owned(), "hello 2".into(), "hello 3".into()]));
    assert_eq!(apns.iter().map(apns_badge).max(), Some(3), "badge = bob's total unread");
    let fcm = p.emu.delivered_to(ANDROID).await;
    assert_eq!(fcm[0]["provider"], "fcm");
    assert_eq!(fcm[0]["body"]["message"]["token"], ANDROID);
    assert_eq!(fcm[0]["body"]["message"]["android"]["collapse_key"], "general");
    assert_eq!(unread_total(&base, "bob").await, 3);
    let rooms = get_json(format!("{base}/v1/rooms"), "bob").await;
    assert_eq!(rooms["rooms"][0]["unread"], 3);
    assert_eq!(unread_total(&base, "alice").await, 0, "the sender counts nothing");

    // bob comes online (on the other gateway): no push, no bump for him; carol
    // (still offline) gets hers, which shows the message was handled.
    let mut bob = Client::connect(p.s.gw2.addr, "bob").await;
    bob.join("general", None).await;
    assert_eventually!(
        Duration::from_secs(5),
        get_json(format!("{base}/v1/presence?users=bob"), "alice").await["presence"][0]["status"] == "online",
        "bob online"
    );
    post_message(&base, "alice", "general", "m4", "are you there?").await;
    assert_eventually!(Duration::from_secs(10), p.emu.delivered_to("carol-phone").await.len() == 4, "carol's 4th");
    assert_eq!(p.emu.delivered_to(IPHONE).await.len(), 3, "no push while bob is online");
    assert_eq!(p.emu.delivered_to(ANDROID).await.len(), 3);
    assert_eq!(unread_total(&base, "bob").await, 3, "no bump while bob is online");
    assert_eq!(unread_total(&base, "carol").await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marking_read_clears_unread_and_the_next_badge_counts_from_there() {
    let p = PushStack::start(&[]).await;
    let base = p.base();
    create_room(&base, "alice", "general", &["bob"]).await;
    create_room(&base, "alice", "other", &["bob"]).await;
    register(&base, "bob", "apns", IPHONE).await;
    let mut last = 0;
    for i in 1..=4 {
        last = post_message(&base, "alice", "general", &format!("g{i}"), "x").await;
    }
    post_message(&base, "alice", "other", "o1", "y").await;
    assert_eventually!(Duration::from_secs(10), unread_total(&base, "bob").await == 5, "5 unread");
    assert_eventually!(Duration::from_secs(10), p.emu.delivered_to(IPHONE).await.len() == 5, "5 pushes");
    let unread = get_json(format!("{base}/v1/unread"), "bob").await;
    assert_eq!(unread, json!({"rooms": {"general": 4, "other": 1}, "total": 5}));

    // Read over HTTP up to the 4th message of general; the other room stays.
    let r = http()
        .post(format!("{base}/v1/rooms/general/read"))
        .bearer_auth(token("bob"))
        .json(&json!({"seq": last}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    assert_eq!(get_json(format!("{base}/v1/unread"), "bob").await, json!({"rooms": {"other": 1}, "total": 1}));

    // Read over WebSocket too (the `read` frame), then a new message: badge 1.
    let mut bob = Client::connect(p.s.gw2.addr, "bob").await;
    bob.send(json!({"type": "read", "room": "other", "seq": 1_000_000})).await;
    assert_eventually!(Duration::from_secs(5), unread_total(&base, "bob").await == 0, "read frame clears unread");
    drop(bob);
    // Offline again after the grace (5 s by default would slow the test: wait for it).
    assert_eventually!(
        Duration::from_secs(10),
        get_json(format!("{base}/v1/presence?users=bob"), "alice").await["presence"][0]["status"] == "offline",
        "bob offline"
    );
    post_message(&base, "alice", "general", "g5", "again").await;
    assert_eventually!(Duration::from_secs(10), p.emu.delivered_to(IPHONE).await.len() == 6, "6th push");
    let pushes = p.emu.delivered_to(IPHONE).await;
    assert_eq!(apns_badge(&pushes[5]), 1, "badge after reading everything is 1");
    assert_eq!(unread_total(&base, "bob").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_errors_unregistered_deletes_the_device_5xx_and_429_are_retried() {
    let p = PushStack::start(&["--push-max-backoff", "5s"]).await;
    let base = p.base();
    create_room(&base, "alice", "general", &["bob", "carol", "dave"]).await;
    register(&base, "bob", "apns", IPHONE).await;
    register(&base, "bob", "fcm", ANDROID).await;
    register(&base, "carol", "apns", "c0ffee").await;
    register(&base, "dave", "fcm", "dave-phone").await;
    p.emu.fail(IPHONE, 410, "Unregistered", 0, None).await;
    p.emu.fail("c0ffee", 503, "ServiceUnavailable", 2, None).await;
    p.emu.fail("dave-phone", 429, "QUOTA_EXCEEDED", 1, Some(1)).await;

    post_message(&base, "alice", "general", "m1", "hi").await;
    assert_eventually!(
        Duration::from_secs(15),
        p.emu.delivered_to(ANDROID).await.len() == 1
            && p.emu.delivered_to("c0ffee").await.len() == 1
            && p.emu.delivered_to("dave-phone").await.len() == 1,
        "the other pushes arrive"
    );
    assert_eventually!(Duration::from_secs(5), devices_of(&base, "bob").await == vec![ANDROID], "iPhone removed");
    let all = p.emu.requests().await;
    let to = |t: &str| all.iter().filter(|r| r["token"] == t).cloned().collect::<Vec<_>>();
    assert_eq!(to(IPHONE).len(), 1, "Unregistered is not retried");
    let carol: Vec<u64> = to("c0ffee").iter().map(|r| r["status"].as_u64().unwrap()).collect();
    assert_eq!(carol, vec![503, 503, 200], "503 twice, then one delivered push");
    let dave = to("dave-phone");
    assert_eq!(dave.len(), 2);
    let waited = dave[1]["at_ms"].as_i64().unwrap() - dave[0]["at_ms"].as_i64().unwrap();
    assert!(waited >= 950, "429 retried after Retry-After (1 s), waited {waited} ms");

    // The deleted device gets nothing more; the notifier counted the outcomes.
    post_message(&base, "alice", "general", "m2", "again").await;
    assert_eventually!(Duration::from_secs(10), p.emu.delivered_to(ANDROID).await.len() == 2, "second push");
    assert_eq!(to(IPHONE).len(), p.emu.requests().await.iter().filter(|r| r["token"] == IPHONE).count());
    let text = http().get(format!("http://{}/metrics", p.notifier.addr)).send().await.unwrap().text().await.unwrap();
    assert!(text.contains(r#"natter_push_total{provider="apns",outcome="invalid_token"} 1"#), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_and_does_not_stall_the_rest() {
    let p = PushStack::start(&[]).await;
    let base = p.base();
    create_room(&base, "alice", "general", &["bob"]).await;
    register(&base, "bob", "fcm", ANDROID).await;
    // Written straight into the stream, bypassing the gateway.
    let nats = async_nats::connect(p.s.nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    js.publish("chat.room.general.msg", "{not json".into()).await.unwrap().await.unwrap();
    post_message(&base, "alice", "general", "m1", "after the poison").await;
    assert_eventually!(Duration::from_secs(10), p.emu.delivered_to(ANDROID).await.len() == 1, "the good one is pushed");
    let pool = p.s.db.pool().await;
    let letters = || async {
        sqlx::query_as::<_, (String, i64, String)>(
            "SELECT consumer, stream_seq, error FROM dead_letters ORDER BY consumer",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    // The archiver works apart from the push: its record may come later.
    assert_eventually!(Duration::from_secs(10), letters().await.len() >= 2, "one record per consumer");
    let letters = letters().await;
    assert_eq!(letters.len(), 2, "one record per consumer: {letters:?}");
    assert_eq!(letters[0].0, "archiver");
    assert_eq!(letters[1].0, "notifier");
    assert!(letters[1].2.contains("unreadable"), "{letters:?}");
    assert_eq!(unread_total(&base, "bob").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_comes_from_the_archive_once_the_stream_has_dropped_it() {
    let cap = ["--stream-max-per-room", "10"];
    let s = Stack::with(&cap, &cap).await;
    let emu = TestEmulator::start(&[]).await;
    let _n = spawn_notifier(&s.nats, &s.db, &emu, &[]).await;
    let base = s.gw1.http();
    create_room(&base, "alice", "general", &["bob"]).await;
    for i in 1..=30 {
        post_message(&base, "alice", "general", &format!("m{i}"), &format!("body {i}")).await;
    }
    let pool = s.db.pool().await;
    assert_eventually!(
        Duration::from_secs(10),
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM messages").fetch_one(&pool).await.unwrap() == 30,
        "archived"
    );
    let h = get_json(format!("{base}/v1/rooms/general/messages?limit=50"), "bob").await;
    let seqs: Vec<u64> = h["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=30).rev().collect::<Vec<_>>(), "all 30, newest first, none twice");
    assert_eq!(h["messages"][29]["body"], "body 1");
    assert_eq!(h["messages"][29]["from"], "alice");
    let older = get_json(format!("{base}/v1/rooms/general/messages?before=5&limit=10"), "bob").await;
    let seqs: Vec<u64> = older["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![4, 3, 2, 1]);
}

/// A JetStream context of its own on the test's server, for reading state.
async fn observer(nats: &NatsServer) -> async_nats::jetstream::Context {
    async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap())
}

/// The CHAT stream's first and last sequence and its message count.
async fn chat_stream_state(js: &async_nats::jetstream::Context) -> (u64, u64, u64) {
    let state = js.get_stream("CHAT").await.unwrap().info().await.unwrap().state.clone();
    (state.first_sequence, state.last_sequence, state.messages)
}

/// A durable consumer's progress, for failure messages.
async fn consumer_state(js: &async_nats::jetstream::Context, name: &str) -> String {
    match js.get_stream("CHAT").await.unwrap().consumer_info(name).await {
        Ok(i) => format!(
            "{name}: delivered {} ack floor {} ack pending {} redelivered {} pending {} waiting {}",
            i.delivered.stream_sequence,
            i.ack_floor.stream_sequence,
            i.num_ack_pending,
            i.num_redelivered,
            i.num_pending,
            i.num_waiting
        ),
        Err(e) => format!("{name}: {e}"),
    }
}

/// A notifier away while a room takes ten times its window finds every
/// message when it is back: the stream holds them (up to the hard limit)
/// until the archiver and the notifier are past them, and only then does the
/// archiver trim the room to its window. With the window as the stream's own
/// limit, 91 of these would have been discarded unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notifier_ten_windows_behind_in_one_room_loses_nothing_and_the_room_is_trimmed_after() {
    let window = ["--stream-max-per-room", "10", "--stream-hard-max-per-room", "1000"];
    let s = Stack::with(&window, &window).await;
    let js = observer(&s.nats).await;
    let emu = TestEmulator::start(&[]).await;
    let base = s.gw1.http();
    create_room(&base, "alice", "general", &["bob"]).await;
    // A message still in flight to the first notifier's pull when it has
    // handed back what it held comes back after the ack wait (the
    // archiver's is 60 s).
    let window = [&window[..], &["--notifier-ack-wait", "2s"]].concat();
    let first = spawn_notifier(&s.nats, &s.db, &emu, &window).await;
    post_message(&base, "alice", "general", "m0", "before").await;
    assert_eventually!(Duration::from_secs(10), unread_total(&base, "bob").await == 1, "counted");
    first.stop().await;

    let seqs = flood(&base, "general", 100).await;
    let (first_seq, last_seq, held) = chat_stream_state(&js).await;
    assert_eq!((first_seq, held), (1, 101), "nothing discarded while the notifier is away (last {last_seq})");

    let second = spawn_notifier(&s.nats, &s.db, &emu, &window).await;
    let until = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        let n = unread_total(&base, "bob").await;
        if n == 101 {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "every message counted: {n} of 101; stream {:?}; {}; {}",
            chat_stream_state(&js).await,
            consumer_state(&js, "notifier").await,
            consumer_state(&js, "archiver").await,
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let pool = s.db.pool().await;
    let archived =
        || async { sqlx::query_scalar::<_, i64>("SELECT count(*) FROM messages").fetch_one(&pool).await.unwrap() };
    assert_eventually!(Duration::from_secs(70), archived().await == 101, "every message archived");
    assert_eventually!(
        Duration::from_secs(20),
        chat_stream_state(&js).await.2 == 10,
        "the room trimmed to its window once both consumers are past"
    );
    let newest = *seqs.iter().max().unwrap();
    assert_eq!(chat_stream_state(&js).await, (newest - 9, newest, 10), "the window is the newest ten");
    assert_eq!(metric(second.addr, "natter_stream_trimmed_messages_total").await, 91);
    let h = get_json(format!("{base}/v1/rooms/general/messages?limit=200"), "bob").await;
    assert_eq!(h["messages"].as_array().unwrap().len(), 101, "history: the window, then the archive");
}

/// The archiver keeps up while the notifier cannot finish (the push
/// provider is down): the trim stops at the notifier's ack floor, so every
/// message is still there to push when the provider is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archiver_does_not_trim_what_the_notifier_has_not_finished() {
    let window = ["--stream-max-per-room", "10"];
    let s = Stack::with(&window, &window).await;
    let js = observer(&s.nats).await;
    let emu = TestEmulator::start(&[]).await;
    let base = s.gw1.http();
    create_room(&base, "alice", "general", &["bob"]).await;
    register(&base, "bob", "fcm", ANDROID).await;
    emu.fail(ANDROID, 503, "UNAVAILABLE", 0, None).await;
    let stuck = ["--stream-max-per-room", "10", "--push-attempts", "1", "--push-redelivery", "1s"];
    let stuck = [&stuck[..], &["--notifier-max-deliver", "1000"]].concat();
    let n = spawn_notifier(&s.nats, &s.db, &emu, &stuck).await;
    let seqs = flood(&base, "general", 50).await;
    let pool = s.db.pool().await;
    assert_eventually!(
        Duration::from_secs(10),
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM messages").fetch_one(&pool).await.unwrap() == 50,
        "archived"
    );
    // Two trim passes with the room due and the notifier's floor at its first message.
    let passes = || metric(n.addr, "natter_stream_trim_passes_total");
    let before = passes().await;
    assert_eventually!(Duration::from_secs(15), passes().await >= before + 2, "two trim passes");
    assert_eq!(chat_stream_state(&js).await.2, 50, "nothing trimmed below the notifier's floor");
    assert_eq!(metric(n.addr, "natter_stream_trimmed_messages_total").await, 0);

    emu.clear_faults().await;
    let want: HashSet<u64> = seqs.iter().copied().collect();
    assert_eventually!(
        Duration::from_secs(30),
        pushed_seqs(&emu.delivered_to(ANDROID).await).into_iter().collect::<HashSet<_>>() == want,
        "every message pushed once the provider is back"
    );
    assert_eventually!(Duration::from_secs(20), chat_stream_state(&js).await.2 == 10, "then trimmed to the window");
}

/// A client that resumes from before the room's window (the stream has
/// trimmed what it missed into the archive) still gets every message in
/// `(since, last]`, in order and once, then live ones; over the replay limit
/// it gets the newest and is told where they start. Over SSE too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_before_the_room_window_replays_the_archive_then_the_stream() {
    let window = ["--stream-max-per-room", "10"];
    let limited = ["--stream-max-per-room", "10", "--limit-replay", "50"];
    let s = Stack::with(&window, &limited).await;
    let js = observer(&s.nats).await;
    let emu = TestEmulator::start(&[]).await;
    let _notifier = spawn_notifier(&s.nats, &s.db, &emu, &window).await;
    let base = s.gw1.http();
    create_room(&base, "alice", "general", &["bob"]).await;
    let mut sent = flood(&base, "general", 100).await;
    sent.sort_unstable();
    assert_eventually!(Duration::from_secs(30), chat_stream_state(&js).await.2 == 10, "trimmed to the window");
    let since = sent[4];

    // Default limit: 95 missed, 85 of them only in the archive.
    let mut bob = Client::connect(s.gw1.addr, "bob").await;
    bob.send(json!({"type":"join","room":"general","since":since})).await;
    let joined = bob.expect("joined").await;
    assert_eq!(joined["last_seq"], sent[99]);
    assert!(joined.get("truncated_before").is_none(), "nothing skipped: {joined}");
    let replayed = bob.messages("general", 95).await;
    assert_eq!(seqs_in_order(&replayed), sent[5..], "every missed message, in order, once");
    let first = &replayed[0];
    let n = first["id"].as_str().unwrap().trim_start_matches('f');
    assert_eq!((&first["from"], &first["body"]), (&json!("alice"), &json!(format!("flood {n}"))), "as stored: {first}");
    let live = post_message(&base, "alice", "general", "after", "live").await;
    assert_eq!(seqs_in_order(&bob.messages("general", 1).await), [live], "then live, no gap or repeat");

    // From the very start (`since` 0): the whole room.
    let mut from_start = Client::connect(s.gw1.addr, "bob").await;
    from_start.join("general", Some(0)).await;
    assert_eq!(seqs_in_order(&from_start.messages("general", 101).await).len(), 101);

    // A limit of 50: the newest 50, and where they start.
    let mut limited_bob = Client::connect(s.gw2.addr, "bob").await;
    limited_bob.send(json!({"type":"join","room":"general","since":since})).await;
    let joined = limited_bob.expect("joined").await;
    assert_eq!(joined["truncated_before"], sent[51], "{joined}");
    let newest: Vec<u64> = sent[51..].iter().copied().chain([live]).collect();
    assert_eq!(seqs_in_order(&limited_bob.messages("general", 50).await), newest);
    // What was skipped is paged over HTTP, below `truncated_before`.
    let page =
        get_json(format!("{}/v1/rooms/general/messages?before={}&limit=200", s.gw2.http(), sent[51]), "bob").await;
    let paged: Vec<u64> = page["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(paged.iter().rev().copied().collect::<Vec<_>>(), sent[..51]);

    // SSE says the same with `event: joined` before the replay.
    let url = crate::sse::events_url(&s.gw2.http(), "general");
    let bob_token = token("bob");
    let mut reader =
        crate::sse::SseClient::open(&url, crate::sse::Auth::Bearer(&bob_token), Some(since)).await.unwrap();
    let joined = reader.expect("joined").await.json();
    assert_eq!(joined["truncated_before"], sent[51], "{joined}");
    let mut over_sse = Vec::new();
    for _ in 0..50 {
        over_sse.push(reader.expect("message").await.seq());
    }
    assert_eq!(over_sse, newest);

    // A byte budget: the newest that fit, from the stream and then the
    // archive (the stream holds 10 or 11 of these ~80-byte messages).
    let small = ["--stream-max-per-room", "10", "--limit-replay-bytes", "1600"];
    let gw3 = spawn_gateway(&s.nats, &s.db, "gw3", &small).await;
    let mut bob3 = Client::connect(gw3.addr, "bob").await;
    bob3.send(json!({"type":"join","room":"general","since":since})).await;
    let joined = bob3.expect("joined").await;
    let from = joined["truncated_before"].as_u64().unwrap_or_else(|| panic!("cut by bytes: {joined}"));
    let fit: Vec<u64> = sent.iter().copied().chain([live]).filter(|&q| q >= from).collect();
    assert!((15..=25).contains(&fit.len()), "about 1 600 bytes of ~80-byte messages: {}", fit.len());
    assert_eq!(seqs_in_order(&bob3.messages("general", fit.len()).await), fit, "the newest that fit, in order");
    bob3.expect_silence(Duration::from_millis(300)).await;

    // Without the archive (its table renamed away): the stream's part, and
    // where it starts, so the client knows what to page later.
    assert_eventually!(Duration::from_secs(30), chat_stream_state(&js).await.2 == 10, "trimmed again");
    let (held_from, _, _) = chat_stream_state(&js).await;
    let pool = s.db.pool().await;
    sqlx::query("ALTER TABLE messages RENAME TO messages_away").execute(&pool).await.unwrap();
    let mut bob = Client::connect(s.gw1.addr, "bob").await;
    bob.send(json!({"type":"join","room":"general","since":since})).await;
    let joined = bob.expect("joined").await;
    assert_eq!(joined["truncated_before"], held_from, "{joined}");
    let held: Vec<u64> = sent.iter().copied().chain([live]).filter(|&q| q >= held_from).collect();
    assert_eq!(seqs_in_order(&bob.messages("general", 10).await), held);
    sqlx::query("ALTER TABLE messages_away RENAME TO messages").execute(&pool).await.unwrap();
}

/// A trim that runs while a resume reads the stream (between its batch
/// reads) costs the resume nothing: the replay notices that the room's
/// oldest held message moved and takes the range from the archive as well.
/// The rooms are purged from below in jumps of 100 while the reader joins,
/// so the purge overtakes the read in some rounds and not in others; every
/// replay must be complete either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trim_during_a_resume_costs_the_resume_nothing() {
    const ROOMS: usize = 5;
    const N: usize = 1100; // three batch reads
    let s = Stack::start().await;
    let js = observer(&s.nats).await;
    let emu = TestEmulator::start(&[]).await;
    let _notifier = spawn_notifier(&s.nats, &s.db, &emu, &[]).await;
    let base = s.gw1.http();
    let rooms: Vec<String> = (0..ROOMS).map(|r| format!("trim{r}")).collect();
    for room in &rooms {
        create_room(&base, "alice", room, &["bob"]).await;
    }
    let mut sent = futures::future::join_all(rooms.iter().map(|room| flood(&base, room, N))).await;
    let pool = s.db.pool().await;
    assert_eventually!(
        Duration::from_secs(60),
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM messages").fetch_one(&pool).await.unwrap()
            == (ROOMS * N) as i64,
        "everything archived first"
    );
    let stream = js.get_stream("CHAT").await.unwrap();
    for (room, seqs) in rooms.iter().zip(&mut sent) {
        seqs.sort_unstable();
        let since = seqs[0];
        let mut bob = Client::connect(s.gw2.addr, "bob").await;
        let (subject, cuts) = (format!("chat.room.{room}.msg"), seqs.clone());
        let stream = stream.clone();
        let purger = tokio::spawn(async move {
            for cut in cuts.iter().step_by(100).skip(1) {
                stream.purge().filter(subject.as_str()).sequence(*cut).await.unwrap();
            }
        });
        bob.send(json!({"type":"join","room":room,"since":since})).await;
        let joined = bob.expect("joined").await;
        assert!(joined.get("truncated_before").is_none(), "{joined}");
        let replayed = bob.messages(room, N - 1).await;
        assert_eq!(seqs_in_order(&replayed), seqs[1..], "{room}: every message after `since`, once, in order");
        purger.await.unwrap();
    }
}

/// The CHAT stream lost (deleted here) and made anew by a gateway that
/// starts: its seqs continue after the archive's, so a client resuming with
/// an old `since` gets the new messages (from 1 again, the gateway would drop
/// them as already seen), and the archive keeps both old and new (a reused
/// seq would keep the old message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_stream_made_anew_continues_after_the_archive() {
    let s = Stack::start().await;
    let js = observer(&s.nats).await;
    let emu = TestEmulator::start(&[]).await;
    let first = spawn_notifier(&s.nats, &s.db, &emu, &[]).await;
    let base = s.gw1.http();
    create_room(&base, "alice", "general", &["bob"]).await;
    let old = flood(&base, "general", 20).await;
    let since = *old.iter().max().unwrap();
    let pool = s.db.pool().await;
    let archived =
        || async { sqlx::query_scalar::<_, i64>("SELECT count(*) FROM messages").fetch_one(&pool).await.unwrap() };
    assert_eventually!(Duration::from_secs(20), archived().await == 20, "archived");
    first.stop().await;

    js.delete_stream("CHAT").await.unwrap();
    let gw3 = spawn_gateway(&s.nats, &s.db, "gw3", &[]).await;
    let (first_seq, _, held) = chat_stream_state(&js).await;
    assert_eq!(held, 0);
    assert!(first_seq > since + 1, "seqs continue after the archive's {since}: first {first_seq}");
    // Sent before any notifier runs: the one that starts counts it (its
    // consumer, gone with the old stream, is made from the new one's start).
    let new = post_message(&gw3.http(), "alice", "general", "after-loss", "after the loss").await;
    assert!(new > since, "{new} after {since}");
    assert_eq!(unread_total(&base, "bob").await, 20);
    let _second = spawn_notifier(&s.nats, &s.db, &emu, &[]).await;
    assert_eventually!(Duration::from_secs(20), unread_total(&base, "bob").await == 21, "counted unread");

    let mut bob = Client::connect(gw3.addr, "bob").await;
    bob.join("general", Some(since)).await;
    let got = bob.messages("general", 1).await;
    assert_eq!((got[0]["seq"].as_u64(), got[0]["body"].as_str()), (Some(new), Some("after the loss")));
    assert_eventually!(Duration::from_secs(20), archived().await == 21, "the new message archived beside the old");
    let h = get_json(format!("{}/v1/rooms/general/messages?limit=100", gw3.http()), "bob").await;
    assert_eq!(h["messages"].as_array().unwrap().len(), 21, "history: the new message, then the archive's 20");
}

/// The CHAT stream lost while everything runs (all its replicas' storage,
/// or deleted by hand): the first send after it is refused `unavailable`
/// while the gateway makes the stream again, and its resend (same id) is
/// stored. The other gateway's members get it live, and the running notifier
/// binds its consumers again, from the new stream's start, so the message is
/// pushed and archived. No process is restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_stream_lost_while_running_is_made_again_without_a_restart() {
    let p = PushStack::start(&[]).await;
    let base = p.base();
    create_room(&base, "alice", "general", &["bob", "carol"]).await;
    register(&base, "bob", "fcm", ANDROID).await;
    let since = flood(&base, "general", 5).await.into_iter().max().unwrap();
    let pool = p.s.db.pool().await;
    let archived =
        || async { sqlx::query_scalar::<_, i64>("SELECT count(*) FROM messages").fetch_one(&pool).await.unwrap() };
    assert_eventually!(Duration::from_secs(20), archived().await == 5, "archived");
    assert_eventually!(Duration::from_secs(20), p.emu.delivered_to(ANDROID).await.len() == 5, "5 pushes");
    let mut carol = Client::connect(p.s.gw2.addr, "carol").await;
    carol.join("general", Some(since)).await;
    let mut alice = Client::connect(p.s.gw1.addr, "alice").await;

    observer(&p.s.nats).await.delete_stream("CHAT").await.unwrap();
    let readyz = format!("http://{}/readyz", p.notifier.addr);
    let ready = || async { http().get(&readyz).send().await.unwrap().status().as_u16() };
    assert_eventually!(Duration::from_secs(10), ready().await == 503, "the notifier is not ready while unbound");
    let send = json!({"type": "send", "room": "general", "id": "after", "body": "after the loss"});
    alice.send(send.clone()).await;
    let refused = alice.expect("error").await;
    assert_eq!((refused["code"].as_str(), refused["ref"].as_str()), (Some("unavailable"), Some("after")), "{refused}");
    assert!(refused["retry_after_ms"].as_u64().is_some(), "{refused}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let seq = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        alice.send(send.clone()).await;
        let v = alice.recv().await;
        if v["type"] == "ack" {
            break v["seq"].as_u64().unwrap();
        }
        assert!(tokio::time::Instant::now() < deadline, "the resend is still refused after 10 s: {v}");
    };
    assert!(seq > since, "seqs continue after the archive's: {seq} after {since}");
    assert_eq!(metric(p.s.gw1.addr, r#"natter_stream_repairs_total{stream="CHAT"}"#).await, 1);

    let got = carol.messages("general", 1).await;
    assert_eq!((got[0]["seq"].as_u64(), got[0]["body"].as_str()), (Some(seq), Some("after the loss")));
    let next = alice.send_msg("general", "next", "and the next one").await;
    assert_eq!(carol.messages("general", 1).await[0]["seq"].as_u64(), Some(next));
    assert_eventually!(
        Duration::from_secs(20),
        pushed_seqs(&p.emu.delivered_to(ANDROID).await).contains(&next),
        "the notifier pushes from the new stream: {:?}",
        pushed_seqs(&p.emu.delivered_to(ANDROID).await)
    );
    let pushed = pushed_seqs(&p.emu.delivered_to(ANDROID).await);
    assert_eq!(pushed.iter().filter(|s| **s == seq).count(), 1, "the message sent before it bound again: {pushed:?}");
    assert_eq!(pushed.len(), 7, "nothing pushed twice: {pushed:?}");
    assert_eventually!(Duration::from_secs(20), archived().await == 7, "both archived beside the old 5");
    assert_eq!(unread_total(&base, "bob").await, 7);
    assert_eq!(ready().await, 200, "ready again once bound");
}

/// Sends `n` messages over HTTP, 16 at a time; returns their seqs.
async fn flood(base: &str, room: &str, n: usize) -> Vec<u64> {
    use futures::StreamExt;
    futures::stream::iter(0..n)
        .map(|i| {
            let base = base.to_owned();
            let room = room.to_owned();
            async move { post_message(&base, "alice", &room, &format!("f{i}"), &format!("flood {i}")).await }
        })
        .buffer_unordered(16)
        .collect()
        .await
}

fn pushed_seqs(reqs: &[Value]) -> Vec<u64> {
    reqs.iter().filter_map(|r| r["body"]["message"]["data"]["seq"].as_str()?.parse().ok()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notifier_killed_mid_batch_loses_no_push_and_counts_nothing_twice() {
    let extra = ["--notifier-ack-wait", "2s", "--notifier-batch", "50", "--push-concurrency", "4"];
    let mut r = MidStream::start().await;
    let mut first = NotifierProcess::start(&r.s.nats, &r.s.db, &r.emu, &extra).await;
    r.send_until_pushing(300, 30).await;
    first.kill9();
    r.the_next_replica_finishes(&extra, Duration::from_secs(30)).await;
}

/// A notifier stopped gracefully (a rolling update) finishes the batches in
/// hand and hands back what its pull brought but it had not started, so the
/// next replica pushes those at once, not after the ack wait (60 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notifier_stopped_mid_stream_hands_back_what_it_had_not_started() {
    let extra = ["--notifier-ack-wait", "60s", "--notifier-batch", "50", "--push-concurrency", "4"];
    let mut r = MidStream::start().await;
    let first = spawn_notifier(&r.s.nats, &r.s.db, &r.emu, &extra).await;
    r.send_until_pushing(600, 50).await;
    first.stop().await;
    r.the_next_replica_finishes(&extra, Duration::from_secs(20)).await;
}

/// A room whose member bob is offline with an Android device, and an
/// emulator that answers after 20 ms: for replacing a notifier replica in
/// the middle of its work.
struct MidStream {
    s: Stack,
    emu: TestEmulator,
    seqs: Vec<u64>,
}

impl MidStream {
    /// Everything but the first replica, which the test starts.
    async fn start() -> Self {
        let s = Stack::start().await;
        let emu = TestEmulator::start(&["--latency", "20ms"]).await;
        create_room(&s.gw1.http(), "alice", "general", &["bob"]).await;
        register(&s.gw1.http(), "bob", "fcm", ANDROID).await;
        Self { s, emu, seqs: Vec::new() }
    }

    /// Sends `n` messages and waits until `begun` of them are pushed.
    async fn send_until_pushing(&mut self, n: usize, begun: usize) {
        self.seqs = flood(&self.s.gw1.http(), "general", n).await;
        assert_eventually!(
            Duration::from_secs(20),
            self.emu.delivered_to(ANDROID).await.len() >= begun,
            "pushing has begun"
        );
    }

    /// With the first replica gone mid-way, a second one pushes every
    /// message within `within` and counts each once.
    async fn the_next_replica_finishes(&self, extra: &[&str], within: Duration) {
        let n = self.seqs.len();
        let before = self.emu.delivered_to(ANDROID).await.len();
        assert!(before < n, "replaced mid-way ({before} of {n} pushed)");
        let _second = spawn_notifier(&self.s.nats, &self.s.db, &self.emu, extra).await;
        let want: HashSet<u64> = self.seqs.iter().copied().collect();
        assert_eventually!(
            within,
            pushed_seqs(&self.emu.delivered_to(ANDROID).await).into_iter().collect::<HashSet<_>>() == want,
            "every message pushed at least once, in time"
        );
        assert_eq!(unread_total(&self.s.gw1.http(), "bob").await, n as i64, "each message counted exactly once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_split_two_thousand_messages_without_double_push_or_count() {
    let p = PushStack::start(&[]).await;
    let second = spawn_notifier(&p.s.nats, &p.s.db, &p.emu, &[]).await;
    let base = p.base();
    create_room(&base, "alice", "general", &["bob"]).await;
    register(&base, "bob", "fcm", ANDROID).await;
    let seqs = flood(&base, "general", 2000).await;
    assert_eventually!(Duration::from_secs(60), p.emu.delivered_to(ANDROID).await.len() >= 2000, "2000 pushes");
    let pushed = pushed_seqs(&p.emu.delivered_to(ANDROID).await);
    assert_eq!(pushed.len(), 2000, "no double push");
    assert_eq!(pushed.iter().copied().collect::<HashSet<_>>(), seqs.iter().copied().collect::<HashSet<_>>());
    assert_eq!(unread_total(&base, "bob").await, 2000);
    let (a, b) = (p.notifier.handled().await, second.handled().await);
    assert_eq!(a + b, 2000, "each message handled once in all");
    assert!(a > 0 && b > 0, "work split between the replicas: {a} + {b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_for_a_while_delays_unread_and_pushes_but_loses_none() {
    let s = Stack::start().await;
    let emu = TestEmulator::start(&[]).await;
    let db_url = url::Url::parse(&s.db.url).unwrap();
    let upstream = format!("{}:{}", db_url.host_str().unwrap(), db_url.port().unwrap_or(5432));
    let upstream = tokio::net::lookup_host(upstream).await.unwrap().next().unwrap();
    let proxy = CutProxy::start(upstream).await;
    let mut via = db_url.clone();
    via.set_host(Some("127.0.0.1")).unwrap();
    via.set_port(Some(proxy.addr.port())).unwrap();
    let n = spawn_notifier_at(&s.nats.url(), via.as_str(), &emu, &[]).await;
    let base = s.gw1.http();
    create_room(&base, "alice", "general", &["bob"]).await;
    register(&base, "bob", "fcm", ANDROID).await;
    post_message(&base, "alice", "general", "m1", "before").await;
    assert_eventually!(Duration::from_secs(10), emu.delivered_to(ANDROID).await.len() == 1, "first push");

    proxy.cut(); // the notifier's PostgreSQL is gone; the gateways' is not
    for i in 2..=6 {
        post_message(&base, "alice", "general", &format!("m{i}"), "during").await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(emu.delivered_to(ANDROID).await.len(), 1, "nothing is pushed while unread cannot be counted");
    let ready = http().get(format!("http://{}/readyz", n.addr)).send().await.unwrap();
    assert_eq!(ready.status(), 503, "not ready while PostgreSQL is down");

    proxy.restore();
    assert_eventually!(Duration::from_secs(30), emu.delivered_to(ANDROID).await.len() == 6, "the backlog is pushed");
    assert_eq!(unread_total(&base, "bob").await, 6);
    let pool = s.db.pool().await;
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters").fetch_one(&pool).await.unwrap();
    assert_eq!(dead, 0, "an outage dead-letters nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_provider_down_then_back_delivers_late_pushes_once() {
    let p = PushStack::start(&["--push-attempts", "2", "--push-redelivery", "1s"]).await;
    let base = p.base();
    create_room(&base, "alice", "general", &["bob"]).await;
    register(&base, "bob", "fcm", ANDROID).await;
    p.emu.fail(ANDROID, 503, "UNAVAILABLE", 0, None).await;
    post_message(&base, "alice", "general", "m1", "one").await;
    post_message(&base, "alice", "general", "m2", "two").await;
    let refused = || async { p.emu.requests().await.iter().filter(|r| r["status"] == 503).count() };
    // 2 messages × 2 attempts, then each is redelivered and tried again.
    assert_eventually!(Duration::from_secs(15), refused().await >= 6, "retried across redeliveries");
    assert!(p.emu.delivered_to(ANDROID).await.is_empty());
    p.emu.clear_faults().await;
    assert_eventually!(Duration::from_secs(15), p.emu.delivered_to(ANDROID).await.len() == 2, "late pushes arrive");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pushed = p.emu.delivered_to(ANDROID).await;
    assert_eq!(pushed.len(), 2, "each message pushed once when the provider is back");
    assert_eq!(unread_total(&base, "bob").await, 2, "counted once despite the redeliveries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_for_image_messages_say_photo_with_the_caption() {
    let p = PushStack::start(&[]).await;
    let base = p.base();
    create_room(&base, "alice", "general", &["bob"]).await;
    register(&base, "bob", "fcm", ANDROID).await;
    let (st, up) =
        crate::attachments::upload(&base, "alice", "general", "image/png", crate::attachments::png(64)).await;
    assert_eq!(st, 201, "{up}");
    for (id, caption) in [("p1", ""), ("p2", "at the beach")] {
        let r = http()
            .post(format!("{base}/v1/rooms/general/messages"))
            .bearer_auth(token("alice"))
            .json(&json!({"id": id, "kind": "image", "attachment": up["id"], "body": caption}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    assert_eventually!(Duration::from_secs(10), p.emu.delivered_to(ANDROID).await.len() == 2, "two pushes for bob");
    let bodies: HashSet<String> = p
        .emu
        .delivered_to(ANDROID)
        .await
        .iter()
        .map(|r| r["body"]["message"]["notification"]["body"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(bodies, HashSet::from(["📷 Photo".to_owned(), "📷 Photo: at the beach".to_owned()]));
}

/// Two replicas mark the same devices after their pushes. The write must not
/// wait on a row another batch holds (waiting made replicas queue behind
/// each other and deadlock), and writes a device at most once a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marking_devices_ok_skips_a_row_another_batch_holds_and_writes_each_device_once_a_minute() {
    use natter::{db::devices, ids::UserId, push::Platform};
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let bob = UserId::parse("bob").unwrap();
    for token in ["tok-a", "tok-b"] {
        devices::register(&pool, &bob, Platform::Fcm, token, None).await.unwrap();
    }
    let marked = |pool: sqlx::PgPool| async move {
        sqlx::query_as::<_, (String, Option<f64>)>(
            "SELECT token, extract(epoch FROM last_ok)::float8 FROM devices ORDER BY token",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    // Another batch holds tok-a's row.
    let mut other = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM devices WHERE token = 'tok-a' FOR UPDATE").execute(&mut *other).await.unwrap();
    let both: Vec<(Platform, String)> =
        ["tok-b", "tok-a", "tok-b"].iter().map(|t| (Platform::Fcm, t.to_string())).collect();
    tokio::time::timeout(Duration::from_secs(3), devices::mark_ok(&pool, &both))
        .await
        .expect("mark_ok does not wait on a row another transaction holds")
        .unwrap();
    let after = marked(pool.clone()).await;
    assert_eq!(after[0], ("tok-a".to_owned(), None), "the held row is skipped");
    assert!(after[1].1.is_some(), "the free row is marked: {after:?}");
    other.rollback().await.unwrap();

    // Within the minute, tok-b is not written again (a rewrite would give a
    // later now(), to the microsecond); tok-a, now free, is.
    devices::mark_ok(&pool, &both).await.unwrap();
    let again = marked(pool.clone()).await;
    assert!(again[0].1.is_some(), "tok-a marked once free: {again:?}");
    assert_eq!(again[1], after[1], "tok-b not rewritten within the minute");
}
