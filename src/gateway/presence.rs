//! Presence on this gateway: the node's lease and its entries in the
//! `presence` bucket (one per locally connected user, written when it
//! changes, offline after a grace period; the heartbeat refreshes the lease
//! alone), and watches of other users' entries for clients that subscribed
//! (one core subscription per watched user, shared by every local
//! subscriber; or, after [`Presence::subscribe_events`] with `shared`, one
//! for every user's events, routed to the watches).

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use async_nats::{Client, Message, jetstream};
use axum::extract::ws::Utf8Bytes;
use futures::{StreamExt, stream::FuturesUnordered};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::{sync::mpsc, task::AbortHandle};
use tokio_util::sync::CancellationToken;

use super::outbound::ConnHandle;
use crate::{
    bus::{
        self,
        envelope::now_ms,
        presence::{self, Entry, Lease, Leases, Observation, Observed, Put, Status},
        subjects,
    },
    config::NatsSettings,
    ids::{NodeId, UserId},
    tasks::{self, alongside},
};

/// How long an entry lives unless rewritten. It outlives its user's
/// session by far: an offline entry carries `last_seen`, and an online one
/// counts only while its node's lease lives, so its own TTL only bounds
/// what a crashed node leaves behind.
const ENTRY_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// An unchanged entry of a user still connected here is rewritten this long
/// after its last write, well within [`ENTRY_TTL`].
const ENTRY_REFRESH: Duration = Duration::from_secs(24 * 3600);

/// At most one warning per this for failed presence writes.
const WARN_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
pub struct PresenceSettings {
    /// The lease's lifetime unless refreshed: how long a crashed node's
    /// users still show online.
    pub ttl: Duration,
    pub grace: Duration,
}

/// A user's aggregated presence as clients see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct View {
    pub status: Status,
    pub last_seen: i64,
}

struct Local {
    /// (connection id, status) of each session here: one or a few, so a
    /// `Vec` (a map's first insert allocates four buckets).
    sessions: Vec<(u64, Status)>,
    /// Bumped by every change, so a stale grace timer does nothing.
    generation: u32,
    published: Option<(Status, u32)>,
    /// When this node's entry for the user was last written.
    written: Instant,
}

impl Local {
    fn new() -> Self {
        Self { sessions: Vec::new(), generation: 0, published: None, written: Instant::now() }
    }
}

struct Watch {
    subscribers: HashMap<u64, Arc<ConnHandle>>,
    /// node → (stream seq, entry; `None` once deleted or expired)
    nodes: HashMap<String, (u64, Option<Entry>)>,
    last_seen_floor: i64,
    initialized: bool,
    sent: Option<View>,
    task: Option<AbortHandle>,
}

impl Watch {
    fn new(subscribers: HashMap<u64, Arc<ConnHandle>>) -> Self {
        Self { subscribers, nodes: HashMap::new(), last_seen_floor: 0, initialized: false, sent: None, task: None }
    }

    /// Tells every subscriber when the aggregated status changed.
    fn announce(&mut self, user: &str, leases: &Leases) {
        let v = self.view(leases);
        if self.initialized && self.sent.is_none_or(|s| s.status != v.status) {
            self.sent = Some(v);
            for c in self.subscribers.values() {
                c.deliver_ephemeral(frame(user, v));
            }
        }
    }

    fn view(&self, leases: &Leases) -> View {
        let entries = self.nodes.iter().filter_map(|(node, (_, e))| e.map(|e| leases.effective(node, &e)));
        let (status, seen) = presence::aggregate(entries);
        View { status, last_seen: seen.max(self.last_seen_floor) }
    }

    fn apply(&mut self, o: &Observed) {
        let newer = self.nodes.get(&o.node).is_none_or(|(seq, _)| o.seq == 0 || o.seq >= *seq);
        if newer {
            if let Some(e) = o.entry {
                self.last_seen_floor = self.last_seen_floor.max(e.last_seen);
            }
            self.nodes.insert(o.node.clone(), (o.seq, o.entry));
        }
    }
}

