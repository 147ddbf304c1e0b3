//! Unread counts and pushes for the members who are not online.
//!
//! Per batch: the rooms' unmuted members (one query), their presence (one
//! batch direct get per 500 users), one INSERT for every unread bump, one query
//! each for devices and badge totals, then the pushes, concurrently up to a
//! bound. A message is acked when its pushes are done; if every push of a
//! message failed for a retryable reason (the provider is down) it is
//! redelivered later, up to `max_deliver` times.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use async_nats::jetstream;
use futures::StreamExt;

use super::{Delivery, Shared, keep_alive};
use crate::{
    bus::{
        envelope::{Kind, StoredMessage},
        presence::{self, Status},
        subjects::NOTIFIER_CONSUMER,
    },
    db::{self, rooms::Recipient, unread::Bump},
    ids::{RoomId, UserId},
    push::{Device, Outcome, Push},
};

struct Job {
    d: Delivery,
    room: RoomId,
    msg: StoredMessage,
}

pub(super) async fn handle(shared: Arc<Shared>, msgs: Vec<jetstream::Message>) -> Option<Duration> {
    let mut jobs = Vec::with_capacity(msgs.len());
    for d in msgs.into_iter().map(Delivery::new) {
        match d.parse() {
            Ok((room, msg)) => jobs.push(Job { d, room, msg }),
            Err(why) => d.give_up(&shared, NOTIFIER_CONSUMER, &why).await,
        }
    }
    if jobs.is_empty() {
        return None;
    }
    let deliveries: Vec<&Delivery> = jobs.iter().map(|j| &j.d).collect();
    let alive = keep_alive(&shared.nats, &deliveries, shared.settings.ack_wait);
    let pause = match process(&shared, &jobs).await {
        Ok(retry) => {
            settle(&shared, &jobs, &retry).await;
            None
        }
        Err(e) if !dependencies_up(&shared).await => {
            tracing::warn!(error = %e, messages = jobs.len(), "notifier paused: PostgreSQL or NATS is down");
            for job in &jobs {
                job.d.retry_later().await;
            }
            Some(Duration::from_secs(2))
        }
        Err(e) => {
            // Not an outage: one message may be at fault. Each is tried on its
            // own (a lone message is not tried again now), so only the culprit
            // is retried and, in the end, dead-lettered.
            if jobs.len() > 1 {
                tracing::warn!(error = %e, messages = jobs.len(), "notifier batch failed; trying its messages one by one");
            }
            let mut lone_error = (jobs.len() == 1).then_some(e);
            for job in jobs.chunks(1) {
                let result = match lone_error.take() {
                    Some(e) => Err(e),
                    None => process(&shared, job).await,
                };
                match result {
                    Ok(retry) => settle(&shared, job, &retry).await,
                    Err(e) if job[0].d.delivered >= shared.settings.max_deliver => {
                        job[0].d.give_up(&shared, NOTIFIER_CONSUMER, &format!("{e:#}")).await
                    }
                    Err(_) => job[0].d.retry_later().await,
                }
            }
            Some(Duration::from_millis(200))
        }
    };
    alive.abort();
    pause
}

/// Acks the finished jobs; redelivers later those whose pushes all failed.
async fn settle(shared: &Shared, jobs: &[Job], retry: &[bool]) {
    for (job, retry) in jobs.iter().zip(retry) {
        if *retry {
            let times = job.d.delivered.clamp(1, 6) as u32;
            job.d.retry_after(shared.settings.push_redelivery * times).await;
        } else {
            job.d.ack().await;
            shared.metrics.messages.inc();
        }
    }
}

/// While PostgreSQL or NATS is down nothing is dead-lettered: work waits.
async fn dependencies_up(shared: &Shared) -> bool {
    db::ping(&shared.db).await && shared.nats.connection_state() == async_nats::connection::State::Connected
}

