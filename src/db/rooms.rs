//! Rooms and memberships: who may read and write a room, and read markers.

use serde::Serialize;
use sqlx::PgPool;

use crate::ids::{RoomId, UserId};

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct RoomSummary {
    pub id: String,
    pub name: String,
    pub role: String,
    pub muted: bool,
    pub last_read_seq: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Owner,
    Member,
}

/// Creates a room with `owner` as its owner and `members` as members.
/// Returns `false` when the id is taken.
pub async fn create(
    pool: &PgPool,
    room: &RoomId,
    name: &str,
    owner: &UserId,
    members: &[UserId],
) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let inserted =
        sqlx::query("INSERT INTO rooms (id, name, created_by) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING")
            .bind(room.as_str())
            .bind(name)
            .bind(owner.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected();
    if inserted == 0 {
        return Ok(false);
    }
    let users: Vec<&str> = members.iter().map(UserId::as_str).filter(|u| *u != owner.as_str()).collect();
    sqlx::query(
        "INSERT INTO room_members (room_id, user_id, role)
         SELECT $1, $2, 'owner'
         UNION ALL SELECT $1, u, 'member' FROM unnest($3::text[]) AS u
         ON CONFLICT DO NOTHING",
    )
    .bind(room.as_str())
    .bind(owner.as_str())
    .bind(&users)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// The caller's role in a room, if a member.
pub async fn role(pool: &PgPool, room: &RoomId, user: &UserId) -> sqlx::Result<Option<Role>> {
    let role: Option<String> = sqlx::query_scalar("SELECT role FROM room_members WHERE room_id = $1 AND user_id = $2")
        .bind(room.as_str())
        .bind(user.as_str())
        .fetch_optional(pool)
        .await?;
    Ok(role.map(|r| if r == "owner" { Role::Owner } else { Role::Member }))
}

/// Which of the (room, user) pairs are memberships: one query for them all.
pub async fn memberships_among(pool: &PgPool, pairs: &[(&str, &str)]) -> sqlx::Result<Vec<(String, String)>> {
    let (rooms, users): (Vec<&str>, Vec<&str>) = pairs.iter().copied().unzip();
    sqlx::query_as(
        "SELECT m.room_id, m.user_id
         FROM unnest($1::text[], $2::text[]) AS q(room_id, user_id)
         JOIN room_members m ON m.room_id = q.room_id AND m.user_id = q.user_id",
    )
    .bind(&rooms)
    .bind(&users)
    .fetch_all(pool)
    .await
}

pub async fn exists(pool: &PgPool, room: &RoomId) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM rooms WHERE id = $1)").bind(room.as_str()).fetch_one(pool).await
}

/// Rooms of a user, most recently joined first.
pub async fn list_for(pool: &PgPool, user: &UserId) -> sqlx::Result<Vec<RoomSummary>> {
    sqlx::query_as(
        "SELECT r.id, r.name, m.role, m.muted, m.last_read_seq
         FROM room_members m JOIN rooms r ON r.id = m.room_id
         WHERE m.user_id = $1 ORDER BY m.joined_at DESC, r.id LIMIT 1000",
    )
    .bind(user.as_str())
    .fetch_all(pool)
    .await
}

pub async fn members(pool: &PgPool, room: &RoomId) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar("SELECT user_id FROM room_members WHERE room_id = $1 ORDER BY user_id")
        .bind(room.as_str())
        .fetch_all(pool)
        .await
}

/// Adds a member; `false` if already one.
pub async fn add_member(pool: &PgPool, room: &RoomId, user: &UserId) -> sqlx::Result<bool> {
    let n = sqlx::query("INSERT INTO room_members (room_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(room.as_str())
        .bind(user.as_str())
        .execute(pool)
        .await?
        .rows_affected();
    Ok(n == 1)
}

/// Removes a member; `false` if not one.
pub async fn remove_member(pool: &PgPool, room: &RoomId, user: &UserId) -> sqlx::Result<bool> {
    let n = sqlx::query("DELETE FROM room_members WHERE room_id = $1 AND user_id = $2")
        .bind(room.as_str())
        .bind(user.as_str())
        .execute(pool)
        .await?
        .rows_affected();
    Ok(n == 1)
}

/// Moves the read marker forward (never back) and clears what it covers from
/// the unread counts. Returns the marker now stored,
/// or `None` when the user is not a member.
pub async fn mark_read(pool: &PgPool, room: &RoomId, user: &UserId, seq: u64) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar(
        "WITH marked AS (
             UPDATE room_members SET last_read_seq = GREATEST(last_read_seq, $3)
             WHERE room_id = $1 AND user_id = $2 RETURNING last_read_seq
         ), pruned AS (
             DELETE FROM unread WHERE room_id = $1 AND user_id = $2 AND seq <= $3
         )
         SELECT last_read_seq FROM marked",
    )
    .bind(room.as_str())
    .bind(user.as_str())
    .bind(i64::try_from(seq).unwrap_or(i64::MAX))
    .fetch_optional(pool)
    .await
}

/// Mutes or unmutes a room for a member (no unread bumps or pushes while
/// muted). `false` when the user is not a member.
pub async fn set_muted(pool: &PgPool, room: &RoomId, user: &UserId, muted: bool) -> sqlx::Result<bool> {
    let n = sqlx::query("UPDATE room_members SET muted = $3 WHERE room_id = $1 AND user_id = $2")
        .bind(room.as_str())
        .bind(user.as_str())
        .bind(muted)
        .execute(pool)
        .await?
        .rows_affected();
    Ok(n == 1)
}

/// A member who may be notified of a room's messages.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Recipient {
    pub room_id: String,
    pub user_id: String,
    pub last_read_seq: i64,
}

/// The unmuted members of these rooms.
pub async fn recipients(pool: &PgPool, rooms: &[&str]) -> sqlx::Result<Vec<Recipient>> {
    sqlx::query_as("SELECT room_id, user_id, last_read_seq FROM room_members WHERE room_id = ANY($1) AND NOT muted")
        .bind(rooms)
        .fetch_all(pool)
        .await
}
