//! The CHAT stream's window per room, kept by the archiver.
//!
//! The stream keeps up to `NATTER_STREAM_HARD_MAX_PER_ROOM` messages per
//! room. The archiver trims each busy room to its newest
//! `NATTER_STREAM_MAX_PER_ROOM` once the messages it removes are below both
//! consumers' ack floors: archived, and counted and pushed by the notifier.
//! So a consumer that falls behind in one room (a PostgreSQL outage, a
//! burst) finds the messages still there when it catches up, where a plain
//! per-subject limit would discard them unread.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use async_nats::jetstream::{self, context::ConsumerInfoErrorKind};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::{
    bus::subjects::{self, ARCHIVER_CONSUMER, NOTIFIER_CONSUMER},
    db::archive,
    ids::RoomId,
};

/// How often the rooms due are trimmed.
const EVERY: Duration = Duration::from_secs(2);

/// The rooms the archiver wrote to since their last trim, and how many
/// messages each.
#[derive(Default)]
pub(crate) struct Due(Mutex<HashMap<RoomId, u64>>);

impl Due {
    /// Counts a batch's archived messages, one room per message.
    pub fn archived<'a>(&self, rooms: impl IntoIterator<Item = &'a RoomId>) {
        let mut due = self.0.lock();
        for room in rooms {
            *due.entry(room.clone()).or_default() += 1;
        }
    }

    /// Takes the rooms with at least `at_least` archived messages since their
    /// last trim.
    fn take(&self, at_least: u64) -> Vec<RoomId> {
        let mut rooms = self.0.lock();
        let due: Vec<RoomId> = rooms.iter().filter(|(_, n)| **n >= at_least).map(|(r, _)| r.clone()).collect();
        for r in &due {
            rooms.remove(r);
        }
        due
    }

    /// Puts back a room whose trim failed, to be tried next round.
    fn retry(&self, room: RoomId, at_least: u64) {
        *self.0.lock().entry(room).or_default() += at_least;
    }
}

/// Trims the rooms due every [`EVERY`] until `stop`. A room is due after a
/// tenth of its window has been archived since its last trim, so the trim
/// costs one archive query and one purge per that many messages. A room
/// trimmed only up to a consumer's floor is tried again when the floor moves.
pub(super) async fn run(shared: Arc<Shared>, stream: jetstream::stream::Stream, stop: CancellationToken) {
    let Ok(window) = u64::try_from(shared.settings.nats.stream_max_per_room) else {
        return; // -1: no window to keep
    };
    let at_least = (window / 10).max(1);
    let mut waiting: HashSet<RoomId> = HashSet::new();
    let mut waiting_since = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
        let mut rooms: HashSet<RoomId> = shared.trim.take(at_least).into_iter().collect();
        if rooms.is_empty() && waiting.is_empty() {
            continue;
        }
        let Some(floor) = read_floor(&stream).await else {
            rooms.into_iter().for_each(|r| shared.trim.retry(r, at_least));
            continue;
        };
        if floor > waiting_since {
            rooms.extend(waiting.drain());
            waiting_since = floor;
        }
        for room in rooms {
            match trim(&shared, &stream, &room, window, floor).await {
                Ok(Trimmed::ToWindow) => {}
                Ok(Trimmed::ToFloor) => {
                    waiting.insert(room);
                }
                Err(e) => {
                    tracing::warn!(error = %e, room = %room.as_str(), "cannot trim the room's window; retrying later");
                    shared.trim.retry(room, at_least);
                }
            }
        }
        shared.metrics.trim_passes.inc();
    }
}

/// How far a trim went.
enum Trimmed {
    /// To the room's window (or the room is within it).
    ToWindow,
    /// Only up to the consumers' floor: older messages wait for them.
    ToFloor,
}

/// The stream sequence below which both consumers are done with every
/// message: the lower of their ack floors, plus one. A consumer that does not
/// exist (no notifier has run) holds nothing back.
async fn read_floor(stream: &jetstream::stream::Stream) -> Option<u64> {
    let mut floor = u64::MAX;
    for name in [ARCHIVER_CONSUMER, NOTIFIER_CONSUMER] {
        match stream.consumer_info(name).await {
            Ok(info) => floor = floor.min(info.ack_floor.stream_sequence + 1),
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound && name == NOTIFIER_CONSUMER => {}
            Err(e) => {
                tracing::warn!(error = %e, consumer = name, "cannot read the consumer's ack floor; not trimming now");
                return None;
            }
        }
    }
    Some(floor)
}

/// Removes the room's messages older than its `window` newest archived ones
/// and below `floor`.
async fn trim(
    shared: &Shared,
    stream: &jetstream::stream::Stream,
    room: &RoomId,
    window: u64,
    floor: u64,
) -> anyhow::Result<Trimmed> {
    let Some(oldest_kept) = archive::nth_newest_seq(&shared.db, room.as_str(), window).await? else {
        return Ok(Trimmed::ToWindow); // fewer than `window` archived
    };
    let below = oldest_kept.min(floor);
    if below > 1 {
        let purged = stream.purge().filter(subjects::room_msg(room)).sequence(below).await?.purged;
        shared.metrics.trimmed.inc_by(purged);
        tracing::debug!(room = %room.as_str(), below, purged, "trimmed the room's window");
    }
    Ok(if floor < oldest_kept { Trimmed::ToFloor } else { Trimmed::ToWindow })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(s: &str) -> RoomId {
        RoomId::parse(s).unwrap()
    }

    #[test]
    fn a_room_is_due_once_enough_is_archived_and_again_after_a_failed_trim() {
        let due = Due::default();
        let (a, b) = (room("a"), room("b"));
        due.archived([&a; 6]);
        due.archived([&b; 3]);
        due.archived([&a; 4]);
        assert_eq!(due.take(10), vec![room("a")]);
        assert!(due.take(10).is_empty(), "taken rooms start counting again");
        due.retry(room("a"), 10);
        assert_eq!(due.take(10), vec![room("a")]);
        due.archived([&b; 7]);
        assert_eq!(due.take(10), vec![room("b")]);
    }
}
