//! Push devices: who gets pushes where.

use sqlx::PgPool;

use crate::{
    ids::UserId,
    push::{Device, Platform},
};

/// Registers a device for `user` (moving the token if another user had it).
/// Returns `true` when the row is new or changed hands.
pub async fn register(
    pool: &PgPool,
    user: &UserId,
    platform: Platform,
    token: &str,
    topic: Option<&str>,
) -> sqlx::Result<bool> {
    let previous: Option<Option<String>> = sqlx::query_scalar(
        "WITH old AS (SELECT user_id FROM devices WHERE platform = $1 AND token = $2)
         INSERT INTO devices (platform, token, user_id, topic) VALUES ($1, $2, $3, $4)
         ON CONFLICT (platform, token) DO UPDATE SET user_id = excluded.user_id, topic = excluded.topic
         RETURNING (SELECT user_id FROM old)",
    )
    .bind(platform.as_str())
    .bind(token)
    .bind(user.as_str())
    .bind(topic)
    .fetch_optional(pool)
    .await?;
    Ok(previous.flatten().as_deref() != Some(user.as_str()))
}

/// Removes one of `user`'s devices by token (either platform); `false` if none.
pub async fn unregister(pool: &PgPool, user: &UserId, token: &str) -> sqlx::Result<bool> {
    let n = sqlx::query("DELETE FROM devices WHERE token = $1 AND user_id = $2")
        .bind(token)
        .bind(user.as_str())
        .execute(pool)
        .await?
        .rows_affected();
    Ok(n > 0)
}

#[derive(sqlx::FromRow)]
struct Row {
    user_id: String,
    platform: String,
    token: String,
    topic: Option<String>,
}

impl Row {
    fn into_device(self) -> Option<Device> {
        let platform = match self.platform.as_str() {
            "apns" => Platform::Apns,
            "fcm" => Platform::Fcm,
            _ => return None,
        };
        Some(Device { user: self.user_id, platform, token: self.token, topic: self.topic })
    }
}

/// Every device of these users.
pub async fn of_users(pool: &PgPool, users: &[&str]) -> sqlx::Result<Vec<Device>> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT user_id, platform, token, topic FROM devices WHERE user_id = ANY($1) ORDER BY user_id, platform, token",
    )
    .bind(users)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().filter_map(Row::into_device).collect())
}

/// Devices of one user (for the API).
pub async fn list(pool: &PgPool, user: &UserId) -> sqlx::Result<Vec<Device>> {
    of_users(pool, &[user.as_str()]).await
}

/// Deletes devices the provider called unregistered or invalid.
pub async fn delete_many(pool: &PgPool, devices: &[(Platform, String)]) -> sqlx::Result<u64> {
    let (platforms, tokens) = keys(devices);
    if platforms.is_empty() {
        return Ok(0);
    }
    Ok(sqlx::query(
        "DELETE FROM devices d USING unnest($1::text[], $2::text[]) AS t(p, k) WHERE d.platform = t.p AND d.token = t.k",
    )
    .bind(&platforms)
    .bind(&tokens)
    .execute(pool)
    .await?
    .rows_affected())
}

/// How often at most a device's `last_ok` is written.
const LAST_OK_EVERY_SECS: i32 = 60;

/// Records a successful push for these devices, at most once every
/// [`LAST_OK_EVERY_SECS`] per device. It never waits on another
/// transaction: a device row that a concurrent batch holds (another replica
/// marking the same device) is skipped, as that batch marks it. Waiting
/// there made replicas queue behind each other and deadlock (PostgreSQL
/// breaks a deadlock after a second): with two notifier replicas pushing to
/// the same devices, a run of 20 000 pushes took 3–12 s instead of 1 s.
pub async fn mark_ok(pool: &PgPool, devices: &[(Platform, String)]) -> sqlx::Result<()> {
    let (platforms, tokens) = keys(devices);
    if platforms.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE devices d SET last_ok = now()
         FROM (SELECT x.platform, x.token FROM devices x
               JOIN unnest($1::text[], $2::text[]) AS t(p, k) ON x.platform = t.p AND x.token = t.k
               WHERE x.last_ok IS NULL OR x.last_ok < now() - make_interval(secs => $3)
               FOR UPDATE OF x SKIP LOCKED) s
         WHERE d.platform = s.platform AND d.token = s.token",
    )
    .bind(&platforms)
    .bind(&tokens)
    .bind(LAST_OK_EVERY_SECS)
    .execute(pool)
    .await?;
    Ok(())
}

/// The (platform, token) keys as two bind arrays, sorted and without
/// repeats: a statement that walks the arrays (a nested loop over the
/// device index, as for a batch's few devices) locks rows in one order, so
/// two batches do not each hold a row the other waits for.
fn keys(devices: &[(Platform, String)]) -> (Vec<&str>, Vec<&str>) {
    let mut keys: Vec<(&str, &str)> = devices.iter().map(|(p, t)| (p.as_str(), t.as_str())).collect();
    keys.sort_unstable();
    keys.dedup();
    keys.into_iter().unzip()
}
