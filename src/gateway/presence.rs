//! Presence on this gateway: the node's own entries in the `presence` bucket
//! (one per locally connected user, refreshed by a heartbeat, written offline
//! after a grace period), and watches of other users' entries for clients
//! that subscribed (one core subscription per watched user, shared by every
//! local subscriber; or, after [`Presence::share_subscription`], one for
//! every user's events, routed to the watches).

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
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
        envelope::now_ms,
        presence::{self, Entry, Observed, Status},
        subjects,
    },
    ids::{NodeId, UserId},
    tasks::{self, alongside},
};

/// How long an offline entry (which carries `last_seen`) is kept.
const OFFLINE_RECORD_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// The heartbeat refreshes a tenth of the local entries at a time, so a
/// gateway's thousands of users are not all rewritten in one burst.
const HEARTBEAT_SLICES: u32 = 10;

#[derive(Debug, Clone, Copy)]
pub struct PresenceSettings {
    pub ttl: Duration,
    pub grace: Duration,
}

/// A user's aggregated presence as clients see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct View {
    pub status: Status,
    pub last_seen: i64,
}

#[derive(Default)]
struct Local {
    /// (connection id, status) of each session here: one or a few, so a
    /// `Vec` (a map's first insert allocates four buckets).
    sessions: Vec<(u64, Status)>,
    /// Bumped by every change, so a stale grace timer does nothing.
    generation: u32,
    /// Which of the heartbeat's slices refreshes this entry.
    slice: u32,
    published: Option<(Status, u32)>,
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
    fn announce(&mut self, user: &str) {
        let v = self.view();
        if self.initialized && self.sent.is_none_or(|s| s.status != v.status) {
            self.sent = Some(v);
            for c in self.subscribers.values() {
                c.deliver_ephemeral(frame(user, v));
            }
        }
    }

