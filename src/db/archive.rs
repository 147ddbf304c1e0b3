//! The message archive (`messages`) and the consumers' dead letters.

use sqlx::PgPool;

use crate::bus::envelope::{Kind, MessageView, StoredMessage};

/// One stored message and where it sits in the stream.
pub struct Archived<'a> {
    pub room: &'a str,
    pub seq: u64,
    pub msg: &'a StoredMessage,
}

fn kind_str(k: Kind) -> &'static str {
    match k {
        Kind::Text => "text",
        Kind::Image => "image",
    }
}

/// Inserts a batch; rows already archived are left alone. Returns the number inserted.
pub async fn insert(pool: &PgPool, batch: &[Archived<'_>]) -> sqlx::Result<u64> {
    if batch.is_empty() {
        return Ok(0);
    }
    let rooms: Vec<&str> = batch.iter().map(|a| a.room).collect();
    let seqs: Vec<i64> = batch.iter().map(|a| a.seq as i64).collect();
    let ids: Vec<&str> = batch.iter().map(|a| a.msg.id.as_str()).collect();
    let senders: Vec<&str> = batch.iter().map(|a| a.msg.from.as_str()).collect();
    let ts: Vec<i64> = batch.iter().map(|a| a.msg.ts).collect();
    let bodies: Vec<&str> = batch.iter().map(|a| a.msg.body.as_str()).collect();
    let kinds: Vec<&str> = batch.iter().map(|a| kind_str(a.msg.kind)).collect();
    let attachments: Vec<Option<&str>> = batch.iter().map(|a| a.msg.attachment.as_deref()).collect();
    Ok(sqlx::query(
        "INSERT INTO messages (room_id, seq, id, sender, ts, body, kind, attachment)
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[], $8::text[])
         ON CONFLICT DO NOTHING",
    )
    .bind(&rooms)
    .bind(&seqs)
    .bind(&ids)
    .bind(&senders)
    .bind(&ts)
    .bind(&bodies)
    .bind(&kinds)
    .bind(&attachments)
    .execute(pool)
    .await?
    .rows_affected())
}

#[derive(sqlx::FromRow)]
struct Row {
    seq: i64,
    id: String,
    sender: String,
    ts: i64,
    body: String,
    kind: String,
    attachment: Option<String>,
}

/// The highest seq in the archive, 0 when it is empty. A scan of the
/// primary key: asked only when the CHAT stream is made anew.
pub async fn highest_seq(pool: &PgPool) -> sqlx::Result<u64> {
    let seq: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM messages").fetch_one(pool).await?;
    Ok(seq.map_or(0, |s| s as u64))
}

/// The seq of a room's `n`-th newest archived message (`n` from 1), if the
/// archive holds that many of the room.
pub async fn nth_newest_seq(pool: &PgPool, room: &str, n: u64) -> sqlx::Result<Option<u64>> {
    let seq: Option<i64> =
        sqlx::query_scalar("SELECT seq FROM messages WHERE room_id = $1 ORDER BY seq DESC OFFSET $2 LIMIT 1")
            .bind(room)
            .bind(i64::try_from(n.saturating_sub(1)).unwrap_or(i64::MAX))
            .fetch_optional(pool)
            .await?;
    Ok(seq.map(|s| s as u64))
}

/// Up to `limit` archived messages of a room below `before`, newest first.
pub async fn newest_before(pool: &PgPool, room: &str, before: u64, limit: usize) -> sqlx::Result<Vec<MessageView>> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT seq, id, sender, ts, body, kind, attachment FROM messages
         WHERE room_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
    )
    .bind(room)
    .bind(i64::try_from(before).unwrap_or(i64::MAX))
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| view(room, r)).collect())
}

fn view(room: &str, r: Row) -> MessageView {
    MessageView {
        room: room.to_owned(),
        seq: r.seq as u64,
        msg: StoredMessage {
            id: r.id,
            from: r.sender,
            ts: r.ts,
            body: r.body,
            kind: if r.kind == "image" { Kind::Image } else { Kind::Text },
            attachment: r.attachment,
        },
    }
}

/// The newest archived messages of a room with `after < seq < before`,
/// newest first, at most `max_messages` and about `max_bytes` of stored
/// payload (body, id, sender, attachment and 64 bytes of the rest each);
/// and whether that is all of them. The byte sum is a running sum in
/// PostgreSQL, so rows beyond the budget are never sent (one is, as the
/// marker that there are more).
pub async fn newest_within(
    pool: &PgPool,
    room: &str,
    after: u64,
    before: u64,
    max_messages: usize,
    max_bytes: usize,
) -> sqlx::Result<(Vec<MessageView>, bool)> {
    #[derive(sqlx::FromRow)]
    struct Sized {
        #[sqlx(flatten)]
        row: Row,
        acc: i64,
    }
    let clamp = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    let rows: Vec<Sized> = sqlx::query_as(
        "SELECT seq, id, sender, ts, body, kind, attachment, acc FROM (
             SELECT *, (sum(size) OVER (ORDER BY seq DESC ROWS UNBOUNDED PRECEDING))::bigint AS acc FROM (
                 SELECT seq, id, sender, ts, body, kind, attachment,
                        (octet_length(body) + octet_length(id) + octet_length(sender)
                         + coalesce(octet_length(attachment), 0) + 64)::bigint AS size
                 FROM messages WHERE room_id = $1 AND seq > $2 AND seq < $3
                 ORDER BY seq DESC LIMIT $4) newest) running
         WHERE acc - size <= $5 ORDER BY seq DESC",
    )
    .bind(room)
    .bind(i64::try_from(after).unwrap_or(i64::MAX))
    .bind(i64::try_from(before).unwrap_or(i64::MAX))
    .bind(clamp(max_messages).saturating_add(1))
    .bind(clamp(max_bytes))
    .fetch_all(pool)
    .await?;
    let within =
        rows.iter().enumerate().position(|(i, r)| i >= max_messages || r.acc > clamp(max_bytes)).unwrap_or(rows.len());
    let complete = within == rows.len();
    let views = rows.into_iter().take(within).map(|r| view(room, r.row)).collect();
    Ok((views, complete))
}

/// A message a consumer gave up on.
pub struct DeadLetter<'a> {
    pub consumer: &'a str,
    pub stream_seq: u64,
    pub subject: &'a str,
    pub payload: &'a [u8],
    pub deliveries: i64,
    pub error: &'a str,
}

pub async fn dead_letter(pool: &PgPool, d: &DeadLetter<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO dead_letters (consumer, stream_seq, subject, payload, deliveries, error)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (consumer, stream_seq)
         DO UPDATE SET deliveries = excluded.deliveries, error = excluded.error, at = now()",
    )
    .bind(d.consumer)
    .bind(d.stream_seq as i64)
    .bind(d.subject)
    .bind(d.payload)
    .bind(d.deliveries)
    .bind(d.error)
    .execute(pool)
    .await?;
    Ok(())
}
