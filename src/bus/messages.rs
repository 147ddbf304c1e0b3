//! Publishing a room message into the CHAT stream, with dedupe by
//! `Nats-Msg-Id` = `<sender>:<room>:<client id>`. Shared by WebSocket and
//! HTTP sends. (DESIGN.md has `<sender>:<client id>`: a client id reused in
//! another room within the duplicate window was acked with the first room's
//! seq and not stored.)

use async_nats::jetstream::{self, message::PublishMessage, stream::Stream};

use super::{
    envelope::{Kind, StoredMessage, now_ms},
    subjects,
};
use crate::ids::{ClientMsgId, RoomId, UserId};

/// What the stream answered.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    pub seq: u64,
    pub ts: i64,
    /// The id was seen inside the duplicate window: nothing new was stored and
    /// `seq`/`ts` are the original message's.
    pub duplicate: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("message not stored: {0}")]
    NotStored(String),
    /// Nothing answered for the room's subject: the CHAT stream is gone (its
    /// replicas were lost, or it was deleted). A gateway makes it again
    /// (`AppState::repair_chat`) and the client resends.
    #[error("message not stored: the CHAT stream is gone")]
    NoStream,
}

pub struct NewMessage<'a> {
    pub room: &'a RoomId,
    pub from: &'a UserId,
    pub id: &'a ClientMsgId,
    pub body: String,
    pub kind: Kind,
    pub attachment: Option<String>,
}

/// Sends the message to the stream and returns the future of its ack. The
/// publish itself is issued in call order, so one connection's messages keep
/// their order; awaiting the ack can happen elsewhere.
pub async fn publish(
    js: &jetstream::Context,
    m: NewMessage<'_>,
) -> Result<(i64, jetstream::context::PublishAckFuture), PublishError> {
    let ts = now_ms();
    let stored = StoredMessage {
        id: m.id.as_str().to_owned(),
        from: m.from.as_str().to_owned(),
        ts,
        body: m.body,
        kind: m.kind,
        attachment: m.attachment,
    };
    let payload = serde_json::to_vec(&stored).expect("serialisable");
    let publish = PublishMessage::build().payload(payload.into()).message_id(format!("{}:{}:{}", m.from, m.room, m.id));
    let fut = js
        .send_publish(subjects::room_msg(m.room), publish)
        .await
        .map_err(|e| PublishError::NotStored(e.to_string()))?;
    Ok((ts, fut))
}

/// Waits for the stream's ack. For a duplicate, reads the original `ts`.
pub async fn confirm(
    stream: &Stream,
    ts: i64,
    fut: jetstream::context::PublishAckFuture,
) -> Result<Published, PublishError> {
    let ack = fut.await.map_err(|e| match e.kind() {
        jetstream::context::PublishErrorKind::StreamNotFound => PublishError::NoStream,
        _ => PublishError::NotStored(e.to_string()),
    })?;
    if !ack.duplicate {
        return Ok(Published { seq: ack.sequence, ts, duplicate: false });
    }
    let original_ts = match stream.direct_get(ack.sequence).await {
        Ok(m) => serde_json::from_slice::<StoredMessage>(&m.payload).map(|s| s.ts).unwrap_or(ts),
        Err(_) => ts,
    };
    Ok(Published { seq: ack.sequence, ts: original_ts, duplicate: true })
}