struct Write {
    put: Put,
    /// Whose entry it writes (`None`: the lease, which every heartbeat
    /// writes anyway).
    user: Option<UserId>,
    /// Answered once this write and all before it are acknowledged.
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Write {
    /// An acknowledged write of the lease, with no one waiting for it.
    fn lease(put: Put) -> Self {
        Self { put, user: None, done: None }
    }

    /// An acknowledged write of `user`'s entry, with no one waiting for it.
    fn change(user: &UserId, put: Put) -> Self {
        Self { user: Some(user.clone()), ..Self::lease(put) }
    }
}

struct State {
    local: HashMap<UserId, Local>,
    watched: HashMap<UserId, Watch>,
    /// Every node's lease, as last heard of.
    leases: Leases,
}

impl State {
    fn new() -> Self {
        Self { local: HashMap::new(), watched: HashMap::new(), leases: Leases::default() }
    }

    /// The entries the heartbeat rewrites at `now`: those of users still
    /// connected here, unwritten for [`ENTRY_REFRESH`].
    fn due(&mut self, now: Instant) -> impl Iterator<Item = (&UserId, &mut Local)> {
        self.local.iter_mut().filter(move |(_, l)| !l.sessions.is_empty() && now >= l.written + ENTRY_REFRESH)
    }

    /// Takes in a snapshot's leases, and tells the watches of what changed.
    fn merge(&mut self, snapshot: &presence::Snapshot) {
        for node in self.leases.merge(snapshot) {
            self.announce_node(&node);
        }
    }

    /// Tells the subscribers of every watch that has an entry of `node`
    /// what changed, after its lease did.
    fn announce_node(&mut self, node: &str) {
        for (user, w) in self.watched.iter_mut() {
            if w.nodes.contains_key(node) {
                w.announce(user.as_str(), &self.leases);
            }
        }
    }
}

pub struct Presence {
    nats: Client,
    node: NodeId,
    /// This process's lease epoch: random, so that a node restarted under
    /// the same id does not revive the entries of its previous life.
    epoch: u64,
    settings: PresenceSettings,
    writes: mpsc::UnboundedSender<Write>,
    state: Mutex<State>,
    /// One subscription feeds every watch ([`Presence::subscribe_events`]).
    shared: AtomicBool,
    /// Ends the heartbeat. It runs through a shutdown's drain window, while
    /// sockets are still open, and ends at the hand-over.
    heartbeat: CancellationToken,
    /// Users whose last entry write failed: the heartbeat writes their
    /// current state again once NATS is connected. Entries are written on
    /// change only, so one lost during an outage would otherwise stand until
    /// the user's next change (an online user shown offline, or a user who
    /// left shown online for as long as the lease lives).
    unstored: Arc<Mutex<HashSet<UserId>>>,
    /// A write found the presence bucket gone (its storage lost, or deleted):
    /// the heartbeat makes it again and writes every entry of this node.
    bucket_gone: Arc<AtomicBool>,
    js: jetstream::Context,
    /// How the bucket is made (its replicas).
    bucket: NatsSettings,
    metrics: Arc<super::metrics::Metrics>,
}

pub fn frame(user: &str, v: View) -> Utf8Bytes {
    #[derive(Serialize)]
    struct F<'a> {
        #[serde(rename = "type")]
        ty: &'static str,
        user: &'a str,
        status: Status,
        last_seen: i64,
    }
    let f = F { ty: "presence", user, status: v.status, last_seen: v.last_seen };
    Utf8Bytes::from(serde_json::to_string(&f).expect("serialisable"))
}

impl Presence {
    /// Takes this node's lease and starts the writer and heartbeat tasks
    /// (they end with [`Presence::hand_over`], or when this is dropped).
    /// The lease is the first write, so it is stored before any entry that
    /// lives by it.
    pub fn start(
        js: jetstream::Context,
        nats: Client,
        node: NodeId,
        settings: PresenceSettings,
        bucket: NatsSettings,
        metrics: Arc<super::metrics::Metrics>,
    ) -> Arc<Self> {
        let (writes, rx) = mpsc::unbounded_channel();
        let p = Arc::new(Self {
            nats,
            node: node.clone(),
            epoch: rand::random(),
            settings,
            writes,
            state: Mutex::new(State::new()),
            shared: AtomicBool::new(false),
            heartbeat: CancellationToken::new(),
            unstored: Arc::default(),
            bucket_gone: Arc::default(),
            js: js.clone(),
            bucket,
            metrics: metrics.clone(),
        });
        let _ = p.writes.send(Write::lease(p.lease(settings.ttl)));
        let failures = Failures { unstored: p.unstored.clone(), bucket_gone: p.bucket_gone.clone() };
        tokio::spawn(write_loop(js, rx, failures, metrics));
        tokio::spawn(heartbeat(Arc::downgrade(&p), p.heartbeat.clone()));
        p
    }

