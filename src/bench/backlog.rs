//! `bench backlog`: a room holds `--messages` messages of `--size` bytes,
//! and `--joins` members rejoin it at once with `since` 0 and read nothing,
//! as an abusive client would. Figure: the gateway's RSS growth at its peak
//! over the hold, which the replay limits (`NATTER_LIMIT_REPLAY`,
//! `NATTER_LIMIT_REPLAY_BYTES`) bound whatever the room holds. Then one
//! reader reads its replay: how many messages, and `truncated_before`.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::{connect, create_rooms, procstat::Servers, resume::send_all, run_id};
use crate::auth::Signer;

#[derive(Debug, Clone, Args)]
pub struct BacklogArgs {
    /// Messages in the room.
    #[arg(long, default_value_t = 10_000)]
    pub messages: usize,
    /// Bytes of each message's body.
    #[arg(long, default_value_t = 60_000)]
    pub size: usize,
    /// Members that rejoin with `since` 0 at once.
    #[arg(long, default_value_t = 5)]
    pub joins: usize,
    /// How long they stay without reading (the gateway's RSS is sampled).
    #[arg(long, default_value = "20s", value_parser = crate::config::parse_duration)]
    pub hold: Duration,
}

pub async fn run(gateways: &[String], signer: &Signer, servers: &Servers, a: BacklogArgs) -> anyhow::Result<Value> {
    anyhow::ensure!(servers.gateways() > 0, "bench backlog needs --gateway-pids to measure the gateways");
    let id = run_id();
    let (room, sender) = (format!("b{id}"), format!("b{id}-s"));
    let readers: Vec<String> = (0..a.joins.max(1)).map(|i| format!("b{id}-r{i}")).collect();
    create_rooms(gateways, signer, &[(room.clone(), [vec![sender.clone()], readers.clone()].concat())], 1).await?;
    let gw = &gateways[0];
    let body = "x".repeat(a.size);
    let t = Instant::now();
    let seqs = send_all(gw, signer, &sender, &room, a.messages, move |_| body.clone()).await?;
    let fill_s = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await; // let the sends' allocations settle
    let before = servers.gateway_rss_kib(&servers.snapshot());

    let mut sockets = Vec::with_capacity(readers.len());
    for r in &readers {
        let mut ws = connect(gw, signer, r).await?;
        ws.send(Message::text(json!({"type": "join", "room": room, "since": 0}).to_string())).await?;
        sockets.push(ws);
    }
    let mut peak = before;
    let until = Instant::now() + a.hold;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(servers.gateway_rss_kib(&servers.snapshot()));
    }

    // One reader reads its replay now.
    let mut ws = sockets.swap_remove(0);
    drop(sockets);
    let (mut replayed, mut truncated_before, mut first) = (0usize, None, None);
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
        let Message::Text(t) = m else { continue };
        let v: Value = serde_json::from_str(&t)?;
        match v["type"].as_str() {
            Some("joined") => truncated_before = v["truncated_before"].as_u64(),
            Some("message") => {
                first = first.or(v["seq"].as_u64());
                replayed += 1;
            }
            _ => {}
        }
    }
    let last = *seqs.last().context("nothing sent")?;
    let mib = |kib: u64| super::round(kib as f64 / 1024.0);
    Ok(json!({
        "scenario": "backlog",
        "messages": a.messages,
        "size": a.size,
        "room_mib": super::round((a.messages * a.size) as f64 / (1 << 20) as f64),
        "fill_s": super::round(fill_s),
        "joins": readers.len(),
        "gateway_rss_before_mib": mib(before),
        "gateway_rss_peak_mib": mib(peak),
        "growth_per_join_mib": super::round(mib(peak.saturating_sub(before)) / readers.len() as f64),
        "replayed_to_one_reader": replayed,
        "first_replayed": first,
        "last_seq": last,
        "truncated_before": truncated_before,
    }))
}
