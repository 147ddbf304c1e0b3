//! Push delivery against the push emulator, in process on a free port: the
//! real wire protocols (APNS over h2c, FCM v1 after the OAuth flow), the
//! outcome of each provider answer, and the bounded retries.

use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt as _;
use natter::{
    config::PushSettings,
    push::{
        Device, Outcome, Platform, Push, Pushers,
        emulator::{Emulator, EmulatorSettings, Fault, Provider, Recorded, RunningEmulator, Stats},
    },
};
use serde_json::{Value, json};

#[derive(Parser)]
struct PushWrap {
    #[command(flatten)]
    p: PushSettings,
}

#[derive(Parser)]
struct EmulatorWrap {
    #[command(flatten)]
    e: EmulatorSettings,
}

/// An emulator with fresh credentials, and its control API over HTTP/1.1.
struct Env {
    emulator: RunningEmulator,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Env {
    async fn start(extra: &[&str]) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec!["emulator", "--listen", "127.0.0.1:0", "--credentials-dir", dir.path().to_str().unwrap()];
        args.extend(extra);
        let settings = EmulatorWrap::try_parse_from(args).expect("emulator settings").e;
        let emulator = Emulator::start(settings).await.expect("emulator starts");
        Env { emulator, http: reqwest::Client::new(), _dir: dir }
    }

    fn settings(&self, extra: &[&str]) -> PushSettings {
        let mut args = vec!["natter".to_owned()];
        // The emulator's settings, less those `extra` overrides.
        let base = self.emulator.credentials().cli_args();
        for pair in base.chunks(2).filter(|pair| !extra.contains(&pair[0].as_str())) {
            args.extend_from_slice(pair);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        PushWrap::try_parse_from(args).expect("push settings").p
    }

    async fn pushers(&self, extra: &[&str]) -> Pushers {
        Pushers::from_settings(&self.settings(extra)).await.expect("pushers")
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.emulator.base_url().as_str().trim_end_matches('/'), path)
    }

    async fn fault(&self, fault: Value) {
        let response = self.http.post(self.url("/emulator/faults")).json(&fault).send().await.unwrap();
        assert!(response.status().is_success(), "{}", response.status());
    }

    async fn requests(&self) -> Vec<Recorded> {
        self.http.get(self.url("/emulator/requests")).send().await.unwrap().json().await.unwrap()
    }

    async fn stats(&self) -> Stats {
        self.http.get(self.url("/emulator/stats")).send().await.unwrap().json().await.unwrap()
    }
}

fn device(platform: Platform, token: &str) -> Device {
    Device { user: "bob".into(), platform, token: token.into(), topic: None }
}