    /// This node's lease, written now, living `ttl` unless refreshed.
    fn lease(&self, ttl: Duration) -> Put {
        Put::lease(&self.node, &Lease { epoch: self.epoch, last_seen: now_ms() }, ttl)
    }

    /// This node's entry for `user` now, with `status`.
    fn entry(&self, user: &UserId, status: Status, sessions: usize) -> Put {
        let entry = Entry { status, sessions: sessions as u32, last_seen: now_ms(), lease: Some(self.epoch) };
        Put::entry(user, &self.node, &entry, ENTRY_TTL)
    }

    /// This node's entry for `user` now, as `l` has it.
    fn entry_of(&self, user: &UserId, l: &Local) -> Put {
        self.entry(user, Self::status_of(l), l.sessions.len())
    }

    fn status_of(l: &Local) -> Status {
        l.sessions.iter().map(|&(_, s)| s).max().unwrap_or(Status::Offline)
    }

    /// Writes this node's entry for `user` if status or session count changed.
    fn publish_if_changed(&self, user: &UserId, l: &mut Local) {
        let now = (Self::status_of(l), l.sessions.len() as u32);
        if l.published != Some(now) {
            l.published = Some(now);
            l.written = Instant::now();
            let _ = self.writes.send(Write::change(user, self.entry_of(user, l)));
        }
    }

    pub fn session_started(&self, user: &UserId, conn_id: u64) {
        let mut st = self.state.lock();
        let l = st.local.entry(user.clone()).or_insert_with(Local::new);
        l.sessions.push((conn_id, Status::Online));
        l.generation = l.generation.wrapping_add(1);
        self.publish_if_changed(user, l);
    }

    pub fn set_status(&self, user: &UserId, conn_id: u64, status: Status) {
        let mut st = self.state.lock();
        if let Some(l) = st.local.get_mut(user)
            && let Some((_, s)) = l.sessions.iter_mut().find(|(id, _)| *id == conn_id)
        {
            *s = status;
            l.generation = l.generation.wrapping_add(1);
            self.publish_if_changed(user, l);
        }
    }

