//! `GET /v1/ws`: the upgrade. Small per-connection buffers (an idle socket
//! costs a few KiB), frame limits from settings, then `connection::serve`.

use axum::{
    extract::{State, WebSocketUpgrade},
    http::{HeaderMap, header},
    response::Response,
};

use super::{AppState, connection};

pub async fn upgrade(State(state): State<AppState>, headers: HeaderMap, ws: WebSocketUpgrade) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned());
    let max = state.settings.max_frame_bytes;
    ws.read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(max.saturating_mul(4).max(256 * 1024))
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| connection::serve(state, socket, bearer))
}