/// Does the batch; returns, per job, whether to redeliver it later.
async fn process(shared: &Shared, jobs: &[Job]) -> anyhow::Result<Vec<bool>> {
    let db = &shared.db;
    let mut rooms: Vec<&str> = jobs.iter().map(|j| j.room.as_str()).collect();
    rooms.sort_unstable();
    rooms.dedup();
    let members = db::rooms::recipients(db, &rooms).await?;
    let mut by_room: HashMap<&str, Vec<&Recipient>> = HashMap::new();
    for m in &members {
        by_room.entry(m.room_id.as_str()).or_default().push(m);
    }
    // Members who have not read the message and did not write it.
    let candidates: Vec<Vec<&str>> = jobs
        .iter()
        .map(|j| {
            by_room
                .get(j.room.as_str())
                .into_iter()
                .flatten()
                .filter(|m| m.user_id != j.msg.from && (j.d.seq as i64) > m.last_read_seq)
                .map(|m| m.user_id.as_str())
                .collect()
        })
        .collect();
    let everyone: HashSet<&str> = candidates.iter().flatten().copied().collect();
    let offline = offline_users(shared, &everyone).await?;
    let targets: Vec<Vec<&str>> =
        candidates.into_iter().map(|c| c.into_iter().filter(|u| offline.contains(*u)).collect()).collect();

    let bumps: Vec<Bump> = jobs
        .iter()
        .zip(&targets)
        .flat_map(|(j, users)| {
            users.iter().map(|u| Bump { user: (*u).to_owned(), room: j.room.to_string(), seq: j.d.seq as i64 })
        })
        .collect();
    let added = db::unread::bump(db, &bumps).await?;
    shared.metrics.unread_bumps.inc_by(added);

    let mut users: Vec<&str> = targets.iter().flatten().copied().collect();
    users.sort_unstable();
    users.dedup();
    if users.is_empty() {
        return Ok(vec![false; jobs.len()]);
    }
    let devices = db::devices::of_users(db, &users).await?;
    if devices.is_empty() {
        return Ok(vec![false; jobs.len()]);
    }
    let totals = db::unread::totals(db, &users).await?;
    let mut devices_of: HashMap<&str, Vec<&Device>> = HashMap::new();
    for d in &devices {
        devices_of.entry(d.user.as_str()).or_default().push(d);
    }
    let previews: Vec<String> = jobs.iter().map(|j| preview(&j.msg)).collect();
    let mut pushes = Vec::new();
    for (i, (job, users)) in jobs.iter().zip(&targets).enumerate() {
        for user in users {
            let badge = totals.get(*user).copied().unwrap_or(0).clamp(0, u32::MAX as i64) as u32;
            for device in devices_of.get(user).into_iter().flatten() {
                let push = Push {
                    device,
                    room: job.room.as_str(),
                    seq: job.d.seq,
                    message_id: &job.msg.id,
                    from: &job.msg.from,
                    body: &previews[i],
                    badge,
                };
                pushes.push((i, push));
            }
        }
    }
    let pushers = &shared.pushers;
    // Futures built eagerly (not in a stream closure): the compiler cannot
    // prove a closure over borrowed pushes general enough for `tokio::spawn`.
    let sends: Vec<_> = pushes.into_iter().map(|(i, p)| send_one(pushers, i, p)).collect();
    let outcomes: Vec<(usize, &Device, Outcome)> =
        futures::stream::iter(sends).buffer_unordered(shared.settings.push.push_concurrency.max(1)).collect().await;

    let mut sent = vec![0usize; jobs.len()];
    let mut failed = vec![0usize; jobs.len()];
    let mut invalid = Vec::new();
    let mut ok = Vec::new();
    for (i, device, outcome) in &outcomes {
        shared.metrics.push(device.platform.as_str(), outcome.label());
        sent[*i] += 1;
        match outcome {
            Outcome::Delivered => ok.push((device.platform, device.token.clone())),
            Outcome::InvalidToken(why) => {
                tracing::info!(user = %device.user, platform = device.platform.as_str(), reason = %why, "device token invalid: removed");
                invalid.push((device.platform, device.token.clone()));
            }
            Outcome::Dropped(why) => {
                tracing::warn!(user = %device.user, platform = device.platform.as_str(), reason = %why, "push dropped");
            }
            Outcome::Failed(why) => {
                failed[*i] += 1;
                tracing::warn!(user = %device.user, platform = device.platform.as_str(), reason = %why, "push failed");
            }
        }
    }
    // Bookkeeping failures must not resend pushes that went out: log only.
    if let Err(e) = db::devices::delete_many(db, &invalid).await {
        tracing::warn!(error = %e, "cannot delete invalid devices (next push will try again)");
    }
    if let Err(e) = db::devices::mark_ok(db, &ok).await {
        tracing::warn!(error = %e, "cannot record last_ok of devices");
    }
    let max = shared.settings.max_deliver;
    Ok(jobs.iter().enumerate().map(|(i, j)| sent[i] > 0 && failed[i] == sent[i] && j.d.delivered < max).collect())
}

async fn send_one<'a>(pushers: &crate::push::Pushers, i: usize, p: Push<'a>) -> (usize, &'a Device, Outcome) {
    (i, p.device, pushers.send(&p).await)
}

/// Users whose presence counts as not reachable live: offline (or away, when
/// so configured), including users with no presence entry at all.
async fn offline_users(shared: &Shared, users: &HashSet<&str>) -> anyhow::Result<HashSet<String>> {
    let ids: Vec<UserId> = users.iter().filter_map(|u| UserId::parse(u).ok()).collect();
    let seen = presence::snapshot(&shared.nats, &ids).await.map_err(|e| anyhow::anyhow!("presence: {e}"))?;
    let away_counts = shared.settings.push_when_away;
    Ok(users
        .iter()
        .filter(|u| {
            let (status, _) = seen.view(u);
            status == Status::Offline || (away_counts && status == Status::Away)
        })
        .map(|u| (*u).to_owned())
        .collect())
}

/// The notification text: the body, shortened on a character boundary; an
/// image message says it is a photo, with its caption if it has one.
fn preview(msg: &StoredMessage) -> String {
    const MAX: usize = 180;
    let text = match msg.kind {
        Kind::Image if msg.body.is_empty() => return PHOTO.to_owned(),
        Kind::Image => format!("{PHOTO}: {}", msg.body),
        Kind::Text => msg.body.clone(),
    };
    if text.chars().count() <= MAX {
        return text;
    }
    let mut s: String = text.chars().take(MAX - 1).collect();
    s.push('…');
    s
}

/// How an image message shows in a push.
const PHOTO: &str = "📷 Photo";

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(body: &str, kind: Kind) -> StoredMessage {
        StoredMessage { id: "m".into(), from: "a".into(), ts: 0, body: body.into(), kind, attachment: None }
    }

    #[test]
    fn previews_are_short_and_cut_on_characters() {
        assert_eq!(preview(&msg("hi", Kind::Text)), "hi");
        let long = "é".repeat(500);
        let p = preview(&msg(&long, Kind::Text));
        assert_eq!(p.chars().count(), 180);
        assert!(p.ends_with('…'));
        assert_eq!(preview(&msg("", Kind::Image)), "📷 Photo");
        assert_eq!(preview(&msg("at the beach", Kind::Image)), "📷 Photo: at the beach");
        assert_eq!(preview(&msg(&long, Kind::Image)).chars().count(), 180);
    }
}
