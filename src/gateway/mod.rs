//! The gateway: WebSocket and HTTP clients in, NATS and PostgreSQL behind.
//!
//! `ws.rs` upgrades and authenticates, `connection.rs` runs one socket,
//! `hub.rs` maps local rooms to connections, `room.rs` owns a room's live
//! subscription, gap repair and fan-out, `replay.rs` reads what a resume
//! missed, `http.rs` is the REST API, `sse.rs` the Server-Sent Events
//! fallback (a connection like a WebSocket one), `attachments.rs` image
//! uploads and downloads (NATS object store), `web/` the embedded browser
//! client, `dev.rs` the `--dev` sign-in.

pub mod attachments;
pub mod connection;
pub mod dev;
pub mod http;
pub mod hub;
pub mod keepalive;
pub mod limits;
pub mod membership;
pub mod metrics;
pub mod outbound;
pub mod presence;
pub mod protocol;
pub mod replay;
pub mod room;
pub mod sse;
pub mod users;
pub mod web;
pub mod ws;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use async_nats::jetstream;
use sqlx::PgPool;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

use crate::{
    auth::Verifier,
    bus::{self, messages},
    config::{GatewaySettings, PresenceSubscriptions, RoomSubscriptions},
    ids::NodeId,
};

/// Shared state of one gateway, cloned into every handler and connection:
/// one pointer. (By value it was 3.4 KiB — the stream and object store
/// handles carry their whole configuration — held twice in every
/// connection's task; measured with `-Zprint-type-sizes`.)
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What `AppState` points to.
pub struct Shared {
    pub settings: Arc<GatewaySettings>,
    pub node: NodeId,
    pub db: PgPool,
    pub nats: async_nats::Client,
    pub js: jetstream::Context,
    /// The CHAT stream (direct gets). Shared, not cloned: a `Stream` handle
    /// is ~1.6 KiB with its info's strings, and every send's ack task held a
    /// copy (a 3.7 KiB task per message in flight).
    pub stream: Arc<jetstream::stream::Stream>,
    /// The `attachments` object store (image uploads).
    pub attachments: jetstream::object_store::ObjectStore,
    pub verifier: Arc<Verifier>,
    pub hub: Arc<hub::Hub>,
    pub membership: Arc<membership::Membership>,
    pub presence: Arc<presence::Presence>,
    pub users: Arc<users::Users>,
    pub limits: Arc<limits::Limits>,
    pub metrics: Arc<metrics::Metrics>,
    /// Every WebSocket connection's task (waited for on shutdown).
    pub connections: tokio_util::task::TaskTracker,
    /// Typing frames per (user, room).
    pub typing_limit: Arc<governor::DefaultKeyedRateLimiter<(crate::ids::UserId, crate::ids::RoomId)>>,
    /// Cancelled when the gateway shuts down: sockets close with 1012.
    pub shutdown: CancellationToken,
    /// False once shutdown starts.
    pub accepting: Arc<AtomicBool>,
    /// Mints `POST /v1/dev/token` tokens; `None` unless `--dev` (and HS256).
    pub dev_signer: Option<Arc<crate::auth::Signer>>,
    next_conn: Arc<AtomicU64>,
    /// Making the CHAT stream again (`repair_chat`).
    chat_repair: Repair,
    /// Making the attachments bucket again (`repair_attachments`).
    attachments_repair: Repair,
}

/// A repair of a stream found gone: one at a time (a caller that finds one
/// running returns at once), at most one per [`REPAIR_EVERY`].
#[derive(Default)]
struct Repair(tokio::sync::Mutex<Option<tokio::time::Instant>>);

impl Repair {
    async fn run<T>(&self, repair: impl std::future::Future<Output = T>) {
        let Ok(mut last) = self.0.try_lock() else { return };
        if last.is_some_and(|t| t.elapsed() < REPAIR_EVERY) {
            return;
        }
        *last = Some(tokio::time::Instant::now());
        repair.await;
    }
}

/// The least time between two repairs of one stream by one gateway.
const REPAIR_EVERY: Duration = Duration::from_secs(1);

/// Makes the stream `name` again with `make` if it is really gone (lost with
/// its storage, or deleted), counted in `natter_stream_repairs_total` as
/// `label`; `found_by` says what found it, for the log. A stream between
/// leaders answers "no responders" too: it is looked up first, and nothing
/// is made or counted then. Whether the stream exists afterwards.
async fn remake_if_gone<T>(
    js: &jetstream::Context,
    metrics: &metrics::Metrics,
    name: &str,
    label: &'static str,
    found_by: &str,
    make: impl std::future::Future<Output = anyhow::Result<T>>,
) -> bool {
    if !bus::stream_gone(js, name).await {
        return true;
    }
    match make.await {
        Ok(_) => {
            metrics.stream_repaired(label);
            tracing::warn!("{found_by} found stream {name} gone: made it again");
            true
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "stream {name} is gone and cannot be made again");
            false
        }
    }
}