    /// A session closed. The last one of a user starts the grace period;
    /// offline is written only if no session came back within it.
    pub fn session_ended(self: &Arc<Self>, user: &UserId, conn_id: u64) {
        let mut st = self.state.lock();
        let Some(l) = st.local.get_mut(user) else { return };
        l.sessions.retain(|&(id, _)| id != conn_id);
        l.generation = l.generation.wrapping_add(1);
        if !l.sessions.is_empty() {
            self.publish_if_changed(user, l);
            return;
        }
        let generation = l.generation;
        let this = Arc::downgrade(self);
        let user = user.clone();
        let grace = self.settings.grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let Some(p) = this.upgrade() else { return };
            let mut st = p.state.lock();
            let still_gone = st.local.get(&user).is_some_and(|l| l.generation == generation && l.sessions.is_empty());
            if still_gone {
                st.local.remove(&user);
                let _ = p.writes.send(Write::change(&user, p.entry(&user, Status::Offline, 0)));
            }
        });
    }

    /// Graceful shutdown: rewrites every local entry (last seen now), then
    /// the lease to expire after the grace period, and waits (bounded) for
    /// the writes to be stored. Users who reconnect elsewhere within the
    /// grace never show offline; the others go offline when the lease
    /// expires, with no process left.
    pub async fn hand_over(&self, within: Duration) -> usize {
        self.heartbeat.cancel();
        let local: Vec<(UserId, Local)> = self.state.lock().local.drain().collect();
        let n = local.len();
        for (user, l) in local {
            // Those already in their grace period are offline.
            let _ = self.writes.send(Write::change(&user, self.entry_of(&user, &l)));
        }
        let (done, stored) = tokio::sync::oneshot::channel();
        let lease = self.lease(self.settings.grace.max(Duration::from_secs(1)));
        let _ = self.writes.send(Write { done: Some(done), ..Write::lease(lease) });
        let _ = tokio::time::timeout(within, stored).await;
        n
    }

    /// Subscribes `conn` to `users`' presence: each gets one frame with the
    /// current state now, then one per change.
    pub async fn watch(self: &Arc<Self>, conn: &Arc<ConnHandle>, users: &[UserId]) -> Result<(), String> {
        // Subscribe before reading the snapshot, so no change falls between.
        let mut fresh = Vec::new();
        let mut ready = Vec::new();
        {
            let mut st = self.state.lock();
            let State { watched, leases, .. } = &mut *st;
            for u in users {
                match watched.get_mut(u) {
                    Some(w) => {
                        w.subscribers.insert(conn.id, conn.clone());
                        if w.initialized {
                            ready.push((u.clone(), w.view(leases)));
                        }
                    }
                    None => {
                        watched.insert(u.clone(), Watch::new(HashMap::from([(conn.id, conn.clone())])));
                        fresh.push(u.clone());
                    }
                }
            }
        }
        for (u, v) in ready {
            conn.deliver_counted(frame(u.as_str(), v), "presence");
        }
        if fresh.is_empty() {
            return Ok(());
        }
        // One subscription per new user, unless the shared one brings them all.
        let mut subs = Vec::new();
        if !self.shared.load(Ordering::Acquire) {
            for u in &fresh {
                subs.push(self.nats.subscribe(subjects::presence_events_of(u)).await.map_err(|e| e.to_string())?);
            }
        }
        let snapshot = presence::snapshot(&self.nats, &fresh).await;
        let mut st = self.state.lock();
        if let Ok(s) = &snapshot {
            st.merge(s);
        }
        let State { watched, leases, .. } = &mut *st;
        let mut subs = subs.into_iter();
        for u in &fresh {
            let sub = subs.next(); // none with the shared subscription
            let Some(w) = watched.get_mut(u) else { continue }; // unwatched meanwhile
            if let Ok(s) = &snapshot {
                for o in s.of(u.as_str()) {
                    w.apply(o);
                }
            }
            w.initialized = true;
            let v = w.view(leases);
            w.sent = Some(v);
            // The first frame answers a `presence_sub`: never dropped for
            // backpressure (a snapshot of hundreds of users fills half a
            // queue at once). Changes after it may be.
            for c in w.subscribers.values() {
                c.deliver_counted(frame(u.as_str(), v), "presence");
            }
            if let Some(sub) = sub {
                let task = tokio::spawn(tasks::in_batches(Arc::downgrade(self), sub, Presence::apply_events));
                w.task = Some(task.abort_handle());
            }
        }
        snapshot.map(|_| ())
    }

    /// Users whose last entry write failed, awaiting the heartbeat's rewrite.
    pub fn unstored_count(&self) -> usize {
        self.unstored.lock().len()
    }

    /// Users watched from this gateway.
    pub fn watch_count(&self) -> usize {
        self.state.lock().watched.len()
    }

    /// Applies presence events (of one watched user's subscription, of the
    /// lease subscription, or of the shared one) to the leases and to their
    /// users' watches; entries of users not watched here are dropped.
    fn apply_events(&self, events: Vec<Message>) {
        let mut st = self.state.lock();
        for msg in events {
            match presence::observe(msg.subject.as_str(), msg.headers.as_ref(), &msg.payload) {
                Some(Observation::Lease(l)) if st.leases.apply(&l) => st.announce_node(&l.node),
                Some(Observation::Entry(o)) => {
                    let lease_changed = st.leases.written_under(&o);
                    let State { watched, leases, .. } = &mut *st;
                    if let Some(w) = watched.get_mut(o.user.as_str()) {
                        w.apply(&o);
                        w.announce(&o.user, leases);
                    }
                    if lease_changed {
                        st.announce_node(&o.node);
                    }
                }
                Some(Observation::Lease(_)) | None => {}
            }
        }
    }

    /// Subscribes to the events that keep the watches current. Called once,
    /// before any watch. Every gateway follows every node's lease. With
    /// `shared`, one subscription to every user's events feeds the watches
    /// too, instead of one per watched user: every gateway then receives
    /// every user's changes, and a watched user costs no subscription and
    /// no task.
    pub async fn subscribe_events(self: &Arc<Self>, shared: bool) -> Result<(), async_nats::SubscribeError> {
        let subject = if shared { subjects::ALL_PRESENCE_EVENTS } else { subjects::LEASE_EVENTS };
        let events = self.nats.subscribe(subject).await?;
        self.shared.store(shared, Ordering::Release);
        tokio::spawn(tasks::in_batches(Arc::downgrade(self), events, Presence::apply_events));
        Ok(())
    }

    /// Re-reads every watched user's entries and every lease, and announces
    /// what changed (after a NATS reconnect, when change events may have
    /// been missed).
    pub async fn resync(&self) {
        let users: Vec<UserId> = self.state.lock().watched.keys().cloned().collect();
        for chunk in users.chunks(500) {
            let snapshot = match presence::snapshot(&self.nats, chunk).await {
                Ok(s) => s,
                Err(e) => return tracing::warn!(error = %e, "presence resync failed"),
            };
            let mut st = self.state.lock();
            st.merge(&snapshot);
            let State { watched, leases, .. } = &mut *st;
            for u in chunk {
                let Some(w) = watched.get_mut(u) else { continue };
                let items = snapshot.of(u.as_str());
                // Entries absent from the snapshot are gone.
                let present: HashSet<&str> = items.iter().map(|o| o.node.as_str()).collect();
                for (node, (_, entry)) in w.nodes.iter_mut() {
                    if !present.contains(node.as_str()) {
                        *entry = None;
                    }
                }
                for o in items {
                    w.apply(o);
                }
                w.announce(u.as_str(), leases);
            }
        }
    }

    /// Drops `conn`'s interest in `users` (all of them when `None`).
    pub fn unwatch(&self, conn_id: u64, users: &HashSet<UserId>) {
        let mut st = self.state.lock();
        for u in users {
            let empty = match st.watched.get_mut(u) {
                Some(w) => {
                    w.subscribers.remove(&conn_id);
                    w.subscribers.is_empty()
                }
                None => false,
            };
            if empty && let Some(Watch { task: Some(t), .. }) = st.watched.remove(u) {
                t.abort();
            }
        }
    }

    /// Current presence of `users` without subscribing (HTTP).
    pub async fn lookup(&self, users: &[UserId]) -> Result<Vec<(UserId, View)>, String> {
        let snapshot = presence::snapshot(&self.nats, users).await?;
        let mut st = self.state.lock();
        st.merge(&snapshot);
        Ok(users
            .iter()
            .map(|u| {
                let (status, last_seen) = st.leases.view(snapshot.of(u.as_str()));
                (u.clone(), View { status, last_seen })
            })
            .collect())
    }

    pub fn node(&self) -> &NodeId {
        &self.node
    }
}

