//! Per-user events (`chat.user.<u>.event`): a room change or a revocation
//! reaches whichever gateway holds the user, with no session table anywhere.
//! One wildcard subscription per gateway, not one per user: user events are
//! rare, and a subscription costs ~6 KiB of channel and a task on the gateway
//! plus an interest entry in nats-server (measured with heaptrack: it was the
//! largest per-connection cost of an idle gateway). Events of users with no
//! session here are dropped after a map lookup.

use std::{collections::HashMap, sync::Arc};

use async_nats::Client;
use futures::StreamExt;
use parking_lot::Mutex;
use serde::Deserialize;

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
    /// Not from NATS: the keepalive sweep's word to one connection that its
    /// token expired (it closes with 4001 unless refreshed meanwhile).
    #[serde(skip)]
    TokenExpired,
}

pub struct Users {
    membership: Arc<Membership>,
    /// The connections of each user with a session here. A `Vec`, not a
    /// map: a user has one or a few, and an empty map's first insert
    /// allocates four buckets (heaptrack: 86 bytes per connection).
    map: Mutex<HashMap<UserId, Vec<Arc<ConnHandle>>>>,
}

impl Users {
    /// Subscribes to every user's events before answering, so no event sent
    /// after a session starts can be missed.
    pub async fn start(nats: &Client, membership: Arc<Membership>) -> anyhow::Result<Arc<Self>> {
        let mut sub = nats.subscribe(subjects::ALL_USER_EVENTS).await?;
        let users = Arc::new(Self { membership, map: Mutex::new(HashMap::new()) });
        let this = Arc::downgrade(&users);
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Some(users) = this.upgrade() else { return };
                let Some(user) = subjects::user_of_event(&msg.subject) else { continue };
                if !users.map.lock().contains_key(&user) {
                    continue;
                }
                match serde_json::from_slice::<UserEvent>(&msg.payload) {
                    Ok(ev) => users.dispatch(&user, ev),
                    Err(e) => tracing::debug!(%user, error = %e, "ignoring unknown user event"),
                }
            }
        });
        Ok(users)
    }

    pub fn register(&self, conn: &Arc<ConnHandle>) {
        self.map.lock().entry(conn.user.clone()).or_default().push(conn.clone());
    }

    pub fn unregister(&self, conn: &ConnHandle) {
        let mut map = self.map.lock();
        if let Some(conns) = map.get_mut(&conn.user) {
            conns.retain(|c| c.id != conn.id);
            if conns.is_empty() {
                map.remove(&conn.user);
            }
        }
    }

    /// Calls `f` on every connection here, under the registry's lock.
    pub fn for_each(&self, mut f: impl FnMut(&Arc<ConnHandle>)) {
        for conns in self.map.lock().values() {
            conns.iter().for_each(&mut f);
        }
    }

    /// The connections here that `keep` keeps.
    pub fn collect(&self, keep: impl Fn(&ConnHandle) -> bool) -> Vec<Arc<ConnHandle>> {
        let mut out = Vec::new();
        self.for_each(|c| {
            if keep(c) {
                out.push(c.clone());
            }
        });
        out
    }

    fn dispatch(&self, user: &UserId, ev: UserEvent) {
        if let UserEvent::RoomAdded { room, .. } | UserEvent::RoomRemoved { room, .. } = &ev {
            self.membership.forget(room, user);
        }
        if let Some(conns) = self.map.lock().get(user) {
            for c in conns {
                c.event(ev.clone());
            }
        }
    }
}
