//! Unread counts: one row per (user, room, seq) counted, so that counting is
//! idempotent and order-free (see migrations/…_notifier.sql).

use std::collections::{BTreeMap, HashMap};

use sqlx::PgPool;

use crate::ids::UserId;

/// One message to count for one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bump {
    pub user: String,
    pub room: String,
    pub seq: i64,
}

/// Counts each message once for each user, skipping members who left, muted
/// the room or have read past it. Returns how many rows were new.
pub async fn bump(pool: &PgPool, bumps: &[Bump]) -> sqlx::Result<u64> {
    if bumps.is_empty() {
        return Ok(0);
    }
    let users: Vec<&str> = bumps.iter().map(|b| b.user.as_str()).collect();
    let rooms: Vec<&str> = bumps.iter().map(|b| b.room.as_str()).collect();
    let seqs: Vec<i64> = bumps.iter().map(|b| b.seq).collect();
    Ok(sqlx::query(
        "INSERT INTO unread (user_id, room_id, seq)
         SELECT t.u, t.r, t.s FROM unnest($1::text[], $2::text[], $3::bigint[]) AS t(u, r, s)
         JOIN room_members m ON m.room_id = t.r AND m.user_id = t.u AND NOT m.muted AND t.s > m.last_read_seq
         ON CONFLICT DO NOTHING",
    )
    .bind(&users)
    .bind(&rooms)
    .bind(&seqs)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Total unread of each of these users (absent = 0).
pub async fn totals(pool: &PgPool, users: &[&str]) -> sqlx::Result<HashMap<String, i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT u.user_id, count(*) FROM unread u
         JOIN room_members m ON m.room_id = u.room_id AND m.user_id = u.user_id AND u.seq > m.last_read_seq
         WHERE u.user_id = ANY($1) GROUP BY u.user_id",
    )
    .bind(users)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Unread per room of one user (rooms with none are absent).
pub async fn by_room(pool: &PgPool, user: &UserId) -> sqlx::Result<BTreeMap<String, i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT u.room_id, count(*) FROM unread u
         JOIN room_members m ON m.room_id = u.room_id AND m.user_id = u.user_id AND u.seq > m.last_read_seq
         WHERE u.user_id = $1 GROUP BY u.room_id",
    )
    .bind(user.as_str())
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}
