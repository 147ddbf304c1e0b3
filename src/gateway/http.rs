//! The REST API of docs/protocol.md, plus `/healthz` and `/readyz`.

use std::{sync::atomic::Ordering, time::Duration};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State},
    http::{StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
    routing::{delete, get, post, put},
};
use bytes::Bytes;
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::json;

use tower_http::{
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::TraceLayer,
};

use super::{AppState, attachments, dev, sse, web, ws};
use crate::{
    auth::Identity,
    bus::{
        directget,
        envelope::{Kind, MessageView, StoredMessage},
        messages::{self, NewMessage},
        subjects,
    },
    db::{self, rooms::Role},
    error::ApiError,
    ids::{ClientMsgId, RoomId, UserId},
    push::Platform,
};

pub fn router(state: AppState) -> Router {
    let limit = state.settings.max_frame_bytes;
    Router::new()
        .route("/v1/ws", get(ws::upgrade))
        .route("/v1/rooms", post(create_room).get(list_rooms))
        .route("/v1/rooms/{id}/members", post(add_member).get(list_members))
        .route("/v1/rooms/{id}/members/{user}", delete(remove_member))
        .route("/v1/rooms/{id}/messages", get(history).post(send_message))
        .route("/v1/rooms/{id}/events", get(sse::events))
        .route("/v1/rooms/{id}/attachments", post(attachments::upload))
        .route("/v1/attachments/{id}", get(attachments::download))
        .route("/v1/rooms/{id}/read", post(mark_read))
        .route("/v1/rooms/{id}/mute", put(mute_room))
        .route("/v1/unread", get(unread))
        .route("/v1/devices", post(register_device).get(list_devices))
        .route("/v1/devices/{token}", delete(unregister_device))
        .route("/v1/presence", get(presence))
        .route("/v1/sessions", delete(revoke_sessions))
        .route("/v1/dev/token", post(dev::token))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), per_ip_limit))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(web::router())
        .layer(DefaultBodyLimit::max(limit))
        // Every request gets an `x-request-id` (the caller's, or a new UUID),
        // echoed in the response and carried by the request's log span. The
        // span has the method and path only: no query, headers or body, so
        // tokens and message text never reach the logs. (Outermost layer last.)
        .layer(PropagateRequestIdLayer::new(REQUEST_ID.clone()))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<axum::body::Body>| {
            let id = req.headers().get(&REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-");
            tracing::info_span!("http", request_id = %id, method = %req.method(), path = %req.uri().path())
        }))
        .layer(SetRequestIdLayer::new(REQUEST_ID.clone(), MakeRequestUuid))
        .with_state(state)
}

static REQUEST_ID: axum::http::HeaderName = axum::http::HeaderName::from_static("x-request-id");

/// Prometheus text (OpenMetrics) of this gateway.
async fn metrics(State(state): State<AppState>) -> Response {
    state.metrics.rooms.set(state.hub.room_count() as i64);
    state.metrics.presence_watches.set(state.presence.watch_count() as i64);
    state.metrics.presence_unstored.set(state.presence.unstored_count() as i64);
    let body = state.metrics.render(&state.db);
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body).into_response()
}

/// HTTP requests per client address (every API route and the upgrade; not
/// the health checks).
async fn per_ip_limit(
    State(state): State<AppState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let ip = ws::client_ip(&state, req.headers(), peer);
    match state.limits.http_from_ip(ip) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// The authenticated caller of an HTTP request (`Authorization: Bearer`).
pub struct Caller(pub Identity);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(&parts.headers).ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
        verify_caller(state, token).map(Caller)
    }
}

/// The caller by `Authorization: Bearer` or else a `token` query parameter,
/// for what browsers fetch without custom headers (EventSource, `<img>`).
/// Same verification as [`Caller`].
pub struct TokenCaller(pub Identity);

impl FromRequestParts<AppState> for TokenCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = match bearer(&parts.headers) {
            Some(t) => t.to_owned(),
            None => query_param(parts.uri.query(), "token")
                .ok_or_else(|| ApiError::unauthorized("missing bearer token or token parameter"))?,
        };
        verify_caller(state, &token).map(TokenCaller)
    }
}

fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
}

fn verify_caller(state: &AppState, token: &str) -> Result<Identity, ApiError> {
    let id = state.verifier.verify(token.trim()).map_err(|e| ApiError::unauthorized(e.to_string()))?;
    state.limits.http_from_user(&id.user)?;
    Ok(id)
}

/// The first value of `name` in a URL query string (percent-decoded).
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

