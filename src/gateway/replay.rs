//! What a resume replays: a WebSocket `join` with `since`, or an SSE stream
//! with `Last-Event-ID`. The contract is every message of the room in
//! `(since, last]`. The CHAT stream keeps a room's newest window; the
//! archiver trims older messages from it only once they are archived, so the
//! rest is in PostgreSQL. A replay reads the stream first and the archive
//! for what the stream no longer holds.
//!
//! At most `NATTER_LIMIT_REPLAY` messages are replayed: the newest ones. When
//! there were more, the replay says where it starts (`truncated_before`) and
//! the client pages the rest with `GET /v1/rooms/{id}/messages?before=`.
//!
//! Every removal from the stream (the archiver's trim, the per-room ceiling,
//! the age limit) takes a room's oldest messages first. So the stream still
//! holding `since` proves it holds everything after it, and a room's first
//! held message that is unchanged after a read proves that nothing was
//! removed during the read.

use bytes::Bytes;
use sqlx::PgPool;

use crate::{
    bus::{
        directget::{self, ReadError, Stored},
        subjects,
    },
    db,
    ids::RoomId,
};

use super::AppState;

/// Messages to send before going live.
#[derive(Debug, Default)]
pub struct Replay {
    /// In seq order.
    pub messages: Vec<Stored>,
    /// Set when messages in `(since, truncated_before)` were not replayed:
    /// there were more than the limit, or the archive could not be read.
    pub truncated_before: Option<u64>,
}

/// The messages of `room` in `(since, last]`, at most `limit` (0: no limit).
pub async fn read(state: &AppState, room: &RoomId, since: u64, last: u64) -> Result<Replay, ReadError> {
    if since >= last {
        return Ok(Replay::default());
    }
    let limit = match state.settings.limits.limit_replay {
        0 => usize::MAX,
        n => n,
    };
    let subject = subjects::room_msg(room);
    let held = from_stream(&state.nats, &subject, since, last, limit).await?;
    if held.messages.len() > limit {
        // More than the limit in the stream alone: its newest.
        let mut newest = directget::newest_before(&state.nats, &state.stream, &subject, last + 1, limit).await?;
        newest.reverse();
        let truncated_before = newest.first().map_or(last + 1, |m| m.seq);
        return Ok(Replay { messages: newest, truncated_before: Some(truncated_before) });
    }
    if held.had_since && !held.trimmed_during_read {
        return Ok(Replay { messages: held.messages, truncated_before: None });
    }
    // The stream does not reach back to `since`: the rest is archived. After
    // a trim during the read, anything in the range may be archived only.
    let first_held = held.messages.first().map_or(last + 1, |m| m.seq);
    let upper = if held.trimmed_during_read { last + 1 } else { first_held };
    match from_archive(&state.db, room, since, upper, limit).await {
        Ok(archived) => Ok(merge(archived, held.messages, limit)),
        Err(e) => {
            tracing::warn!(error = %e, room = room.as_str(), "resume without the archive");
            Ok(Replay { messages: held.messages, truncated_before: Some(first_held) })
        }
    }
}

/// What the stream holds of `(since, last]`.
struct Held {
    /// At most `limit + 1`: one more says "over the limit".
    messages: Vec<Stored>,
    /// The stream still holds the message at `since` itself.
    had_since: bool,
    /// The room's oldest held message changed while it was read.
    trimmed_during_read: bool,
}

async fn from_stream(
    nats: &async_nats::Client,
    subject: &str,
    since: u64,
    last: u64,
    limit: usize,
) -> Result<Held, ReadError> {
    // Read from `since` itself: finding it proves nothing older is needed.
    let mut from = since;
    let mut oldest = None;
    let mut messages = Vec::new();
    let mut batches = 0;
    loop {
        let got = directget::next_batch(nats, subject, from, directget::MAX_BATCH).await?;
        batches += 1;
        let full = got.len() == directget::MAX_BATCH;
        oldest = oldest.or(got.first().map(|m| m.seq));
        for m in got {
            from = m.seq + 1;
            if m.seq > last {
                break;
            }
            if m.seq > since {
                messages.push(m);
            }
        }
        if !full || from > last || messages.len() > limit {
            break;
        }
    }
    let had_since = oldest == Some(since);
    // One batch is one read. After several, the room's oldest held message
    // says whether a removal ran in between.
    let trimmed_during_read = batches > 1 && {
        let now = directget::next_batch(nats, subject, since, 1).await?;
        now.first().map(|m| m.seq) != oldest
    };
    Ok(Held { messages, had_since, trimmed_during_read })
}

/// The newest `limit + 1` archived messages of `(since, before)`, newest first.
async fn from_archive(
    pool: &PgPool,
    room: &RoomId,
    since: u64,
    before: u64,
    limit: usize,
) -> sqlx::Result<Vec<Stored>> {
    let rows = db::archive::newest_between(pool, room.as_str(), since, before, limit.saturating_add(1)).await?;
    Ok(rows
        .into_iter()
        .map(|v| Stored { seq: v.seq, payload: Bytes::from(serde_json::to_vec(&v.msg).expect("serialisable")) })
        .collect())
}

/// The newest `limit` of both (a message in both counts once), in seq order.
fn merge(archived: Vec<Stored>, held: Vec<Stored>, limit: usize) -> Replay {
    let mut all: Vec<Stored> = archived.into_iter().chain(held).collect();
    all.sort_by_key(|m| m.seq);
    all.dedup_by_key(|m| m.seq);
    let truncated = all.len() > limit;
    if truncated {
        all.drain(..all.len() - limit);
    }
    let truncated_before = truncated.then(|| all.first().map_or(u64::MAX, |m| m.seq));
    Replay { messages: all, truncated_before }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(seqs: &[u64]) -> Vec<Stored> {
        seqs.iter().map(|&seq| Stored { seq, payload: Bytes::from(format!("{{\"n\":{seq}}}")) }).collect()
    }

    fn seqs(r: &Replay) -> Vec<u64> {
        r.messages.iter().map(|m| m.seq).collect()
    }

    #[test]
    fn archive_and_stream_join_in_order_each_message_once() {
        // Archive rows come newest first; the stream's overlap with them counts once.
        let r = merge(stored(&[9, 7, 4]), stored(&[9, 12, 15]), 10);
        assert_eq!(seqs(&r), [4, 7, 9, 12, 15]);
        assert_eq!(r.truncated_before, None);
    }

    #[test]
    fn over_the_limit_keeps_the_newest_and_says_where_they_start() {
        let r = merge(stored(&[9, 7, 4]), stored(&[12, 15]), 3);
        assert_eq!(seqs(&r), [9, 12, 15]);
        assert_eq!(r.truncated_before, Some(9));
        let exactly = merge(stored(&[7, 4]), stored(&[12]), 3);
        assert_eq!((seqs(&exactly), exactly.truncated_before), (vec![4, 7, 12], None));
    }
}
