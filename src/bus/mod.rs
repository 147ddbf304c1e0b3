//! Everything that travels over NATS: subject names (`subjects`), the CHAT
//! stream's setup (`streams`), the attachments object store (`objects`), the
//! stored message format (`envelope`), and reads of the stream by batch direct
//! get (`directget`).

pub mod directget;
pub mod envelope;
pub mod messages;
pub mod objects;
pub mod presence;
pub mod streams;
pub mod subjects;

use std::time::Duration;

use anyhow::Context;

use crate::config::NatsSettings;

/// Counts (re)connections: a change means the connection came back and core
/// messages sent meanwhile may be lost (room tails and presence are re-read).
pub type Reconnects = tokio::sync::watch::Receiver<u64>;

/// Runs a start-up request (creating or updating a stream or bucket, which
/// is idempotent) with `js` given a 10 s timeout, up to three times, 1 s
/// apart. A cluster still placing replicas can answer after a request's
/// default 5 s (seen: the presence bucket, three nodes on two busy cores),
/// and a request made around a meta-leader election can go unanswered (seen:
/// the CHAT stream, no answer within 30 s, under the full test suite's
/// load). The handles kept for normal work come from `js` itself, with the
/// default timeout.
pub async fn setup<T, E, F, Fut>(js: &async_nats::jetstream::Context, mut request: F) -> Result<T, E>
where
    F: FnMut(async_nats::jetstream::Context) -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    const TRIES: u32 = 3;
    let mut js = js.clone();
    js.set_timeout(std::time::Duration::from_secs(10));
    let mut tried = 1;
    loop {
        match request(js.clone()).await {
            Err(e) if tried < TRIES => {
                tracing::warn!(error = %e, tried, "start-up request to JetStream failed; trying again");
                tried += 1;
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            done => return done,
        }
    }
}

/// Connects to NATS, failing within a few seconds when no server answers.
/// Once connected the client reconnects by itself forever.
pub async fn connect(s: &NatsSettings, name: &str) -> anyhow::Result<(async_nats::Client, Reconnects)> {
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    let servers: Vec<async_nats::ServerAddr> = s
        .nats_url
        .split(',')
        .map(|u| u.trim().parse().with_context(|| format!("NATTER_NATS_URL: {u:?} is not a NATS URL")))
        .collect::<anyhow::Result<_>>()?;
    let options = match (&s.nats_user, &s.nats_password) {
        (Some(user), Some(pass)) => {
            async_nats::ConnectOptions::with_user_and_password(user.clone(), pass.expose().to_owned())
        }
        (None, None) => async_nats::ConnectOptions::new(),
        _ => anyhow::bail!("NATTER_NATS_USER and NATTER_NATS_PASSWORD go together"),
    };
    let events = move |ev: async_nats::Event| {
        let tx = tx.clone();
        async move {
            match ev {
                async_nats::Event::Connected => tx.send_modify(|n| *n += 1),
                async_nats::Event::SlowConsumer(sid) => tracing::warn!(sid, "NATS subscription overflowed"),
                other => tracing::info!(event = %other, "NATS connection event"),
            }
        }
    };
    let client = options
        .event_callback(events)
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .subscription_capacity(16 * 1024)
        .retain_servers_order()
        .connect(servers.as_slice())
        .await
        .with_context(|| format!("cannot connect to NATS at {}", s.nats_url))?;
    Ok((client, rx))
}

/// Whether the stream `name` does not exist (lost with its storage, or
/// deleted); `false` when it exists or NATS cannot say. A send or write
/// that got "no responders" asks this before anything is made again: in a
/// cluster, a stream between leaders can answer that way too.
pub async fn stream_gone(js: &async_nats::jetstream::Context, name: &str) -> bool {
    js.get_stream(name).await.is_err_and(|e| is_stream_not_found(&e))
}

/// Whether a stream lookup failed because the stream does not exist.
pub fn is_stream_not_found(e: &async_nats::jetstream::context::GetStreamError) -> bool {
    use async_nats::jetstream::{ErrorCode, context::GetStreamErrorKind};
    matches!(e.kind(), GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND)
}
