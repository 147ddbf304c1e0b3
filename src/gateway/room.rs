//! One task per room that has members on this gateway. It receives the
//! room's live traffic, `live.room.<r>.>`: stored messages from the
//! stream's RePublish (`.msg`), room events (`.event`) and typing
//! (`.typing`), from a core subscription of its own or, with shared
//! subscriptions, from the hub's one subscription for every room
//! ([`RoomCmd::Live`]). It keeps the last sequence delivered, drops duplicates,
//! repairs gaps from the stream before delivering later messages, encodes each
//! message once and hands the same bytes to every local member.

use std::{collections::HashMap, sync::Arc};

use async_nats::{Client, Message, Subscriber, jetstream::stream::Stream};
use axum::extract::ws::Utf8Bytes;
use futures::channel::mpsc;
use futures::{StreamExt, future::BoxFuture};
use tokio::sync::oneshot;

use super::outbound::{ConnHandle, close};
use crate::{
    bus::{
        directget::{self, ReadError},
        envelope, subjects,
    },
    ids::RoomId,
};

/// Quiet time after live traffic before the tail of the room is checked.
const TAIL_CHECK_AFTER: std::time::Duration = std::time::Duration::from_millis(750);

/// Most live frames held for a member while it replays history.
const MAX_BUFFERED: usize = 20_000;

pub enum RoomCmd {
    /// Adds a member in buffering state; answers the room's last seq `L`.
    Join {
        conn: Arc<ConnHandle>,
        reply: oneshot::Sender<Result<u64, ReadError>>,
    },
    /// The member has everything up to `cursor`; flush its buffer, go live.
    CaughtUp {
        conn_id: u64,
        cursor: u64,
    },
    Leave {
        conn_id: u64,
    },
    /// Re-read the stream for messages after the last delivered one.
    CheckTail,
    /// Live traffic of the room, from the hub's shared subscription. Boxed:
    /// the channel keeps a node of the command's size for the room's life.
    Live(Box<Message>),
}

/// What a room task needs from the gateway.
#[derive(Clone)]
pub struct RoomDeps {
    pub metrics: Arc<super::metrics::Metrics>,
    pub nats: Client,
    pub stream: Stream,
    /// The hub's one subscription brings every room's live traffic
    /// ([`RoomCmd::Live`]); room tasks subscribe to nothing themselves.
    pub shared_subscription: bool,
    /// Test hook: drop every Nth live delivery (0 = off).
    pub drop_live_every: u64,
}

struct Member {
    conn: Arc<ConnHandle>,
    cursor: u64,
    buffer: Option<Vec<(u64, Utf8Bytes)>>,
}

struct Room {
    id: RoomId,
    subject: String,
    deps: Arc<RoomDeps>,
    last: Option<u64>,
    members: HashMap<u64, Member>,
    live_seen: u64,
}

