//! `bench fanout`: R rooms × M members, the members of each room spread over
//! the gateways, one sender per room (a member that does not join), all
//! senders together at a fixed total rate, open loop. Every delivery is
//! checked (lost, duplicated, out of order) and timed from the send to the
//! receive on one monotonic clock (the sent instant travels in the body).
//!
//! `--saturate` runs steps of rising rate, each drained before the next, then
//! bisects between the highest step that held and the first that did not
//! (`--refine` times), and reports the highest step with p99 within the bound
//! and nothing lost.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use clap::Args;
use futures::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::{Ws, connect, create_rooms, extend, join, percentiles, procstat::Servers, round, run_id};
use crate::auth::Signer;

#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    /// Rooms.
    #[arg(long, default_value_t = 100)]
    pub rooms: usize,
    /// Receiving members per room (the sender is one more).
    #[arg(long, default_value_t = 10)]
    pub members: usize,
    /// Total messages per second over all rooms (the first step with `--saturate`).
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Measured time (per step with `--saturate`).
    #[arg(long, default_value = "10s", value_parser = crate::config::parse_duration)]
    pub duration: Duration,
    /// Unmeasured time at the first rate before measuring.
    #[arg(long, default_value = "2s", value_parser = crate::config::parse_duration)]
    pub warmup: Duration,
    /// Step the rate up until p99 exceeds `--p99-limit` or anything is lost.
    #[arg(long)]
    pub saturate: bool,
    /// Rate factor from one step to the next.
    #[arg(long, default_value_t = 1.3)]
    pub factor: f64,
    /// Most rising steps with `--saturate`.
    #[arg(long, default_value_t = 15)]
    pub max_steps: usize,
    /// Steps with `--saturate` that bisect (geometrically) between the highest
    /// rate that held and the lowest that did not, once one has failed.
    #[arg(long, default_value_t = 2)]
    pub refine: usize,
    /// The p99 bound of a sustained step.
    #[arg(long, default_value = "50ms", value_parser = crate::config::parse_duration)]
    pub p99_limit: Duration,
    /// Body bytes per message (the timestamp plus padding).
    #[arg(long, default_value_t = 64)]
    pub body_bytes: usize,
    /// Connections opened at once while setting up.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
}

/// One receiver's findings, drained by the driver after each step.
#[derive(Default)]
struct Recorder {
    samples: Mutex<Vec<Sample>>,
}

/// One delivery: its step, when it was sent (ms on the run's clock) and its
/// latency (µs).
#[derive(Clone, Copy)]
struct Sample {
    step: u16,
    sent_ms: u32,
    us: u32,
}

/// The width of the windows the tail is located in.
const WINDOW_MS: u32 = 100;

#[derive(Default)]
struct Counters {
    duplicates: AtomicU64,
    out_of_order: AtomicU64,
    acked: AtomicU64,
    send_errors: AtomicU64,
    closed: AtomicU64,
}

struct Step {
    rate: f64,
    sent: u64,
    expected: u64,
    delivered: u64,
    seconds: f64,
    latencies: Value,
    windows: Value,
    p99_ms: f64,
    cpu: Value,
    server_cpu_s: f64,
}

