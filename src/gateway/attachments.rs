//! Image attachments. `POST /v1/rooms/{id}/attachments` checks the caller is a
//! member, the declared type is an image type we accept, the size is within
//! NATTER_ATTACHMENT_MAX_BYTES and the bytes really are that type, then stores
//! them in the `attachments` object store under a random id.
//! `GET /v1/attachments/{id}` streams one back to current members of its room
//! (404 to everyone else, so ids do not reveal what exists). An image message
//! must name an attachment of its own room (`check_for_message`).

use async_nats::jetstream::object_store::{InfoErrorKind, ObjectInfo, ObjectMetadata};
use axum::{
    Json,
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde_json::json;

use super::{
    AppState, connection,
    http::{Caller, TokenCaller, require_member},
};
use crate::{
    bus::{envelope::Kind, objects},
    error::{ApiError, Code},
    ids::RoomId,
};

/// Attachments never change (a new upload gets a new id): cache for a year.
const CACHE_CONTROL: &str = "private, max-age=31536000, immutable";

/// The image types accepted, recognised by their magic numbers. Four fixed
/// signatures are a few lines; a sniffing crate (e.g. `infer`) would add a
/// dependency that knows hundreds of types we refuse anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageType {
    Png,
    Jpeg,
    Gif,
    Webp,
}

impl ImageType {
    /// The type of a `Content-Type` value (parameters and case ignored).
    pub fn from_mime(value: &str) -> Option<Self> {
        let essence = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        match essence.as_str() {
            "image/png" => Some(Self::Png),
            "image/jpeg" => Some(Self::Jpeg),
            "image/gif" => Some(Self::Gif),
            "image/webp" => Some(Self::Webp),
            _ => None,
        }
    }

    pub fn mime(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Gif => "image/gif",
            Self::Webp => "image/webp",
        }
    }

    /// The type the bytes are, by their first bytes.
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(Self::Png)
        } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(Self::Jpeg)
        } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
            Some(Self::Gif)
        } else if bytes.len() >= 12 && bytes.starts_with(b"RIFF") && &bytes[8..12] == b"WEBP" {
            Some(Self::Webp)
        } else {
            None
        }
    }
}

fn unsupported(message: impl Into<String>) -> ApiError {
    ApiError::new(Code::UnsupportedMediaType, message)
}

fn too_large(max: usize) -> ApiError {
    ApiError::new(Code::TooLarge, format!("attachments are at most {max} bytes"))
}

/// The declared type, which must be one we accept.
fn declared_type(headers: &HeaderMap) -> Result<ImageType, ApiError> {
    let value = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    ImageType::from_mime(value).ok_or_else(|| {
        unsupported(format!(
            "Content-Type {value:?} is not accepted; send image/png, image/jpeg, image/gif or image/webp"
        ))
    })
}

