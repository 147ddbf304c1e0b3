//! `bench notifier`: notifier throughput against the push emulator. A sender
//! posts messages to a room whose other members never connect (offline), each
//! with devices; the run measures how fast every message is counted unread for
//! every member and pushed to every device, whatever number of notifier
//! replicas is running.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use serde_json::{Value, json};

use super::procstat::{Role, Servers};
use crate::auth::Signer;

#[derive(Debug, Clone, Args)]
pub struct NotifierArgs {
    /// Base URL of the push emulator the notifiers send to (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8090")]
    pub emulator: String,
    /// Messages to send.
    #[arg(long, default_value_t = 2000)]
    pub messages: usize,
    /// Offline members of the room (each counts every message).
    #[arg(long, default_value_t = 10)]
    pub recipients: usize,
    /// Devices per member, alternately APNS and FCM (0 = unread counts only).
    #[arg(long, default_value_t = 1)]
    pub devices: usize,
    /// HTTP sends in flight.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Give up after this long.
    #[arg(long, default_value = "120s", value_parser = crate::config::parse_duration)]
    pub timeout: Duration,
}

pub async fn run(gateways: &[String], signer: &Signer, servers: &Servers, a: NotifierArgs) -> anyhow::Result<Value> {
    let emulator = super::parse_gateways(&a.emulator)?.pop().context("--emulator")?;
    let http = reqwest::Client::new();
    let gw = format!("http://{}", gateways.first().context("a gateway")?);
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let room = format!("bn{run_id}");
    let sender = format!("bn{run_id}-sender");
    let members: Vec<String> = (0..a.recipients).map(|i| format!("bn{run_id}-{i}")).collect();
    let bearer = |user: &str| signer.mint(user, Duration::from_secs(3600), None);

    let r = http
        .post(format!("{gw}/v1/rooms"))
        .bearer_auth(bearer(&sender)?)
        .json(&json!({"id": room, "members": members}))
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "create room: {}", r.status());
    for (i, m) in members.iter().enumerate() {
        for d in 0..a.devices {
            let platform = if (i + d) % 2 == 0 { "apns" } else { "fcm" };
            let token = format!("{run_id}{i:06}{d:04}");
            let r = http
                .post(format!("{gw}/v1/devices"))
                .bearer_auth(bearer(m)?)
                .json(&json!({"platform": platform, "token": token}))
                .send()
                .await?;
            anyhow::ensure!(r.status().is_success(), "register device: {}", r.status());
        }
    }
    let pushes_before = emulator_ok(&http, &emulator).await?;
    let want_pushes = (a.messages * a.recipients * a.devices) as u64;

    let before = servers.snapshot();
    let started = Instant::now();
    let sender_token = bearer(&sender)?;
    let sent: Vec<anyhow::Result<()>> = futures::stream::iter(0..a.messages)
        .map(|i| {
            let (http, gw, room, token) = (&http, &gw, &room, &sender_token);
            async move {
                let r = http
                    .post(format!("{gw}/v1/rooms/{room}/messages"))
                    .bearer_auth(token)
                    .json(&json!({"id": format!("m{i}"), "body": format!("bench message {i}")}))
                    .send()
                    .await?;
                anyhow::ensure!(r.status().is_success(), "send: {}", r.status());
                Ok(())
            }
        })
        .buffer_unordered(a.concurrency.max(1))
        .collect()
        .await;
    sent.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let sent_in = started.elapsed();

    // Done when the last member has every message unread and every push is in.
    let last = members.last().context("--recipients must be at least 1")?;
    let last_token = bearer(last)?;
    let mut unread_done = None;
    let mut pushes_done = if want_pushes == 0 { Some(Duration::ZERO) } else { None };
    while unread_done.is_none() || pushes_done.is_none() {
        anyhow::ensure!(started.elapsed() < a.timeout, "timed out: unread {unread_done:?}, pushes {pushes_done:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        if unread_done.is_none() {
            let v: Value = http.get(format!("{gw}/v1/unread")).bearer_auth(&last_token).send().await?.json().await?;
            if v["total"].as_u64() == Some(a.messages as u64) {
                unread_done = Some(started.elapsed());
            }
        }
        if pushes_done.is_none() && emulator_ok(&http, &emulator).await? - pushes_before >= want_pushes {
            pushes_done = Some(started.elapsed());
        }
    }
    let after = servers.snapshot();
    let (unread_done, pushes_done) = (unread_done.unwrap_or_default(), pushes_done.unwrap_or_default());
    let total = unread_done.max(pushes_done).as_secs_f64();
    let per_s = |n: f64, t: f64| if t > 0.0 { (n / t).round() } else { 0.0 };
    let mut out = json!({
        "scenario": "notifier",
        "messages": a.messages,
        "recipients": a.recipients,
        "devices_per_recipient": a.devices,
        "unread_bumps": a.messages * a.recipients,
        "pushes": want_pushes,
        "send_s": sent_in.as_secs_f64(),
        "unread_done_s": unread_done.as_secs_f64(),
        "pushes_done_s": pushes_done.as_secs_f64(),
        "messages_per_s": per_s(a.messages as f64, total),
        "unread_bumps_per_s": per_s((a.messages * a.recipients) as f64, unread_done.as_secs_f64()),
        "pushes_per_s": per_s(want_pushes as f64, pushes_done.as_secs_f64()),
    });
    if servers.count(Role::Notifier) > 0 {
        // Throughput per CPU second of the notifiers: what a replica does
        // with a core of its own, whatever the machine's other processes take.
        let cpu = servers.cpu_of(Role::Notifier, &before, &after);
        super::extend(
            &mut out,
            json!({
                "notifiers": servers.count(Role::Notifier),
                "notifier_cpu_s": super::round(cpu),
                "pushes_per_notifier_cpu_s": per_s(want_pushes as f64, cpu),
                "unread_bumps_per_notifier_cpu_s": per_s((a.messages * a.recipients) as f64, cpu),
                "cpu": servers.report(&before, &after),
            }),
        );
    }
    Ok(out)
}

/// Successful pushes the emulator has recorded so far (both providers).
async fn emulator_ok(http: &reqwest::Client, emulator: &str) -> anyhow::Result<u64> {
    let v: Value = http.get(format!("http://{emulator}/emulator/stats")).send().await?.json().await?;
    Ok(v["apns"]["ok"].as_u64().unwrap_or(0) + v["fcm"]["ok"].as_u64().unwrap_or(0))
}
