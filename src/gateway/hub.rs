//! Local rooms ↔ connections. The first local member of a room starts its
//! room task (and so its NATS subscription); the last one to leave ends it.
//! With shared subscriptions the hub holds the gateway's one subscription to
//! every room's live traffic and hands each message to its room's task, or
//! drops it when the room has no local member.

use std::{collections::HashMap, sync::Arc};

use async_nats::Message;
use futures::channel::mpsc;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::{
    outbound::ConnHandle,
    room::{self, RoomCmd, RoomDeps},
};
use crate::{
    bus::{directget::ReadError, subjects},
    ids::RoomId,
    tasks,
};

struct Slot {
    /// futures' channel, not tokio's: commands are rare (joins, leaves) and
    /// it allocates a node per command, where tokio's allocates a block of
    /// 32 slots up front (~1.3 KiB per room with the channel's own state).
    tx: mpsc::UnboundedSender<RoomCmd>,
    members: usize,
}

pub struct Hub {
    deps: Arc<RoomDeps>,
    /// Room → its task's command channel and local member count. The count
    /// changes under this lock, so a room is removed exactly when it empties.
    rooms: Mutex<HashMap<RoomId, Slot>>,
}

impl Hub {
    /// The hub; with `deps.shared_subscription`, also its subscription to
    /// every room's live traffic, made before this returns (so a failure to
    /// subscribe is a startup error) and routed by a task of its own.
    pub async fn start(deps: RoomDeps) -> Result<Arc<Self>, async_nats::SubscribeError> {
        let shared = deps.shared_subscription.then(|| deps.nats.clone());
        let hub = Arc::new(Self { deps: Arc::new(deps), rooms: Mutex::new(HashMap::new()) });
        if let Some(nats) = shared {
            let live = nats.subscribe(subjects::ALL_LIVE_ROOMS).await?;
            tokio::spawn(tasks::in_batches(Arc::downgrade(&hub), live, Hub::route));
        }
        Ok(hub)
    }

    /// Adds `conn` to `room` in buffering state and returns the room's last
    /// seq; the caller replays up to it and then calls [`Hub::caught_up`].
    pub async fn join(&self, room: &RoomId, conn: Arc<ConnHandle>) -> Result<u64, ReadError> {
        let (reply, answer) = oneshot::channel();
        let conn_id = conn.id;
        {
            let mut rooms = self.rooms.lock();
            let slot = rooms.entry(room.clone()).or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded();
                tokio::spawn(room::run(room.clone(), self.deps.clone(), rx));
                Slot { tx, members: 0 }
            });
            slot.members += 1;
            let _ = slot.tx.unbounded_send(RoomCmd::Join { conn, reply });
        }
        match answer.await {
            Ok(Ok(last)) => Ok(last),
            Ok(Err(e)) => {
                self.leave(room, conn_id);
                Err(e)
            }
            Err(_) => {
                self.leave(room, conn_id);
                Err(ReadError::Nats("room task ended".into()))
            }
        }
    }

    pub fn caught_up(&self, room: &RoomId, conn_id: u64, cursor: u64) {
        if let Some(slot) = self.rooms.lock().get(room) {
            let _ = slot.tx.unbounded_send(RoomCmd::CaughtUp { conn_id, cursor });
        }
    }

    pub fn leave(&self, room: &RoomId, conn_id: u64) {
        let mut rooms = self.rooms.lock();
        if let Some(slot) = rooms.get_mut(room) {
            let _ = slot.tx.unbounded_send(RoomCmd::Leave { conn_id });
            slot.members = slot.members.saturating_sub(1);
            if slot.members == 0 {
                rooms.remove(room); // dropping the sender ends the task
            }
        }
    }

    /// Asks every room task to look for messages lost at its tail.
    pub fn check_tails(&self) {
        for slot in self.rooms.lock().values() {
            let _ = slot.tx.unbounded_send(RoomCmd::CheckTail);
        }
    }

    /// Hands each message of the shared subscription to its room's task.
    /// Messages of rooms without a local member are dropped (counted in
    /// `natter_live_unrouted_total`).
    fn route(&self, batch: Vec<Message>) {
        let mut unrouted = 0;
        {
            let rooms = self.rooms.lock();
            for msg in batch {
                match subjects::room_of_live(msg.subject.as_str()).and_then(|r| rooms.get(r)) {
                    Some(slot) => {
                        let _ = slot.tx.unbounded_send(RoomCmd::Live(Box::new(msg)));
                    }
                    None => unrouted += 1,
                }
            }
        }
        self.deps.metrics.live_unrouted.inc_by(unrouted);
    }

    /// Rooms with a room task on this gateway.
    pub fn room_count(&self) -> usize {
        self.rooms.lock().len()
    }
}