fn push(device: &Device) -> Push<'_> {
    Push { device, room: "lobby", seq: 42, message_id: "m-1", from: "alice", body: "hello there", badge: 3 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_push_arrives_over_http2_with_apple_headers() {
    let env = Env::start(&[]).await;
    let pushers = env.pushers(&[]).await;
    assert!(pushers.enabled(Platform::Apns) && pushers.enabled(Platform::Fcm));
    let d = device(Platform::Apns, "a0b1c2d3e4f5");
    assert_eq!(pushers.send(&push(&d)).await, Outcome::Delivered);

    let requests = env.requests().await;
    assert_eq!(requests.len(), 1, "{requests:?}");
    let r = &requests[0];
    assert_eq!((r.provider, r.token.as_str(), r.status), (Provider::Apns, "a0b1c2d3e4f5", 200));
    assert_eq!(r.version, "HTTP/2.0");
    let h = |name: &str| r.headers.get(name).map(String::as_str);
    assert_eq!(h("apns-topic"), Some("dev.natter.app"));
    assert_eq!(h("apns-push-type"), Some("alert"));
    assert_eq!(h("apns-collapse-id"), Some("lobby"));
    assert_eq!(h("apns-priority"), Some("10"));
    assert!(h("apns-expiration").unwrap().parse::<u64>().is_ok());
    assert!(h("authorization").unwrap().starts_with("bearer "), "{:?}", h("authorization"));
    let aps = &r.body["aps"];
    assert_eq!(aps["badge"], 3);
    assert_eq!(aps["alert"], json!({ "title": "alice", "body": "hello there" }));
    assert_eq!(aps["thread-id"], "lobby");
    assert_eq!(aps["sound"], "default");
    assert_eq!((&r.body["room"], &r.body["seq"], &r.body["id"]), (&json!("lobby"), &json!("42"), &json!("m-1")));

    // The device's own topic wins over the default.
    let mut own = device(Platform::Apns, "a0b1c2d3e4f6");
    own.topic = Some("com.example.other".into());
    assert_eq!(pushers.send(&push(&own)).await, Outcome::Delivered);
    assert_eq!(env.requests().await[1].headers["apns-topic"], "com.example.other");

    // Apple speaks HTTP/2 only; the same port answers HTTP/1.1 for the control API.
    let h1 = env.http.post(env.url("/3/device/a0b1c2d3e4f5")).body("{}").send().await.unwrap();
    assert_eq!(h1.version(), reqwest::Version::HTTP_11);
    assert_eq!(h1.status(), 400);
    assert_eq!(env.stats().await.apns, natter::push::emulator::Counts { ok: 2, failed: 1 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_provider_token_is_verified() {
    let env = Env::start(&[]).await;
    let d = device(Platform::Apns, "abcdef");
    let wrong_kid = env.pushers(&["--apns-key-id", "OTHERKEY01"]).await;
    assert_eq!(wrong_kid.send(&push(&d)).await, Outcome::Dropped("apns 403 InvalidProviderToken".into()));
    let wrong_team = env.pushers(&["--apns-team-id", "OTHERTEAM1"]).await;
    assert_eq!(wrong_team.send(&push(&d)).await, Outcome::Dropped("apns 403 InvalidProviderToken".into()));
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let anonymous = h2.post(env.url("/3/device/abcdef")).header("apns-topic", "dev.natter.app").body(r#"{"aps":{}}"#);
    let answer = anonymous.send().await.unwrap();
    assert_eq!((answer.version(), answer.status().as_u16()), (reqwest::Version::HTTP_2, 403));
    assert!(answer.headers().contains_key("apns-id"));
    assert_eq!(answer.json::<Value>().await.unwrap(), json!({ "reason": "MissingProviderToken" }));
    assert_eq!(env.requests().await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcm_push_arrives_after_the_oauth_flow() {
    let env = Env::start(&[]).await;
    let pushers = env.pushers(&[]).await;
    let d = device(Platform::Fcm, "fcm-token:abc_123");
    assert_eq!(pushers.send(&push(&d)).await, Outcome::Delivered);
    assert_eq!(pushers.send(&push(&d)).await, Outcome::Delivered);

    let stats = env.stats().await;
    assert_eq!(stats.oauth_tokens, 1, "the access token is cached");
    assert_eq!(stats.fcm.ok, 2);
    let requests = env.requests().await;
    let r = &requests[0];
    assert_eq!((r.provider, r.token.as_str(), r.status), (Provider::Fcm, "fcm-token:abc_123", 200));
    assert!(r.headers["authorization"].starts_with("Bearer ya29."), "{:?}", r.headers);
    // Google negotiates h2 by ALPN; against a cleartext URL the sender speaks h2 too.
    assert_eq!(r.version, "HTTP/2.0");
    let m = &r.body["message"];
    assert_eq!(m["token"], "fcm-token:abc_123");
    assert_eq!(m["notification"], json!({ "title": "alice", "body": "hello there" }));
    assert_eq!(m["android"]["collapse_key"], "lobby");
    assert_eq!(m["android"]["notification"]["notification_count"], 3);
    assert_eq!(m["android"]["notification"]["tag"], "lobby");
    assert_eq!(m["apns"]["headers"]["apns-collapse-id"], "lobby");
    assert_eq!(m["apns"]["payload"]["aps"], json!({ "badge": 3, "thread-id": "lobby", "sound": "default" }));
    assert_eq!(m["data"], json!({ "room": "lobby", "seq": "42", "id": "m-1" }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unregistered_tokens_are_invalid_without_retry() {
    let env = Env::start(&[]).await;
    let pushers = env.pushers(&[]).await;
    env.fault(json!({ "token": "gone1", "status": 410, "reason": "Unregistered" })).await;
    env.fault(json!({ "token": "gone2", "status": 404, "reason": "UNREGISTERED" })).await;
    let apns = device(Platform::Apns, "gone1");
    let fcm = device(Platform::Fcm, "gone2");
    assert_eq!(pushers.send(&push(&apns)).await, Outcome::InvalidToken("Unregistered".into()));
    assert!(matches!(pushers.send(&push(&fcm)).await, Outcome::InvalidToken(_)));
    // A token FCM refuses as malformed is invalid too.
    let bad = device(Platform::Fcm, "not a token!");
    assert!(matches!(pushers.send(&push(&bad)).await, Outcome::InvalidToken(_)));

    let requests = env.requests().await;
    let statuses: Vec<_> = requests.iter().map(|r| (r.provider, r.status)).collect();
    assert_eq!(statuses, [(Provider::Apns, 410), (Provider::Fcm, 404), (Provider::Fcm, 400)]);
    assert!(requests[0].body.is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_twice_then_delivered() {
    let env = Env::start(&[]).await;
    let pushers = env.pushers(&[]).await;
    for (platform, token) in [(Platform::Apns, "flaky1"), (Platform::Fcm, "flaky2")] {
        env.fault(json!({ "token": token, "status": 503, "times": 2 })).await;
        let d = device(platform, token);
        assert_eq!(pushers.send(&push(&d)).await, Outcome::Delivered, "{platform:?}");
    }
    let requests = env.requests().await;
    for token in ["flaky1", "flaky2"] {
        let statuses: Vec<u16> = requests.iter().filter(|r| r.token == token).map(|r| r.status).collect();
        assert_eq!(statuses, [503, 503, 200], "{token}");
    }
    let stats = env.stats().await;
    assert_eq!((stats.apns.ok, stats.apns.failed, stats.fcm.ok, stats.fcm.failed), (1, 2, 1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_and_bounded() {
    let env = Env::start(&[]).await;
    let pushers = env.pushers(&["--push-max-backoff", "1500ms"]).await;
    env.fault(
        json!({ "token": "busy", "status": 429, "reason": "TooManyRequests", "times": 1, "retry_after_secs": 1 }),
    )
    .await;
    let d = device(Platform::Apns, "busy");
    assert_eq!(pushers.send(&push(&d)).await, Outcome::Delivered);
    let requests = env.requests().await;
    assert_eq!(requests.iter().map(|r| r.status).collect::<Vec<_>>(), [429, 200]);
    let waited = requests[1].at_ms - requests[0].at_ms;
    assert!(waited >= 950, "waited {waited} ms");

    // A Retry-After beyond the backoff bound fails at once.
    env.fault(json!({ "token": "busier", "status": 503, "retry_after_secs": 5 })).await;
    let d = device(Platform::Fcm, "busier");
    let started = Instant::now();
    assert!(matches!(pushers.send(&push(&d)).await, Outcome::Failed(_)));
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(env.requests().await.iter().filter(|r| r.token == "busier").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_client_errors_are_dropped_once() {
    let env = Env::start(&[]).await;
    let pushers = env.pushers(&[]).await;
    env.fault(json!({ "token": "topic", "status": 400, "reason": "BadTopic" })).await;
    env.fault(json!({ "token": "sender", "status": 403, "reason": "SENDER_ID_MISMATCH" })).await;
    assert_eq!(
        pushers.send(&push(&device(Platform::Apns, "topic"))).await,
        Outcome::Dropped("apns 400 BadTopic".into())
    );
    assert!(matches!(pushers.send(&push(&device(Platform::Fcm, "sender"))).await, Outcome::Dropped(_)));
    assert_eq!(env.requests().await.len(), 2);

    // A platform without credentials is dropped without a request.
    let mut settings = env.settings(&[]);
    settings.fcm.fcm_credentials = None;
    let no_fcm = Pushers::from_settings(&settings).await.unwrap();
    assert!(no_fcm.enabled(Platform::Apns) && !no_fcm.enabled(Platform::Fcm));
    assert_eq!(no_fcm.send(&push(&device(Platform::Fcm, "x"))).await, Outcome::Dropped("fcm not configured".into()));
    assert_eq!(env.requests().await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_providers_fail_within_the_time_bound() {
    let env = Env::start(&["--latency", "2s"]).await;
    let pushers = env.pushers(&["--push-timeout", "300ms", "--push-attempts", "3", "--push-max-backoff", "1s"]).await;
    let started = Instant::now();
    let outcome = pushers.send(&push(&device(Platform::Apns, "slow"))).await;
    let elapsed = started.elapsed();
    assert!(matches!(&outcome, Outcome::Failed(why) if why.contains("timed out")), "{outcome:?}");
    // 3 × 300 ms plus two backoffs of at most 200 ms and 400 ms.
    assert!(elapsed >= Duration::from_millis(900) && elapsed < Duration::from_millis(1500 + 500), "{elapsed:?}");
    assert_eq!(env.stats().await.apns.ok, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_pushes_share_connections() {
    let env = Env::start(&["--record-limit", "100"]).await;
    let pushers = std::sync::Arc::new(env.pushers(&[]).await);
    let devices: Vec<Device> =
        (0..400).map(|i| device(if i % 2 == 0 { Platform::Apns } else { Platform::Fcm }, &format!("tok{i}"))).collect();
    // The notifier's shape: a spawned task driving borrowed pushes concurrently
    // (the closure takes an index: one taking a `Push<'_>` trips rustc's
    // higher-ranked Send check inside `tokio::spawn`).
    let task = tokio::spawn({
        let pushers = pushers.clone();
        async move {
            let pushes: Vec<Push<'_>> = devices.iter().map(push).collect();
            let (pushers, pushes) = (&pushers, &pushes);
            futures::stream::iter(0..pushes.len())
                .map(|k| async move { pushers.send(&pushes[k]).await })
                .buffer_unordered(64)
                .collect::<Vec<Outcome>>()
                .await
        }
    });
    let outcomes = task.await.unwrap();
    assert!(outcomes.iter().all(|o| *o == Outcome::Delivered), "{outcomes:?}");
    let stats = env.stats().await;
    assert_eq!((stats.apns.ok, stats.fcm.ok, stats.oauth_tokens), (200, 200, 1));
    assert_eq!(env.requests().await.len(), 100, "the record limit holds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_errors_name_the_variable() {
    let env = Env::start(&[]).await;
    let mut settings = env.settings(&[]);
    settings.apns.apns_key_id = None;
    let err = Pushers::from_settings(&settings).await.err().expect("an error").to_string();
    assert!(err.contains("NATTER_APNS_KEY_ID"), "{err}");
    let mut settings = env.settings(&[]);
    settings.fcm.fcm_credentials = Some(env.emulator.credentials().apns_key.clone());
    let err = Pushers::from_settings(&settings).await.err().expect("an error").to_string();
    assert!(err.contains("NATTER_FCM_CREDENTIALS"), "{err}");
    // The emulator keeps its faults until cleared, and lists them.
    env.fault(json!({ "token": "*", "status": 500 })).await;
    let faults: Vec<Fault> = env.http.get(env.url("/emulator/faults")).send().await.unwrap().json().await.unwrap();
    assert_eq!(faults.len(), 1);
    env.http.delete(env.url("/emulator/faults")).send().await.unwrap();
    let pushers = env.pushers(&[]).await;
    assert_eq!(pushers.send(&push(&device(Platform::Apns, "any"))).await, Outcome::Delivered);
}
