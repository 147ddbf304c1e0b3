//! `bench resume`: a client joins a room and goes away; another member sends
//! `--messages` messages; the client reconnects (to the other gateway) and
//! rejoins with `since` = the last seq it had. Figures: time from sending
//! `join` to the last replayed message, and from opening the socket, with
//! every missed message checked to arrive once and in order.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::{connect, create_rooms, extend, join, percentiles, run_id};
use crate::auth::Signer;

#[derive(Debug, Clone, Args)]
pub struct ResumeArgs {
    /// Messages missed while away.
    #[arg(long, default_value_t = 1000)]
    pub messages: usize,
    /// Repetitions (each in a fresh room).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Milliseconds the client stays away after the messages are sent. With
    /// a room window (`NATTER_STREAM_MAX_PER_ROOM`) below `--messages`, a few
    /// seconds let the archiver trim the room, so the replay reads the archive.
    #[arg(long, default_value_t = 0)]
    pub away_ms: u64,
}

pub async fn run(gateways: &[String], signer: &Signer, a: ResumeArgs) -> anyhow::Result<Value> {
    let id = run_id();
    let mut from_join = Vec::new();
    let mut from_connect = Vec::new();
    for run in 0..a.runs.max(1) {
        let (room, reader, sender) = (format!("r{id}-{run}"), format!("r{id}-{run}-reader"), format!("r{id}-{run}-s"));
        create_rooms(gateways, signer, &[(room.clone(), vec![sender.clone(), reader.clone()])], 1).await?;
        let first = &gateways[0];
        let other = gateways.last().context("a gateway")?;

        let mut ws = connect(first, signer, &reader).await?;
        let since = join(&mut ws, &room, None).await?;
        ws.close(None).await?;

        let seqs = send_all(first, signer, &sender, &room, a.messages, |i| format!("missed {i}")).await?;
        tokio::time::sleep(Duration::from_millis(a.away_ms)).await;

        let t_connect = Instant::now();
        let mut ws = connect(other, signer, &reader).await?;
        let t_join = Instant::now();
        join(&mut ws, &room, Some(since)).await?;
        let mut got = Vec::with_capacity(seqs.len());
        let last = *seqs.last().context("nothing sent")?;
        while got.last() != Some(&last) {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await? {
                Some(Ok(Message::Text(t))) if t.contains(r#""type":"message""#) => {
                    let v: Value = serde_json::from_str(&t)?;
                    got.push(v["seq"].as_u64().context("message without seq")?);
                }
                Some(Ok(_)) => {}
                _ => anyhow::bail!("closed while replaying"),
            }
        }
        from_join.push(t_join.elapsed());
        from_connect.push(t_connect.elapsed());
        anyhow::ensure!(
            got == seqs,
            "replay differs: {} messages, {} replayed (in order, once each expected)",
            seqs.len(),
            got.len()
        );
        let _ = ws.close(None).await;
    }
    let mut out = json!({"scenario": "resume", "messages": a.messages, "away_ms": a.away_ms, "runs": from_join.len(), "checked": "every message once, in order"});
    extend(&mut out, json!({"from_join": percentiles(&mut from_join), "from_connect": percentiles(&mut from_connect)}));
    let median = out["from_join"]["p50_ms"].clone();
    extend(&mut out, json!({"median_ms": median}));
    Ok(out)
}

/// Sends `n` messages over one socket, pipelined, and answers their seqs in
/// order; `body(i)` is the body of the `i`-th.
pub async fn send_all(
    gw: &str,
    signer: &Signer,
    user: &str,
    room: &str,
    n: usize,
    body: impl Fn(usize) -> String + Send + 'static,
) -> anyhow::Result<Vec<u64>> {
    let ws = connect(gw, signer, user).await?;
    let (mut tx, mut rx) = ws.split();
    let room_owned = room.to_owned();
    let writer = tokio::spawn(async move {
        for i in 0..n {
            let f = json!({"type": "send", "room": room_owned, "id": format!("m{i}"), "body": body(i)});
            tx.send(Message::text(f.to_string())).await?;
        }
        anyhow::Ok(tx)
    });
    let mut seqs = vec![0u64; n];
    let mut acked = 0;
    while acked < n {
        match tokio::time::timeout(Duration::from_secs(10), rx.next()).await? {
            Some(Ok(Message::Text(t))) if t.contains(r#""type":"ack""#) => {
                let v: Value = serde_json::from_str(&t)?;
                let i: usize = v["id"]
                    .as_str()
                    .and_then(|s| s.strip_prefix('m'))
                    .and_then(|s| s.parse().ok())
                    .context("ack id")?;
                seqs[i] = v["seq"].as_u64().context("ack seq")?;
                acked += 1;
            }
            Some(Ok(Message::Text(t))) if t.contains(r#""type":"error""#) => anyhow::bail!("send refused: {t}"),
            Some(Ok(_)) => {}
            _ => anyhow::bail!("sender closed"),
        }
    }
    let mut tx = writer.await??;
    let _ = tx.close().await;
    seqs.sort_unstable();
    Ok(seqs)
}