/// Writes entries in the order they were decided; acks are awaited together.
///
/// The acks are polled even while a publish waits ([`alongside`]). async-nats lets one
/// JetStream context have 5 000 publishes unacknowledged (the gateway's
/// message sends share them), and gives a permit back only when its ack
/// future completes. A writer that stopped polling its acks while it waited
/// for a permit would wait for ever, and so would every message send of the
/// gateway: it did, after a burst of more than 5 000 writes.
///
/// The user of a write that fails goes into `unstored`, for the heartbeat to
/// write again; a write that finds no bucket sets `bucket_gone`. Failures
/// are logged at warn once per [`WARN_EVERY`], with the number since the
/// last warning (at debug in between): in an outage every connect, leave
/// and retry fails, and a line for each would flood the log.
async fn write_loop(
    js: jetstream::Context,
    mut rx: mpsc::UnboundedReceiver<Write>,
    Failures { unstored, bucket_gone }: Failures,
    metrics: Arc<super::metrics::Metrics>,
) {
    let warned: Mutex<(Option<Instant>, u64)> = Mutex::new((None, 0));
    let failed = |user: Option<UserId>, subject: &str, error: &dyn std::fmt::Display| {
        let mut w = warned.lock();
        let now = Instant::now();
        match *w {
            (Some(at), ref mut quiet) if now.duration_since(at) < WARN_EVERY => {
                *quiet += 1;
                tracing::debug!(subject, error = %error, "presence write failed");
            }
            (_, quiet) => {
                tracing::warn!(subject, error = %error, failed_since_last_warning = quiet, "presence write failed");
                *w = (Some(now), 0);
            }
        }
        if let Some(user) = user {
            unstored.lock().insert(user);
        }
    };
    let acked = |(user, subject, r): (Option<UserId>, String, Result<_, jetstream::context::PublishError>)| {
        if let Err(e) = r {
            if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound {
                bucket_gone.store(true, Ordering::Relaxed);
            }
            failed(user, &subject, &e);
        }
    };
    let mut acks = FuturesUnordered::new();
    while let Some(w) = alongside(rx.recv(), &mut acks, acked).await {
        let subject = w.put.subject.clone();
        match alongside(presence::send(&js, w.put), &mut acks, acked).await {
            Ok(fut) => {
                metrics.presence_updates.inc();
                let user = w.user;
                acks.push(async move { (user, subject, fut.await) })
            }
            Err(e) => failed(w.user, &subject, &e),
        }
        if let Some(done) = w.done {
            while let Some(r) = acks.next().await {
                acked(r);
            }
            let _ = done.send(());
        }
    }
    while let Some(r) = acks.next().await {
        acked(r);
    }
}