pub async fn run(gateways: &[String], signer: &Signer, servers: &Servers, a: FanoutArgs) -> anyhow::Result<Value> {
    anyhow::ensure!(a.rooms > 0 && a.members > 0 && a.rate > 0.0, "rooms, members and rate must be positive");
    let id = run_id();
    let rooms: Vec<(String, Vec<String>)> = (0..a.rooms)
        .map(|r| {
            let mut members = vec![format!("f{id}-{r}-s")];
            members.extend((0..a.members).map(|m| format!("f{id}-{r}-{m}")));
            (format!("f{id}-{r}"), members)
        })
        .collect();
    let t = Instant::now();
    create_rooms(gateways, signer, &rooms, 16).await?;
    let setup_rooms_s = t.elapsed().as_secs_f64();

    // Receivers: member m of room r on gateway (r + m) % G.
    let clock = Instant::now();
    let clock_unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
    let counters = Arc::new(Counters::default());
    let t = Instant::now();
    let plan: Vec<(String, String, String)> = rooms
        .iter()
        .enumerate()
        .flat_map(|(r, (room, members))| {
            members[1..]
                .iter()
                .enumerate()
                .map(move |(m, u)| (gateways[(r + m) % gateways.len()].clone(), u.clone(), room.clone()))
        })
        .collect();
    let receivers: Vec<(Ws, String)> = futures::stream::iter(plan)
        .map(|(gw, user, room)| async move {
            let mut ws = connect(&gw, signer, &user).await?;
            join(&mut ws, &room, None).await?;
            anyhow::Ok((ws, room))
        })
        .buffer_unordered(a.connect_concurrency.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let setup_receivers_s = t.elapsed().as_secs_f64();
    let recorders: Vec<Arc<Recorder>> = receivers
        .into_iter()
        .map(|(ws, _room)| {
            let rec = Arc::new(Recorder::default());
            tokio::spawn(receive(ws, rec.clone(), counters.clone(), clock));
            rec
        })
        .collect();

    // Senders: one per room, alternating gateways.
    let mut senders = Vec::new();
    for (r, (room, members)) in rooms.iter().enumerate() {
        let ws = connect(&gateways[r % gateways.len()], signer, &members[0]).await?;
        let (tx, rx) = ws.split();
        tokio::spawn(read_acks(rx, counters.clone()));
        senders.push((tx, room.clone()));
    }
    let senders = Arc::new(tokio::sync::Mutex::new(senders));

    let pad = "x".repeat(a.body_bytes.saturating_sub(24));
    let driver = Driver { servers, senders, recorders, clock, clock_unix_ms, pad, members: a.members };
    let mut steps: Vec<Step> = Vec::new();
    let mut rates = Rates::new(&a);
    let limit_ms = a.p99_limit.as_secs_f64() * 1000.0;
    // Step 0 is the warm-up at the first rate, never measured.
    let mut next = Some(a.rate);
    let mut step = 0u16;
    while let Some(rate) = next {
        let duration = if step == 0 { a.warmup } else { a.duration };
        if !duration.is_zero() {
            let s = driver.step(step, rate, duration).await?;
            if step > 0 {
                eprintln!(
                    "fanout step {step}: {rate:.0} msg/s, delivered {}/{}, p99 {} ms, server CPU {} s",
                    s.delivered, s.expected, s.p99_ms, s.server_cpu_s
                );
                rates.record(rate, s.held(limit_ms));
                steps.push(s);
            }
        }
        next = rates.next();
        step += 1;
    }

    let c = &counters;
    let mut out = json!({
        "scenario": if a.saturate { "fanout-saturate" } else { "fanout" },
        "rooms": a.rooms,
        "members": a.members,
        "gateways": gateways.len(),
        "connections": a.rooms * (a.members + 1),
        "setup_rooms_s": round(setup_rooms_s),
        "setup_receivers_s": round(setup_receivers_s),
        "duplicates": c.duplicates.load(Relaxed),
        "out_of_order": c.out_of_order.load(Relaxed),
        "send_errors": c.send_errors.load(Relaxed),
        "closed_receivers": c.closed.load(Relaxed),
    });
    let summary = |s: &Step| {
        let mut v = json!({
            "rate": round(s.rate),
            "sent": s.sent,
            "expected": s.expected,
            "delivered": s.delivered,
            "lost": s.expected.saturating_sub(s.delivered),
            "deliveries_per_s": round(s.delivered as f64 / s.seconds),
            "server_cpu_s_per_million": if s.delivered > 0 { round(s.server_cpu_s / s.delivered as f64 * 1e6) } else { 0.0 },
            "cpu": s.cpu,
        });
        extend(&mut v, s.latencies.clone());
        extend(&mut v, s.windows.clone());
        v
    };
    if a.saturate {
        let best = steps.iter().filter(|s| s.held(limit_ms)).max_by(|x, y| x.rate.total_cmp(&y.rate));
        extend(
            &mut out,
            json!({
                "p99_limit_ms": limit_ms,
                "max_sustained_rate": best.map(|s| round(s.rate)),
                "max_sustained_deliveries_per_s": best.map(|s| round(s.delivered as f64 / s.seconds)),
                "steps": steps.iter().map(summary).collect::<Vec<_>>(),
            }),
        );
    } else if let Some(s) = steps.first() {
        extend(&mut out, summary(s));
    }
    Ok(out)
}

impl Step {
    /// Everything delivered, with p99 within the bound.
    fn held(&self, limit_ms: f64) -> bool {
        self.delivered == self.expected && self.p99_ms <= limit_ms
    }
}

/// What every step of a run drives and reads.
struct Driver<'a> {
    servers: &'a Servers,
    senders: Arc<tokio::sync::Mutex<Vec<(super::WsTx, String)>>>,
    recorders: Vec<Arc<Recorder>>,
    clock: Instant,
    /// `clock`'s start in ms since the Unix epoch, to line the worst windows
    /// up with other records (the servers' logs, a CPU sampler).
    clock_unix_ms: u64,
    pad: String,
    members: usize,
}

