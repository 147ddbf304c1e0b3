//! The archiver: every message of the CHAT stream into PostgreSQL `messages`,
//! one INSERT per batch, idempotent on (room, seq).

use std::{sync::Arc, time::Duration};

use async_nats::jetstream;

use super::{Delivery, Shared};
use crate::{
    bus::subjects::ARCHIVER_CONSUMER,
    db::archive::{self, Archived},
};

pub(super) async fn handle(shared: Arc<Shared>, msgs: Vec<jetstream::Message>) -> Option<Duration> {
    let mut batch = Vec::with_capacity(msgs.len());
    for d in msgs.into_iter().map(Delivery::new) {
        match d.parse() {
            Ok((room, msg)) => batch.push((d, room, msg)),
            Err(why) => d.give_up(&shared, ARCHIVER_CONSUMER, &why).await,
        }
    }
    let rows: Vec<Archived> =
        batch.iter().map(|(d, room, msg)| Archived { room: room.as_str(), seq: d.seq, msg }).collect();
    match archive::insert(&shared.db, &rows).await {
        Ok(n) => {
            shared.metrics.archived.inc_by(n);
            for (d, _, _) in &batch {
                d.ack().await;
            }
            shared.trim.archived(batch.iter().map(|(_, room, _)| room));
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, messages = batch.len(), "cannot archive; retrying later");
            for (d, _, _) in &batch {
                d.retry_later().await;
            }
            Some(Duration::from_secs(2))
        }
    }
}
