//! `natter bench`: the load generator. It drives running gateways over the
//! client protocol (tokens minted with the configured key) and prints one
//! JSON line per scenario. Scenarios live one per file.

pub mod notifier;
pub mod presence;

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use futures::{SinkExt, StreamExt, stream::SplitSink};
use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

use crate::{auth::Signer, config::Secret};

#[derive(Debug, Clone, Args)]
pub struct BenchSettings {
    /// Gateway base URLs (loopback only), comma-separated.
    #[arg(long, env = "NATTER_BENCH_GATEWAYS", default_value = "http://127.0.0.1:8081,http://127.0.0.1:8082")]
    pub gateways: String,
    /// HS256 secret the gateways verify tokens with.
    #[arg(long, env = "NATTER_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Secret,
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Scenario {
    /// Status change → remote delivery latency across gateways.
    Presence(presence::PresenceArgs),
    /// Notifier throughput: unread bumps and pushes per second against the push emulator.
    Notifier(notifier::NotifierArgs),
}

pub async fn run(s: BenchSettings) -> anyhow::Result<()> {
    let gateways = parse_gateways(&s.gateways)?;
    let signer = Signer::hs256(s.jwt_secret.expose());
    let line = match s.scenario {
        Scenario::Presence(a) => presence::run(&gateways, &signer, a).await?,
        Scenario::Notifier(a) => notifier::run(&gateways, &signer, a).await?,
    };
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

/// Connects and authenticates; returns the socket after `welcome`.
pub async fn connect(addr: &str, signer: &Signer, user: &str) -> anyhow::Result<Ws> {
    let token = signer.mint(user, Duration::from_secs(3 * 3600), None)?;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws")).await?;
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

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
