//! The presence KV bucket: one entry per (user, node), and one lease per
//! node. A node's entries count only while its lease lives: the node's
//! heartbeat refreshes the lease alone (one write per node, not per user),
//! and a crashed node's lease expires and leaves a delete marker that
//! watchers see, which takes every user of that node offline at once.

use std::{collections::HashMap, time::Duration};

use anyhow::Context;
use async_nats::{
    Client, HeaderMap,
    jetstream::{self, kv, message::PublishMessage, stream::Republish},
};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::subjects;
use crate::{
    config::NatsSettings,
    ids::{NodeId, UserId},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Offline,
    Away,
    Online,
}

/// One node's view of one user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub status: Status,
    pub sessions: u32,
    /// ms since the epoch.
    pub last_seen: i64,
    /// The epoch of the node's lease this entry lives by: it counts only
    /// while that node holds a lease of this epoch. `None` (an entry
    /// written before leases) counts while it is present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<u64>,
}

/// A node's lease: alive while the key is present. A new epoch per process,
/// so a node restarted under the same id does not revive the entries of its
/// previous life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub epoch: u64,
    /// When the node last wrote it, ms since the epoch.
    pub last_seen: i64,
}

/// How long delete markers stay (so late watchers still see them).
const MARKER_TTL: Duration = Duration::from_secs(60);

pub async fn ensure_bucket(js: &jetstream::Context, s: &NatsSettings) -> anyhow::Result<()> {
    let config = kv::Config {
        bucket: subjects::PRESENCE_BUCKET.to_owned(),
        description: "natter: presence per user and gateway".to_owned(),
        history: 1,
        max_value_size: 1024,
        storage: jetstream::stream::StorageType::File,
        num_replicas: s.stream_replicas.max(1),
        republish: Some(Republish {
            source: subjects::PRESENCE_REPUBLISH_SRC.to_owned(),
            destination: subjects::PRESENCE_REPUBLISH_DEST.to_owned(),
            headers_only: false,
        }),
        limit_markers: Some(MARKER_TTL),
        ..Default::default()
    };
    super::setup(js, |js| {
        let config = config.clone();
        async move { js.create_or_update_key_value(config).await }
    })
    .await
    .context("cannot create or update the presence bucket (needs nats-server >= 2.11)")?;
    Ok(())
}

/// A value to write under a bucket subject, living `ttl` unless rewritten.
#[derive(Debug)]
pub struct Put {
    pub subject: String,
    pub payload: Bytes,
    pub ttl: Duration,
}

impl Put {
    pub fn entry(user: &UserId, node: &NodeId, entry: &Entry, ttl: Duration) -> Self {
        let payload = serde_json::to_vec(entry).expect("serialisable").into();
        Self { subject: subjects::presence_key(user, node), payload, ttl }
    }

    pub fn lease(node: &NodeId, lease: &Lease, ttl: Duration) -> Self {
        let payload = serde_json::to_vec(lease).expect("serialisable").into();
        Self { subject: subjects::presence_lease_key(node), payload, ttl }
    }

    /// TTLs are whole seconds, at least one.
    fn ttl_secs(&self) -> u64 {
        self.ttl.as_secs().max(1)
    }
}

/// Issues `put`; returns the future of its ack (issue order is write order).
pub async fn send(js: &jetstream::Context, put: Put) -> Result<jetstream::context::PublishAckFuture, String> {
    let ttl = Duration::from_secs(put.ttl_secs());
    js.send_publish(put.subject, PublishMessage::build().payload(put.payload).ttl(ttl)).await.map_err(|e| e.to_string())
}

/// A user's entry as read: which node, at which stream sequence, and the
/// entry (`None` = deleted or expired).
#[derive(Debug, Clone)]
pub struct Observed {
    pub user: String,
    pub node: String,
    pub seq: u64,
    pub entry: Option<Entry>,
}

/// A node's lease as read (`lease` is `None` once it expired or was deleted).
#[derive(Debug, Clone)]
pub struct LeaseObserved {
    pub node: String,
    pub seq: u64,
    pub lease: Option<Lease>,
}

