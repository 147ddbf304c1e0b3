//! The NATS users and permissions of `nats.conf`, against a real nats-server.
//!
//! `nats.conf` keeps its accounts in `nats-accounts.conf` (`include
//! ./nats-accounts.conf`). The test starts a server from a minimal config of
//! its own (port, store dir, no cluster) that includes the repo's accounts file
//! unchanged, with the passwords in the environment as in production. Then it
//! does each user's work through async-nats, as natter does, and checks that the
//! forbidden subjects are refused with a permissions violation.

use std::{
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_nats::{
    Client, ConnectOptions, Event, ServerError,
    jetstream::{self, consumer::pull, kv},
};
use futures::StreamExt;
use natter::{
    bus::presence,
    config::NatsSettings,
    ids::{NodeId, UserId},
};

use crate::{
    assert_eventually,
    helpers::{
        Client as WsClient, Spawned, TestDb, TestEmulator, create_room, free_port, http, nats_bin, nats_settings,
        spawn_gateway_at, spawn_notifier_at, token,
    },
};

const GATEWAY_PASSWORD: &str = "test-gateway-password";
const NOTIFIER_PASSWORD: &str = "test-notifier-password";
const SYS_PASSWORD: &str = "test-sys-password";
const WAIT: Duration = Duration::from_secs(10);

/// A nats-server running from the repo's accounts file; killed on Drop.
struct ConfiguredNats {
    _server: Spawned,
    port: u16,
    _dir: tempfile::TempDir,
}

impl ConfiguredNats {
    fn start() -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let production = std::fs::read_to_string(root.join("nats.conf")).unwrap();
        assert!(
            production.lines().any(|l| l.trim() == "include ./nats-accounts.conf"),
            "nats.conf must take its users from nats-accounts.conf, which this test checks"
        );

        let dir = tempfile::tempdir().unwrap();
        // `include` is relative to the including file: put an unchanged copy beside ours.
        std::fs::copy(root.join("nats-accounts.conf"), dir.path().join("nats-accounts.conf")).unwrap();
        let port = free_port();
        let conf = dir.path().join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{port}\n\
                 jetstream {{ store_dir: \"{}\" }}\n\
                 include ./nats-accounts.conf\n",
                dir.path().join("js").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("nats.log")).unwrap();
        let child = Command::new(nats_bin())
            .arg("-c")
            .arg(&conf)
            .env("NATTER_GATEWAY_NATS_PASSWORD", GATEWAY_PASSWORD)
            .env("NATTER_NOTIFIER_NATS_PASSWORD", NOTIFIER_PASSWORD)
            .env("NATS_SYS_PASSWORD", SYS_PASSWORD)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        let mut server = Spawned(child);
        if let Err(status) = server.listening(port, WAIT, "nats-server") {
            let log = std::fs::read_to_string(dir.path().join("nats.log"));
            panic!("nats-server exited ({status}) with the accounts file: {log:?}");
        }
        Self { _server: server, port, _dir: dir }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

/// A client plus the server errors (`-ERR`) it has been sent.
struct User {
    client: Client,
    errors: Arc<Mutex<Vec<String>>>,
}

impl User {
    async fn connect(nats: &ConfiguredNats, user: &str, password: &str) -> Self {
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        let client = ConnectOptions::with_user_and_password(user.into(), password.into())
            .event_callback(move |event| {
                let sink = sink.clone();
                async move {
                    if let Event::ServerError(ServerError::Other(msg)) = event {
                        sink.lock().unwrap().push(msg);
                    }
                }
            })
            .connect(nats.url())
            .await
            .unwrap_or_else(|e| panic!("{user} cannot connect: {e}"));
        Self { client, errors }
    }

    fn js(&self) -> jetstream::Context {
        jetstream::new(self.client.clone())
    }

    /// Waits until the server has refused `what` (`Publish` or `Subscription`) on `subject`.
    async fn refused(&self, what: &str, subject: &str) {
        let needle = format!("permissions violation for {what} to \"{subject}\"").to_lowercase();
        let until = Instant::now() + WAIT;
        loop {
            if self.errors.lock().unwrap().iter().any(|e| e.to_lowercase().contains(&needle)) {
                return;
            }
            assert!(
                Instant::now() < until,
                "no permissions violation for {what} to {subject}; server errors: {:?}",
                self.errors.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Publishes to a subject this user must not publish to and waits for the refusal.
    /// A reply inbox is attached, as a JetStream API request would have.
    async fn publish_refused(&self, subject: &str) {
        let inbox = self.client.new_inbox();
        self.client.publish_with_reply(subject.to_owned(), inbox, "{}".into()).await.unwrap();
        self.client.flush().await.unwrap();
        self.refused("Publish", subject).await;
    }

    /// Every error so far is a refusal of one of `expected` (so the allowed work caused none).
    fn only_refused(&self, expected: &[&str]) {
        for e in self.errors.lock().unwrap().iter() {
            assert!(expected.iter().any(|s| e.contains(&format!("\"{s}\""))), "unexpected server error: {e}");
        }
    }
}

fn settings(nats: &ConfiguredNats) -> NatsSettings {
    nats_settings(nats.url())
}

/// What the gateway sets up at start, with natter's own code: the CHAT stream
/// and the presence bucket (per-key TTL, limit markers, republish).
async fn gateway_setup(nats: &ConfiguredNats, gw: &User) -> kv::Store {
    let js = gw.js();
    natter::bus::streams::ensure_chat(&js, &settings(nats), || async { Ok(0) })
        .await
        .expect("gateway creates the CHAT stream");
    presence::ensure_bucket(&js, &settings(nats)).await.expect("gateway creates the presence bucket");
    js.get_key_value("presence").await.expect("gateway opens the presence bucket")
}

/// A presence heartbeat as the gateway sends it (JetStream publish with a TTL).
async fn heartbeat(gw: &User, user: &str) {
    let gw1 = NodeId::parse("gw1").unwrap();
    let lease = presence::Lease { epoch: 1, last_seen: 1 };
    let entry = presence::Entry { status: presence::Status::Online, sessions: 1, last_seen: 1, lease: Some(1) };
    for put in [
        presence::Put::lease(&gw1, &lease, Duration::from_secs(30)),
        presence::Put::entry(&UserId::parse(user).unwrap(), &gw1, &entry, Duration::from_secs(30)),
    ] {
        presence::send(&gw.js(), put).await.expect("presence write").await.expect("presence write acked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_user_does_its_work_and_nothing_else() {
    let nats = ConfiguredNats::start();
    let gw = User::connect(&nats, "gateway", GATEWAY_PASSWORD).await;
    let presence = gateway_setup(&nats, &gw).await;
    let js = gw.js();

    // Live delivery: the stream republishes to live.room.<r>.msg; one
    // subscription per room takes messages, events and typing.
    let mut live = gw.client.subscribe("live.room.r.>").await.unwrap();
    let _events = gw.client.subscribe("chat.user.alice.event").await.unwrap();
    let mut presence_evt = gw.client.subscribe("presence.evt.alice.>").await.unwrap();

    let ack = js
        .publish("chat.room.r.msg", "{\"body\":\"hi\"}".into())
        .await
        .expect("publish to chat.room.r.msg")
        .await
        .expect("JetStream acks chat.room.r.msg");
    assert_eq!(ack.stream, "CHAT");
    assert_eq!(ack.sequence, 1);
    let republished = tokio::time::timeout(WAIT, live.next()).await.expect("republished to live.room.r.msg").unwrap();
    assert_eq!(republished.subject.as_str(), "live.room.r.msg");
    assert_eq!(&republished.payload[..], b"{\"body\":\"hi\"}");

    // Replay and gap repair read the stream by direct get.
    let stream = js.get_stream("CHAT").await.expect("CHAT stream info");
    let last =
        stream.direct_get_last_for_subject("chat.room.r.msg").await.expect("direct get of the last room message");
    assert_eq!(last.sequence, 1);

    // Ephemeral core subjects.
    for s in ["live.room.r.typing", "live.room.r.event"] {
        gw.client.publish(s, "{}".into()).await.unwrap();
        let got = tokio::time::timeout(WAIT, live.next()).await.expect("delivered on the room's subscription").unwrap();
        assert_eq!(got.subject.as_str(), s);
    }
    gw.client.publish("chat.user.alice.event", "{}".into()).await.unwrap();

    // Presence: heartbeat (republished to presence.evt.<user>.<node>), read back
    // by key and by natter's batch snapshot (multi-last direct get).
    heartbeat(&gw, "alice").await;
    tokio::time::timeout(WAIT, presence_evt.next()).await.expect("presence change is republished").unwrap();
    assert!(presence.get("alice.gw1").await.expect("presence get").is_some());
    let snap = presence::snapshot(&gw.client, &[UserId::parse("alice").unwrap()]).await.expect("presence snapshot");
    assert_eq!(snap.of("alice").len(), 1);
    assert_eq!(snap.view("alice").0, presence::Status::Online, "the lease is read with the entries");

    // Attachments: the object store round trip.
    let attachments = natter::bus::objects::ensure_attachments(&js, &settings(&nats))
        .await
        .expect("gateway creates the attachments object store");
    let mut data: &[u8] = b"attachment bytes";
    attachments.put("a1", &mut data).await.expect("object put");
    let mut obj = attachments.get("a1").await.expect("object get");
    let mut read = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut obj, &mut read).await.expect("object read");
    assert_eq!(read, b"attachment bytes");

    // Forbidden: stream admin, other consumers' work, arbitrary subjects.
    let forbidden_pub = [
        "$JS.API.STREAM.DELETE.CHAT",
        "$JS.API.STREAM.PURGE.CHAT",
        "$JS.API.CONSUMER.CREATE.CHAT.x",
        "$JS.API.STREAM.DELETE.KV_presence",
        "live.room.r.msg",
        "chat.room.r.typing",
        "admin.x",
    ];
    for s in forbidden_pub {
        gw.publish_refused(s).await;
    }
    // It may not listen to every room's stored messages either.
    let _all = gw.client.subscribe("chat.room.>").await.unwrap();
    gw.client.flush().await.unwrap();
    gw.refused("Subscription", "chat.room.>").await;

    let mut expected = forbidden_pub.to_vec();
    expected.push("chat.room.>");
    gw.only_refused(&expected);

    let info = js.get_stream("CHAT").await.unwrap().info().await.unwrap().clone();
    assert_eq!(info.state.messages, 1, "CHAT survived the refused requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifier_user_consumes_but_cannot_publish_messages() {
    let nats = ConfiguredNats::start();
    let gw = User::connect(&nats, "gateway", GATEWAY_PASSWORD).await;
    gateway_setup(&nats, &gw).await;
    gw.js().publish("chat.room.r.msg", "{\"body\":\"hi\"}".into()).await.unwrap().await.unwrap();
    heartbeat(&gw, "bob").await;

    let nt = User::connect(&nats, "notifier", NOTIFIER_PASSWORD).await;
    let js = nt.js();

    // The durable pull consumer that all notifier replicas share.
    let stream = js.get_stream("CHAT").await.expect("notifier reads CHAT info");
    let consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .get_or_create_consumer(
            "notifier",
            pull::Config {
                durable_name: Some("notifier".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                max_deliver: 5,
                ..Default::default()
            },
        )
        .await
        .expect("notifier creates its durable consumer");
    let mut batch = consumer.fetch().max_messages(10).expires(Duration::from_secs(2)).messages().await.expect("fetch");
    let msg = tokio::time::timeout(WAIT, batch.next()).await.expect("a message is fetched").unwrap().unwrap();
    assert_eq!(msg.subject.as_str(), "chat.room.r.msg");
    msg.double_ack().await.expect("the ack is accepted");

    // Presence reads.
    let kv = js.get_key_value("presence").await.expect("notifier opens the presence bucket");
    assert!(kv.get("bob.gw1").await.expect("presence get").is_some());
    let snap = presence::snapshot(&nt.client, &[UserId::parse("bob").unwrap()]).await.expect("presence snapshot");
    assert_eq!(snap.of("bob").len(), 1);
    assert_eq!(snap.view("bob").0, presence::Status::Online, "the lease is read with the entries");

    // "Unread changed" for a user.
    nt.client.publish("chat.user.bob.event", "{}".into()).await.unwrap();

    let forbidden_pub = [
        "chat.room.r.msg",
        "live.room.r.typing",
        "$KV.presence.bob.gw1",
        "$JS.API.STREAM.DELETE.CHAT",
        "$JS.API.STREAM.CREATE.CHAT",
    ];
    for s in forbidden_pub {
        nt.publish_refused(s).await;
    }
    let _live = nt.client.subscribe("live.room.r.>").await.unwrap();
    nt.client.flush().await.unwrap();
    nt.refused("Subscription", "live.room.r.>").await;

    let mut expected = forbidden_pub.to_vec();
    expected.push("live.room.r.>");
    nt.only_refused(&expected);

    let info = gw.js().get_stream("CHAT").await.unwrap().info().await.unwrap().clone();
    assert_eq!(info.state.messages, 1, "the notifier stored nothing in CHAT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_refused() {
    let nats = ConfiguredNats::start();
    let res =
        ConnectOptions::with_user_and_password("gateway".into(), "not-the-password".into()).connect(nats.url()).await;
    assert!(res.is_err(), "a wrong password must not connect");
    // And the system user exists with its own password.
    let sys = ConnectOptions::with_user_and_password("sys".into(), SYS_PASSWORD.into())
        .connect(nats.url())
        .await
        .expect("sys connects");
    sys.flush().await.unwrap();
}

/// The real gateway and notifier, each with its own NATS user: messages to
/// an offline member are stored, counted unread, archived and pushed, and
/// the room is trimmed to its window (one message here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_and_notifier_run_under_their_nats_users() {
    let nats = ConfiguredNats::start();
    let db = TestDb::new().await;
    let window = ["--stream-max-per-room", "1"];
    let gw_args = [&["--nats-user", "gateway", "--nats-password", GATEWAY_PASSWORD][..], &window].concat();
    let gw = spawn_gateway_at(&nats.url(), &db, "gw1", &gw_args).await;
    let emu = TestEmulator::start(&[]).await;
    let creds = [&["--nats-user", "notifier", "--nats-password", NOTIFIER_PASSWORD][..], &window].concat();
    let _notifier = spawn_notifier_at(&nats.url(), &db.url, &emu, &creds).await;
    let base = gw.http();
    create_room(&base, "alice", "general", &["bob"]).await;
    let r = http()
        .post(format!("{base}/v1/devices"))
        .bearer_auth(token("bob"))
        .json(&serde_json::json!({"platform": "fcm", "token": "bob-phone"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    for id in ["m1", "m2", "m3"] {
        let r = http()
            .post(format!("{base}/v1/rooms/general/messages"))
            .bearer_auth(token("alice"))
            .json(&serde_json::json!({"id": id, "body": "hi"}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    assert_eventually!(WAIT, emu.delivered_to("bob-phone").await.len() == 3, "pushed under the notifier user");
    let pool = db.pool().await;
    assert_eventually!(
        WAIT,
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM messages").fetch_one(&pool).await.unwrap() == 3,
        "archived under the notifier user"
    );
    let observer = User::connect(&nats, "gateway", GATEWAY_PASSWORD).await;
    let chat = || async { observer.js().get_stream("CHAT").await.unwrap().info().await.unwrap().state.messages };
    assert_eventually!(WAIT, chat().await == 1, "trimmed to the window under the notifier user");
}

/// A gateway with one subscription for every room and one for every user's
/// presence may make them under its NATS user, and delivers through them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscription_gateway_delivers_under_its_nats_user() {
    let nats = ConfiguredNats::start();
    let db = TestDb::new().await;
    let shared = ["--room-subscriptions", "shared", "--presence-subscriptions", "shared"];
    let creds = [&["--nats-user", "gateway", "--nats-password", GATEWAY_PASSWORD][..], &shared].concat();
    let gw = spawn_gateway_at(&nats.url(), &db, "gw1", &creds).await;
    create_room(&gw.http(), "alice", "general", &["bob"]).await;
    let mut alice = WsClient::connect(gw.addr, "alice").await;
    let mut bob = WsClient::connect(gw.addr, "bob").await;
    alice.join("general", None).await;
    bob.join("general", None).await;
    let seq = alice.send_msg("general", "m1", "hi").await;
    assert_eq!(bob.messages("general", 1).await[0]["seq"], seq);
    alice.send(serde_json::json!({"type": "typing", "room": "general", "active": true})).await;
    assert_eq!(bob.expect("typing").await["user"], "alice");
    bob.send(serde_json::json!({"type": "presence_sub", "users": ["alice"]})).await;
    assert_eq!(bob.expect("presence").await["status"], "online");
    alice.send(serde_json::json!({"type": "presence", "status": "away"})).await;
    assert_eq!(bob.expect("presence").await["status"], "away");
}
