//! Gateways for tests: in-process (`spawn_gateway`) or as a separate
//! `natter` process (`GatewayProcess`, for kill -9).

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use clap::Parser;
use natter::{config::GatewaySettings, gateway::Gateway};
use tokio_util::sync::CancellationToken;

use super::{NatsServer, SECRET, TestDb, free_port, wait_listening};

#[derive(Parser)]
#[command(args_override_self = true)]
struct Wrap {
    #[command(flatten)]
    g: GatewaySettings,
}

const UNLIMITED: [&str; 5] = [
    "--limit-frames-per-sec",
    "--limit-sends-per-sec",
    "--limit-user-sends-per-sec",
    "--limit-http-per-ip-per-sec",
    "--limit-http-per-token-per-sec",
];

pub fn settings(nats: &str, db: &TestDb, node: &str, extra: &[&str]) -> GatewaySettings {
    let mut args = vec![
        "natter".to_owned(),
        "--nats-url".into(),
        nats.into(),
        "--database-url".into(),
        db.url.clone(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--node-id".into(),
        node.into(),
        "--jwt-secret".into(),
        SECRET.into(),
    ];
    // Tests send faster than people do: rate limits off unless a test sets them
    // (a later flag wins).
    for limit in UNLIMITED {
        args.extend([limit.to_owned(), "0".to_owned()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Wrap::try_parse_from(args).expect("test settings").g
}

pub struct TestGateway {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestGateway {
    pub fn http(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn spawn_gateway(nats: &NatsServer, db: &TestDb, node: &str, extra: &[&str]) -> TestGateway {
    spawn_gateway_at(&nats.url(), db, node, extra).await
}

pub async fn spawn_gateway_at(nats_url: &str, db: &TestDb, node: &str, extra: &[&str]) -> TestGateway {
    let gw = Gateway::build(settings(nats_url, db, node, extra)).await.expect("gateway builds");
    let addr = gw.local_addr();
    let stop = CancellationToken::new();
    let task = tokio::spawn(gw.run_until_stopped(stop.clone()));
    TestGateway { addr, stop, task: Some(task) }
}

/// The `natter` binary, for tests that need a separate process.
pub fn natter_bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_natter"));
    c.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    c
}

pub struct GatewayProcess {
    child: Option<Child>,
    pub addr: SocketAddr,
}

impl GatewayProcess {
    pub fn start(nats: &str, db: &TestDb, node: &str, extra: &[&str]) -> Self {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = natter_bin()
            .args(["gateway", "--nats-url", nats, "--database-url", &db.url, "--node-id", node])
            .args(["--listen", &addr.to_string(), "--jwt-secret", SECRET])
            .args(extra)
            .env("NATTER_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn natter gateway");
        wait_listening(port, Duration::from_secs(20), "gateway process");
        Self { child: Some(child), addr }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits for the exit status (bounded).
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let until = Instant::now() + within;
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            if Instant::now() > until {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
