//! `GET /v1/rooms/{id}/events`: the room as Server-Sent Events, for networks
//! that block WebSocket. An SSE stream is a connection like a WebSocket one,
//! joined to one room: it registers a `ConnHandle` with the room task (join
//! with buffer → replay from the stream → caught up → live, with the room's
//! dedupe and gap repair), and its bounded queue is the response body. So the
//! replay/live boundary, slow consumers (the stream ends; the client resumes
//! with `Last-Event-ID`), user events (removed from the room, sessions revoked)
//! and per-user / per-IP connection limits work as for WebSocket.
//!
//! Each message is `event: message`, `id: <seq>`, `data: <the WebSocket
//! message frame>`; typing and read markers are `event: typing` / `event: read`.
//! A resume that skipped messages starts with `event: joined` (the WebSocket
//! `joined` frame, with `truncated_before`).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    extract::{ConnectInfo, Path, RawQuery, State},
    http::{HeaderMap, HeaderValue},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use tokio::time::Instant;

use super::{
    AppState,
    http::{TokenCaller, query_param, require_member},
    limits::ConnSlot,
    outbound::{ConnHandle, Out, Outbox},
    protocol::ServerFrame,
    replay,
    users::UserEvent,
    ws,
};
use crate::{
    auth::unix_now,
    bus::envelope,
    error::{ApiError, Code},
    ids::RoomId,
};

/// A comment line this often keeps proxies from closing an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// `GET /v1/rooms/{id}/events[?since=<seq>][&token=<JWT>]`, `Last-Event-ID`.
pub async fn events(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    TokenCaller(me): TokenCaller,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !state.accepting.load(std::sync::atomic::Ordering::Acquire) {
        return Err(ApiError::new(Code::Unavailable, "gateway shutting down; connect to another"));
    }
    let room = RoomId::parse(&id)?;
    require_member(&state, &room, &me.user).await?;
    let since = resume_point(&headers, query_param(query.as_deref(), "since"))?;
    let slot = state.limits.admit(&me.user, ws::client_ip(&state, &headers, peer))?;
    let (mut conn, rx) = SseConn::open(&state, room, &me.user, slot);
    let last = state.hub.join(&conn.room, conn.handle.clone()).await.map_err(|e| unavailable(&e))?;
    conn.joined = true;
    let replay = match since {
        Some(since) => replay::read(&state, &conn.room, since, last).await.map_err(|e| unavailable(&e))?,
        None => replay::Replay::default(),
    };
    let cursor = replay::cursor(since, last);
    // A truncated replay says so first, in the WebSocket `joined` frame.
    let truncated = replay.truncated_before.map(|before| {
        let joined = ServerFrame::Joined { room: conn.room.as_str(), last_seq: last, truncated_before: Some(before) };
        Event::default().event("joined").data(joined.encode().as_str())
    });
    let room_id = conn.room.clone();
    let replayed = futures::stream::iter(truncated)
        .chain(
            futures::stream::iter(replay.messages)
                .filter_map(move |m| std::future::ready(message_event(&room_id, m.seq, &m.payload))),
        )
        .map(Ok);
    let live = Live { conn, rx, exp: me.exp, cursor: Some(cursor), restart_at: None };
    let mut resp =
        Sse::new(replayed.chain(live.into_stream())).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response();
    // Proxies such as nginx must pass events on as they come.
    resp.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

fn unavailable(e: &dyn std::fmt::Display) -> ApiError {
    ApiError::unavailable("message stream", e)
}

/// Where to resume: `Last-Event-ID` (sent by EventSource on reconnect) wins
/// over `?since=`; neither means live only.
fn resume_point(headers: &HeaderMap, since: Option<String>) -> Result<Option<u64>, ApiError> {
    let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::trim);
    match last_event_id.filter(|v| !v.is_empty()).map(str::to_owned).or(since) {
        None => Ok(None),
        Some(raw) => raw
            .parse()
            .map(Some)
            .map_err(|_| ApiError::bad_request("Last-Event-ID and since must be a message seq (an integer)")),
    }
}

/// The SSE event of a stored message.
fn message_event(room: &RoomId, seq: u64, payload: &[u8]) -> Option<Event> {
    let frame = envelope::message_frame(room.as_str(), seq, payload)?;
    let frame = std::str::from_utf8(&frame).ok()?;
    Some(Event::default().event("message").id(seq.to_string()).data(frame))
}

#[derive(Deserialize)]
struct Peek {
    #[serde(rename = "type")]
    ty: String,
}

/// The SSE event of a frame the room task queued: messages with their seq as
/// id, typing and read markers without; other frames are not for SSE.
fn frame_event(frame: &str) -> Option<Event> {
    if let Some(seq) = envelope::frame_seq(frame.as_bytes()) {
        return Some(Event::default().event("message").id(seq.to_string()).data(frame));
    }
    let ty = serde_json::from_str::<Peek>(frame).ok()?.ty;
    matches!(ty.as_str(), "typing" | "read").then(|| Event::default().event(ty).data(frame))
}