/// One message of the bucket, read.
#[derive(Debug, Clone)]
pub enum Observation {
    Entry(Observed),
    Lease(LeaseObserved),
}

/// Reads a KV message (republished or direct get) into an observation.
/// `subject` is `$KV.presence.<user>.<node>` or `presence.evt.<user>.<node>`;
/// `<user>` is [`subjects::LEASE_TOKEN`] for a node's lease.
pub fn observe(subject: &str, headers: Option<&HeaderMap>, payload: &[u8]) -> Option<Observation> {
    let mut parts = subject.rsplitn(3, '.');
    let node = parts.next()?.to_owned();
    let user = parts.next()?.to_owned();
    let get = |k: &str| headers.and_then(|h| h.get(k)).map(|v| v.as_str().to_owned());
    let seq = get("Nats-Sequence").and_then(|s| s.parse().ok()).unwrap_or(0);
    let deleted = get("Nats-Marker-Reason").is_some()
        || matches!(get("KV-Operation").as_deref(), Some("DEL") | Some("PURGE"))
        || payload.is_empty();
    Some(if user == subjects::LEASE_TOKEN {
        let lease = if deleted { None } else { serde_json::from_slice(payload).ok() };
        Observation::Lease(LeaseObserved { node, seq, lease })
    } else {
        let entry = if deleted { None } else { serde_json::from_slice(payload).ok() };
        Observation::Entry(Observed { user, node, seq, entry })
    })
}

/// Every node's lease as last observed. A node with no record holds no
/// lease.
#[derive(Debug, Default, Clone)]
pub struct Leases(HashMap<String, Known>);

/// What is known of one node's lease.
#[derive(Debug, Clone, Copy)]
struct Known {
    /// The stream sequence it was learnt from.
    seq: u64,
    /// The last epoch heard of, and whether the node still holds it.
    epoch: u64,
    alive: bool,
    /// When the node last wrote its lease of that epoch, ms since the epoch.
    last_seen: i64,
}

impl Known {
    fn held(&self) -> Option<u64> {
        self.alive.then_some(self.epoch)
    }

    /// `self` after hearing that the node holds `epoch`, as of `seq` and `last_seen`.
    fn holding(prior: Option<Known>, seq: u64, epoch: u64, last_seen: i64) -> Self {
        let last_seen = match prior {
            Some(k) if k.epoch == epoch => k.last_seen.max(last_seen),
            _ => last_seen,
        };
        Self { seq, epoch, alive: true, last_seen }
    }
}

impl Leases {
    /// Records `o` if it is newer than what is known of its node; answers
    /// whether that changed which entries of the node count.
    pub fn apply(&mut self, o: &LeaseObserved) -> bool {
        let prior = self.0.get(&o.node).copied();
        if prior.is_some_and(|k| o.seq != 0 && o.seq < k.seq) {
            return false;
        }
        let known = match (o.lease, prior) {
            (Some(l), _) => Known::holding(prior, o.seq, l.epoch, l.last_seen),
            (None, Some(k)) => Known { seq: o.seq, alive: false, ..k },
            (None, None) => return false, // the end of a lease never heard of
        };
        self.0.insert(o.node.clone(), known);
        prior.and_then(|k| k.held()) != known.held()
    }

    /// A live change of an entry proves its node was writing under the
    /// entry's lease when it wrote it (a node writes its lease before any
    /// entry of that epoch), even if the lease's own event is still on its
    /// way. Answers whether that changed which entries of the node count.
    pub fn written_under(&mut self, o: &Observed) -> bool {
        let Some(e @ Entry { lease: Some(epoch), .. }) = o.entry else { return false };
        let prior = self.0.get(&o.node).copied();
        if prior.is_some_and(|k| k.seq >= o.seq || k.held() == Some(epoch)) {
            return false;
        }
        self.0.insert(o.node.clone(), Known::holding(prior, o.seq, epoch, e.last_seen));
        true
    }