/// JSON bodies are parsed here so that every failure gets our error body.
fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

fn room_id(raw: &str) -> Result<RoomId, ApiError> {
    Ok(RoomId::parse(raw)?)
}

pub(super) async fn require_member(state: &AppState, room: &RoomId, user: &UserId) -> Result<(), ApiError> {
    if state.membership.is_member(room, user).await? {
        Ok(())
    } else if db::rooms::exists(&state.db, room).await? {
        Err(ApiError::forbidden("not a member of this room"))
    } else {
        Err(ApiError::not_found("no such room"))
    }
}

async fn require_owner(state: &AppState, room: &RoomId, user: &UserId) -> Result<(), ApiError> {
    match db::rooms::role(&state.db, room, user).await? {
        Some(Role::Owner) => Ok(()),
        Some(Role::Member) => Err(ApiError::forbidden("only the room's owner may do this")),
        None if db::rooms::exists(&state.db, room).await? => Err(ApiError::forbidden("not a member of this room")),
        None => Err(ApiError::not_found("no such room")),
    }
}

/// Tells a user's sessions, wherever they are, that their rooms changed.
async fn user_event(state: &AppState, user: &UserId, event: serde_json::Value) {
    let payload = Bytes::from(event.to_string());
    if let Err(e) = state.nats.publish(subjects::user_event(user), payload).await {
        tracing::warn!(error = %e, "cannot publish user event");
    }
}

#[derive(Deserialize)]
struct CreateRoom {
    id: Option<String>,
    name: Option<String>,
    #[serde(default)]
    members: Vec<String>,
}

async fn create_room(State(state): State<AppState>, Caller(me): Caller, body: Bytes) -> Result<Response, ApiError> {
    let req: CreateRoom = parse(&body)?;
    let id = match req.id {
        Some(id) => room_id(&id)?,
        None => RoomId::parse(&uuid::Uuid::new_v4().simple().to_string())?,
    };
    if req.members.len() > 10_000 {
        return Err(ApiError::bad_request("at most 10000 members at creation"));
    }
    let members = req.members.iter().map(|m| UserId::parse(m)).collect::<Result<Vec<_>, _>>()?;
    let name = req.name.unwrap_or_else(|| id.to_string());
    if name.len() > 200 {
        return Err(ApiError::bad_request("name is longer than 200 bytes"));
    }
    if !db::rooms::create(&state.db, &id, &name, &me.user, &members).await? {
        return Err(ApiError::new(crate::error::Code::Conflict, "a room with this id exists"));
    }
    let all = db::rooms::members(&state.db, &id).await?;
    for m in &members {
        if *m != me.user {
            user_event(&state, m, json!({"type":"room_added","room":id,"by":me.user})).await;
        }
    }
    Ok((StatusCode::CREATED, Json(json!({"id": id, "name": name, "members": all}))).into_response())
}

async fn list_rooms(State(state): State<AppState>, Caller(me): Caller) -> Result<Json<serde_json::Value>, ApiError> {
    let rooms = db::rooms::list_for(&state.db, &me.user).await?;
    let unread = db::unread::by_room(&state.db, &me.user).await?;
    let lasts = futures::future::join_all(rooms.iter().map(|r| async {
        match RoomId::parse(&r.id) {
            Ok(id) => directget::last_seq(&state.stream, &subjects::room_msg(&id)).await.ok(),
            Err(_) => None,
        }
    }))
    .await;
    let out: Vec<_> = rooms
        .into_iter()
        .zip(lasts)
        .map(|(r, last)| {
            let count = unread.get(&r.id).copied().unwrap_or(0);
            json!({"id": r.id, "name": r.name, "role": r.role, "muted": r.muted, "last_read_seq": r.last_read_seq,
                   "last_seq": last, "unread": count})
        })
        .collect();
    Ok(Json(json!({ "rooms": out })))
}

#[derive(Deserialize)]
struct AddMember {
    user: String,
}

async fn add_member(
    State(state): State<AppState>,
    Caller(me): Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let room = room_id(&id)?;
    let req: AddMember = parse(&body)?;
    let user = UserId::parse(&req.user)?;
    require_owner(&state, &room, &me.user).await?;
    let added = db::rooms::add_member(&state.db, &room, &user).await?;
    state.membership.forget(&room, &user);
    if added {
        user_event(&state, &user, json!({"type":"room_added","room":room,"by":me.user})).await;
    }
    let status = if added { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(json!({"room": room, "user": user, "added": added}))).into_response())
}