/// The room task. Its future lives as long as the room has local members, so
/// it is kept small: the dependencies are shared behind an `Arc` (a `Stream`
/// handle alone is ~1.6 KiB) and the rarely taken paths that await are boxed
/// (heaptrack: 7.4 KiB per room task before).
pub async fn run(id: RoomId, deps: Arc<RoomDeps>, mut cmds: mpsc::UnboundedReceiver<RoomCmd>) {
    // A subscription of its own (it holds a channel block of ~5.9 KiB) unless
    // the hub's shared one brings the traffic. Awaited boxed, as every rarely
    // taken path here: this future stays small.
    let mut live = None;
    if !deps.shared_subscription {
        match Box::pin(deps.nats.subscribe(subjects::live_room(&id))).await {
            Ok(s) => live = Some(s),
            Err(e) => return Box::pin(refuse_joins(id, e, cmds)).await,
        }
    }
    let mut room =
        Room { subject: subjects::room_msg(&id), id, deps, last: None, members: HashMap::new(), live_seen: 0 };
    Box::pin(room.init()).await;
    // Armed after live traffic: once the room is quiet, check that nothing
    // after the last delivered message was lost (a gap at the tail has no
    // later message to reveal it).
    let tail_check = tokio::time::sleep(TAIL_CHECK_AFTER);
    tokio::pin!(tail_check);
    let mut armed = false;
    loop {
        // Each branch ends in a plain call that answers what is left to
        // await, if anything, boxed: no message is held in this future
        // across an await (456 bytes instead of 1 296, for every room).
        let (rest, traffic) = tokio::select! {
            biased;
            cmd = cmds.next() => match cmd {
                Some(RoomCmd::Live(msg)) => room.take_live(*msg),
                Some(cmd) => (Some(Box::pin(room.command(cmd)) as BoxFuture<'_, ()>), false),
                None => break,
            },
            Some(msg) = next_live(&mut live) => room.take_live(msg),
            _ = &mut tail_check, if armed => {
                armed = false;
                (Some(Box::pin(room.check_tail()) as BoxFuture<'_, ()>), false)
            }
        };
        if let Some(rest) = rest {
            rest.await;
        }
        if traffic {
            tail_check.as_mut().reset(tokio::time::Instant::now() + TAIL_CHECK_AFTER);
            armed = true;
        }
    }
    tracing::debug!(room = %room.id, "room task ends");
}

/// A room that could not subscribe answers every join with the error.
async fn refuse_joins(id: RoomId, e: async_nats::SubscribeError, mut cmds: mpsc::UnboundedReceiver<RoomCmd>) {
    tracing::error!(room = %id, error = %e, "cannot subscribe to room");
    while let Some(cmd) = cmds.next().await {
        if let RoomCmd::Join { reply, .. } = cmd {
            let _ = reply.send(Err(ReadError::Nats(e.to_string())));
        }
    }
}

/// The next message of the room's own subscription; never, without one.
async fn next_live(live: &mut Option<Subscriber>) -> Option<Message> {
    match live {
        Some(sub) => sub.next().await,
        None => std::future::pending().await,
    }
}

impl Room {
    /// Learns the room's last sequence, after subscribing, so nothing falls
    /// between the two.
    async fn init(&mut self) -> Option<u64> {
        if self.last.is_none() {
            match directget::last_seq(&self.deps.stream, &self.subject).await {
                Ok(seq) => self.last = Some(seq),
                Err(e) => {
                    tracing::warn!(room = %self.id, error = %e, "cannot read the room's last seq")
                }
            }
        }
        self.last
    }

    async fn command(&mut self, cmd: RoomCmd) {
        match cmd {
            RoomCmd::Join { conn, reply } => {
                let answer = match self.init().await {
                    Some(last) => {
                        self.members.insert(conn.id, Member { conn, cursor: last, buffer: Some(Vec::new()) });
                        Ok(last)
                    }
                    None => Err(ReadError::TimedOut),
                };
                let _ = reply.send(answer);
            }
            RoomCmd::CaughtUp { conn_id, cursor } => {
                if let Some(m) = self.members.get_mut(&conn_id) {
                    m.cursor = m.cursor.max(cursor);
                    let mut delivered = 0;
                    for (seq, frame) in m.buffer.take().unwrap_or_default() {
                        if seq > m.cursor {
                            m.cursor = seq;
                            delivered += u64::from(m.conn.deliver(frame));
                        }
                    }
                    self.deps.metrics.frames_out_by("message", delivered);
                }
            }
            RoomCmd::Leave { conn_id } => {
                self.members.remove(&conn_id);
            }
            RoomCmd::CheckTail => self.check_tail().await,
            // The task's loop takes these itself (to arm the tail check).
            RoomCmd::Live(msg) => {
                if let (Some(rest), _) = self.take_live(*msg) {
                    rest.await;
                }
            }
        }
    }

    /// Takes one message of the room's live traffic: answers what must be
    /// awaited before the next (a stream read, for a gap), and whether it
    /// was a stored message (which arms the tail check).
    fn take_live(&mut self, msg: Message) -> (Option<BoxFuture<'_, ()>>, bool) {
        match subjects::Live::of(msg.subject.as_str()) {
            Some(subjects::Live::Message) => {
                let rest = self
                    .on_live_in_order(msg)
                    .map(|(seq, prev, msg)| Box::pin(self.on_live(seq, prev, msg)) as BoxFuture<'_, ()>);
                (rest, true)
            }
            Some(subjects::Live::Event) => {
                self.on_event(msg);
                (None, false)
            }
            Some(subjects::Live::Typing) => {
                self.on_typing(msg);
                (None, false)
            }
            None => (None, false),
        }
    }

    /// The common case, without awaiting: a republished message that follows
    /// the last one delivered is delivered now. Returns the message when the
    /// stream must be read first (the room's last seq is unknown, or there
    /// is a gap to repair), with its sequence headers: then [`Room::on_live`]
    /// takes it.
    fn on_live_in_order(&mut self, msg: Message) -> Option<(u64, u64, Message)> {
        self.live_seen += 1;
        let drop_every = self.deps.drop_live_every;
        if drop_every > 0 && self.live_seen.is_multiple_of(drop_every) {
            return None; // test hook: as if the republish never arrived
        }
        let Some((seq, prev)) = sequence_headers(&msg) else {
            tracing::warn!(room = %self.id, "republished message without sequence headers");
            return None;
        };
        match self.last {
            Some(last) if seq <= last => None, // already delivered (repair got there first)
            Some(last) if prev <= last => {
                self.deliver(seq, &msg.payload);
                None
            }
            _ => Some((seq, prev, msg)),
        }
    }

    /// A republished message (`seq`, after `prev` in its room) that needs
    /// the stream read first.
    async fn on_live(&mut self, seq: u64, prev: u64, msg: Message) {
        let Some(last) = self.init().await else {
            return;
        };
        if seq <= last {
            return; // already delivered (repair got there first)
        }
        if prev > last {
            self.repair(last, seq).await;
        }
        self.deliver(seq, &msg.payload);
    }

    /// Repairs a lost message at the tail (nothing later arrived to show the gap).
    async fn check_tail(&mut self) {
        let Some(last) = self.last else { return };
        match directget::last_seq(&self.deps.stream, &self.subject).await {
            Ok(tail) if tail > last => self.repair(last, tail + 1).await,
            Ok(_) => {}
            Err(e) => tracing::warn!(room = %self.id, error = %e, "tail check failed"),
        }
    }

    /// Delivers every stored message with `after < seq < before`.
    async fn repair(&mut self, after: u64, before: u64) {
        match directget::range(&self.deps.nats, &self.subject, after, before).await {
            Ok(missing) => {
                tracing::debug!(room = %self.id, after, before, n = missing.len(), "gap repaired");
                self.deps.metrics.gap_repairs.inc_by(missing.len() as u64);
                for m in missing {
                    self.deliver(m.seq, &m.payload);
                }
            }
            Err(e) => {
                // Cannot fill the gap: members reconnect and resume from their
                // last seq, which reads the stream; nothing is skipped silently.
                tracing::error!(room = %self.id, error = %e, "gap repair failed; asking members to resume");
                for m in self.members.values() {
                    m.conn.close_now(close::RESTARTING);
                }
            }
        }
    }

    fn deliver(&mut self, seq: u64, payload: &[u8]) {
        if self.last.is_some_and(|l| seq <= l) {
            return;
        }
        self.last = Some(seq);
        let Some(frame) = envelope::message_frame(self.id.as_str(), seq, payload) else {
            tracing::warn!(room = %self.id, seq, "stored message is not a JSON object; skipped");
            return;
        };
        let Ok(frame) = Utf8Bytes::try_from(frame) else {
            tracing::warn!(room = %self.id, seq, "stored message is not UTF-8; skipped");
            return;
        };
        if let Some(ts) = super::metrics::stamped_ms(payload) {
            let ms = (envelope::now_ms() - ts).max(0) as f64;
            self.deps.metrics.delivery_latency.observe(ms / 1000.0);
        }
        let mut delivered = 0;
        for m in self.members.values_mut() {
            match &mut m.buffer {
                Some(buf) if buf.len() < MAX_BUFFERED => buf.push((seq, frame.clone())),
                Some(_) => m.conn.close_now(close::SLOW_CONSUMER),
                None if seq > m.cursor => {
                    m.cursor = seq;
                    delivered += u64::from(m.conn.deliver(frame.clone()));
                }
                None => {}
            }
        }
        self.deps.metrics.frames_out_by("message", delivered);
    }

    /// Room events arrive as ready frames; the originating session is skipped.
    fn on_event(&mut self, msg: Message) {
        let origin = msg.headers.as_ref().and_then(|h| h.get(subjects::ORIGIN_SESSION_HEADER)).map(|v| v.as_str());
        let Ok(frame) = Utf8Bytes::try_from(msg.payload) else {
            return;
        };
        for m in self.members.values() {
            if Some(m.conn.session.as_str()) != origin {
                m.conn.deliver_ephemeral(frame.clone());
            }
        }
    }
}

impl Room {
    /// Typing goes to every member but the typing user's own sessions.
    fn on_typing(&mut self, msg: Message) {
        let origin = msg.headers.as_ref().and_then(|h| h.get(subjects::ORIGIN_USER_HEADER)).map(|v| v.as_str());
        let Ok(frame) = Utf8Bytes::try_from(msg.payload) else { return };
        for m in self.members.values() {
            if Some(m.conn.user.as_str()) != origin {
                m.conn.deliver_ephemeral(frame.clone());
            }
        }
    }
}

fn sequence_headers(msg: &Message) -> Option<(u64, u64)> {
    let h = msg.headers.as_ref()?;
    let seq = h.get("Nats-Sequence")?.as_str().parse().ok()?;
    let prev = h.get("Nats-Last-Sequence").and_then(|v| v.as_str().parse().ok()).unwrap_or(0);
    Some((seq, prev))
}