    /// Takes in a snapshot, whose leases are every lease there was when it
    /// was read: a node known here by an older write but absent from it has
    /// lost its lease. Answers the nodes whose counting entries changed.
    pub fn merge(&mut self, snapshot: &Snapshot) -> Vec<String> {
        let mut changed = Vec::new();
        for (node, k) in &snapshot.leases.0 {
            let lease = k.alive.then_some(Lease { epoch: k.epoch, last_seen: k.last_seen });
            if self.apply(&LeaseObserved { node: node.clone(), seq: k.seq, lease }) {
                changed.push(node.clone());
            }
        }
        for (node, k) in self.0.iter_mut() {
            if k.alive && k.seq < snapshot.high_water && !snapshot.leases.0.contains_key(node) {
                k.alive = false;
                changed.push(node.clone());
            }
        }
        changed
    }

    /// Forgets the nodes that lost their lease before `cutoff` (ms since
    /// the epoch): entries written under it have expired since, when
    /// `cutoff` is their TTL ago. A node id is heard of once per gateway
    /// process, so without this the records would grow with every restart.
    pub fn forget_ended_before(&mut self, cutoff: i64) {
        self.0.retain(|_, k| k.alive || k.last_seen >= cutoff);
    }

    /// Whether `entry`, written by `node`, counts.
    pub fn holds(&self, node: &str, entry: &Entry) -> bool {
        match entry.lease {
            None => true,
            Some(e) => self.0.get(node).is_some_and(|k| k.held() == Some(e)),
        }
    }

    /// How `entry` of `node` reads. An offline entry, or one from before
    /// leases, as written. Otherwise last seen when its node last wrote the
    /// lease the entry lives by (while it is connected, a user is seen with
    /// each lease refresh); and offline once that lease is gone.
    pub fn effective(&self, node: &str, entry: &Entry) -> Entry {
        let Some(epoch) = entry.lease.filter(|_| entry.status != Status::Offline) else { return *entry };
        let known = self.0.get(node).filter(|k| k.epoch == epoch);
        let status = if known.is_some_and(|k| k.alive) { entry.status } else { Status::Offline };
        Entry { status, last_seen: entry.last_seen.max(known.map_or(0, |k| k.last_seen)), ..*entry }
    }

    /// The combined status and last seen of one user's `entries`.
    pub fn view(&self, entries: &[Observed]) -> (Status, i64) {
        aggregate(entries.iter().filter_map(|o| o.entry.map(|e| self.effective(&o.node, &e))))
    }
}

/// What a snapshot read: the users' entries and every node's lease.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// user → the entries of every node.
    entries: HashMap<String, Vec<Observed>>,
    leases: Leases,
    /// The highest stream sequence read: what was written later is newer
    /// than the snapshot.
    high_water: u64,
}

impl Snapshot {
    /// The entries of `user`, one per node.
    pub fn of(&self, user: &str) -> &[Observed] {
        self.entries.get(user).map_or(&[], Vec::as_slice)
    }

    /// The combined status and last seen of `user`.
    pub fn view(&self, user: &str) -> (Status, i64) {
        self.leases.view(self.of(user))
    }
}

#[derive(Serialize)]
struct MultiLast<'a> {
    multi_last: &'a [String],
    batch: usize,
}

/// The current entries of every node for `users` and every node's lease,
/// by batch direct gets of `SNAPSHOT_CHUNK` users each.
pub async fn snapshot(client: &Client, users: &[UserId]) -> Result<Snapshot, String> {
    let mut out = Snapshot::default();
    for chunk in users.chunks(SNAPSHOT_CHUNK) {
        for o in snapshot_chunk(client, chunk).await? {
            let seq = match &o {
                Observation::Entry(e) => e.seq,
                Observation::Lease(l) => l.seq,
            };
            out.high_water = out.high_water.max(seq);
            match o {
                Observation::Entry(e) => out.entries.entry(e.user.clone()).or_default().push(e),
                Observation::Lease(l) => {
                    out.leases.apply(&l);
                }
            }
        }
    }
    Ok(out)
}

/// Users per batch direct get. With one request of 1 000 user filters
/// (nats-server 2.15.1), a `presence_sub` of the full allowance got no
/// snapshot frame at all; `natter bench churn` found it, and
/// tests/it/presence.rs holds the case.
const SNAPSHOT_CHUNK: usize = 500;