async fn list_members(
    State(state): State<AppState>,
    Caller(me): Caller,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let room = room_id(&id)?;
    require_member(&state, &room, &me.user).await?;
    Ok(Json(json!({"room": room, "members": db::rooms::members(&state.db, &room).await?})))
}

async fn remove_member(
    State(state): State<AppState>,
    Caller(me): Caller,
    Path((id, user)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let room = room_id(&id)?;
    let user = UserId::parse(&user)?;
    if user != me.user {
        require_owner(&state, &room, &me.user).await?;
    }
    let removed = db::rooms::remove_member(&state.db, &room, &user).await?;
    state.membership.forget(&room, &user);
    if !removed {
        return Err(ApiError::not_found("not a member"));
    }
    user_event(&state, &user, json!({"type":"room_removed","room":room,"by":me.user})).await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct HistoryQuery {
    before: Option<u64>,
    limit: Option<usize>,
}

async fn history(
    State(state): State<AppState>,
    Caller(me): Caller,
    Path(id): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let room = room_id(&id)?;
    require_member(&state, &room, &me.user).await?;
    let limit = q.limit.unwrap_or(50).clamp(1, 200);
    let before = q.before.unwrap_or(u64::MAX);
    let subject = subjects::room_msg(&room);
    let found = tokio::time::timeout(
        Duration::from_secs(10),
        directget::newest_before(&state.nats, &state.stream, &subject, before, limit),
    )
    .await
    .map_err(|_| ApiError::unavailable("message stream", "timed out"))?
    .map_err(|e| ApiError::unavailable("message stream", e))?;
    let oldest = found.last().map_or(before, |m| m.seq);
    let mut messages: Vec<MessageView> = found
        .into_iter()
        .filter_map(|m| {
            let msg: StoredMessage = serde_json::from_slice(&m.payload).ok()?;
            Some(MessageView { room: room.to_string(), seq: m.seq, msg })
        })
        .collect();
    // What the stream no longer keeps comes from the archive.
    if messages.len() < limit {
        let older = db::archive::newest_before(&state.db, room.as_str(), oldest, limit - messages.len()).await?;
        messages.extend(older);
    }
    Ok(Json(json!({ "messages": messages })))
}

#[derive(Deserialize)]
struct SendBody {
    id: String,
    #[serde(default)]
    body: String,
    #[serde(default)]
    kind: Kind,
    attachment: Option<String>,
}

async fn send_message(
    State(state): State<AppState>,
    Caller(me): Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let room = room_id(&id)?;
    let req: SendBody = parse(&body)?;
    let msg_id = ClientMsgId::parse(&req.id)?;
    state.limits.user_send(&me.user)?;
    require_member(&state, &room, &me.user).await?;
    let attachment = attachments::check_for_message(&state, &room, req.kind, req.attachment).await?;
    let new = NewMessage { room: &room, from: &me.user, id: &msg_id, body: req.body, kind: req.kind, attachment };
    let (ts, fut) = messages::publish(&state.js, new).await.map_err(|e| ApiError::unavailable("message stream", e))?;
    let p = state.confirm_send(ts, fut).await.map_err(|e| ApiError::unavailable("message stream", e))?;
    let status = if p.duplicate { StatusCode::OK } else { StatusCode::CREATED };
    let out = json!({"room": room, "seq": p.seq, "ts": p.ts, "id": msg_id, "duplicate": p.duplicate});
    Ok((status, Json(out)).into_response())
}

#[derive(Deserialize)]
struct ReadBody {
    seq: u64,
}

async fn mark_read(
    State(state): State<AppState>,
    Caller(me): Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let room = room_id(&id)?;
    let req: ReadBody = parse(&body)?;
    super::connection::publish_read(&state, &room, &me.user, req.seq, None).await?;
    Ok(Json(json!({"room": room, "seq": req.seq})))
}

#[derive(Deserialize)]
struct MuteBody {
    muted: bool,
}

/// `PUT /v1/rooms/{id}/mute`: no unread bumps or pushes for the caller in this room.
async fn mute_room(
    State(state): State<AppState>,
    Caller(me): Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let room = room_id(&id)?;
    let req: MuteBody = parse(&body)?;
    if !db::rooms::set_muted(&state.db, &room, &me.user, req.muted).await? {
        require_member(&state, &room, &me.user).await?;
    }
    Ok(Json(json!({"room": room, "muted": req.muted})))
}

/// `GET /v1/unread`: `{"rooms":{"general":3},"total":3}`.
async fn unread(State(state): State<AppState>, Caller(me): Caller) -> Result<Json<serde_json::Value>, ApiError> {
    let rooms = db::unread::by_room(&state.db, &me.user).await?;
    let total: i64 = rooms.values().sum();
    Ok(Json(json!({"rooms": rooms, "total": total})))
}

#[derive(Deserialize)]
struct DeviceBody {
    platform: Platform,
    token: String,
    /// APNS topic (bundle id) / FCM app; `app` is accepted as an alias.
    #[serde(alias = "app")]
    topic: Option<String>,
}

/// Device tokens end up in provider URLs (`/3/device/<token>`): only URL-safe
/// token characters are accepted.
fn check_device_token(token: &str) -> Result<(), ApiError> {
    check_chars("token", token, 4096, b"_-:")
}

fn check_topic(topic: &str) -> Result<(), ApiError> {
    check_chars("topic", topic, 255, b"_-.")
}

/// 1 to `max` bytes of ASCII letters, digits and `extra`.
fn check_chars(what: &str, value: &str, max: usize, extra: &[u8]) -> Result<(), ApiError> {
    let ok = (1..=max).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_alphanumeric() || extra.contains(&b));
    if ok {
        Ok(())
    } else {
        let extra = String::from_utf8_lossy(extra);
        Err(ApiError::bad_request(format!("{what}: 1 to {max} of [A-Za-z0-9{extra}]")))
    }
}

/// `POST /v1/devices`: registers the caller's device for pushes.
async fn register_device(State(state): State<AppState>, Caller(me): Caller, body: Bytes) -> Result<Response, ApiError> {
    let req: DeviceBody = parse(&body)?;
    check_device_token(&req.token)?;
    if let Some(t) = &req.topic {
        check_topic(t)?;
    }
    let new = db::devices::register(&state.db, &me.user, req.platform, &req.token, req.topic.as_deref()).await?;
    let status = if new { StatusCode::CREATED } else { StatusCode::OK };
    let out = json!({"platform": req.platform, "token": req.token, "topic": req.topic, "user": me.user});
    Ok((status, Json(out)).into_response())
}

/// `GET /v1/devices`: the caller's devices.
async fn list_devices(State(state): State<AppState>, Caller(me): Caller) -> Result<Json<serde_json::Value>, ApiError> {
    let devices = db::devices::list(&state.db, &me.user).await?;
    let out: Vec<_> =
        devices.iter().map(|d| json!({"platform": d.platform, "token": d.token, "topic": d.topic})).collect();
    Ok(Json(json!({ "devices": out })))
}

/// `DELETE /v1/devices/{token}`: stops pushes to that device.
async fn unregister_device(
    State(state): State<AppState>,
    Caller(me): Caller,
    Path(token): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_device_token(&token)?;
    if db::devices::unregister(&state.db, &me.user, &token).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("no such device"))
    }
}

