//! The attachments object store: created at gateway start when missing, with
//! the replica count of the other buckets. Objects are named by attachment id
//! and carry who uploaded them, to which room, and their content type.

use std::collections::HashMap;

use anyhow::Context;
use async_nats::jetstream::{
    self,
    object_store::{Config, ObjectInfo, ObjectStore},
    stream::StorageType,
};

use super::subjects::ATTACHMENTS_BUCKET;
use crate::{
    config::NatsSettings,
    ids::{RoomId, UserId},
};

/// Metadata keys of an attachment object.
pub const META_ROOM: &str = "room";
pub const META_UPLOADER: &str = "uploader";
pub const META_CONTENT_TYPE: &str = "content_type";

pub fn attachments_config(s: &NatsSettings) -> Config {
    Config {
        bucket: ATTACHMENTS_BUCKET.to_owned(),
        description: Some("natter: image attachments".to_owned()),
        storage: StorageType::File,
        num_replicas: s.stream_replicas.max(1),
        ..Default::default()
    }
}

/// Makes the attachments bucket exist and returns it. Creating is idempotent
/// for the same configuration; a bucket that exists with another one (e.g.
/// created by an operator) is used as it is.
pub async fn ensure_attachments(js: &jetstream::Context, s: &NatsSettings) -> anyhow::Result<ObjectStore> {
    // Created (or found) as a start-up request, opened with the default
    // timeout. A bucket an operator made with another configuration fails
    // creation three times (2 s) before it is opened as it is.
    let created = super::setup(js, |js| {
        let config = attachments_config(s);
        async move { js.create_object_store(config).await }
    })
    .await
    .err();
    js.get_object_store(ATTACHMENTS_BUCKET).await.with_context(|| match created {
        Some(create) => format!("cannot create ({create}) or open the {ATTACHMENTS_BUCKET:?} object store"),
        None => format!("cannot open the {ATTACHMENTS_BUCKET:?} object store (is JetStream enabled?)"),
    })
}

/// The metadata stored with an attachment.
pub fn metadata(room: &RoomId, uploader: &UserId, content_type: &str) -> HashMap<String, String> {
    HashMap::from([
        (META_ROOM.to_owned(), room.to_string()),
        (META_UPLOADER.to_owned(), uploader.to_string()),
        (META_CONTENT_TYPE.to_owned(), content_type.to_owned()),
    ])
}

/// The room an attachment was uploaded to, if it is a live natter attachment.
pub fn room_of(info: &ObjectInfo) -> Option<&str> {
    if info.deleted {
        return None;
    }
    info.metadata.get(META_ROOM).map(String::as_str)
}