async fn snapshot_chunk(client: &Client, users: &[UserId]) -> Result<Vec<Observation>, String> {
    if users.is_empty() {
        return Ok(Vec::new());
    }
    let mut keys: Vec<String> = users.iter().map(subjects::presence_keys_of).collect();
    keys.push(subjects::PRESENCE_LEASES.to_owned());
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.map_err(|e| e.to_string())?;
    let req = serde_json::to_vec(&MultiLast { multi_last: &keys, batch: 10_000 }).expect("serialisable");
    client
        .publish_with_reply(subjects::direct_get(subjects::PRESENCE_STREAM), inbox, req.into())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(3), sub.next())
            .await
            .map_err(|_| "presence snapshot timed out".to_owned())?
            .ok_or("subscription closed")?;
        match msg.status.map(|s| s.as_u16()) {
            None | Some(200) => {}
            Some(204) | Some(404) => break,
            Some(s) => return Err(format!("presence snapshot: status {s}")),
        }
        let subject = msg.headers.as_ref().and_then(|h| h.get("Nats-Subject")).map(|v| v.as_str().to_owned());
        if let Some(o) = subject.and_then(|s| observe(&s, msg.headers.as_ref(), &msg.payload)) {
            out.push(o);
        }
    }
    Ok(out)
}

