//! `GET /v1/ws`: the upgrade. Refused while shutting down, from an origin not
//! on the allow-list, or from an address over its connection limit; then
//! small per-connection buffers (an idle socket costs a few KiB), frame
//! limits from settings, and `connection::serve`.

use std::net::{IpAddr, SocketAddr};

use axum::{
    extract::{ConnectInfo, State, WebSocketUpgrade},
    http::{HeaderMap, header},
    response::{IntoResponse, Response},
};

use super::{AppState, connection};
use crate::error::{ApiError, Code};

/// Initial read buffer of a socket. Chat frames are small; a bigger frame
/// grows the buffer as needed. Every idle connection holds this much (the
/// 4 KiB it was showed in heaptrack as the largest single per-connection
/// allocation; then 1 KiB and 512 bytes, each the largest once the others
/// were cut). The cost: tungstenite reads at most this much per read call,
/// so a frame of n bytes takes about n/256 reads (a 2 KiB message 8, the
/// 64 KiB maximum 256); most chat frames fit in one.
const READ_BUFFER: usize = 256;

pub async fn upgrade(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if !state.accepting.load(std::sync::atomic::Ordering::Acquire) {
        return ApiError::new(Code::Unavailable, "gateway shutting down; connect to another").into_response();
    }
    if let Some(origin) = headers.get(header::ORIGIN)
        && !origin_allowed(&state.settings.allowed_origins, origin.to_str().unwrap_or(""))
    {
        return ApiError::forbidden("origin not allowed").into_response();
    }
    let ip = client_ip(&state, &headers, peer);
    if !state.limits.ip_has_room(ip) {
        return ApiError::rate_limited("too many connections from this address", std::time::Duration::from_secs(5))
            .into_response();
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned());
    let max = state.settings.max_frame_bytes;
    let tracker = state.connections.clone();
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(max.saturating_mul(4).max(256 * 1024))
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            // A task of its own: axum's upgrade task keeps its captures (the
            // config, callback and protocol, 176 bytes) for as long as the
            // future it awaits, which would be the connection's whole life.
            tracker.spawn(connection::serve(state, Box::new(socket), bearer, ip));
            std::future::ready(())
        })
}

/// `allowed` is the comma-separated allow-list; empty allows every origin.
pub fn origin_allowed(allowed: &str, origin: &str) -> bool {
    let mut list = allowed.split(',').map(|o| o.trim().trim_end_matches('/')).filter(|o| !o.is_empty()).peekable();
    list.peek().is_none() || list.any(|o| o.eq_ignore_ascii_case(origin.trim_end_matches('/')))
}

/// The client's address: the configured load-balancer header's first entry,
/// else the peer.
pub fn client_ip(state: &AppState, headers: &HeaderMap, peer: SocketAddr) -> IpAddr {
    state
        .settings
        .client_ip_header
        .as_deref()
        .and_then(|h| headers.get(h))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(peer.ip())
}

#[cfg(test)]
mod tests {
    use super::origin_allowed;

    #[test]
    fn origins_are_matched_exactly_from_the_list() {
        assert!(origin_allowed("", "https://evil.example"), "no list: any origin");
        let list = "https://chat.example.com, https://app.example.com/";
        assert!(origin_allowed(list, "https://chat.example.com"));
        assert!(origin_allowed(list, "https://APP.example.com"));
        assert!(!origin_allowed(list, "https://chat.example.com.evil.net"));
        assert!(!origin_allowed(list, "http://chat.example.com"));
        assert!(!origin_allowed(list, "null"));
    }
}
