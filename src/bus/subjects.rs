//! The only place where subject, stream and bucket names are built. Every
//! function takes parsed ids, so no unchecked text reaches a subject.

use crate::ids::{RoomId, UserId};

/// The durable log of every room.
pub const CHAT_STREAM: &str = "CHAT";
/// Subjects captured by the CHAT stream.
pub const CHAT_SUBJECTS: &str = "chat.room.*.msg";
/// Where the stream republishes each stored message (`{{wildcard(1)}}` = room).
pub const LIVE_REPUBLISH_DEST: &str = "live.room.{{wildcard(1)}}";

/// Stored messages of a room (in the CHAT stream).
pub fn room_msg(room: &RoomId) -> String {
    format!("chat.room.{room}.msg")
}

/// The republished copy of each stored message, for live delivery.
pub fn live_room(room: &RoomId) -> String {
    format!("live.room.{room}")
}

/// Ephemeral room events (read markers, member changes).
pub fn room_event(room: &RoomId) -> String {
    format!("chat.room.{room}.event")
}

/// Typing indicators (core NATS, never stored).
pub fn room_typing(room: &RoomId) -> String {
    format!("chat.room.{room}.typing")
}

/// Events for one user wherever they are connected.
pub fn user_event(user: &UserId) -> String {
    format!("chat.user.{user}.event")
}

/// The batch direct-get API of a stream.
pub fn direct_get(stream: &str) -> String {
    format!("$JS.API.DIRECT.GET.{stream}")
}

/// Header with the session that caused a room event (so it is not echoed back).
pub const ORIGIN_SESSION_HEADER: &str = "Natter-Session";
