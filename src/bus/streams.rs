//! Creates or updates the CHAT stream at start (idempotent).

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{
    self,
    stream::{Config, DiscardPolicy, Republish, StorageType},
};

use super::subjects::{CHAT_STREAM, CHAT_SUBJECTS, LIVE_REPUBLISH_DEST};
use crate::config::NatsSettings;

/// How long a `Nats-Msg-Id` is remembered for dedupe.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// The window the archiver trims a room to must fit under the stream's
/// hard limit per room (-1 is no limit).
fn check_room_limits(s: &NatsSettings) -> anyhow::Result<()> {
    let (window, hard) = (s.stream_max_per_room, s.stream_hard_max_per_room);
    anyhow::ensure!(
        (window == -1 || window > 0) && (hard == -1 || hard > 0),
        "NATTER_STREAM_MAX_PER_ROOM and NATTER_STREAM_HARD_MAX_PER_ROOM must be positive or -1 (no limit)"
    );
    anyhow::ensure!(
        hard == -1 || (window != -1 && window <= hard),
        "NATTER_STREAM_HARD_MAX_PER_ROOM ({hard}) must be at least NATTER_STREAM_MAX_PER_ROOM ({window})"
    );
    Ok(())
}

pub fn chat_config(s: &NatsSettings) -> Config {
    Config {
        name: CHAT_STREAM.to_owned(),
        description: Some("natter: every room's messages".to_owned()),
        subjects: vec![CHAT_SUBJECTS.to_owned()],
        storage: StorageType::File,
        num_replicas: s.stream_replicas.max(1),
        duplicate_window: DUPLICATE_WINDOW,
        max_messages_per_subject: s.stream_hard_max_per_room,
        max_age: s.stream_max_age,
        discard: DiscardPolicy::Old,
        allow_direct: true,
        republish: Some(Republish {
            source: CHAT_SUBJECTS.to_owned(),
            destination: LIVE_REPUBLISH_DEST.to_owned(),
            headers_only: false,
        }),
        ..Default::default()
    }
}

/// Seqs left unused after the archive's highest when the CHAT stream is made
/// anew: room for messages the lost stream held and the archive had not
/// copied yet, whose seqs clients may hold as `since`.
pub const RECREATED_SEQ_MARGIN: u64 = 1_000_000;

/// Makes the CHAT stream exist with our settings, and returns its handle.
///
/// A stream made anew while the archive holds messages (the stream was
/// lost) starts after them: at `archived_up_to().await + 1 +`
/// [`RECREATED_SEQ_MARGIN`]. Seqs are room positions that clients keep as
/// `since` and the archive keys on; starting again at 1 would make every
/// client drop new messages up to its old `since`, and the archive would
/// keep the old message of each reused seq instead of the new one.
pub async fn ensure_chat<F, Fut>(
    js: &jetstream::Context,
    s: &NatsSettings,
    archived_up_to: F,
) -> anyhow::Result<jetstream::stream::Stream>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<u64>>,
{
    check_room_limits(s)?;
    let existing = super::setup(js, |js| async move {
        match js.get_stream(CHAT_STREAM).await {
            Ok(stream) => Ok(Some(stream.cached_info().config.first_sequence)),
            Err(e) if super::is_stream_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    })
    .await
    .context("cannot look up the CHAT stream (is JetStream enabled?)")?;
    let first_sequence = match existing {
        Some(kept) => kept,
        None => match archived_up_to().await? {
            0 => None,
            up_to => {
                let first = up_to + 1 + RECREATED_SEQ_MARGIN;
                tracing::warn!(
                    archived_up_to = up_to,
                    first_seq = first,
                    "making the CHAT stream anew after the archive"
                );
                Some(first)
            }
        },
    };
    super::setup(js, |js| {
        let config = jetstream::stream::Config { first_sequence, ..chat_config(s) };
        async move { js.create_or_update_stream(config).await }
    })
    .await
    .context("cannot create or update the CHAT stream (is JetStream enabled?)")?;
    js.get_stream(CHAT_STREAM).await.context("cannot open the CHAT stream")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(window: i64, hard: i64) -> anyhow::Result<()> {
        let s = NatsSettings {
            nats_url: String::new(),
            nats_user: None,
            nats_password: None,
            stream_replicas: 1,
            stream_max_age: Duration::from_secs(60),
            stream_max_per_room: window,
            stream_hard_max_per_room: hard,
        };
        check_room_limits(&s)
    }

    #[test]
    fn the_window_per_room_must_fit_under_the_hard_limit() {
        assert!(limits(10_000, 100_000).is_ok());
        assert!(limits(100, 100).is_ok());
        assert!(limits(100, -1).is_ok(), "no hard limit");
        assert!(limits(-1, -1).is_ok(), "neither");
        let e = limits(1_000, 100).unwrap_err().to_string();
        assert!(e.contains("NATTER_STREAM_HARD_MAX_PER_ROOM (100)"), "{e}");
        assert!(limits(-1, 100).is_err(), "no trim but a hard limit would discard unread messages");
        assert!(limits(0, 100).is_err());
        assert!(limits(10, 0).is_err());
    }
}
