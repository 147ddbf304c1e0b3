//! What a resume replays: a WebSocket `join` with `since`, or an SSE stream
//! with `Last-Event-ID`. The contract is every message of the room in
//! `(since, last]`. The CHAT stream keeps a room's newest window; the
//! archiver trims older messages from it only once they are archived, so the
//! rest is in PostgreSQL. A replay reads the stream first and the archive
//! for what the stream no longer holds.
//!
//! A replay is held in memory until it is sent, so it is bounded: at most
//! `NATTER_LIMIT_REPLAY` messages and `NATTER_LIMIT_REPLAY_BYTES` bytes, the
//! newest. When there were more, the replay says where it starts
//! (`truncated_before`) and the client pages the rest with
//! `GET /v1/rooms/{id}/messages?before=`.
//!
//! Every removal from the stream (the archiver's trim, the per-room ceiling,
//! the age limit) takes a room's oldest messages first. So the stream still
//! holding `since` proves it holds everything after it, and a room's first
//! held message that is unchanged after a read proves that nothing was
//! removed during the read.

use std::collections::VecDeque;

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

/// Reads of the stream tried before giving up while trims keep passing them.
const ATTEMPTS: usize = 5;

/// Messages to send before going live.
#[derive(Debug, Default)]
pub struct Replay {
    /// In seq order.
    pub messages: Vec<Stored>,
    /// Set when messages in `(since, truncated_before)` were not replayed:
    /// there were more than the limits, or the archive could not be read.
    pub truncated_before: Option<u64>,
}

/// The most a replay holds.
#[derive(Debug, Clone, Copy)]
struct Budget {
    messages: usize,
    bytes: usize,
}

impl Budget {
    fn of(state: &AppState) -> Self {
        let off_is_max = |n: usize| if n == 0 { usize::MAX } else { n };
        let l = &state.settings.limits;
        Self { messages: off_is_max(l.limit_replay), bytes: off_is_max(l.limit_replay_bytes) }
    }

    fn exceeded_by(&self, messages: usize, bytes: usize) -> bool {
        messages > self.messages || bytes > self.bytes
    }

    fn left_after(&self, messages: usize, bytes: usize) -> Self {
        Self { messages: self.messages.saturating_sub(messages), bytes: self.bytes.saturating_sub(bytes) }
    }
}

/// Where live delivery to a member who joined at `last` starts, after the
/// replay: the newer of `last` and its `since`. A `since` beyond `last`
/// means the client saw those messages already (from another gateway that
/// was ahead); live messages up to it are not sent again.
pub fn cursor(since: Option<u64>, last: u64) -> u64 {
    since.map_or(last, |s| s.max(last))
}

/// The messages of `room` in `(since, last]`, within the replay limits.
pub async fn read(state: &AppState, room: &RoomId, since: u64, last: u64) -> Result<Replay, ReadError> {
    if since >= last {
        return Ok(Replay::default());
    }
    let budget = Budget::of(state);
    let subject = subjects::room_msg(room);
    let mut attempt = 0;
    let held = loop {
        let held = from_stream(&state.nats, &subject, since, last, budget).await?;
        attempt += 1;
        if !held.trimmed_during_read {
            break held;
        }
        // Rare: a trim reached past the read. The next read sees where it ended.
        if attempt == ATTEMPTS {
            return Err(ReadError::Nats("the room was trimmed during every read; retry".into()));
        }
    };
    let first_held = held.messages.front().map_or(last + 1, |m| m.seq);
    let messages = Vec::from(held.messages);
    if held.dropped {
        return Ok(Replay { messages, truncated_before: Some(first_held) });
    }
    if held.had_since {
        return Ok(Replay { messages, truncated_before: None });
    }
    // The stream does not reach back to `since`: the rest is archived.
    let left = budget.left_after(messages.len(), held.bytes);
    match from_archive(&state.db, room, since, first_held, left).await {
        Ok((mut archived, complete)) => {
            let truncated_before = (!complete).then(|| archived.first().map_or(first_held, |m| m.seq));
            archived.extend(messages);
            Ok(Replay { messages: archived, truncated_before })
        }
        Err(e) => {
            tracing::warn!(error = %e, room = room.as_str(), "resume without the archive");
            Ok(Replay { messages, truncated_before: Some(first_held) })
        }
    }
}

/// What the stream holds of `(since, last]`: the newest within the budget.
struct Held {
    messages: VecDeque<Stored>,
    bytes: usize,
    /// Older messages held in the stream were left out for the budget.
    dropped: bool,
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
    budget: Budget,
) -> Result<Held, ReadError> {
    // Read from `since` itself: finding it proves nothing older is needed.
    let mut read = directget::Batches::new(nats, subject, since);
    let mut oldest = None;
    let mut held =
        Held { messages: VecDeque::new(), bytes: 0, dropped: false, had_since: false, trimmed_during_read: false };
    let mut batches = 0;
    loop {
        let (got, full) = read.next(directget::MAX_BATCH).await?;
        batches += 1;
        oldest = oldest.or(got.first().map(|m| m.seq));
        for m in got {
            if m.seq > last {
                break;
            }
            if m.seq > since {
                held.bytes += m.payload.len();
                held.messages.push_back(m);
                // Keep the newest: drop the oldest past the budget.
                while budget.exceeded_by(held.messages.len(), held.bytes) {
                    let Some(old) = held.messages.pop_front() else { break };
                    held.bytes -= old.payload.len();
                    held.dropped = true;
                }
            }
        }
        if !full || read.from > last {
            break;
        }
    }
    held.had_since = oldest == Some(since);
    // One batch is one read. After several, the room's oldest held message
    // says whether a removal ran in between.
    held.trimmed_during_read = batches > 1 && {
        let now = directget::next_batch(nats, subject, since, 1).await?;
        now.first().map(|m| m.seq) != oldest
    };
    Ok(held)
}

/// The newest archived messages of `(since, before)` within `budget`, in seq
/// order, and whether that is all of them.
async fn from_archive(
    pool: &PgPool,
    room: &RoomId,
    since: u64,
    before: u64,
    budget: Budget,
) -> sqlx::Result<(Vec<Stored>, bool)> {
    let (rows, complete) =
        db::archive::newest_within(pool, room.as_str(), since, before, budget.messages, budget.bytes).await?;
    let messages = rows
        .into_iter()
        .rev()
        .map(|v| Stored { seq: v.seq, payload: Bytes::from(serde_json::to_vec(&v.msg).expect("serialisable")) })
        .collect();
    Ok((messages, complete))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_is_exceeded_by_count_or_bytes_and_what_is_left_never_underflows() {
        let b = Budget { messages: 3, bytes: 100 };
        assert!(!b.exceeded_by(3, 100));
        assert!(b.exceeded_by(4, 10));
        assert!(b.exceeded_by(1, 101));
        let left = b.left_after(2, 150);
        assert_eq!((left.messages, left.bytes), (1, 0));
    }

    #[test]
    fn live_delivery_starts_after_the_newer_of_the_join_and_the_clients_since() {
        assert_eq!(cursor(None, 10), 10, "a join without since goes live from the room's last");
        assert_eq!(cursor(Some(4), 10), 10, "the replay covered (4, 10]");
        assert_eq!(cursor(Some(15), 10), 15, "the client saw up to 15 elsewhere");
    }
}
