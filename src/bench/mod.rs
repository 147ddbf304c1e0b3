//! `natter bench`: the load generator. It drives running gateways over the
//! client protocol (tokens minted with the configured key) and prints one
//! JSON line per scenario. Scenarios live one per file.

pub mod backlog;
pub mod churn;
pub mod fanout;
pub mod floor;
pub mod idle;
pub mod notifier;
pub mod presence;
pub mod procstat;
pub mod resume;

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use futures::{SinkExt, StreamExt, stream::SplitSink};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{Message, protocol::WebSocketConfig},
};

use crate::{auth::Signer, config::Secret};

#[derive(Debug, Clone, Args)]
pub struct BenchSettings {
    /// Gateway base URLs (loopback only), comma-separated.
    #[arg(long, env = "NATTER_BENCH_GATEWAYS", default_value = "http://127.0.0.1:8081,http://127.0.0.1:8082")]
    pub gateways: String,
    /// HS256 secret the gateways verify tokens with.
    #[arg(long, env = "NATTER_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Secret,
    /// Gateway process ids to measure (CPU seconds, RSS from /proc), comma-separated.
    #[arg(long, env = "NATTER_BENCH_GATEWAY_PIDS", value_delimiter = ',')]
    pub gateway_pids: Vec<u32>,
    /// Notifier process ids to measure, comma-separated.
    #[arg(long, env = "NATTER_BENCH_NOTIFIER_PIDS", value_delimiter = ',')]
    pub notifier_pids: Vec<u32>,
    /// Other server process ids to measure (nats-server), comma-separated.
    #[arg(long, env = "NATTER_BENCH_SERVER_PIDS", value_delimiter = ',')]
    pub server_pids: Vec<u32>,
    /// Recorded as `label` in the output line: what the run compares (the
    /// gateways' settings, the build), so a results file tells its runs apart.
    #[arg(long, env = "NATTER_BENCH_LABEL")]
    pub label: Option<String>,
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Scenario {
    /// R rooms × M members across the gateways, senders at a fixed total rate (or `--saturate`).
    Fanout(fanout::FanoutArgs),
    /// N authenticated connections, each joined to its rooms, held idle.
    Idle(idle::IdleArgs),
    /// Connect/disconnect storm with resume.
    Churn(churn::ChurnArgs),
    /// A client that missed messages rejoins with `since`.
    Resume(resume::ResumeArgs),
    /// Members rejoin a room of large messages from `since` 0 and read nothing: the gateway's memory.
    Backlog(backlog::BacklogArgs),
    /// Status change → remote delivery latency across gateways.
    Presence(presence::PresenceArgs),
    /// Notifier throughput: unread bumps and pushes per second against the push emulator.
    #[command(alias = "push")]
    Notifier(notifier::NotifierArgs),
    /// Not a scenario: the least server `fanout` can run against (one process,
    /// one write per delivery, no broker or log), to measure natter against.
    FloorServer(floor::FloorArgs),
}

pub async fn run(s: BenchSettings) -> anyhow::Result<()> {
    let gateways = parse_gateways(&s.gateways)?;
    let signer = Signer::hs256(s.jwt_secret.expose());
    let procs = procstat::Servers::new(&s.gateway_pids, &s.notifier_pids, &s.server_pids)?;
    raise_open_files_limit();
    let mut line = match s.scenario {
        Scenario::Fanout(a) => fanout::run(&gateways, &signer, &procs, a).await?,
        Scenario::Idle(a) => idle::run(&gateways, &signer, &procs, a).await?,
        Scenario::Churn(a) => churn::run(&gateways, &signer, &procs, a).await?,
        Scenario::Resume(a) => resume::run(&gateways, &signer, a).await?,
        Scenario::Backlog(a) => backlog::run(&gateways, &signer, &procs, a).await?,
        Scenario::Presence(a) => presence::run(&gateways, &signer, a).await?,
        Scenario::Notifier(a) => notifier::run(&gateways, &signer, &procs, a).await?,
        Scenario::FloorServer(a) => return floor::serve(a).await,
    };
    if let Some(label) = s.label {
        extend(&mut line, serde_json::json!({ "label": label }));
    }
    println!("{line}");
    Ok(())
}

/// `http://127.0.0.1:8081` → `127.0.0.1:8081`; refuses anything but loopback.
pub fn parse_gateways(list: &str) -> anyhow::Result<Vec<String>> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|g| {
            let u = url::Url::parse(g).with_context(|| format!("gateway {g:?} is not a URL"))?;
            let host = u.host_str().unwrap_or_default();
            let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
            anyhow::ensure!(loopback, "gateway {g}: load runs target loopback addresses only");
            Ok(format!("{}:{}", host, u.port_or_known_default().unwrap_or(80)))
        })
        .collect()
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
pub type WsTx = SplitSink<Ws, Message>;

