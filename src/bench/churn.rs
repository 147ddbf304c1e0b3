//! `bench churn`: a connect/disconnect storm. Each cycle connects a user
//! (alternating gateways, as a phone hopping networks behind a balancer),
//! authenticates, rejoins its room with `since` (resume) and closes. A
//! watcher subscribed to every churning user counts the presence frames the
//! storm causes: with the presence grace, a user who is back within it should
//! cause none.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use clap::Args;
use futures::StreamExt;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::{connect, create_rooms, extend, join, percentiles, presence_sub, procstat::Servers, round, run_id};
use crate::auth::Signer;

#[derive(Debug, Clone, Args)]
pub struct ChurnArgs {
    /// Connect–join–close cycles per second (open loop, bounded by `--concurrency`).
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// How long the storm lasts.
    #[arg(long, default_value = "10s", value_parser = crate::config::parse_duration)]
    pub duration: Duration,
    /// Distinct users cycling (the watcher subscribes to all of them; 1 000
    /// still ends in a timeout in this scenario, not yet understood).
    #[arg(long, default_value_t = 500)]
    pub users: usize,
    /// Members per room.
    #[arg(long, default_value_t = 10)]
    pub room_size: usize,
    /// Cycles in flight at most.
    #[arg(long, default_value_t = 512)]
    pub concurrency: usize,
}

#[derive(Default)]
struct Tally {
    done: AtomicU64,
    failed: AtomicU64,
    presence_frames: AtomicU64,
}

pub async fn run(gateways: &[String], signer: &Signer, servers: &Servers, a: ChurnArgs) -> anyhow::Result<Value> {
    anyhow::ensure!(a.users > 0 && a.rate > 0.0, "users and rate must be positive");
    let id = run_id();
    let size = a.room_size.max(1);
    let users: Arc<Vec<String>> = Arc::new((0..a.users).map(|i| format!("c{id}-{i}")).collect());
    let rooms: Vec<(String, Vec<String>)> =
        users.chunks(size).enumerate().map(|(r, m)| (format!("c{id}-{r}"), m.to_vec())).collect();
    create_rooms(gateways, signer, &rooms, 16).await?;
    let rooms: Arc<Vec<String>> = Arc::new(rooms.into_iter().map(|(r, _)| r).collect());

    // The watcher: subscribed to every user, its snapshot (all offline) read.
    let tally = Arc::new(Tally::default());
    let mut watcher = connect(&gateways[0], signer, &format!("c{id}-watcher")).await?;
    presence_sub(&mut watcher, &users).await?;
    let counting = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watch = {
        let (tally, counting) = (tally.clone(), counting.clone());
        tokio::spawn(async move {
            while let Some(Ok(m)) = watcher.next().await {
                if let Message::Text(t) = m
                    && t.contains(r#""type":"presence""#)
                    && counting.load(Relaxed)
                {
                    tally.presence_frames.fetch_add(1, Relaxed);
                }
            }
        })
    };

    let last_seq: Arc<Mutex<Vec<Option<u64>>>> = Arc::new(Mutex::new(vec![None; a.users]));
    let latencies = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let permits = Arc::new(tokio::sync::Semaphore::new(a.concurrency.max(1)));
    let gateways: Arc<Vec<String>> = Arc::new(gateways.to_vec());
    let signer = Arc::new(signer.clone());

    let before = servers.snapshot();
    let started = Instant::now();
    let total = (a.rate * a.duration.as_secs_f64()).round() as u64;
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..total {
        let due = started + Duration::from_secs_f64(k as f64 / a.rate);
        tokio::time::sleep_until(due.into()).await;
        let permit = permits.clone().acquire_owned().await?;
        let (users, rooms, gateways, signer) = (users.clone(), rooms.clone(), gateways.clone(), signer.clone());
        let (last_seq, latencies, tally, first_error) =
            (last_seq.clone(), latencies.clone(), tally.clone(), first_error.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let u = (k as usize) % users.len();
            let gw = &gateways[(k as usize / users.len() + u) % gateways.len()];
            let t = Instant::now();
            let since = last_seq.lock()[u];
            let cycle = async {
                let mut ws = connect(gw, &signer, &users[u]).await?;
                let last = join(&mut ws, &rooms[u / size], since).await?;
                let _ = ws.close(None).await;
                anyhow::Ok(last)
            };
            match cycle.await {
                Ok(last) => {
                    latencies.lock().push(t.elapsed());
                    last_seq.lock()[u] = Some(last);
                    tally.done.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    tally.failed.fetch_add(1, Relaxed);
                    first_error.lock().get_or_insert_with(|| format!("{e:#}"));
                }
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let seconds = started.elapsed().as_secs_f64();
    let after = servers.snapshot();
    // Frames caused by the storm, not by its end (users going offline after the grace).
    counting.store(false, Relaxed);
    watch.abort();

    let done = tally.done.load(Relaxed);
    let frames = tally.presence_frames.load(Relaxed);
    let mut out = json!({
        "scenario": "churn",
        "gateways": gateways.len(),
        "users": a.users,
        "target_rate": a.rate,
        "cycles": done,
        "failed_handshakes": tally.failed.load(Relaxed),
        "first_error": *first_error.lock(),
        "seconds": round(seconds),
        "cycles_per_s": round(done as f64 / seconds),
        "connects_per_s_per_gateway": round(done as f64 / seconds / gateways.len() as f64),
        "presence_frames_to_watcher": frames,
        "presence_frames_per_cycle": round(frames as f64 / done.max(1) as f64),
    });
    extend(&mut out, percentiles(&mut latencies.lock()));
    extend(&mut out, json!({"cpu": servers.report(&before, &after)}));
    Ok(out)
}