/// Reads the body, refusing it as soon as it is over `max` bytes.
async fn read_limited(headers: &HeaderMap, body: Body, max: usize) -> Result<Bytes, ApiError> {
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large(max));
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0));
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("cannot read the body: {e}")))?;
        if buf.len() + chunk.len() > max {
            return Err(too_large(max));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// `POST /v1/rooms/{id}/attachments`: 201 `{"id","size","content_type"}`.
pub async fn upload(
    State(state): State<AppState>,
    Caller(me): Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let room = RoomId::parse(&id)?;
    require_member(&state, &room, &me.user).await?;
    let declared = declared_type(&headers)?;
    let bytes = read_limited(&headers, body, state.settings.attachment_max_bytes).await?;
    if ImageType::sniff(&bytes) != Some(declared) {
        return Err(unsupported(format!("the body is not a {} image", declared.mime())));
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    let meta = ObjectMetadata {
        name: id.clone(),
        metadata: objects::metadata(&room, &me.user, declared.mime()),
        ..Default::default()
    };
    if let Err(e) = state.attachments.put(meta, &mut bytes.as_ref()).await {
        state.repair_attachments().await;
        return Err(ApiError::unavailable("attachment store", e));
    }
    tracing::debug!(attachment = %id, room = %room, size = bytes.len(), "attachment stored");
    let out = json!({"id": id, "size": bytes.len(), "content_type": declared.mime()});
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

/// The stored object of an attachment id; `None` when unknown (or not an id).
async fn lookup(state: &AppState, id: &str) -> Result<Option<ObjectInfo>, ApiError> {
    // Attachment ids are ours (32 hex digits); this also keeps odd names away
    // from the store.
    if RoomId::parse(id).is_err() {
        return Ok(None);
    }
    match state.attachments.info(id).await {
        Ok(info) if !info.deleted => Ok(Some(info)),
        Ok(_) => Ok(None),
        Err(e) if matches!(e.kind(), InfoErrorKind::NotFound | InfoErrorKind::InvalidName) => Ok(None),
        Err(e) => Err(ApiError::unavailable("attachment store", e)),
    }
}

/// An image message must name an attachment uploaded to the same room; a text
/// message must not name one. One object-info lookup. Shared by the WebSocket
/// and HTTP send paths.
pub async fn check_for_message(
    state: &AppState,
    room: &RoomId,
    kind: Kind,
    attachment: Option<String>,
) -> Result<Option<String>, ApiError> {
    let Some(id) = connection::check_attachment(kind, attachment)? else {
        return Ok(None);
    };
    match lookup(state, &id).await? {
        Some(info) if objects::room_of(&info) == Some(room.as_str()) => Ok(Some(id)),
        // The same answer for unknown and for another room's attachment.
        _ => Err(ApiError::bad_request("\"attachment\" is not an attachment of this room")),
    }
}

/// `GET /v1/attachments/{id}`: the file, streamed, to members of its room.
pub async fn download(
    State(state): State<AppState>,
    TokenCaller(me): TokenCaller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::not_found("no such attachment");
    let info = lookup(&state, &id).await?.ok_or_else(not_found)?;
    let room = objects::room_of(&info).and_then(|r| RoomId::parse(r).ok()).ok_or_else(not_found)?;
    if !state.membership.is_member(&room, &me.user).await? {
        return Err(not_found());
    }
    let etag = etag(&info);
    if if_none_match(&headers, &etag) {
        let mut resp = StatusCode::NOT_MODIFIED.into_response();
        set_cache_headers(resp.headers_mut(), etag);
        return Ok(resp);
    }
    let content_type =
        info.metadata.get(objects::META_CONTENT_TYPE).and_then(|t| ImageType::from_mime(t)).map(ImageType::mime);
    let object = state.attachments.get(&info.name).await.map_err(|e| ApiError::unavailable("attachment store", e))?;
    let mut resp = Body::from_stream(tokio_util::io::ReaderStream::new(object)).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type.unwrap_or("application/octet-stream")));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(info.size));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    set_cache_headers(h, etag);
    Ok(resp)
}

/// A strong validator: the object's digest (or, without one, its id).
fn etag(info: &ObjectInfo) -> HeaderValue {
    let tag = info.digest.as_deref().unwrap_or(&info.name);
    HeaderValue::from_str(&format!("\"{tag}\""))
        .or_else(|_| HeaderValue::from_str(&format!("\"{}\"", info.name)))
        .unwrap_or_else(|_| HeaderValue::from_static("\"attachment\""))
}

fn set_cache_headers(h: &mut HeaderMap, etag: HeaderValue) {
    h.insert(header::ETAG, etag);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(CACHE_CONTROL));
}

/// Whether `If-None-Match` names this entity (a list, `*`, or weak forms).
fn if_none_match(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let Ok(etag) = etag.to_str() else { return false };
    headers.get_all(header::IF_NONE_MATCH).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(
        |candidate| {
            let c = candidate.trim();
            c == "*" || c.strip_prefix("W/").unwrap_or(c) == etag
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_numbers_decide_the_type() {
        assert_eq!(ImageType::sniff(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"), Some(ImageType::Png));
        assert_eq!(ImageType::sniff(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 0x10]), Some(ImageType::Jpeg));
        assert_eq!(ImageType::sniff(b"GIF89a\x01\0"), Some(ImageType::Gif));
        assert_eq!(ImageType::sniff(b"GIF87a\x01\0"), Some(ImageType::Gif));
        assert_eq!(ImageType::sniff(b"RIFF\x24\0\0\0WEBPVP8 "), Some(ImageType::Webp));
        assert_eq!(ImageType::sniff(b"RIFF\x24\0\0\0WAVEfmt "), None);
        assert_eq!(ImageType::sniff(b"<svg xmlns="), None);
        assert_eq!(ImageType::sniff(b""), None);
    }

    #[test]
    fn declared_types_are_the_four_image_types() {
        assert_eq!(ImageType::from_mime("IMAGE/PNG; charset=binary"), Some(ImageType::Png));
        assert_eq!(ImageType::from_mime("image/webp"), Some(ImageType::Webp));
        assert_eq!(ImageType::from_mime("image/svg+xml"), None);
        assert_eq!(ImageType::from_mime("text/plain"), None);
    }

    #[test]
    fn if_none_match_accepts_lists_weak_tags_and_star() {
        let tag = HeaderValue::from_static("\"SHA-256=abc\"");
        let mut h = HeaderMap::new();
        assert!(!if_none_match(&h, &tag));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"x\", W/\"SHA-256=abc\""));
        assert!(if_none_match(&h, &tag));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        assert!(!if_none_match(&h, &tag));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(if_none_match(&h, &tag));
    }
}
