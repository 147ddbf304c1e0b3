//! The notifier: what happens to a message for members who are not online.
//!
//! Every replica pulls from the durable consumer `notifier` on the CHAT stream
//! (competing consumers: each message goes to one replica), counts it unread
//! for offline members and pushes it to their devices (`deliver.rs`). The
//! durable consumer `archiver` copies every message into PostgreSQL
//! (`archive.rs`), and keeps the stream's window per room (`trim.rs`). Both
//! ack a message only when its work is done.

mod archive;
mod deliver;
pub mod metrics;
mod trim;

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context;
use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
};
use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use futures::StreamExt;
use serde_json::json;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    bus::{
        self,
        subjects::{self, ARCHIVER_CONSUMER, NOTIFIER_CONSUMER},
    },
    config::NotifierSettings,
    push::Pushers,
};

/// What both loops share.
pub(crate) struct Shared {
    pub settings: NotifierSettings,
    pub db: PgPool,
    pub nats: async_nats::Client,
    pub pushers: Pushers,
    pub metrics: metrics::Metrics,
    /// The rooms the archiver wrote to, for the window's trim.
    pub trim: trim::Due,
    /// Consumer loops waiting to bind their consumer again (not ready).
    pub unbound: std::sync::atomic::AtomicUsize,
}

pub struct Notifier {
    listener: TcpListener,
    shared: Arc<Shared>,
    js: jetstream::Context,
}

/// `natter notifier`: runs until a signal.
pub async fn run(settings: NotifierSettings, stop: CancellationToken) -> anyhow::Result<()> {
    Notifier::build(settings).await?.run_until_stopped(stop).await
}

impl Notifier {
    /// Checks settings, connects to PostgreSQL and NATS, loads the push
    /// credentials and binds the health listener. Fails with a one-line reason.
    pub async fn build(settings: NotifierSettings) -> anyhow::Result<Self> {
        if settings.batch == 0 || settings.pipeline == 0 || settings.max_deliver < 1 {
            anyhow::bail!(
                "NATTER_NOTIFIER_BATCH, NATTER_NOTIFIER_PIPELINE and NATTER_NOTIFIER_MAX_DELIVER must be at least 1"
            );
        }
        let pushers = Pushers::from_settings(&settings.push).await?;
        let db = crate::db::connect(&settings.db).await?;
        let (nats, _) = bus::connect(&settings.nats, "natter-notifier").await?;
        let js = jetstream::new(nats.clone());
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("cannot listen on {}", settings.listen))?;
        let metrics = metrics::Metrics::default();
        let trim = trim::Due::default();
        Ok(Self {
            listener,
            shared: Arc::new(Shared { settings, db, nats, pushers, metrics, trim, unbound: Default::default() }),
            js,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    /// Works until `stop`: finishes the batch in hand, then drains NATS.
    pub async fn run_until_stopped(self, stop: CancellationToken) -> anyhow::Result<()> {
        let Self { listener, shared, js } = self;
        tracing::info!(addr = %listener.local_addr()?, "notifier listening");
        let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
        let app = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics_text))
            .with_state(Health { shared: shared.clone(), ready: ready_rx });
        let http_stop = stop.clone();
        let http = tokio::spawn(async move {
            axum::serve(listener, app).with_graceful_shutdown(http_stop.cancelled_owned()).await
        });

        let Some(stream) = wait_for_stream(&js, &stop).await else {
            return Ok(());
        };
        let notifier = Binding::new(&js, &stream, notifier_consumer(&shared.settings)).await?;
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(lag_gauge(shared.clone(), stream.clone(), NOTIFIER_CONSUMER, stop.clone()));
        tasks.spawn(consume(shared.clone(), notifier, stop.clone(), deliver::handle));
        if shared.settings.archive {
            let archiver = Binding::new(&js, &stream, archiver_consumer()).await?;
            tasks.spawn(lag_gauge(shared.clone(), stream.clone(), ARCHIVER_CONSUMER, stop.clone()));
            tasks.spawn(consume(shared.clone(), archiver, stop.clone(), archive::handle));
            tasks.spawn(trim::run(shared.clone(), stream.clone(), stop.clone()));
        }
        ready_tx.send_replace(true);
        tracing::info!(archive = shared.settings.archive, "notifier consuming");
        while tasks.join_next().await.is_some() {}
        ready_tx.send_replace(false);
        let _ = http.await;
        if tokio::time::timeout(Duration::from_secs(5), shared.nats.drain()).await.is_err() {
            tracing::warn!("NATS drain did not finish in 5 s");
        }
        tracing::info!("notifier stopped");
        Ok(())
    }
}

