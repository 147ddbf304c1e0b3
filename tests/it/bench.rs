//! The load generator end to end: `natter bench fanout` against two real
//! gateways and against `natter bench floor-server` (the floor natter is
//! compared with in BENCHMARKS.md) counts every delivery, and both servers
//! deliver every message once, in order. A figure from a run that lost or
//! doubled messages would measure nothing.

use std::{process::Stdio, time::Duration};

use serde_json::Value;

use crate::helpers::*;

/// One small fixed-rate fan-out run against `gateways`; its JSON line.
async fn fanout(gateways: String) -> Value {
    let mut c = natter_bin();
    c.args(["bench", "--gateways", &gateways, "fanout", "--rooms", "4", "--members", "3"])
        .args(["--rate", "40", "--duration", "1s", "--warmup", "0s"])
        .env("NATTER_JWT_SECRET", SECRET)
        .stderr(Stdio::inherit());
    let out = tokio::task::spawn_blocking(move || c.output()).await.unwrap().unwrap();
    assert!(out.status.success(), "bench fanout against {gateways} failed");
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

fn assert_everything_delivered_once_in_order(line: &Value, server: &str) {
    let sent = line["sent"].as_u64().unwrap();
    assert!(sent >= 30, "{server}: only {sent} of ~40 messages sent: {line}");
    assert_eq!(line["expected"].as_u64(), Some(sent * 3), "{server}: {line}");
    assert_eq!(line["delivered"], line["expected"], "{server}: {line}");
    for zero in ["lost", "duplicates", "out_of_order", "send_errors", "closed_receivers"] {
        assert_eq!(line[zero], 0, "{server}: {zero}: {line}");
    }
    assert!(line["p99_ms"].as_f64().unwrap() > 0.0, "{server}: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_fanout_delivers_everything_through_natter_and_through_the_floor_server() {
    let stack = Stack::start().await;
    let line = fanout(format!("{},{}", stack.gw1.http(), stack.gw2.http())).await;
    assert_everything_delivered_once_in_order(&line, "natter");
    assert_eq!(line["gateways"], 2);

    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut floor = Spawned(
        natter_bin()
            .args(["bench", "floor-server", "--listen", &addr, "--exit-after", "60s"])
            .env("NATTER_JWT_SECRET", SECRET)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn floor-server"),
    );
    floor.listening(port, Duration::from_secs(10), "floor-server").expect("floor-server exited");
    let line = fanout(format!("http://{addr}")).await;
    assert_everything_delivered_once_in_order(&line, "floor-server");

    // It is loopback only, like every load run.
    let o = natter_bin()
        .args(["bench", "floor-server", "--listen", "0.0.0.0:0"])
        .env("NATTER_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("loopback"));
}