/// Where the writer reports failed writes to the heartbeat.
struct Failures {
    unstored: Arc<Mutex<HashSet<UserId>>>,
    bucket_gone: Arc<AtomicBool>,
}

impl Presence {
    /// After a write found no presence bucket: makes it again if it is still
    /// missing, and marks every entry of this node unstored, for the
    /// heartbeat to write again. The wipe took them (entries are written on
    /// change only), whether this gateway or another one made the bucket
    /// again. (Last-seen records of users no longer connected are lost with
    /// it.)
    async fn remake_bucket(&self) {
        let make = bus::presence::ensure_bucket(&self.js, &self.bucket);
        let found_by = "a presence write";
        if !super::remake_if_gone(&self.js, &self.metrics, subjects::PRESENCE_STREAM, "presence", found_by, make).await
        {
            self.bucket_gone.store(true, Ordering::Relaxed);
            return;
        }
        let st = self.state.lock();
        let mut unstored = self.unstored.lock();
        unstored.extend(st.local.iter().filter(|(_, l)| !l.sessions.is_empty()).map(|(u, _)| u.clone()));
        tracing::info!(entries = unstored.len(), "writing this gateway's presence entries again");
    }
}

/// Refreshes the lease every TTL/3, acknowledged, and with it the rare
/// entry unwritten for [`ENTRY_REFRESH`] (a session of more than a day),
/// and, while NATS is connected, the entries whose last write failed.
/// Nothing else: the heartbeat costs one write per node, whatever its
/// number of users.
async fn heartbeat(p: std::sync::Weak<Presence>, stop: CancellationToken) {
    let Some(every) = p.upgrade().map(|p| p.settings.ttl / 3) else { return };
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(300)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(p) = p.upgrade() else { return };
        let connected = p.nats.connection_state() == async_nats::connection::State::Connected;
        if connected && p.bucket_gone.swap(false, Ordering::Relaxed) {
            p.remake_bucket().await;
        }
        let _ = p.writes.send(Write::lease(p.lease(p.settings.ttl)));
        let now = Instant::now();
        let mut st = p.state.lock();
        st.leases.forget_ended_before(now_ms() - ENTRY_TTL.as_millis() as i64);
        for (user, l) in st.due(now) {
            l.written = now;
            let _ = p.writes.send(Write::change(user, p.entry_of(user, l)));
        }
        if connected {
            let unstored = std::mem::take(&mut *p.unstored.lock());
            for user in unstored {
                let put = match st.local.get_mut(&user) {
                    Some(l) if l.sessions.is_empty() => continue, // its grace timer writes it
                    Some(l) => {
                        l.written = now;
                        p.entry_of(&user, l)
                    }
                    None => p.entry(&user, Status::Offline, 0), // gone, and its offline record failed
                };
                let _ = p.writes.send(Write::change(&user, put));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heartbeat_rewrites_an_entry_only_a_day_after_its_last_write() {
        let mut st = State::new();
        let users: Vec<UserId> = (0..100).map(|i| UserId::parse(&format!("u{i}")).unwrap()).collect();
        let start = Instant::now();
        for (i, u) in users.iter().enumerate() {
            let l = st.local.entry(u.clone()).or_insert_with(Local::new);
            l.sessions.push((i as u64, Status::Online));
            l.written = start;
        }
        st.local.get_mut(&users[0]).unwrap().sessions.clear(); // in its grace period: not refreshed
        assert_eq!(st.due(start + ENTRY_REFRESH / 2).count(), 0, "nothing is due within the day");
        let later = start + ENTRY_REFRESH;
        let due: HashSet<UserId> = st
            .due(later)
            .map(|(u, l)| {
                l.written = later;
                u.clone()
            })
            .collect();
        assert_eq!(due.len(), 99);
        assert!(!due.contains(&users[0]));
        assert_eq!(st.due(later + Duration::from_secs(1)).count(), 0, "each once per day");
    }
}
