//! Per-user events (`chat.user.<u>.event`): one core subscription per user
//! with a session on this gateway, so a room change or a revocation reaches
//! whichever gateway holds the user, with no session table anywhere.

use std::{collections::HashMap, sync::Arc};

use async_nats::Client;
use futures::StreamExt;
use parking_lot::Mutex;
use serde::Deserialize;
use tokio::task::AbortHandle;

use super::{membership::Membership, outbound::ConnHandle};
use crate::{
    bus::subjects,
    ids::{RoomId, UserId},
};

/// What a user event asks of each of the user's connections.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum UserEvent {
    RoomAdded {
        room: RoomId,
        by: Option<String>,
    },
    RoomRemoved {
        room: RoomId,
        by: Option<String>,
    },
    /// Close the user's sessions (all, or the one named) with 4001.
    SessionRevoked {
        session: Option<String>,
    },
}

struct Slot {
    conns: HashMap<u64, Arc<ConnHandle>>,
    task: AbortHandle,
}

pub struct Users {
    nats: Client,
    membership: Arc<Membership>,
    map: Mutex<HashMap<UserId, Slot>>,
}

impl Users {
    pub fn new(nats: Client, membership: Arc<Membership>) -> Arc<Self> {
        Arc::new(Self { nats, membership, map: Mutex::new(HashMap::new()) })
    }

    pub fn register(self: &Arc<Self>, conn: &Arc<ConnHandle>) {
        let mut map = self.map.lock();
        if let Some(slot) = map.get_mut(&conn.user) {
            slot.conns.insert(conn.id, conn.clone());
            return;
        }
        let this = Arc::downgrade(self);
        let user = conn.user.clone();
        let nats = self.nats.clone();
        let task = tokio::spawn(async move {
            let mut sub = match nats.subscribe(subjects::user_event(&user)).await {
                Ok(s) => s,
                Err(e) => return tracing::warn!(%user, error = %e, "cannot subscribe to user events"),
            };
            while let Some(msg) = sub.next().await {
                let Some(users) = this.upgrade() else { return };
                match serde_json::from_slice::<UserEvent>(&msg.payload) {
                    Ok(ev) => users.dispatch(&user, ev),
                    Err(e) => tracing::debug!(%user, error = %e, "ignoring unknown user event"),
                }
            }
        });
        map.insert(
            conn.user.clone(),
            Slot { conns: HashMap::from([(conn.id, conn.clone())]), task: task.abort_handle() },
        );
    }

    pub fn unregister(&self, conn: &ConnHandle) {
        let mut map = self.map.lock();
        if let Some(slot) = map.get_mut(&conn.user) {
            slot.conns.remove(&conn.id);
            if slot.conns.is_empty() {
                slot.task.abort();
                map.remove(&conn.user);
            }
        }
    }

    fn dispatch(&self, user: &UserId, ev: UserEvent) {
        if let UserEvent::RoomAdded { room, .. } | UserEvent::RoomRemoved { room, .. } = &ev {
            self.membership.forget(room, user);
        }
        if let Some(slot) = self.map.lock().get(user) {
            for c in slot.conns.values() {
                c.event(ev.clone());
            }
        }
    }
}
