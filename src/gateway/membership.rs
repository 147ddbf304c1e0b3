//! "Is this user a member of this room?" from PostgreSQL, with a short
//! positive cache per gateway (negative answers are not cached, so a user
//! added a moment ago can join at once).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use sqlx::PgPool;

use crate::{
    db,
    error::ApiError,
    ids::{RoomId, UserId},
};

const MAX_ENTRIES: usize = 200_000;

pub struct Membership {
    ttl: Duration,
    cache: Mutex<HashMap<(RoomId, UserId), Instant>>,
}

impl Membership {
    pub fn new(ttl: Duration) -> Self {
        Self { ttl, cache: Mutex::new(HashMap::new()) }
    }

    pub async fn is_member(&self, pool: &PgPool, room: &RoomId, user: &UserId) -> Result<bool, ApiError> {
        let key = (room.clone(), user.clone());
        if let Some(at) = self.cache.lock().get(&key)
            && at.elapsed() < self.ttl
        {
            return Ok(true);
        }
        let member = db::rooms::role(pool, room, user).await?.is_some();
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
}