/// Thousands of sockets per run: use the whole hard limit on open files.
fn raise_open_files_limit() {
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("bench: cannot raise the open files limit: {e}");
    }
}

/// Small client buffers, like the gateway's: thousands of idle sockets in one
/// process must not cost 128 KiB each.
fn client_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0)
}

/// Connects and authenticates; returns the socket after `welcome`.
pub async fn connect(addr: &str, signer: &Signer, user: &str) -> anyhow::Result<Ws> {
    let token = signer.mint(user, Duration::from_secs(3 * 3600), None)?;
    let (mut ws, _) =
        tokio_tungstenite::connect_async_with_config(format!("ws://{addr}/v1/ws"), Some(client_config()), true).await?;
    ws.send(Message::text(serde_json::json!({"type": "hello", "token": token}).to_string())).await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await? {
            Some(Ok(Message::Text(t))) if t.contains("\"welcome\"") => return Ok(ws),
            Some(Ok(Message::Text(t))) => anyhow::bail!("handshake refused: {t}"),
            Some(Ok(_)) => continue,
            _ => anyhow::bail!("connection closed during handshake"),
        }
    }
}

/// Sends `join` and waits for `joined`; answers the room's last seq.
pub async fn join(ws: &mut Ws, room: &str, since: Option<u64>) -> anyhow::Result<u64> {
    let mut frame = serde_json::json!({"type": "join", "room": room});
    if let Some(s) = since {
        frame["since"] = s.into();
    }
    ws.send(Message::text(frame.to_string())).await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await? {
            Some(Ok(Message::Text(t))) if t.contains("\"joined\"") => {
                let v: serde_json::Value = serde_json::from_str(&t)?;
                return v["last_seq"].as_u64().context("joined without last_seq");
            }
            Some(Ok(Message::Text(t))) if t.contains("\"error\"") => anyhow::bail!("join {room} refused: {t}"),
            Some(Ok(_)) => continue,
            _ => anyhow::bail!("connection closed while joining {room}"),
        }
    }
}

/// Sends `presence_sub` for `users` and reads the snapshot: one `presence`
/// frame per user (other frames are skipped).
pub async fn presence_sub(ws: &mut Ws, users: &[String]) -> anyhow::Result<()> {
    ws.send(Message::text(serde_json::json!({"type": "presence_sub", "users": users}).to_string())).await?;
    let mut initial = 0;
    while initial < users.len() {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await? {
            Some(Ok(Message::Text(t))) if t.contains(r#""type":"presence""#) => initial += 1,
            Some(Ok(Message::Text(t))) if t.contains(r#""error""#) => anyhow::bail!("presence_sub refused: {t}"),
            Some(Ok(_)) => {}
            _ => anyhow::bail!("closed before the presence snapshot"),
        }
    }
    Ok(())
}

/// Creates rooms over HTTP, `concurrency` at a time, each by its first member
/// on gateway `i % G`. `rooms`: (id, members).
pub async fn create_rooms(
    gateways: &[String],
    signer: &Signer,
    rooms: &[(String, Vec<String>)],
    concurrency: usize,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    futures::stream::iter(rooms.iter().enumerate())
        .map(|(i, (id, members))| {
            let http = http.clone();
            let gw = &gateways[i % gateways.len()];
            async move {
                let token = signer.mint(&members[0], Duration::from_secs(3600), None)?;
                let r = http
                    .post(format!("http://{gw}/v1/rooms"))
                    .bearer_auth(token)
                    .json(&serde_json::json!({"id": id, "name": id, "members": members[1..]}))
                    .send()
                    .await?;
                let status = r.status();
                anyhow::ensure!(
                    status.is_success(),
                    "create room {id}: {status} {}",
                    r.text().await.unwrap_or_default()
                );
                Ok(())
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect::<Vec<anyhow::Result<()>>>()
        .await
        .into_iter()
        .collect()
}

/// A short id that keeps one run's users and rooms apart from another's.
pub fn run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// Merges `extra`'s fields into the JSON object `out`.
pub fn extend(out: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(o), serde_json::Value::Object(e)) = (out.as_object_mut(), extra) {
        o.extend(e);
    }
}

/// p50/p99/p999/max of latency samples, in ms.
pub fn percentiles(samples: &mut [Duration]) -> serde_json::Value {
    samples.sort_unstable();
    let at = |q: f64| -> f64 {
        if samples.is_empty() {
            return 0.0;
        }
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_secs_f64() * 1000.0
    };
    serde_json::json!({
        "p50_ms": round(at(0.5)), "p99_ms": round(at(0.99)), "p999_ms": round(at(0.999)), "max_ms": round(at(1.0)),
    })
}

pub fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
