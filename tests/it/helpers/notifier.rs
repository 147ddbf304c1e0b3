//! The push emulator and notifiers for tests: in-process, or as a separate
//! `natter notifier` process (for kill -9).

use std::{
    net::SocketAddr,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use clap::Parser;
use natter::{
    config::NotifierSettings,
    notifier::Notifier,
    push::emulator::{Emulator, EmulatorSettings, RunningEmulator},
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{NatsServer, TestDb, free_port, http, natter_bin};

#[derive(Parser)]
struct WrapEmulator {
    #[command(flatten)]
    e: EmulatorSettings,
}

#[derive(Parser)]
struct WrapNotifier {
    #[command(flatten)]
    n: NotifierSettings,
}

/// A push emulator on a free port with fresh credentials.
pub struct TestEmulator {
    pub running: RunningEmulator,
    _dir: tempfile::TempDir,
}

impl TestEmulator {
    pub async fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec!["emu".to_owned(), "--listen".into(), "127.0.0.1:0".into()];
        args.extend(["--credentials-dir".to_owned(), dir.path().display().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let settings = WrapEmulator::try_parse_from(args).expect("emulator settings").e;
        let running = Emulator::start(settings).await.expect("emulator starts");
        Self { running, _dir: dir }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.running.base_url().as_str().trim_end_matches('/'), path)
    }

    /// The notifier flags that point at this emulator.
    pub fn push_args(&self) -> Vec<String> {
        self.running.credentials().cli_args()
    }

    /// Makes the next `times` pushes to `token` fail (`times` 0 = until cleared).
    pub async fn fail(&self, token: &str, status: u16, reason: &str, times: u32, retry_after: Option<u64>) {
        let mut body = json!({"token": token, "status": status, "reason": reason});
        if times > 0 {
            body["times"] = json!(times);
        }
        if let Some(s) = retry_after {
            body["retry_after_secs"] = json!(s);
        }
        let r = http().post(self.url("/emulator/faults")).json(&body).send().await.unwrap();
        assert!(r.status().is_success(), "fault injection refused: {}", r.status());
    }

    pub async fn clear_faults(&self) {
        let r = http().delete(self.url("/emulator/faults")).send().await.unwrap();
        assert!(r.status().is_success(), "clear faults: {}", r.status());
    }

    /// Every push request received, in arrival order.
    pub async fn requests(&self) -> Vec<Value> {
        http().get(self.url("/emulator/requests")).send().await.unwrap().json().await.unwrap()
    }

    /// The successful pushes to one device token.
    pub async fn delivered_to(&self, token: &str) -> Vec<Value> {
        self.requests().await.into_iter().filter(|r| r["token"] == token && r["status"] == 200).collect()
    }
}

fn notifier_args(nats: &str, db_url: &str, emu: &TestEmulator, listen: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--nats-url".to_owned(), nats.into(), "--database-url".into(), db_url.to_owned()];
    args.extend(["--listen".to_owned(), listen.to_owned()]);
    args.extend(emu.push_args());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

pub struct TestNotifier {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestNotifier {
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }

    /// `natter_notifier_messages_total` of this replica.
    pub async fn handled(&self) -> u64 {
        metric(self.addr, "natter_notifier_messages_total").await
    }
}

impl Drop for TestNotifier {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn spawn_notifier(nats: &NatsServer, db: &TestDb, emu: &TestEmulator, extra: &[&str]) -> TestNotifier {
    spawn_notifier_at(&nats.url(), &db.url, emu, extra).await
}

/// A notifier with its own NATS and database URLs (e.g. a database behind a
/// [`super::CutProxy`], or a server with nats.conf's users).
pub async fn spawn_notifier_at(nats_url: &str, db_url: &str, emu: &TestEmulator, extra: &[&str]) -> TestNotifier {
    let mut args = vec!["natter".to_owned()];
    args.extend(notifier_args(nats_url, db_url, emu, "127.0.0.1:0", extra));
    let settings = WrapNotifier::try_parse_from(args).expect("notifier settings").n;
    let n = Notifier::build(settings).await.expect("notifier builds");
    let addr = n.local_addr();
    let stop = CancellationToken::new();
    let task = tokio::spawn(n.run_until_stopped(stop.clone()));
    wait_ready(addr).await;
    TestNotifier { addr, stop, task: Some(task) }
}

/// Waits until `/readyz` says the consumers are bound.
async fn wait_ready(addr: SocketAddr) {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = http().get(format!("http://{addr}/readyz")).send().await.is_ok_and(|r| r.status().is_success());
        if ok {
            return;
        }
        assert!(Instant::now() < until, "notifier at {addr} never became ready");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Reads one un-labelled sample from a `/metrics` page (0 when absent).
pub async fn metric(addr: SocketAddr, name: &str) -> u64 {
    let text = http().get(format!("http://{addr}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
        .next()
        .map_or(0, |v| v as u64)
}

/// A notifier as its own process, to be killed with SIGKILL.
pub struct NotifierProcess {
    child: Option<Child>,
    pub addr: SocketAddr,
}

impl NotifierProcess {
    pub async fn start(nats: &NatsServer, db: &TestDb, emu: &TestEmulator, extra: &[&str]) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = natter_bin()
            .arg("notifier")
            .args(notifier_args(&nats.url(), &db.url, emu, &addr.to_string(), extra))
            .env("NATTER_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn natter notifier");
        wait_ready(addr).await;
        Self { child: Some(child), addr }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NotifierProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