/// The best status over a user's entries: online beats away beats offline;
/// `last_seen` is the latest.
pub fn aggregate(entries: impl IntoIterator<Item = Entry>) -> (Status, i64) {
    entries.into_iter().fold((Status::Offline, 0), |(s, t), e| (s.max(e.status), t.max(e.last_seen)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(status: Status, last_seen: i64, lease: Option<u64>) -> Entry {
        Entry { status, sessions: 1, last_seen, lease }
    }

    fn lease(node: &str, seq: u64, epoch: Option<u64>, last_seen: i64) -> LeaseObserved {
        LeaseObserved { node: node.to_owned(), seq, lease: epoch.map(|epoch| Lease { epoch, last_seen }) }
    }

    #[test]
    fn best_status_wins_and_last_seen_is_latest() {
        let e = |status, last_seen| entry(status, last_seen, None);
        assert_eq!(aggregate([e(Status::Away, 5), e(Status::Online, 3)]), (Status::Online, 5));
        assert_eq!(aggregate([e(Status::Away, 5), e(Status::Offline, 9)]), (Status::Away, 9));
        assert_eq!(aggregate([]), (Status::Offline, 0));
    }

    #[test]
    fn observes_entries_leases_and_markers() {
        let Some(Observation::Entry(o)) =
            observe("presence.evt.alice.gw1", None, br#"{"status":"away","sessions":2,"last_seen":7,"lease":3}"#)
        else {
            panic!("an entry")
        };
        assert_eq!((o.user.as_str(), o.node.as_str()), ("alice", "gw1"));
        assert_eq!(o.entry, Some(entry(Status::Away, 7, Some(3))).map(|e| Entry { sessions: 2, ..e }));
        // Entries written before leases have none.
        let Some(Observation::Entry(o)) =
            observe("presence.evt.bob.gw1", None, br#"{"status":"online","sessions":1,"last_seen":7}"#)
        else {
            panic!("an entry")
        };
        assert_eq!(o.entry.unwrap().lease, None);
        let mut h = HeaderMap::new();
        h.insert("Nats-Marker-Reason", "MaxAge");
        h.insert("Nats-Sequence", "42");
        let Some(Observation::Entry(o)) = observe("$KV.presence.alice.gw1", Some(&h), b"") else { panic!("an entry") };
        assert_eq!((o.seq, o.entry), (42, None));
        let Some(Observation::Lease(l)) = observe("presence.evt.=.gw1", None, br#"{"epoch":9,"last_seen":8}"#) else {
            panic!("a lease")
        };
        assert_eq!((l.node.as_str(), l.lease), ("gw1", Some(Lease { epoch: 9, last_seen: 8 })));
        let Some(Observation::Lease(l)) = observe("$KV.presence.=.gw1", Some(&h), b"") else { panic!("a lease") };
        assert_eq!(l.lease, None);
    }

    #[test]
    fn an_entry_counts_while_its_nodes_lease_of_its_epoch_lives() {
        let mut leases = Leases::default();
        assert!(leases.apply(&lease("gw1", 5, Some(1), 100)));
        assert!(!leases.apply(&lease("gw1", 6, Some(1), 200)), "a refresh changes nothing that counts");
        assert!(leases.holds("gw1", &entry(Status::Online, 50, Some(1))));
        assert!(!leases.holds("gw1", &entry(Status::Online, 50, Some(2))), "another life's entry");
        assert!(!leases.holds("gw2", &entry(Status::Online, 50, Some(1))), "no lease known");
        assert!(leases.holds("gw2", &entry(Status::Online, 50, None)), "an entry from before leases");
        assert!(!leases.apply(&lease("gw1", 4, None, 0)), "an older marker is ignored");
        assert!(!leases.apply(&lease("gw9", 4, None, 0)), "the end of a lease never heard of changes nothing");
        assert!(leases.apply(&lease("gw1", 9, None, 0)));
        let online = entry(Status::Online, 50, Some(1));
        assert_eq!(leases.effective("gw1", &online), entry(Status::Offline, 200, Some(1)), "last seen with its node");
        assert!(leases.apply(&lease("gw1", 10, Some(2), 300)), "the node's next life");
        assert_eq!(leases.effective("gw1", &online), entry(Status::Offline, 50, Some(1)), "not seen in its next life");
        let now = entry(Status::Away, 250, Some(2));
        assert_eq!(leases.effective("gw1", &now), entry(Status::Away, 300, Some(2)), "seen with each lease refresh");
        let offline = entry(Status::Offline, 30, Some(1));
        assert_eq!(leases.effective("gw1", &offline), offline, "an offline entry keeps its own last seen");
    }

    #[test]
    fn a_live_entry_proves_its_lease_until_a_later_lease_event_says_otherwise() {
        let mut leases = Leases::default();
        let o = |seq, lease| Observed {
            user: "u".into(),
            node: "gw1".into(),
            seq,
            entry: Some(entry(Status::Online, 5, lease)),
        };
        assert!(!leases.written_under(&o(3, None)), "an entry from before leases proves nothing");
        assert!(leases.written_under(&o(10, Some(7))));
        assert!(leases.holds("gw1", &entry(Status::Online, 5, Some(7))));
        assert!(leases.apply(&lease("gw1", 12, None, 0)));
        assert!(!leases.written_under(&o(11, Some(7))), "written before the lease expired");
        assert!(!leases.holds("gw1", &entry(Status::Online, 5, Some(7))));
        assert!(leases.written_under(&o(20, Some(8))), "the node's next life");
        assert!(leases.holds("gw1", &entry(Status::Online, 5, Some(8))));
    }

    #[test]
    fn ended_leases_are_forgotten_after_their_entries_expired() {
        let mut leases = Leases::default();
        leases.apply(&lease("ended-long-ago", 1, Some(1), 100));
        leases.apply(&lease("ended-long-ago", 2, None, 0));
        leases.apply(&lease("ended-lately", 3, Some(2), 900));
        leases.apply(&lease("ended-lately", 4, None, 0));
        leases.apply(&lease("alive", 5, Some(3), 100));
        leases.forget_ended_before(500);
        let mut left: Vec<&str> = leases.0.keys().map(String::as_str).collect();
        left.sort();
        assert_eq!(left, ["alive", "ended-lately"]);
    }

    #[test]
    fn a_snapshot_ends_the_leases_it_lacks_unless_they_are_newer() {
        let mut known = Leases::default();
        known.apply(&lease("old", 5, Some(1), 0));
        known.apply(&lease("new", 50, Some(2), 0));
        known.apply(&lease("kept", 6, Some(3), 0));
        let mut snapshot = Snapshot { high_water: 20, ..Snapshot::default() };
        snapshot.leases.apply(&lease("kept", 18, Some(3), 0));
        assert_eq!(known.merge(&snapshot), ["old"]);
        assert!(!known.holds("old", &entry(Status::Online, 0, Some(1))), "gone when the snapshot was read");
        assert!(known.holds("new", &entry(Status::Online, 0, Some(2))), "written after the snapshot was read");
        assert!(known.holds("kept", &entry(Status::Online, 0, Some(3))));
    }
}
