//! `bench presence`: subjects on the first gateway change status; watchers on
//! the other gateway measure the time from the change to its delivery.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Args;
use futures::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::{connect, percentiles, presence_sub};
use crate::auth::Signer;

#[derive(Debug, Clone, Args)]
pub struct PresenceArgs {
    /// Users whose status changes (on the first gateway).
    #[arg(long, default_value_t = 50)]
    pub subjects: usize,
    /// Watchers subscribed to every subject (on the last gateway).
    #[arg(long, default_value_t = 50)]
    pub watchers: usize,
    /// Status changes per subject.
    #[arg(long, default_value_t = 10)]
    pub changes: usize,
    /// Pause between two changes (all subjects).
    #[arg(long, default_value = "20ms", value_parser = crate::config::parse_duration)]
    pub interval: Duration,
}

type Sent = Arc<Mutex<HashMap<String, (String, Instant)>>>;

pub async fn run(gateways: &[String], signer: &Signer, a: PresenceArgs) -> anyhow::Result<serde_json::Value> {
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let names: Vec<String> = (0..a.subjects).map(|i| format!("ps{run_id}-{i}")).collect();
    let sent: Sent = Arc::new(Mutex::new(HashMap::new()));
    let samples = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let watch_gw = gateways.last().expect("a gateway");

    // Watchers first, each subscribed to every subject, with the snapshot in.
    let mut readers = Vec::new();
    for w in 0..a.watchers {
        let mut ws = connect(watch_gw, signer, &format!("pw{run_id}-{w}")).await?;
        presence_sub(&mut ws, &names).await?;
        let (sent, samples) = (sent.clone(), samples.clone());
        readers.push(tokio::spawn(async move {
            while let Some(Ok(m)) = ws.next().await {
                let Message::Text(t) = m else { continue };
                let now = Instant::now();
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&t) else { continue };
                let (Some(user), Some(status)) = (v["user"].as_str(), v["status"].as_str()) else { continue };
                if let Some((want, at)) = sent.lock().get(user)
                    && want == status
                {
                    samples.lock().push(now - *at);
                }
            }
        }));
    }

    let mut subjects = Vec::new();
    for n in &names {
        subjects.push(connect(&gateways[0], signer, n).await?);
    }
    // Wait until every watcher has seen every subject online.
    tokio::time::sleep(Duration::from_secs(1)).await;
    samples.lock().clear();

    let started = Instant::now();
    for round in 0..a.changes {
        let status = if round % 2 == 0 { "away" } else { "online" };
        for (n, ws) in names.iter().zip(subjects.iter_mut()) {
            sent.lock().insert(n.clone(), (status.to_owned(), Instant::now()));
            ws.send(Message::text(json!({"type": "presence", "status": status}).to_string())).await?;
            tokio::time::sleep(a.interval).await;
        }
    }
    let expected = a.changes * a.subjects * a.watchers;
    let until = Instant::now() + Duration::from_secs(5);
    while samples.lock().len() < expected && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed();
    for r in readers {
        r.abort();
    }
    let mut got = samples.lock().clone();
    let mut out = json!({
        "scenario": "presence",
        "subjects": a.subjects,
        "watchers": a.watchers,
        "changes": a.changes * a.subjects,
        "expected": expected,
        "delivered": got.len(),
        "seconds": elapsed.as_secs_f64(),
    });
    let p = percentiles(&mut got);
    out.as_object_mut().expect("object").extend(p.as_object().expect("object").clone());
    Ok(out)
}
