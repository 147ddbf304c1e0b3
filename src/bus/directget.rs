//! Reads from the CHAT stream by batch direct get (`next_by_subj` + `batch`),
//! which async-nats does not wrap: one request, many replies, then an
//! end-of-batch status. Used for gap repair, `join` with `since`, and history.

use std::time::Duration;

use async_nats::{Client, jetstream::stream::Stream};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;

use super::subjects;

/// One stored message: its stream sequence and payload.
#[derive(Debug, Clone)]
pub struct Stored {
    pub seq: u64,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("NATS request failed: {0}")]
    Nats(String),
    #[error("timed out reading the stream")]
    TimedOut,
    #[error("stream answered status {0}")]
    Status(u16),
}

#[derive(Serialize)]
struct BatchRequest<'a> {
    seq: u64,
    next_by_subj: &'a str,
    batch: usize,
}

const REPLY_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest batch asked of the server in one request.
pub const MAX_BATCH: usize = 512;
/// Messages asked for in a read's first batch; later batches are sized from
/// the largest message seen so that one is about [`BATCH_BYTES`]. Batches of
/// 512 messages of 64 KiB (32 MiB each) let a few concurrent reads pass
/// nats-server's 64 MiB pending limit for the gateway's connection, which
/// then cuts it as a slow consumer (measured: BENCHMARKS.md, `bench backlog`).
const FIRST_BATCH: usize = 128;
const BATCH_BYTES: usize = 1 << 20;

/// The size of the next batch of a read whose largest message so far is
/// `largest` bytes.
fn next_batch_size(largest: usize) -> usize {
    (BATCH_BYTES / largest.max(1)).clamp(1, MAX_BATCH)
}

/// A forward read of `subject` in batches: [`FIRST_BATCH`] messages first,
/// then sized from the largest message seen so far.
pub struct Batches<'a> {
    client: &'a Client,
    subject: &'a str,
    /// The seq the next batch starts at.
    pub from: u64,
    want: usize,
    largest: usize,
}

impl<'a> Batches<'a> {
    pub fn new(client: &'a Client, subject: &'a str, from: u64) -> Self {
        Self { client, subject, from, want: FIRST_BATCH, largest: 1 }
    }

    /// The next batch, of at most `limit` messages, and whether it was full
    /// (more may follow).
    pub async fn next(&mut self, limit: usize) -> Result<(Vec<Stored>, bool), ReadError> {
        let want = self.want.min(limit).max(1);
        let got = next_batch(self.client, self.subject, self.from, want).await?;
        self.largest = got.iter().map(|m| m.payload.len()).fold(self.largest, usize::max);
        self.want = next_batch_size(self.largest);
        if let Some(m) = got.last() {
            self.from = m.seq + 1;
        }
        let full = got.len() == want;
        Ok((got, full))
    }
}

/// Up to `batch` messages on `subject` with sequence ≥ `from`, in order.
pub async fn next_batch(client: &Client, subject: &str, from: u64, batch: usize) -> Result<Vec<Stored>, ReadError> {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.map_err(|e| ReadError::Nats(e.to_string()))?;
    let req =
        serde_json::to_vec(&BatchRequest { seq: from.max(1), next_by_subj: subject, batch: batch.clamp(1, MAX_BATCH) })
            .expect("serialisable");
    client
        .publish_with_reply(subjects::direct_get(subjects::CHAT_STREAM), inbox, req.into())
        .await
        .map_err(|e| ReadError::Nats(e.to_string()))?;
    let mut out = Vec::new();
    loop {
        let msg = tokio::time::timeout(REPLY_TIMEOUT, sub.next())
            .await
            .map_err(|_| ReadError::TimedOut)?
            .ok_or_else(|| ReadError::Nats("subscription closed".into()))?;
        match msg.status.map(|s| s.as_u16()) {
            None | Some(200) => {}
            // End of batch (204) or nothing at all at or after `from` (404).
            Some(204) | Some(404) => break,
            Some(s) => return Err(ReadError::Status(s)),
        }
        let seq = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Sequence"))
            .and_then(|v| v.as_str().parse::<u64>().ok())
            .ok_or_else(|| ReadError::Nats("direct get reply without Nats-Sequence".into()))?;
        out.push(Stored { seq, payload: msg.payload });
        if out.len() >= batch {
            break;
        }
    }
    Ok(out)
}

/// Every message on `subject` with `after < seq < before`, in order.
pub async fn range(client: &Client, subject: &str, after: u64, before: u64) -> Result<Vec<Stored>, ReadError> {
    range_newest(client, subject, after, before, usize::MAX).await
}

/// The newest `keep` messages on `subject` with `after < seq < before`, in
/// order. The range is read forwards; only `keep` messages and one batch are
/// held at a time.
async fn range_newest(
    client: &Client,
    subject: &str,
    after: u64,
    before: u64,
    keep: usize,
) -> Result<Vec<Stored>, ReadError> {
    let mut out = std::collections::VecDeque::new();
    let mut batches = Batches::new(client, subject, after + 1);
    while batches.from < before {
        let (got, full) = batches.next(usize::try_from(before - batches.from).unwrap_or(MAX_BATCH)).await?;
        for m in got {
            if m.seq >= before {
                return Ok(out.into());
            }
            if out.len() == keep {
                out.pop_front();
            }
            out.push_back(m);
        }
        if !full {
            break;
        }
    }
    Ok(out.into())
}

/// Sequence of the last message on `subject`, 0 when there is none.
pub async fn last_seq(stream: &Stream, subject: &str) -> Result<u64, ReadError> {
    use async_nats::jetstream::stream::DirectGetErrorKind;
    match stream.direct_get_last_for_subject(subject).await {
        Ok(m) => Ok(m.sequence),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(0),
        Err(e) if e.kind() == DirectGetErrorKind::TimedOut => Err(ReadError::TimedOut),
        Err(e) => Err(ReadError::Nats(e.to_string())),
    }
}

/// The newest `limit` messages on `subject` with seq < `before`, newest first.
/// The stream cannot be read backwards, so windows of sequence numbers below
/// `before` are read forwards, each four times wider, until enough is found.
pub async fn newest_before(
    client: &Client,
    stream: &Stream,
    subject: &str,
    before: u64,
    limit: usize,
) -> Result<Vec<Stored>, ReadError> {
    use async_nats::jetstream::stream::DirectGetErrorKind;
    let first = match stream.direct_get_first_for_subject(subject).await {
        Ok(m) => m.sequence,
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) if e.kind() == DirectGetErrorKind::TimedOut => return Err(ReadError::TimedOut),
        Err(e) => return Err(ReadError::Nats(e.to_string())),
    };
    let mut window = (limit as u64).max(16) * 4;
    let mut hi = before;
    let mut found: Vec<Stored> = Vec::new();
    while found.len() < limit && hi > first {
        let lo = hi.saturating_sub(window).max(first);
        let mut chunk = range_newest(client, subject, lo - 1, hi, limit - found.len()).await?;
        chunk.extend(found);
        found = chunk;
        hi = lo;
        window = window.saturating_mul(4);
    }
    found.reverse();
    found.truncate(limit);
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_of_large_messages_stay_near_a_mebibyte() {
        assert_eq!(next_batch_size(200), MAX_BATCH, "small messages: the largest batch");
        assert_eq!(next_batch_size(60_000), 17);
        assert_eq!(next_batch_size(4 << 20), 1, "a message beyond the target still comes, one at a time");
        assert_eq!(next_batch_size(0), MAX_BATCH);
    }
}