/// Connections the kernel completes and queues before the gateway accepts
/// them (capped by `net.core.somaxconn`). A reconnect storm (every client of
/// a restarted gateway at once) arrives faster than one worker accepts; when
/// the queue is full the kernel drops the SYN and the client retries only
/// after a second. tokio's `bind` queues 1 024.
const LISTEN_BACKLOG: u32 = 8192;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

impl Shared {
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Waits for a send's ack ([`messages::confirm`]). When the CHAT stream
    /// turns out to be gone, this gateway makes it again before answering,
    /// so that the client's resend (same id) is stored.
    pub async fn confirm_send(
        &self,
        ts: i64,
        ack: jetstream::context::PublishAckFuture,
    ) -> Result<messages::Published, messages::PublishError> {
        let confirmed = messages::confirm(&self.stream, ts, ack).await;
        if matches!(confirmed, Err(messages::PublishError::NoStream)) {
            // Boxed: the repair's future (lookups, the archive query, the
            // stream's config) is ~16 KiB, and every send's ack task would
            // carry it, and be moved whole into its task, for a path taken
            // when the stream is lost.
            Box::pin(self.repair_chat()).await;
        }
        confirmed
    }

    /// Makes the CHAT stream again after it was lost (every replica's
    /// storage) or deleted, as at start: its seqs continue after the
    /// archive's. The rooms' subscriptions and this gateway's stream handle
    /// go by name, so nothing else needs a restart; the notifiers bind their
    /// consumers again.
    async fn repair_chat(&self) {
        let archived_up_to = || async {
            crate::db::archive::highest_seq(&self.db).await.context("cannot read the archive's highest seq")
        };
        let make = bus::streams::ensure_chat(&self.js, &self.settings.nats, archived_up_to);
        let remake = remake_if_gone(&self.js, &self.metrics, bus::subjects::CHAT_STREAM, "CHAT", "a send", make);
        self.chat_repair.run(remake).await;
    }

    /// After an upload failed: if the attachments bucket is gone (its
    /// storage lost, or deleted), makes it again, so that the next upload
    /// is stored. (The images it held are lost with it.)
    pub async fn repair_attachments(&self) {
        let name = format!("OBJ_{}", bus::subjects::ATTACHMENTS_BUCKET);
        let make = bus::objects::ensure_attachments(&self.js, &self.settings.nats);
        let remake = remake_if_gone(&self.js, &self.metrics, &name, "attachments", "an upload", make);
        self.attachments_repair.run(remake).await;
    }
}

pub struct Gateway {
    listener: TcpListener,
    state: AppState,
}

