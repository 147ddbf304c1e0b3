//! `/metrics` on the gateway and the notifier: the numbers move with traffic.
//! And every HTTP response carries a request id.

use std::time::Duration;

use serde_json::json;

use crate::{assert_eventually, helpers::*};

async fn scrape(base: &str) -> String {
    let r = http().get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().contains("openmetrics-text"));
    r.text().await.unwrap()
}

/// The value of the sample whose line starts with `series` (name and labels).
fn sample(page: &str, series: &str) -> f64 {
    page.lines()
        .filter_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.split(' ').next()?.parse().ok())
        .next()
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_metrics_count_connections_frames_latencies_and_presence() {
    let s = Stack::start().await;
    let base = s.gw1.http();
    create_room(&base, "alice", "general", &["bob"]).await;
    let before = scrape(&base).await;
    assert_eq!(sample(&before, "natter_connections"), 0.0);

    let mut alice = Client::connect(s.gw1.addr, "alice").await;
    let mut bob = Client::connect(s.gw1.addr, "bob").await;
    alice.join("general", None).await;
    bob.join("general", None).await;
    for i in 0..3 {
        alice.send_msg("general", &format!("m{i}"), "hi").await;
    }
    bob.messages("general", 3).await;
    alice.messages("general", 3).await; // her own, echoed
    alice.send_text("{not json").await;
    alice.expect("error").await;

    let page = scrape(&base).await;
    assert_eq!(sample(&page, "natter_connections"), 2.0, "{page}");
    assert_eq!(sample(&page, r#"natter_frames_in_total{type="send"}"#), 3.0);
    assert_eq!(sample(&page, r#"natter_frames_in_total{type="join"}"#), 2.0);
    assert_eq!(sample(&page, r#"natter_frames_in_total{type="invalid"}"#), 1.0);
    assert!(sample(&page, r#"natter_frames_out_total{type="message"}"#) >= 6.0, "3 messages × 2 members");
    assert_eq!(sample(&page, "natter_publish_latency_seconds_count"), 3.0);
    assert!(sample(&page, "natter_delivery_latency_seconds_count") >= 3.0);
    assert!(sample(&page, "natter_presence_updates_total") >= 2.0, "alice and bob went online");
    assert_eq!(sample(&page, "natter_rooms"), 1.0, "{page}");
    assert_eq!(sample(&page, "natter_presence_watches"), 0.0);
    bob.send(json!({"type": "presence_sub", "users": ["carol", "dave"]})).await;
    bob.expect("presence").await;
    bob.expect("presence").await;
    assert_eq!(sample(&scrape(&base).await, "natter_presence_watches"), 2.0);
    assert!(
        sample(&page, r#"natter_db_pool_connections{state="idle"}"#)
            + sample(&page, r#"natter_db_pool_connections{state="used"}"#)
            >= 1.0
    );

    drop(alice);
    assert_eventually!(
        Duration::from_secs(5),
        sample(&scrape(&base).await, "natter_connections") == 1.0,
        "a closed connection is counted down"
    );
    let page = scrape(&base).await;
    assert!(sample(&page, r#"natter_closes_total{code="1000"}"#) >= 1.0, "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_responses_carry_a_request_id_the_callers_or_a_new_one() {
    let s = Stack::start().await;
    let r = http().get(format!("{}/v1/rooms", s.gw1.http())).bearer_auth(token("alice")).send().await.unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    let r = http()
        .post(format!("{}/v1/rooms", s.gw1.http()))
        .header("x-request-id", "trace-me-42")
        .json(&json!({"id": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["x-request-id"], "trace-me-42", "the caller's id is kept");
}

/// A gateway logging at debug, as JSON: tokens and message text never appear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_json_with_request_ids_and_never_hold_tokens_or_message_text() {
    let nats = NatsServer::start();
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("gateway.log");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut child = natter_bin()
        .args(["gateway", "--nats-url", &nats.url(), "--database-url", &db.url, "--node-id", "gwlog"])
        .args(["--listen", &addr.to_string(), "--jwt-secret", SECRET])
        .env("NATTER_LOG", "debug")
        .env("NATTER_LOG_FORMAT", "json")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let base = format!("http://{addr}");
    assert_eventually!(
        Duration::from_secs(20),
        http().get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status() == 200),
        "gateway up"
    );
    create_room(&base, "alice", "general", &[]).await;
    let mut alice = Client::connect(addr, "alice").await;
    alice.join("general", None).await;
    alice.send_msg("general", "m1", "the secret plans of alice").await;
    let r = http()
        .post(format!("{base}/v1/rooms/general/messages?note=private-query"))
        .bearer_auth(token("alice"))
        .header("x-request-id", "req-for-the-log")
        .json(&json!({"id": "m2", "body": "more secret plans"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    drop(alice);
    let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();

    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.lines().count() > 5, "the gateway logged: {log}");
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        assert!(v.get("level").is_some(), "{line}");
    }
    assert!(log.contains("req-for-the-log"), "the request id is in the request's span");
    assert!(!log.contains(&token("alice")[..40]), "no token in the logs");
    assert!(!log.contains("secret plans"), "no message text in the logs");
    assert!(!log.contains("private-query"), "no query strings in the logs");
}