    fn view(&self) -> View {
        let (status, seen) = presence::aggregate(self.nodes.values().filter_map(|(_, e)| e.as_ref()));
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
    user: UserId,
    entry: Entry,
    ttl: Duration,
    /// A heartbeat's refresh of an unchanged entry: published without an
    /// ack (a lost one is followed by the next well within the TTL).
    refresh: bool,
    /// Answered once this write and all before it are acknowledged.
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Write {
    /// A change of this node's entry for `user`, acknowledged, with no one
    /// waiting for it.
    fn change(user: UserId, entry: Entry, ttl: Duration) -> Self {
        Self { user, entry, ttl, refresh: false, done: None }
    }
}

struct State {
    local: HashMap<UserId, Local>,
    watched: HashMap<UserId, Watch>,
    /// Slices are dealt round-robin, so each holds a tenth of the entries.
    next_slice: u32,
}

impl State {
    fn local_mut(&mut self, user: &UserId) -> &mut Local {
        let slice = &mut self.next_slice;
        self.local.entry(user.clone()).or_insert_with(|| {
            *slice = (*slice + 1) % HEARTBEAT_SLICES;
            Local { slice: *slice, ..Local::default() }
        })
    }

    /// The entries the heartbeat's `tick` refreshes: those of its slice
    /// that still have a session here.
    fn due(&self, tick: u64) -> impl Iterator<Item = (&UserId, &Local)> {
        let slice = (tick % u64::from(HEARTBEAT_SLICES)) as u32;
        self.local.iter().filter(move |(_, l)| l.slice == slice && !l.sessions.is_empty())
    }
}

pub struct Presence {
    nats: Client,
    node: NodeId,
    settings: PresenceSettings,
    writes: mpsc::UnboundedSender<Write>,
    state: Mutex<State>,
    /// One subscription feeds every watch ([`Presence::share_subscription`]).
    shared: AtomicBool,
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
    /// Starts the writer and heartbeat tasks (they end with `stop`).
    pub fn start(
        js: jetstream::Context,
        nats: Client,
        node: NodeId,
        settings: PresenceSettings,
        stop: CancellationToken,
        metrics: Arc<super::metrics::Metrics>,
    ) -> Arc<Self> {
        let (writes, rx) = mpsc::unbounded_channel();
        let p = Arc::new(Self {
            nats,
            node: node.clone(),
            settings,
            writes,
            state: Mutex::new(State { local: HashMap::new(), watched: HashMap::new(), next_slice: 0 }),
            shared: AtomicBool::new(false),
        });
        tokio::spawn(write_loop(js, node, rx, metrics));
        tokio::spawn(heartbeat(Arc::downgrade(&p), stop));
        p
    }

    fn local_entry(l: &Local) -> Entry {
        let status = l.sessions.iter().map(|&(_, s)| s).max().unwrap_or(Status::Offline);
        Entry { status, sessions: l.sessions.len() as u32, last_seen: now_ms() }
    }

    /// Publishes this node's entry for `user` if status or session count changed.
    fn publish_if_changed(&self, user: &UserId, l: &mut Local) {
        let e = Self::local_entry(l);
        if l.published != Some((e.status, e.sessions)) {
            l.published = Some((e.status, e.sessions));
            let _ = self.writes.send(Write::change(user.clone(), e, self.settings.ttl));
        }
    }

    pub fn session_started(&self, user: &UserId, conn_id: u64) {
        let mut st = self.state.lock();
        let l = st.local_mut(user);
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
                let entry = Entry { status: Status::Offline, sessions: 0, last_seen: now_ms() };
                let _ = p.writes.send(Write::change(user, entry, OFFLINE_RECORD_TTL));
            }
        });
    }

    /// Graceful shutdown: rewrites every local entry to expire after the
    /// grace period, then waits (bounded) for the writes to be stored. Users
    /// who reconnect elsewhere within the grace never show offline; the
    /// others go offline when their entry expires, with no process left.
    pub async fn hand_over(&self, within: Duration) -> usize {
        let (done, stored) = tokio::sync::oneshot::channel();
        let local: Vec<(UserId, Local)> = self.state.lock().local.drain().collect();
        let n = local.len();
        let mut done = Some(done);
        let ttl = self.settings.grace.max(Duration::from_secs(1));
        for (i, (user, l)) in local.into_iter().enumerate() {
            let mut entry = Self::local_entry(&l);
            if l.sessions.is_empty() {
                entry.status = Status::Offline; // already in its grace period
            }
            let done = if i + 1 == n { done.take() } else { None };
            let _ = self.writes.send(Write { done, ..Write::change(user, entry, ttl) });
        }
        if n > 0 {
            let _ = tokio::time::timeout(within, stored).await;
        }
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
            for u in users {
                match st.watched.get_mut(u) {
                    Some(w) => {
                        w.subscribers.insert(conn.id, conn.clone());
                        if w.initialized {
                            ready.push((u.clone(), w.view()));
                        }
                    }
                    None => {
                        st.watched.insert(u.clone(), Watch::new(HashMap::from([(conn.id, conn.clone())])));
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
        let mut subs = subs.into_iter();
        for u in &fresh {
            let sub = subs.next(); // none with the shared subscription
            let Some(w) = st.watched.get_mut(u) else { continue }; // unwatched meanwhile
            if let Ok(items) = &snapshot {
                for o in items.iter().filter(|o| o.user == u.as_str()) {
                    w.apply(o);
                }
            }
            w.initialized = true;
            let v = w.view();
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

    /// Users watched from this gateway.
    pub fn watch_count(&self) -> usize {
        self.state.lock().watched.len()
    }

    /// Applies presence events (of one watched user's subscription, or of
    /// the shared one) to their users' watches; events of users not watched
    /// here are dropped.
    fn apply_events(&self, events: Vec<Message>) {
        let mut st = self.state.lock();
        for msg in events {
            let Some(o) = presence::observe(msg.subject.as_str(), msg.headers.as_ref(), &msg.payload) else {
                continue;
            };
            if let Some(w) = st.watched.get_mut(o.user.as_str()) {
                w.apply(&o);
                w.announce(&o.user);
            }
        }
    }

    /// From now on, one subscription to every user's presence events feeds
    /// the watches, instead of one per watched user. Called once, before
    /// any watch. Every gateway then receives every user's changes and
    /// heartbeat refreshes (one per online user and gateway every TTL/3),
    /// and a watched user costs no subscription and no task.
    pub async fn share_subscription(self: &Arc<Self>) -> Result<(), async_nats::SubscribeError> {
        let events = self.nats.subscribe(subjects::ALL_PRESENCE_EVENTS).await?;
        self.shared.store(true, Ordering::Release);
        tokio::spawn(tasks::in_batches(Arc::downgrade(self), events, Presence::apply_events));
        Ok(())
    }

    /// Re-reads every watched user's entries and announces what changed
    /// (after a NATS reconnect, when change events may have been missed).
    pub async fn resync(&self) {
        let users: Vec<UserId> = self.state.lock().watched.keys().cloned().collect();
        for chunk in users.chunks(500) {
            let items = match presence::snapshot(&self.nats, chunk).await {
                Ok(items) => items,
                Err(e) => return tracing::warn!(error = %e, "presence resync failed"),
            };
            let mut st = self.state.lock();
            for u in chunk {
                let Some(w) = st.watched.get_mut(u) else { continue };
                // Entries absent from the snapshot are gone.
                let present: HashSet<&str> =
                    items.iter().filter(|o| o.user == u.as_str()).map(|o| o.node.as_str()).collect();
                for (node, (_, entry)) in w.nodes.iter_mut() {
                    if !present.contains(node.as_str()) {
                        *entry = None;
                    }
                }
                for o in items.iter().filter(|o| o.user == u.as_str()) {
                    w.apply(o);
                }
                w.announce(u.as_str());
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
        let items = presence::snapshot(&self.nats, users).await?;
        Ok(users
            .iter()
            .map(|u| {
                let mut w = Watch::new(HashMap::new());
                for o in items.iter().filter(|o| o.user == u.as_str()) {
                    w.apply(o);
                }
                (u.clone(), w.view())
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
/// gateway: it did, after a heartbeat of more than 5 000 users.
async fn write_loop(
    js: jetstream::Context,
    node: NodeId,
    mut rx: mpsc::UnboundedReceiver<Write>,
    metrics: Arc<super::metrics::Metrics>,
) {
    fn acked<T, E: std::fmt::Display>(r: Result<T, E>) {
        if let Err(e) = r {
            tracing::warn!(error = %e, "presence write not acknowledged");
        }
    }
    let nats = js.client();
    let mut acks = FuturesUnordered::new();
    while let Some(w) = alongside(rx.recv(), &mut acks, acked).await {
        if w.refresh {
            match presence::refresh(&nats, &w.user, &node, &w.entry, w.ttl).await {
                Ok(()) => {
                    metrics.presence_updates.inc();
                }
                Err(e) => tracing::warn!(user = %w.user, error = %e, "presence refresh failed"),
            }
        } else {
            match alongside(presence::send(&js, &w.user, &node, &w.entry, w.ttl), &mut acks, acked).await {
                Ok(fut) => {
                    metrics.presence_updates.inc();
                    acks.push(fut.into_future())
                }
                Err(e) => tracing::warn!(user = %w.user, error = %e, "presence write failed"),
            }
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

/// Refreshes every local entry well within its TTL: each entry once every
/// TTL/3, a slice of them at a time (a tenth of that period apart).
async fn heartbeat(p: std::sync::Weak<Presence>, stop: CancellationToken) {
    let Some(every) = p.upgrade().map(|p| p.settings.ttl / 3) else { return };
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(300)) / HEARTBEAT_SLICES);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    for n in 0u64.. {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(p) = p.upgrade() else { return };
        let st = p.state.lock();
        for (user, l) in st.due(n) {
            let refresh = Write::change(user.clone(), Presence::local_entry(l), p.settings.ttl);
            let _ = p.writes.send(Write { refresh: true, ..refresh });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State { local: HashMap::new(), watched: HashMap::new(), next_slice: 0 }
    }

    #[test]
    fn the_heartbeat_refreshes_each_entry_with_a_session_once_per_round_in_even_slices() {
        let mut st = state();
        let users: Vec<UserId> = (0..1000).map(|i| UserId::parse(&format!("u{i}")).unwrap()).collect();
        for (i, u) in users.iter().enumerate() {
            st.local_mut(u).sessions.push((i as u64, Status::Online));
        }
        st.local_mut(&users[0]).sessions.clear(); // in its grace period: not refreshed
        let mut written: HashMap<&UserId, u32> = HashMap::new();
        // Two rounds, starting mid-round.
        for tick in 7..7 + 2 * u64::from(HEARTBEAT_SLICES) {
            let due: Vec<&UserId> = st.due(tick).map(|(u, _)| u).collect();
            assert!((99..=100).contains(&due.len()), "tick {tick}: {} entries", due.len());
            for u in due {
                *written.entry(u).or_default() += 1;
            }
        }
        assert_eq!(written.len(), 999);
        assert!(!written.contains_key(&users[0]));
        assert!(written.values().all(|&n| n == 2), "each entry twice in two rounds");
    }
}