impl Gateway {
    /// Checks settings, connects to PostgreSQL and NATS, makes sure the CHAT
    /// stream exists, and binds the listener. Fails with a one-line reason.
    pub async fn build(settings: GatewaySettings) -> anyhow::Result<Self> {
        let node = settings.node_id()?;
        let verifier = Verifier::from_settings(&settings.jwt)?;
        let db = crate::db::connect(&settings.db).await?;
        let (nats, mut reconnects) = bus::connect(&settings.nats, &format!("natter-gateway-{node}")).await?;
        reconnects.mark_unchanged();
        let js = jetstream::new(nats.clone());
        let stream = bus::streams::ensure_chat(&js, &settings.nats, || async {
            crate::db::archive::highest_seq(&db).await.context("cannot read the archive's highest seq")
        })
        .await?;
        bus::presence::ensure_bucket(&js, &settings.nats).await?;
        let attachments = bus::objects::ensure_attachments(&js, &settings.nats).await?;
        let listener = listen(settings.listen).with_context(|| format!("cannot listen on {}", settings.listen))?;
        let metrics = Arc::new(metrics::Metrics::default());
        let hub = hub::Hub::start(room::RoomDeps {
            metrics: metrics.clone(),
            nats: nats.clone(),
            stream: stream.clone(),
            shared_subscription: settings.room_subscriptions == RoomSubscriptions::Shared,
            drop_live_every: settings.fault_drop_live_every,
        })
        .await
        .context("cannot subscribe to the rooms' live traffic")?;
        let shutdown = CancellationToken::new();
        let membership = Arc::new(membership::Membership::new(settings.membership_cache_ttl, db.clone()));
        let presence = presence::Presence::start(
            js.clone(),
            nats.clone(),
            node.clone(),
            presence::PresenceSettings { ttl: settings.presence_ttl, grace: settings.presence_grace },
            settings.nats.clone(),
            metrics.clone(),
        );
        let shared = settings.presence_subscriptions == PresenceSubscriptions::Shared;
        presence.subscribe_events(shared).await.context("cannot subscribe to presence events")?;
        let per_sec = std::num::NonZeroU32::new(settings.typing_per_sec.max(1)).expect("non-zero");
        let typing_limit = Arc::new(governor::RateLimiter::keyed(governor::Quota::per_second(per_sec)));
        let limits = limits::Limits::new(&settings.limits);
        let users = users::Users::start(&nats, membership.clone()).await.context("cannot subscribe to user events")?;
        let dev_signer = dev::signer(&settings).map(Arc::new);
        let state = AppState(Arc::new(Shared {
            limits,
            metrics,
            connections: tokio_util::task::TaskTracker::new(),
            users,
            membership,
            presence,
            typing_limit,
            settings: Arc::new(settings),
            node,
            db,
            nats,
            js,
            stream: Arc::new(stream),
            attachments,
            verifier: Arc::new(verifier),
            hub,
            shutdown,
            accepting: Arc::new(AtomicBool::new(true)),
            dev_signer,
            next_conn: Arc::new(AtomicU64::new(1)),
            chat_repair: Repair::default(),
            attachments_repair: Repair::default(),
        }));
        tokio::spawn(resync_on_reconnect(reconnects, state.hub.clone(), state.presence.clone()));
        let timing = keepalive::Timing {
            heartbeat: state.settings.heartbeat,
            idle_timeout: state.settings.idle_timeout,
            drain_spread: state.settings.drain_window.mul_f32(0.6),
        };
        tokio::spawn(keepalive::run(state.users.clone(), timing, state.shutdown.clone()));
        tokio::spawn(forget_idle_keys(state.limits.clone(), state.typing_limit.clone(), state.shutdown.clone()));
        Ok(Self { listener, state })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    /// Serves until `stop` is cancelled, then closes every socket with 1012
    /// and drains the NATS connection.
    pub async fn run_until_stopped(self, stop: CancellationToken) -> anyhow::Result<()> {
        let Self { listener, state } = self;
        tracing::info!(addr = %listener.local_addr()?, node = %state.node, "gateway listening");
        let app = http::router(state.clone());
        let conns_stop = state.shutdown.clone();
        let accepting = state.accepting.clone();
        // Nagle off: an ack written right after a message frame must not wait
        // for the client's delayed TCP ACK (measured: 42 ms → 0.5 ms p50).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let serve = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async move {
                stop.cancelled().await;
                accepting.store(false, Ordering::Release);
                conns_stop.cancel();
            });
        serve.await.context("HTTP server failed")?;
        // The sockets close themselves (1012) spread over most of the drain
        // window; what is left of it bounds the rest of the shutdown.
        let started = tokio::time::Instant::now();
        let window = state.settings.drain_window;
        state.connections.close();
        if tokio::time::timeout(window.mul_f32(0.8), state.connections.wait()).await.is_err() {
            tracing::warn!(left = state.connections.len(), "connections still open at the end of the drain window");
        }
        let rest = window.saturating_sub(started.elapsed()).max(Duration::from_secs(1));
        let n = state.presence.hand_over(rest.min(Duration::from_secs(3))).await;
        tracing::info!(users = n, "presence lease set to expire after the grace");
        let rest = window.saturating_sub(started.elapsed()).max(Duration::from_secs(1));
        if tokio::time::timeout(rest.min(Duration::from_secs(5)), state.nats.drain()).await.is_err() {
            tracing::warn!("NATS drain did not finish in time");
        }
        tracing::info!(took_ms = started.elapsed().as_millis() as u64, "gateway stopped");
        Ok(())
    }
}

/// After NATS comes back, what core subscriptions may have missed is re-read
/// from JetStream: every room's tail and every watched user's presence.
async fn resync_on_reconnect(mut reconnects: bus::Reconnects, hub: Arc<hub::Hub>, presence: Arc<presence::Presence>) {
    while reconnects.changed().await.is_ok() {
        tracing::info!(rooms = hub.room_count(), "NATS reconnected: re-reading room tails and presence");
        hub.check_tails();
        presence.resync().await;
    }
}

/// Keyed limiters keep a cell per key they ever saw: forget idle ones.
async fn forget_idle_keys(
    limits: Arc<limits::Limits>,
    typing: Arc<governor::DefaultKeyedRateLimiter<(crate::ids::UserId, crate::ids::RoomId)>>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        limits.forget_idle();
        typing.retain_recent();
        typing.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nobody accepts here: the kernel completes handshakes into the accept
    /// queue only up to the backlog and drops later SYNs (their clients would
    /// wait a second to retry). A storm of 2 000 connects all complete.
    #[tokio::test]
    async fn the_listener_queues_a_reconnect_storm_without_dropping_syns() {
        let _ = rlimit::increase_nofile_limit(u64::MAX);
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let storm = 2000;
        let connects =
            (0..storm).map(|_| tokio::time::timeout(Duration::from_millis(1500), tokio::net::TcpStream::connect(addr)));
        let done = futures::future::join_all(connects).await;
        let completed = done.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
        // The kernel caps the backlog at net.core.somaxconn (4 096 by default).
        let cap: usize =
            std::fs::read_to_string("/proc/sys/net/core/somaxconn").map_or(4096, |s| s.trim().parse().unwrap());
        assert_eq!(completed, storm.min(cap + 1), "SYNs dropped by a full accept queue");
        // A port already listened on is refused, not shared.
        assert!(listen(addr).is_err());
    }
}
