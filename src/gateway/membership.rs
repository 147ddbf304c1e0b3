//! "Is this user a member of this room?" from PostgreSQL, with a short
//! positive cache per gateway (negative answers are not cached, so a user
//! added a moment ago can join at once).
//!
//! Lookups that miss the cache are batched: a task takes every lookup
//! waiting when a query slot is free and asks about them all in one query
//! (up to [`BATCH_MAX`], [`QUERIES_IN_FLIGHT`] queries at once). A lone
//! join waits for nothing but its own query; a reconnect storm's thousands
//! of joins cost a few dozen queries instead of one each.

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
    lookups: mpsc::UnboundedSender<Lookup>,
    queries: Arc<AtomicU64>,
}

impl Membership {
    /// Starts the lookup task; it ends when the `Membership` is dropped.
    pub fn new(ttl: Duration, pool: PgPool) -> Self {
        let (lookups, rx) = mpsc::unbounded_channel();
        let queries = Arc::new(AtomicU64::new(0));
        tokio::spawn(batch_lookups(pool, rx, queries.clone()));
        Self { ttl, cache: Mutex::new(HashMap::new()), lookups, queries }
    }

    pub async fn is_member(&self, room: &RoomId, user: &UserId) -> Result<bool, ApiError> {
        let key = (room.clone(), user.clone());
        if let Some(at) = self.cache.lock().get(&key)
            && at.elapsed() < self.ttl
        {
            return Ok(true);
        }
        let (answer, answered) = oneshot::channel();
        let unavailable = || ApiError::unavailable("membership lookup", "the lookup task has stopped");
        self.lookups.send(Lookup { room: room.clone(), user: user.clone(), answer }).map_err(|_| unavailable())?;
        let member = answered.await.map_err(|_| unavailable())??;
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

async fn batch_lookups(pool: PgPool, mut rx: mpsc::UnboundedReceiver<Lookup>, queries: Arc<AtomicU64>) {
    let slots = Arc::new(Semaphore::new(QUERIES_IN_FLIGHT));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mut batch = Vec::new();
        if rx.recv_many(&mut batch, BATCH_MAX).await == 0 {
            return;
        }
        queries.fetch_add(1, Ordering::Relaxed);
        let pool = pool.clone();
        tokio::spawn(async move {
            let pairs: Vec<(&str, &str)> = batch.iter().map(|l| (l.room.as_str(), l.user.as_str())).collect();
            match db::rooms::memberships_among(&pool, &pairs).await {
                Ok(found) => {
                    let found: HashSet<(&str, &str)> = found.iter().map(|(r, u)| (r.as_str(), u.as_str())).collect();
                    drop(pairs);
                    for l in batch {
                        let member = found.contains(&(l.room.as_str(), l.user.as_str()));
                        let _ = l.answer.send(Ok(member));
                    }
                }
                Err(e) => {
                    let e = ApiError::from(e);
                    for l in batch {
                        let _ = l.answer.send(Err(e.clone()));
                    }
                }
            }
            drop(slot);
        });
    }
}