/// The connection's registrations, undone on drop (the client went away, the
/// stream ended, or the handler failed half-way).
struct SseConn {
    state: AppState,
    room: RoomId,
    handle: Arc<ConnHandle>,
    /// Whether the hub counts this connection as a member of the room.
    joined: bool,
    _slot: ConnSlot,
}

impl SseConn {
    fn open(state: &AppState, room: RoomId, user: &crate::ids::UserId, slot: ConnSlot) -> (Self, Outbox) {
        let session = uuid::Uuid::new_v4().simple().to_string();
        let s = &state.settings;
        let (handle, rx) = ConnHandle::new(
            state.next_conn_id(),
            session,
            user.clone(),
            (s.outbound_queue, s.outbound_bytes),
            None,
            state.metrics.clone(),
        );
        state.metrics.connections.inc();
        state.presence.session_started(user, handle.id);
        state.users.register(&handle);
        (Self { state: state.clone(), room, handle, joined: false, _slot: slot }, rx)
    }
}

impl Drop for SseConn {
    fn drop(&mut self) {
        let state = &self.state;
        if self.joined {
            state.hub.leave(&self.room, self.handle.id);
        }
        state.users.unregister(&self.handle);
        state.presence.session_ended(&self.handle.user, self.handle.id);
        state.metrics.connections.dec();
        state.metrics.closed(self.handle.close_code());
    }
}

/// The live part of the stream: the connection's queue until it is closed.
struct Live {
    conn: SseConn,
    rx: Outbox,
    /// The token's expiry (unix s): the stream ends then; the client comes
    /// back with a fresh token.
    exp: u64,
    /// Told to the room once the replay has been taken by the response.
    cursor: Option<u64>,
    /// When shutting down: this stream's random moment in the drain window.
    restart_at: Option<Instant>,
}

impl Live {
    fn into_stream(self) -> impl Stream<Item = Result<Event, Infallible>> + Send {
        futures::stream::unfold(self, |mut live| async move {
            let event = live.next_event().await?;
            Some((Ok(event), live))
        })
    }

    async fn next_event(&mut self) -> Option<Event> {
        let conn = &self.conn;
        if let Some(cursor) = self.cursor.take() {
            conn.state.hub.caught_up(&conn.room, conn.handle.id, cursor);
        }
        loop {
            let expiry = tokio::time::sleep(Duration::from_secs(self.exp.saturating_sub(unix_now())));
            let far = Instant::now() + Duration::from_secs(86_400);
            tokio::select! {
                biased;
                _ = tokio::time::sleep_until(self.restart_at.unwrap_or(far)), if self.restart_at.is_some() => return None,
                _ = conn.state.shutdown.cancelled(), if self.restart_at.is_none() => {
                    let spread = conn.state.settings.drain_window.mul_f32(0.6);
                    self.restart_at = Some(Instant::now() + spread.mul_f64(rand::random::<f64>()));
                }
                _ = expiry => return None,
                ev = conn.handle.next_event() => {
                    if ends_stream(&ev, &conn.room, &conn.handle.session) {
                        return None;
                    }
                }
                out = self.rx.recv() => match out {
                    Some(Out::Frame(frame)) => {
                        conn.handle.dequeued(frame.len());
                        if let Some(event) = frame_event(frame.as_str()) {
                            return Some(event);
                        }
                    }
                    Some(Out::Ping) => {}
                    Some(Out::Close(..)) | None => return None,
                },
            }
        }
    }
}

/// Removed from this room, or this session revoked.
fn ends_stream(ev: &UserEvent, room: &RoomId, session: &str) -> bool {
    match ev {
        UserEvent::RoomRemoved { room: r, .. } => r == room,
        UserEvent::SessionRevoked { session: s } => s.as_deref().is_none_or(|s| s == session),
        UserEvent::RoomAdded { .. } | UserEvent::TokenExpired => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_event_id_wins_over_since_and_must_be_a_seq() {
        let mut h = HeaderMap::new();
        assert_eq!(resume_point(&h, None).unwrap(), None);
        assert_eq!(resume_point(&h, Some("7".into())).unwrap(), Some(7));
        h.insert("last-event-id", HeaderValue::from_static("42"));
        assert_eq!(resume_point(&h, Some("7".into())).unwrap(), Some(42));
        h.insert("last-event-id", HeaderValue::from_static("x"));
        assert!(resume_point(&h, None).is_err());
    }

    #[test]
    fn only_messages_typing_and_read_become_events() {
        let frame = envelope::message_frame("r", 5, br#"{"id":"a","body":"hi"}"#).unwrap();
        assert!(frame_event(std::str::from_utf8(&frame).unwrap()).is_some());
        assert!(frame_event(r#"{"active":true,"room":"r","type":"typing","user":"u"}"#).is_some());
        assert!(frame_event(r#"{"type":"read","room":"r","user":"u","seq":3}"#).is_some());
        assert!(frame_event(r#"{"type":"room_added","room":"r"}"#).is_none());
        assert!(frame_event("not json").is_none());
    }
}
