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

pub fn chat_config(s: &NatsSettings) -> Config {
    Config {
        name: CHAT_STREAM.to_owned(),
        description: Some("natter: every room's messages".to_owned()),
        subjects: vec![CHAT_SUBJECTS.to_owned()],
        storage: StorageType::File,
        num_replicas: s.stream_replicas.max(1),
        duplicate_window: DUPLICATE_WINDOW,
        max_messages_per_subject: s.stream_max_per_room,
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

/// Makes the CHAT stream exist with our settings, and returns its handle.
pub async fn ensure_chat(js: &jetstream::Context, s: &NatsSettings) -> anyhow::Result<jetstream::stream::Stream> {
    super::setup(js, |js| {
        let config = chat_config(s);
        async move { js.create_or_update_stream(config).await }
    })
    .await
    .context("cannot create or update the CHAT stream (is JetStream enabled?)")?;
    js.get_stream(CHAT_STREAM).await.context("cannot open the CHAT stream")
}
