//! "Is this user a member of this room?" from PostgreSQL, with a short
//! positive cache per gateway (negative answers are not cached, so a user
//! added a moment ago can join at once).
//!
//! Lookups that miss the cache share [`QUERIES_IN_FLIGHT`] query slots. A
//! lookup that finds a slot free asks PostgreSQL itself, in its own task;
//! the others queue, and one task asks about every queued lookup in one
//! query (up to [`BATCH_MAX`]) whenever it gets a slot. So a lone join, or
//! joins at a pace the slots keep up with, wait for their own query only,
//! and a reconnect storm's thousands of joins share a few dozen queries.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use sqlx::PgPool;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::{
    db,
    error::ApiError,
    ids::{RoomId, UserId},
};

const MAX_ENTRIES: usize = 200_000;
/// Most lookups in one query.
const BATCH_MAX: usize = 500;
/// Queries at once: a slow one does not hold up the others.
const QUERIES_IN_FLIGHT: usize = 4;

struct Lookup {
    room: RoomId,
    user: UserId,
    answer: oneshot::Sender<Result<bool, ApiError>>,
}

pub struct Membership {
    ttl: Duration,
    cache: Mutex<HashMap<(RoomId, UserId), Instant>>,
    pool: PgPool,
    /// Queries to PostgreSQL at once, single or batched.
    slots: Arc<Semaphore>,
    /// Lookups that found no slot free, for the batching task.
    queued: mpsc::UnboundedSender<Lookup>,
    queries: Arc<AtomicU64>,
}

impl Membership {
    /// Starts the batching task; it ends when the `Membership` is dropped.
    pub fn new(ttl: Duration, pool: PgPool) -> Self {
        let (queued, rx) = mpsc::unbounded_channel();
        let queries = Arc::new(AtomicU64::new(0));
        let slots = Arc::new(Semaphore::new(QUERIES_IN_FLIGHT));
        tokio::spawn(batch_lookups(pool.clone(), slots.clone(), rx, queries.clone()));
        Self { ttl, cache: Mutex::new(HashMap::new()), pool, slots, queued, queries }
    }

    pub async fn is_member(&self, room: &RoomId, user: &UserId) -> Result<bool, ApiError> {
        let key = (room.clone(), user.clone());
        if let Some(at) = self.cache.lock().get(&key)
            && at.elapsed() < self.ttl
        {
            return Ok(true);
        }
        let member = match self.slots.clone().try_acquire_owned() {
            Ok(_slot) => {
                self.queries.fetch_add(1, Ordering::Relaxed);
                db::rooms::role(&self.pool, room, user).await?.is_some()
            }
            Err(_) => {
                let (answer, answered) = oneshot::channel();
                let unavailable = || ApiError::unavailable("membership lookup", "the lookup task has stopped");
                self.queued
                    .send(Lookup { room: room.clone(), user: user.clone(), answer })
                    .map_err(|_| unavailable())?;
                answered.await.map_err(|_| unavailable())??
            }
        };
        let mut cache = self.cache.lock();
        if member {
            if cache.len() >= MAX_ENTRIES {
                cache.clear();
            }
            cache.insert(key, Instant::now());
        } else {
            cache.remove(&key);
        }
        Ok(member)
    }

    /// Drops a cached answer (membership changed).
    pub fn forget(&self, room: &RoomId, user: &UserId) {
        self.cache.lock().remove(&(room.clone(), user.clone()));
    }

    /// Queries sent to PostgreSQL so far.
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }
}

/// Asks about every queued lookup in one query whenever a slot is free:
/// one batch at a time, the other slots left to lookups that find one.
async fn batch_lookups(
    pool: PgPool,
    slots: Arc<Semaphore>,
    mut rx: mpsc::UnboundedReceiver<Lookup>,
    queries: Arc<AtomicU64>,
) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, BATCH_MAX).await > 0 {
        let Ok(_slot) = slots.acquire().await else { return };
        // Lookups queued while the slot was awaited join this batch.
        if batch.len() < BATCH_MAX {
            while let Ok(l) = rx.try_recv() {
                batch.push(l);
                if batch.len() == BATCH_MAX {
                    break;
                }
            }
        }
        queries.fetch_add(1, Ordering::Relaxed);
        let pairs: Vec<(&str, &str)> = batch.iter().map(|l| (l.room.as_str(), l.user.as_str())).collect();
        let found = db::rooms::memberships_among(&pool, &pairs).await;
        drop(pairs);
        match found {
            Ok(found) => {
                let found: HashSet<(&str, &str)> = found.iter().map(|(r, u)| (r.as_str(), u.as_str())).collect();
                for l in batch.drain(..) {
                    let member = found.contains(&(l.room.as_str(), l.user.as_str()));
                    let _ = l.answer.send(Ok(member));
                }
            }
            Err(e) => {
                let e = ApiError::from(e);
                for l in batch.drain(..) {
                    let _ = l.answer.send(Err(e.clone()));
                }
            }
        }
    }
}
