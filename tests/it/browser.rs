//! The web client: served by the gateway (`/`), its `--dev` sign-in, and an
//! end-to-end run in a real browser (tests/browser/chat.mjs: chromium driven
//! by playwright-core, both installed by scripts/setup).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::helpers::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Where screenshots go: `$CARGO_TARGET_DIR/browser-artifacts`, else the
/// target directory this test binary was built into.
fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| {
        // target/<profile>/deps/it-<hash>
        let exe = std::env::current_exe().expect("test binary path");
        exe.ancestors().nth(3).map(Path::to_path_buf).unwrap_or_else(|| Path::new(ROOT).join("target"))
    });
    let target = if target.is_relative() { Path::new(ROOT).join(target) } else { target };
    target.join("browser-artifacts")
}

/// What the browser test needs, or a panic that says how to get it.
fn browser_tools() -> (PathBuf, PathBuf) {
    let chromium =
        std::env::var_os("NATTER_TEST_CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    let modules = Path::new(ROOT).join(".tools/browser");
    let mut missing = Vec::new();
    if !chromium.is_file() {
        missing.push(format!("chromium ({})", chromium.display()));
    }
    if !modules.join("node_modules/playwright-core/package.json").is_file() {
        missing.push(format!("playwright-core ({}/node_modules)", modules.display()));
    }
    if std::process::Command::new("node").arg("--version").output().is_err() {
        missing.push("node".to_owned());
    }
    assert!(missing.is_empty(), "the browser test needs {}: run scripts/setup", missing.join(", "));
    (chromium, modules)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_between_two_gateways_in_a_browser() {
    let (chromium, modules) = browser_tools();
    // A resume replays at most 3 messages here, so the page's handling of a
    // cut replay (`truncated_before`) is exercised.
    let dev = ["--dev", "--presence-grace", "1s", "--limit-replay", "3"];
    let s = Stack::with(&dev, &dev).await;
    let artifacts = artifacts_dir();
    let _ = std::fs::remove_dir_all(&artifacts);

    let started = Instant::now();
    let run = tokio::process::Command::new("node")
        .arg(Path::new(ROOT).join("tests/browser/chat.mjs"))
        .env("NATTER_GW1", s.gw1.http())
        .env("NATTER_GW2", s.gw2.http())
        .env("NATTER_BROWSER_MODULES", &modules)
        .env("NATTER_BROWSER_ARTIFACTS", &artifacts)
        .env("NATTER_CHROMIUM", &chromium)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("tests/browser/chat.mjs did not finish within 90 s")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "tests/browser/chat.mjs failed ({}) after {:?}; screenshots in {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status,
        started.elapsed(),
        artifacts.display()
    );
    println!("{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_client_is_served_with_a_strict_policy() {
    let nats = NatsServer::start();
    let db = TestDb::new().await;
    let gw = spawn_gateway(&nats, &db, "gw1", &[]).await;
    let page = http().get(format!("{}/", gw.http())).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let h = page.headers().clone();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
    assert!(csp.contains("connect-src 'self' ws:"), "{csp}");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert!(page.text().await.unwrap().contains(r#"<script type="module" src="/app.js">"#));

    let js = http().get(format!("{}/app.js", gw.http())).send().await.unwrap();
    assert_eq!(js.headers()["content-type"], "text/javascript; charset=utf-8");
    let etag = js.headers()["etag"].clone();
    let again = http().get(format!("{}/app.js", gw.http())).header("if-none-match", etag).send().await.unwrap();
    assert_eq!(again.status(), 304);
    assert_eq!(http().get(format!("{}/nope.js", gw.http())).send().await.unwrap().status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_sign_in_only_with_dev() {
    let s = Stack::with(&["--dev"], &[]).await;
    let post = |base: String, body: Value| async move {
        let r = http().post(format!("{base}/v1/dev/token")).json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().await.unwrap_or(Value::Null))
    };
    let (st, v) = post(s.gw1.http(), json!({"user":"alice"})).await;
    assert_eq!(st, 200, "{v}");
    let token = v["token"].as_str().unwrap();
    let rooms = http().get(format!("{}/v1/rooms", s.gw2.http())).bearer_auth(token).send().await.unwrap();
    assert_eq!(rooms.status(), 200, "a dev token works on every gateway with the same secret");

    let (st, v) = post(s.gw1.http(), json!({"user":"a.b"})).await;
    assert_eq!((st, v["error"]["code"].as_str()), (400, Some("bad_request")));
    let (st, _) = post(s.gw1.http(), json!({"name":"alice"})).await;
    assert_eq!(st, 400);
    let (st, v) = post(s.gw2.http(), json!({"user":"alice"})).await;
    assert_eq!((st, v["error"]["code"].as_str()), (404, Some("not_found")), "no --dev: no dev tokens");
}