impl Driver<'_> {
    /// One step at `rate` for `duration`, drained, with the servers' CPU over it.
    async fn step(&self, step: u16, rate: f64, duration: Duration) -> anyhow::Result<Step> {
        self.servers.reset_peaks();
        let before = self.servers.snapshot();
        let started = Instant::now();
        let sent = send_step(&self.senders, step, rate, duration, self.clock, &self.pad).await?;
        let seconds = started.elapsed().as_secs_f64();
        let expected = sent * self.members as u64;
        let samples = drain(&self.recorders, step, expected).await;
        let after = self.servers.snapshot();
        let delivered = samples.len() as u64;
        let windows = windows(&samples, WINDOW_MS, self.clock_unix_ms);
        let mut lat: Vec<Duration> = samples.iter().map(|s| Duration::from_micros(s.us as u64)).collect();
        let latencies = percentiles(&mut lat);
        let p99_ms = latencies["p99_ms"].as_f64().unwrap_or(f64::MAX);
        let cpu = self.servers.report(&before, &after);
        let server_cpu_s = cpu["server_cpu_s"].as_f64().unwrap_or(0.0);
        Ok(Step { rate, sent, expected, delivered, seconds, latencies, windows, p99_ms, cpu, server_cpu_s })
    }
}

/// The rates of the measured steps: one without `--saturate`; with it, rising
/// by `--factor` until a step fails (or `--max-steps`), then `--refine`
/// geometric bisections between the highest rate that held and the lowest
/// that did not.
struct Rates {
    first: f64,
    factor: f64,
    rising_left: usize,
    refine_left: usize,
    held: Option<f64>,
    failed: Option<f64>,
}

impl Rates {
    fn new(a: &FanoutArgs) -> Self {
        Rates {
            first: a.rate,
            factor: a.factor,
            rising_left: if a.saturate { a.max_steps.max(1) } else { 1 },
            refine_left: if a.saturate { a.refine } else { 0 },
            held: None,
            failed: None,
        }
    }

    /// The rate of the next measured step, if any.
    fn next(&mut self) -> Option<f64> {
        match (self.held, self.failed) {
            (held, None) if self.rising_left > 0 => {
                self.rising_left -= 1;
                Some(held.map_or(self.first, |h| h * self.factor))
            }
            (Some(held), Some(failed)) if self.refine_left > 0 => {
                self.refine_left -= 1;
                Some((held * failed).sqrt())
            }
            _ => None,
        }
    }

    fn record(&mut self, rate: f64, held: bool) {
        if held {
            self.held = Some(self.held.map_or(rate, |h| h.max(rate)));
        } else {
            self.failed = Some(self.failed.map_or(rate, |f| f.min(rate)));
        }
    }
}