/// Ready while accepting, connected to NATS, and PostgreSQL answers.
async fn readyz(State(state): State<AppState>) -> Response {
    let accepting = state.accepting.load(Ordering::Acquire);
    let nats = state.nats.connection_state() == async_nats::connection::State::Connected;
    let db = db::ping(&state.db).await;
    let body = json!({"accepting": accepting, "nats": nats, "database": db});
    let status = if accepting && nats && db { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

#[derive(Deserialize)]
struct PresenceQuery {
    users: String,
}

/// `GET /v1/presence?users=a,b`: current status and last seen of each user.
async fn presence(
    State(state): State<AppState>,
    Caller(_me): Caller,
    Query(q): Query<PresenceQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let users = q.users.split(',').filter(|u| !u.is_empty()).map(UserId::parse).collect::<Result<Vec<_>, _>>()?;
    if users.is_empty() || users.len() > state.settings.presence_sub_max {
        return Err(ApiError::bad_request(format!("users: 1 to {} ids", state.settings.presence_sub_max)));
    }
    let views = state.presence.lookup(&users).await.map_err(|e| ApiError::unavailable("presence", e))?;
    let out: Vec<_> =
        views.into_iter().map(|(u, v)| json!({"user": u, "status": v.status, "last_seen": v.last_seen})).collect();
    Ok(Json(json!({ "presence": out })))
}

/// `DELETE /v1/sessions`: closes every live session of the caller, on every
/// gateway, with 4001 ("log out everywhere").
async fn revoke_sessions(State(state): State<AppState>, Caller(me): Caller) -> StatusCode {
    user_event(&state, &me.user, json!({"type": "session_revoked"})).await;
    StatusCode::ACCEPTED
}
