//! The only place where subject, stream and bucket names are built. Every
//! function takes parsed ids, so no unchecked text reaches a subject.

use crate::ids::{RoomId, UserId};

/// The durable log of every room.
pub const CHAT_STREAM: &str = "CHAT";
/// Subjects captured by the CHAT stream.
pub const CHAT_SUBJECTS: &str = "chat.room.*.msg";
/// Where the stream republishes each stored message (`{{wildcard(1)}}` = room).
/// Everything a gateway delivers live for a room is under `live.room.<r>.`,
/// so one subscription per room and gateway takes it all.
pub const LIVE_REPUBLISH_DEST: &str = "live.room.{{wildcard(1)}}.msg";

/// Stored messages of a room (in the CHAT stream).
pub fn room_msg(room: &RoomId) -> String {
    format!("chat.room.{room}.msg")
}

/// The room of a CHAT stream subject (`chat.room.<r>.msg`), checked.
pub fn room_of_msg(subject: &str) -> Option<RoomId> {
    let room = subject.strip_prefix("chat.room.")?.strip_suffix(".msg")?;
    RoomId::parse(room).ok()
}

/// Durable consumer shared by every notifier replica (unread + pushes).
pub const NOTIFIER_CONSUMER: &str = "notifier";
/// Durable consumer that copies messages into the PostgreSQL archive.
pub const ARCHIVER_CONSUMER: &str = "archiver";

/// Everything delivered live in a room: the republished messages
/// (`.msg`), room events (`.event`) and typing (`.typing`).
pub fn live_room(room: &RoomId) -> String {
    format!("live.room.{room}.>")
}

/// Every room's live traffic: the one subscription of a gateway that
/// receives its rooms' traffic through a shared subscription.
pub const ALL_LIVE_ROOMS: &str = "live.room.*.>";

/// The room token of a subject under [`live_room`] (unchecked: it is only
/// looked up among the rooms the gateway has).
pub fn room_of_live(subject: &str) -> Option<&str> {
    subject.strip_prefix("live.room.")?.split('.').next()
}

/// What a subject under [`live_room`] carries (its last token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Live {
    /// A stored message, republished by the CHAT stream.
    Message,
    /// An ephemeral room event (read markers).
    Event,
    /// A typing indicator.
    Typing,
}

impl Live {
    pub fn of(subject: &str) -> Option<Self> {
        match subject.rsplit('.').next()? {
            "msg" => Some(Self::Message),
            "event" => Some(Self::Event),
            "typing" => Some(Self::Typing),
            _ => None,
        }
    }
}

/// Ephemeral room events (read markers, member changes; core NATS).
pub fn room_event(room: &RoomId) -> String {
    format!("live.room.{room}.event")
}

/// Typing indicators (core NATS, never stored).
pub fn room_typing(room: &RoomId) -> String {
    format!("live.room.{room}.typing")
}

/// Events for one user wherever they are connected.
pub fn user_event(user: &UserId) -> String {
    format!("chat.user.{user}.event")
}

/// Every user's events: one subscription per gateway.
pub const ALL_USER_EVENTS: &str = "chat.user.*.event";

/// The user of a user-event subject (`chat.user.<u>.event`), checked.
pub fn user_of_event(subject: &str) -> Option<UserId> {
    let user = subject.strip_prefix("chat.user.")?.strip_suffix(".event")?;
    UserId::parse(user).ok()
}

/// The batch direct-get API of a stream.
pub fn direct_get(stream: &str) -> String {
    format!("$JS.API.DIRECT.GET.{stream}")
}

/// Header with the session that caused a room event (so it is not echoed back).
pub const ORIGIN_SESSION_HEADER: &str = "Natter-Session";
/// Header with the user who is typing (their own sessions are skipped).
pub const ORIGIN_USER_HEADER: &str = "Natter-User";

/// The object store bucket of image attachments (stream `OBJ_attachments`);
/// object name = attachment id.
pub const ATTACHMENTS_BUCKET: &str = "attachments";

/// The presence KV bucket: key `<user>.<node>`, and `=.<node>` for a node's
/// lease.
pub const PRESENCE_BUCKET: &str = "presence";
/// The stream behind the presence bucket.
pub const PRESENCE_STREAM: &str = "KV_presence";
/// The bucket republishes every change (including expiry markers) here.
pub const PRESENCE_REPUBLISH_SRC: &str = "$KV.presence.>";
pub const PRESENCE_REPUBLISH_DEST: &str = "presence.evt.>";
/// Every user's presence events: a gateway's one subscription when its
/// watches share one.
pub const ALL_PRESENCE_EVENTS: &str = PRESENCE_REPUBLISH_DEST;

/// The first token of a lease's key: no user id, so a user's keys and
/// events never include a lease's.
pub const LEASE_TOKEN: &str = "=";
/// Every node's lease, in the bucket (for multi-last reads).
pub const PRESENCE_LEASES: &str = "$KV.presence.=.*";
/// Republished changes of every node's lease.
pub const LEASE_EVENTS: &str = "presence.evt.=.*";

/// The KV subject of one node's lease.
pub fn presence_lease_key(node: &crate::ids::NodeId) -> String {
    format!("$KV.presence.{LEASE_TOKEN}.{node}")
}

/// The KV subject of one user's entry on one node.
pub fn presence_key(user: &UserId, node: &crate::ids::NodeId) -> String {
    format!("$KV.presence.{user}.{node}")
}

/// Every node's entry of one user, in the bucket (for multi-last reads).
pub fn presence_keys_of(user: &UserId) -> String {
    format!("$KV.presence.{user}.>")
}

/// Republished changes of one user's entries.
pub fn presence_events_of(user: &UserId) -> String {
    format!("presence.evt.{user}.>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rooms_live_subjects_are_told_apart_by_their_last_token() {
        let room = RoomId::parse("general").unwrap();
        assert_eq!(live_room(&room), "live.room.general.>");
        assert_eq!(Live::of(&room_typing(&room)), Some(Live::Typing));
        assert_eq!(Live::of(&room_event(&room)), Some(Live::Event));
        let republished = LIVE_REPUBLISH_DEST.replace("{{wildcard(1)}}", "general");
        assert_eq!(Live::of(&republished), Some(Live::Message));
        assert_eq!(Live::of("live.room.general.other"), None);
        for subject in [room_typing(&room), room_event(&room), republished] {
            assert_eq!(room_of_live(&subject), Some("general"), "{subject}");
        }
        assert_eq!(room_of_live("chat.room.general.msg"), None);
    }
}