/// Sends for `duration` at `rate` messages/s in total, spread evenly over the
/// senders on an absolute schedule (a late sender catches up). Answers the
/// number of messages written.
async fn send_step(
    senders: &Arc<tokio::sync::Mutex<Vec<(super::WsTx, String)>>>,
    step: u16,
    rate: f64,
    duration: Duration,
    clock: Instant,
    pad: &str,
) -> anyhow::Result<u64> {
    let mut guard = senders.lock().await;
    let n = guard.len();
    let period = Duration::from_secs_f64(n as f64 / rate);
    let start = tokio::time::Instant::now();
    let end = start + duration;
    let tasks = guard.iter_mut().enumerate().map(|(i, (tx, room))| async move {
        let mut next = start + period.mul_f64(i as f64 / n as f64);
        let mut k = 0u64;
        while next < end {
            tokio::time::sleep_until(next).await;
            let ns = clock.elapsed().as_nanos();
            let frame = format!(r#"{{"type":"send","room":"{room}","id":"{step}-{k}","body":"{step} {ns} {pad}"}}"#);
            tx.send(Message::text(frame)).await?;
            k += 1;
            next += period;
        }
        anyhow::Ok(k)
    });
    let sent: Vec<u64> = futures::future::try_join_all(tasks).await?;
    Ok(sent.into_iter().sum())
}

/// Waits until the step's deliveries are all in (or 5 s without progress),
/// then takes its samples out of every recorder.
async fn drain(recorders: &[Arc<Recorder>], step: u16, expected: u64) -> Vec<Sample> {
    let count =
        || -> u64 { recorders.iter().map(|r| r.samples.lock().iter().filter(|s| s.step == step).count() as u64).sum() };
    let mut last = 0;
    let mut quiet_since = Instant::now();
    loop {
        let n = count();
        if n >= expected || quiet_since.elapsed() > Duration::from_secs(5) {
            break;
        }
        if n != last {
            last = n;
            quiet_since = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut out = Vec::new();
    for r in recorders {
        let mut s = r.samples.lock();
        out.extend(s.iter().filter(|s| s.step == step));
        s.retain(|s| s.step > step);
    }
    out
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type")]
    ty: &'a str,
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    body: &'a str,
}

/// Seqs are stream sequences: increasing within a room, not contiguous. A seq
/// at or below the last one is a duplicate if it was seen lately, else out
/// of order; losses show in the counts.
async fn receive(mut ws: Ws, rec: Arc<Recorder>, counters: Arc<Counters>, clock: Instant) {
    const RECENT: usize = 512;
    let mut recent: std::collections::VecDeque<u64> = std::collections::VecDeque::with_capacity(RECENT);
    let mut last_seq = 0u64;
    while let Some(Ok(m)) = ws.next().await {
        let Message::Text(t) = m else { continue };
        let now = clock.elapsed().as_nanos();
        let Ok(f) = serde_json::from_str::<Frame>(&t) else { continue };
        if f.ty != "message" {
            continue;
        }
        if f.seq <= last_seq {
            if recent.contains(&f.seq) {
                counters.duplicates.fetch_add(1, Relaxed);
                continue;
            }
            counters.out_of_order.fetch_add(1, Relaxed);
        }
        last_seq = last_seq.max(f.seq);
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(f.seq);
        let mut parts = f.body.split(' ');
        let (Some(Ok(step)), Some(Ok(sent))) =
            (parts.next().map(str::parse::<u16>), parts.next().map(str::parse::<u128>))
        else {
            continue;
        };
        let us = (now.saturating_sub(sent) / 1000).min(u32::MAX as u128) as u32;
        let sent_ms = (sent / 1_000_000).min(u32::MAX as u128) as u32;
        rec.samples.lock().push(Sample { step, sent_ms, us });
    }
    counters.closed.fetch_add(1, Relaxed);
}

/// Where in time the tail is: the step cut by send time into windows of
/// `width_ms`, each window's p99, and the three worst windows (offset from
/// the step's first send, wall clock, p99 and max). A tail spread over every
/// window is queueing at that rate; one in a few windows is a pause.
fn windows(samples: &[Sample], width_ms: u32, clock_unix_ms: u64) -> Value {
    let Some(start) = samples.iter().map(|s| s.sent_ms).min() else {
        return json!({});
    };
    let mut by_window: std::collections::BTreeMap<u32, Vec<u32>> = Default::default();
    for s in samples {
        by_window.entry((s.sent_ms - start) / width_ms).or_default().push(s.us);
    }
    let mut rows: Vec<(u32, f64, f64)> = by_window
        .into_iter()
        .map(|(w, mut us)| {
            us.sort_unstable();
            let p99 = us[((us.len() - 1) as f64 * 0.99).round() as usize];
            (w * width_ms, p99 as f64 / 1000.0, us[us.len() - 1] as f64 / 1000.0)
        })
        .collect();
    let mut p99s: Vec<f64> = rows.iter().map(|r| r.1).collect();
    p99s.sort_unstable_by(f64::total_cmp);
    let median_p99 = p99s[p99s.len() / 2];
    rows.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    json!({
        "window_ms": width_ms,
        "windows": p99s.len(),
        "window_p99_median_ms": round(median_p99),
        "windows_p99_over_10ms": p99s.iter().filter(|&&p| p > 10.0).count(),
        "worst_windows": rows.iter().take(3).map(|&(at, p99, max)| json!({
            "at_ms": at, "unix_ms": clock_unix_ms + (start + at) as u64, "p99_ms": round(p99), "max_ms": round(max),
        })).collect::<Vec<_>>(),
    })
}

async fn read_acks(mut rx: futures::stream::SplitStream<Ws>, counters: Arc<Counters>) {
    while let Some(Ok(m)) = rx.next().await {
        let Message::Text(t) = m else { continue };
        if t.contains(r#""type":"ack""#) {
            counters.acked.fetch_add(1, Relaxed);
        } else if t.contains(r#""type":"error""#) {
            counters.send_errors.fetch_add(1, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: FanoutArgs,
    }

    /// Runs the plan against a system that holds up to `limit` msg/s.
    fn plan(args: &[&str], limit: f64) -> Vec<f64> {
        let a = Cli::parse_from(std::iter::once("bench").chain(args.iter().copied())).a;
        let mut rates = Rates::new(&a);
        let mut out = Vec::new();
        while let Some(r) = rates.next() {
            rates.record(r, r <= limit);
            out.push((r * 10.0).round() / 10.0);
        }
        out
    }

    #[test]
    fn windows_locate_a_pause_among_quiet_windows() {
        // 1 s of sends, one per ms at 1 ms latency, except 40 ms from 300 ms on at 30 ms.
        let samples: Vec<Sample> = (0..1000u32)
            .map(|t| Sample { step: 1, sent_ms: 5000 + t, us: if (300..340).contains(&t) { 30_000 } else { 1000 } })
            .collect();
        let w = windows(&samples, 100, 1_000_000);
        assert_eq!(w["windows"], 10);
        assert_eq!(w["window_p99_median_ms"], 1.0);
        assert_eq!(w["windows_p99_over_10ms"], 1);
        assert_eq!(w["worst_windows"][0]["at_ms"], 300);
        assert_eq!(w["worst_windows"][0]["unix_ms"], 1_005_300);
        assert_eq!(w["worst_windows"][0]["max_ms"], 30.0);
        assert_eq!(w["worst_windows"][1]["p99_ms"], 1.0);
        assert_eq!(windows(&[], 100, 0), json!({}));
    }

    #[test]
    fn one_step_without_saturate() {
        assert_eq!(plan(&["--rate", "100"], 50.0), vec![100.0]);
        assert_eq!(plan(&["--rate", "100"], 500.0), vec![100.0]);
    }

    #[test]
    fn saturate_rises_until_a_step_fails_then_bisects_between_held_and_failed() {
        // 100, 200, 400 (fails), then sqrt(200*400)=282.8 (fails), sqrt(200*282.8)=237.8 (holds).
        let steps = plan(&["--rate", "100", "--factor", "2", "--saturate", "--refine", "2"], 250.0);
        assert_eq!(steps, vec![100.0, 200.0, 400.0, 282.8, 237.8]);
    }

    #[test]
    fn saturate_stops_at_max_steps_and_without_a_held_step_does_not_bisect() {
        let steps = plan(&["--rate", "100", "--factor", "2", "--saturate", "--max-steps", "3"], 1e9);
        assert_eq!(steps, vec![100.0, 200.0, 400.0]);
        assert_eq!(plan(&["--rate", "100", "--saturate"], 50.0), vec![100.0]);
    }
}