/// The notifier may not create the stream (nats.conf): wait for a gateway to.
async fn wait_for_stream(js: &jetstream::Context, stop: &CancellationToken) -> Option<jetstream::stream::Stream> {
    let mut logged = false;
    loop {
        match js.get_stream(subjects::CHAT_STREAM).await {
            Ok(s) => return Some(s),
            Err(e) if !logged => {
                tracing::warn!(error = %e, "waiting for the CHAT stream (a gateway creates it)");
                logged = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// A durable consumer on the CHAT stream, bound again when it is gone: the
/// stream was lost and a gateway made it anew, or the consumer was deleted.
/// Running replicas carry on without a restart.
struct Binding {
    js: jetstream::Context,
    config: pull::Config,
    /// When the stream bound on was created. A stream created later was made
    /// anew, and every message in it is new to this consumer.
    stream_created: async_nats::datetime::DateTime,
    consumer: PullConsumer,
}

impl Binding {
    async fn new(
        js: &jetstream::Context,
        stream: &jetstream::stream::Stream,
        config: pull::Config,
    ) -> anyhow::Result<Self> {
        // A stream with a first seq of its own was made anew after a loss
        // (`bus::streams::ensure_chat`): a consumer missing from it went
        // with the old one, and everything in it is new to this consumer.
        let made_anew = stream.cached_info().config.first_sequence.is_some_and(|first| first > 1);
        let consumer = bind(stream, config.clone(), made_anew).await?;
        let stream_created = stream.cached_info().created;
        Ok(Self { js: js.clone(), config, stream_created, consumer })
    }

    /// Binds again, waiting for the stream to exist; `false` at stop.
    async fn rebind(&mut self, stop: &CancellationToken) -> bool {
        let name = self.config.durable_name.clone().unwrap_or_default();
        let mut logged = false;
        loop {
            match self.try_rebind().await {
                Ok(true) => {
                    tracing::warn!(consumer = name, "the CHAT stream was made anew: consumer bound from its start");
                    return true;
                }
                Ok(false) => return true,
                Err(e) if !logged => {
                    tracing::warn!(consumer = name, error = format!("{e:#}"), "cannot bind the consumer; retrying");
                    logged = true;
                }
                Err(_) => {}
            }
            pause(stop, Duration::from_secs(1)).await;
            if stop.is_cancelled() {
                return false;
            }
        }
    }

    /// Whether the stream was made anew since the last bind.
    async fn try_rebind(&mut self) -> anyhow::Result<bool> {
        let stream = self.js.get_stream(subjects::CHAT_STREAM).await?;
        let created = stream.cached_info().created;
        let anew = created != self.stream_created;
        self.consumer = bind(&stream, self.config.clone(), anew).await?;
        self.stream_created = created;
        Ok(anew)
    }
}

/// Creates the consumer, or updates an existing one to `config` while
/// keeping where it delivers from (the server refuses to change that). A
/// consumer made on a stream `made_anew` delivers all of it: those messages
/// were sent after the loss, and none was pushed yet.
async fn bind(
    stream: &jetstream::stream::Stream,
    mut config: pull::Config,
    made_anew: bool,
) -> anyhow::Result<PullConsumer> {
    let name = config.durable_name.clone().unwrap_or_default();
    match stream.consumer_info(&name).await {
        Ok(existing) => config.deliver_policy = existing.config.deliver_policy,
        Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => {
            if made_anew {
                config.deliver_policy = DeliverPolicy::All;
            }
        }
        Err(e) => return Err(e).with_context(|| format!("cannot look up the consumer {name:?}")),
    }
    stream.create_consumer(config).await.with_context(|| format!("cannot create or bind the consumer {name:?}"))
}

/// Competing consumer of every replica. New messages only: a first deploy
/// does not push the stream's whole past. Redelivery is unbounded on the
/// server; `deliver.rs` dead-letters a message after `max_deliver` failures
/// while PostgreSQL is up, so an outage never throws work away.
fn notifier_consumer(s: &NotifierSettings) -> pull::Config {
    pull::Config {
        durable_name: Some(subjects::NOTIFIER_CONSUMER.to_owned()),
        description: Some("natter notifier: unread counts and pushes".to_owned()),
        deliver_policy: DeliverPolicy::New,
        ack_policy: AckPolicy::Explicit,
        ack_wait: s.ack_wait,
        max_deliver: -1,
        filter_subject: subjects::CHAT_SUBJECTS.to_owned(),
        max_ack_pending: 20_000,
        ..Default::default()
    }
}

/// The archive wants everything the stream still has.
fn archiver_consumer() -> pull::Config {
    pull::Config {
        durable_name: Some(subjects::ARCHIVER_CONSUMER.to_owned()),
        description: Some("natter archiver: messages into PostgreSQL".to_owned()),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: Duration::from_secs(60),
        max_deliver: -1,
        filter_subject: subjects::CHAT_SUBJECTS.to_owned(),
        max_ack_pending: 20_000,
        ..Default::default()
    }
}

/// Keeps `natter_consumer_lag{consumer}` current (what KEDA / the HPA scale on).
/// Looked up by name each time: the consumer may have been bound anew.
async fn lag_gauge(
    shared: Arc<Shared>,
    stream: jetstream::stream::Stream,
    name: &'static str,
    stop: CancellationToken,
) {
    loop {
        if let Ok(info) = stream.consumer_info(name).await {
            let labels = metrics::ConsumerLabels { consumer: info.name.clone() };
            shared.metrics.consumer_lag.get_or_create(&labels).set(info.num_pending as i64);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

#[derive(Clone)]
struct Health {
    shared: Arc<Shared>,
    ready: tokio::sync::watch::Receiver<bool>,
}

/// Ready while consuming (every consumer bound), connected to NATS, and
/// PostgreSQL answers.
async fn readyz(State(h): State<Health>) -> impl IntoResponse {
    let consuming = *h.ready.borrow() && h.shared.unbound.load(Ordering::Relaxed) == 0;
    let nats = h.shared.nats.connection_state() == async_nats::connection::State::Connected;
    let db = crate::db::ping(&h.shared.db).await;
    let status = if consuming && nats && db { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(json!({"consuming": consuming, "nats": nats, "database": db})))
}

async fn metrics_text(State(h): State<Health>) -> impl IntoResponse {
    let mut out = String::new();
    let registry = h.shared.metrics.registry();
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], out).into_response()
}

/// Pulls from `consumer` and hands what is ready (up to a batch) to `handle`,
/// up to `pipeline` batches at once, until `stop` (the batches in hand are
/// finished first). `handle` acks or naks every message it gets, and may ask
/// for a pause (e.g. PostgreSQL is down) before the next batch is taken; the
/// batches in hand go on meanwhile, and while the pull is set up again.
async fn consume<F, Fut>(shared: Arc<Shared>, mut binding: Binding, stop: CancellationToken, handle: F)
where
    F: Fn(Arc<Shared>, Vec<jetstream::Message>) -> Fut,
    Fut: std::future::Future<Output = Option<Duration>>,
{
    let batch = shared.settings.batch;
    let pipeline = shared.settings.pipeline.max(1);
    let mut in_hand = InHand::new();
    // The consumer or its stream may be gone: bind again before the next pull.
    let mut lost = false;
    'connect: while !stop.is_cancelled() {
        if std::mem::take(&mut lost) {
            shared.unbound.fetch_add(1, Ordering::Relaxed);
            in_hand.alongside(pause(&stop, Duration::from_secs(1))).await;
            let bound = in_hand.alongside(binding.rebind(&stop)).await;
            shared.unbound.fetch_sub(1, Ordering::Relaxed);
            if !bound {
                break;
            }
        }
        let pull = binding.consumer.stream().max_messages_per_batch(batch).messages();
        let messages = match in_hand.alongside(pull).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot pull from the consumer; retrying");
                lost = true;
                continue;
            }
        };
        let mut chunks = messages.ready_chunks(batch);
        loop {
            let chunk = tokio::select! {
                _ = stop.cancelled() => {
                    in_hand.alongside(hand_back(&mut chunks)).await;
                    break 'connect;
                }
                Some(wait) = in_hand.futs.next(), if !in_hand.futs.is_empty() => {
                    in_hand.pause_for(wait);
                    continue;
                }
                _ = &mut in_hand.resume, if in_hand.paused => {
                    in_hand.paused = false;
                    continue;
                }
                c = chunks.next(), if !in_hand.paused && in_hand.futs.len() < pipeline => c,
            };
            let Some(chunk) = chunk else { continue 'connect };
            let mut msgs = Vec::with_capacity(chunk.len());
            for m in chunk {
                match m {
                    Ok(m) => msgs.push(m),
                    Err(e) if consumer_gone(e.kind()) => {
                        tracing::warn!(error = %e, "the consumer is gone; binding it again");
                        lost = true;
                    }
                    Err(e) => tracing::debug!(error = %e, "pull stream notice"),
                }
            }
            if !msgs.is_empty() {
                in_hand.futs.push(handle(shared.clone(), msgs));
            }
            if lost {
                continue 'connect;
            }
        }
    }
    while in_hand.futs.next().await.is_some() {}
}

/// A pull's error that means the consumer (or its stream) no longer exists:
/// deleted, or nothing answers its pull requests.
fn consumer_gone(kind: pull::MessagesErrorKind) -> bool {
    matches!(kind, pull::MessagesErrorKind::ConsumerDeleted | pull::MessagesErrorKind::NoResponders)
}

/// How long a stopping consumer loop waits for more of what its pull
/// brought (in flight when it stopped), and the most it spends handing back.
const HAND_BACK_QUIET: Duration = Duration::from_millis(100);
const HAND_BACK_MAX: Duration = Duration::from_secs(1);

/// At stop: what the pull brought and no batch took goes back to the stream
/// (a nak) for another replica, which gets it within `HAND_BACK_MAX` instead
/// of after the ack wait. The nak's delay keeps this replica's pull, still
/// open meanwhile, from taking it again.
async fn hand_back<E>(pulled: &mut (impl futures::Stream<Item = Vec<Result<jetstream::Message, E>>> + Unpin)) {
    let until = tokio::time::Instant::now() + HAND_BACK_MAX;
    let mut handed = 0usize;
    loop {
        let quiet = until.saturating_duration_since(tokio::time::Instant::now()).min(HAND_BACK_QUIET);
        let Ok(Some(chunk)) = tokio::time::timeout(quiet, pulled.next()).await else { break };
        for msg in chunk.into_iter().filter_map(Result::ok) {
            match msg.ack_with(jetstream::AckKind::Nak(Some(HAND_BACK_MAX))).await {
                Ok(()) => handed += 1,
                Err(e) => tracing::warn!(error = %e, "hand-back failed (redelivered after the ack wait)"),
            }
        }
    }
    if handed > 0 {
        tracing::info!(messages = handed, "stopping: handed back what was pulled and not started");
    }
}

/// The batches a consumer loop is working on, and the pause one of them
/// asked for.
struct InHand<Fut> {
    futs: futures::stream::FuturesUnordered<Fut>,
    /// When the next batch may be taken, if `paused`.
    resume: Pin<Box<tokio::time::Sleep>>,
    paused: bool,
}

impl<Fut: std::future::Future<Output = Option<Duration>>> InHand<Fut> {
    fn new() -> Self {
        Self {
            futs: futures::stream::FuturesUnordered::new(),
            resume: Box::pin(tokio::time::sleep(Duration::ZERO)),
            paused: false,
        }
    }

    /// A batch is done; `wait` is the pause it asks for (the later one wins).
    fn pause_for(&mut self, wait: Option<Duration>) {
        pause_for(&mut self.resume, &mut self.paused, wait);
    }

    /// Runs `fut` while the batches in hand go on.
    async fn alongside<T>(&mut self, fut: impl std::future::Future<Output = T>) -> T {
        let Self { futs, resume, paused } = self;
        crate::tasks::alongside(fut, futs, |wait| pause_for(resume, paused, wait)).await
    }
}

fn pause_for(resume: &mut Pin<Box<tokio::time::Sleep>>, paused: &mut bool, wait: Option<Duration>) {
    let until = wait.map(|w| tokio::time::Instant::now() + w);
    if let Some(until) = until.filter(|u| !*paused || *u > resume.deadline()) {
        resume.as_mut().reset(until);
        *paused = true;
    }
}

async fn pause(stop: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

/// How long a failed message waits before its next delivery.
fn redelivery_delay(delivered: i64) -> Duration {
    let exp = delivered.clamp(1, 6) as u32 - 1;
    Duration::from_secs(1 << exp).min(Duration::from_secs(30))
}

/// A message one of the loops took from the stream.
struct Delivery {
    msg: jetstream::Message,
    /// Stream sequence = the message's seq in its room.
    seq: u64,
    delivered: i64,
}

impl Delivery {
    fn new(msg: jetstream::Message) -> Self {
        let (seq, delivered) = msg.info().map(|i| (i.stream_sequence, i.delivered)).unwrap_or((0, 1));
        Self { msg, seq, delivered }
    }

    /// The room and the stored message, or why it cannot be read.
    fn parse(&self) -> Result<(crate::ids::RoomId, crate::bus::envelope::StoredMessage), String> {
        let room = subjects::room_of_msg(self.msg.subject.as_str())
            .ok_or_else(|| format!("not a room message subject: {}", self.msg.subject))?;
        let stored = serde_json::from_slice(&self.msg.payload).map_err(|e| format!("unreadable payload: {e}"))?;
        Ok((room, stored))
    }

    async fn ack(&self) {
        if let Err(e) = self.msg.ack().await {
            tracing::warn!(error = %e, seq = self.seq, "ack failed (the message will be redelivered)");
        }
    }

    async fn retry_later(&self) {
        self.retry_after(redelivery_delay(self.delivered)).await;
    }

    async fn retry_after(&self, delay: Duration) {
        if let Err(e) = self.msg.ack_with(jetstream::AckKind::Nak(Some(delay))).await {
            tracing::warn!(error = %e, seq = self.seq, "nak failed (redelivered after the ack wait)");
        }
    }

    /// Records the message in `dead_letters` and stops its redelivery; if the
    /// record cannot be written, it is retried later instead.
    async fn give_up(&self, shared: &Shared, consumer: &str, why: &str) {
        let letter = crate::db::archive::DeadLetter {
            consumer,
            stream_seq: self.seq,
            subject: self.msg.subject.as_str(),
            payload: &self.msg.payload,
            deliveries: self.delivered,
            error: why,
        };
        match crate::db::archive::dead_letter(&shared.db, &letter).await {
            Ok(()) => {
                tracing::error!(consumer, seq = self.seq, deliveries = self.delivered, error = why, "dead-lettered");
                shared.metrics.dead_letter(consumer);
                if let Err(e) = self.msg.ack_with(jetstream::AckKind::Term).await {
                    tracing::warn!(error = %e, seq = self.seq, "term failed");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, seq = self.seq, "cannot record a dead letter; retrying later");
                self.retry_later().await;
            }
        }
    }
}

/// While a batch is worked on, tells the server it is in progress so that a
/// slow push does not trigger a redelivery to another replica.
fn keep_alive(nats: &async_nats::Client, batch: &[&Delivery], ack_wait: Duration) -> tokio::task::JoinHandle<()> {
    let nats = nats.clone();
    let replies: Vec<_> = batch.iter().filter_map(|d| d.msg.reply.clone()).collect();
    let every = (ack_wait / 3).max(Duration::from_millis(200));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            for r in &replies {
                let _ = nats.publish(r.clone(), bytes::Bytes::from_static(b"+WPI")).await;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    type Batch = Pin<Box<dyn std::future::Future<Output = Option<Duration>> + Send>>;

    #[tokio::test]
    async fn the_batches_in_hand_go_on_while_the_pull_is_set_up_again() {
        let mut in_hand: InHand<Batch> = InHand::new();
        let (done, ran) = tokio::sync::oneshot::channel::<()>();
        in_hand.futs.push(Box::pin(async move {
            let _ = done.send(());
            Some(Duration::from_secs(5))
        }));
        // The "pull" only completes once the batch in hand has run.
        let pull = async move { ran.await.is_ok() };
        let finished = tokio::time::timeout(Duration::from_secs(5), in_hand.alongside(pull)).await;
        assert_eq!(finished.ok(), Some(true), "the batch ran while the pull waited");
        assert!(in_hand.futs.is_empty());
        assert!(in_hand.paused, "the pause the batch asked for is kept");
    }

    #[tokio::test]
    async fn of_two_pauses_asked_for_the_later_end_wins() {
        let mut in_hand: InHand<Batch> = InHand::new();
        in_hand.pause_for(Some(Duration::from_secs(10)));
        let first = in_hand.resume.deadline();
        in_hand.pause_for(Some(Duration::from_secs(1)));
        assert_eq!(in_hand.resume.deadline(), first, "a shorter pause does not cut a longer one");
        in_hand.pause_for(None);
        assert!(in_hand.paused);
        in_hand.pause_for(Some(Duration::from_secs(20)));
        assert!(in_hand.resume.deadline() > first);
    }
}
