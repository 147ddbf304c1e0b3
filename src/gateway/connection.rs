//! One WebSocket connection, in one task: the handshake, then the client's
//! frames are read and handled while the outbound queue is written to the
//! socket ([`Link`]). No writer task, no split socket and no timers of its
//! own (the keepalive sweep pings, and closes idle or expired connections):
//! an idle connection is this task, its socket and its queue.

use std::{
    collections::HashSet,
    pin::pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};

use super::{
    AppState,
    keepalive::Keepalive,
    limits::ConnSlot,
    outbound::{ConnHandle, Out, Outbox, close},
    protocol::{self, ClientFrame, ServerFrame},
    replay,
};
use crate::{
    auth::{AuthError, Identity},
    bus::presence::Status,
    bus::{
        envelope,
        envelope::Kind,
        messages::{self, NewMessage},
        subjects,
    },
    error::{ApiError, Code},
    ids::{ClientMsgId, RoomId, UserId},
};

use super::users::UserEvent;

/// Frames coalesced into one socket write.
const WRITE_BATCH: usize = 64;

/// How long a closing connection may take to write what is left and read
/// the client's close.
const CLOSING: Duration = Duration::from_secs(3);

/// Runs one upgraded socket to its end. The socket comes boxed: an async
/// fn keeps its arguments apart from its locals, and a socket by value
/// (368 bytes) was held three times over in this future. The opening runs
/// boxed and apart, so what it needs (the hello, the token's claims) is not
/// kept for the connection's life either.
pub async fn serve(state: AppState, ws: Box<WebSocket>, bearer: Option<String>, ip: std::net::IpAddr) {
    // `let … else`, not `if let`: an `if let`'s scrutinee would be kept for
    // the whole body, the connection's life. `_slot` (the connection's place
    // in the per-user / per-IP counts) is held to the end; `link` is lent,
    // as an async fn moves its arguments into locals and would hold it twice.
    let Some((mut link, _slot)) = Box::pin(open(&state, ws, bearer, ip)).await else { return };
    connected(&state, &mut link).await;
}

/// The handshake: `hello` (or the upgrade's bearer token), the connection
/// limits, the welcome, and the connection's registration. `None` when the
/// client was refused (told why, and closed).
async fn open(
    state: &AppState,
    mut ws: Box<WebSocket>,
    bearer: Option<String>,
    ip: std::net::IpAddr,
) -> Option<(Link, ConnSlot)> {
    let identity = match handshake(state, &mut ws, bearer).await {
        Ok(id) => id,
        Err(reason) => {
            let e = ApiError::new(Code::Unauthorized, reason);
            refuse(&mut ws, e, close_msg(close::UNAUTHORIZED, "unauthorized")).await;
            return None;
        }
    };
    let slot = match state.limits.admit(&identity.user, ip) {
        Ok(slot) => slot,
        Err(e) => {
            refuse(&mut ws, e, close_msg(close::ABUSE, "too many connections")).await;
            return None;
        }
    };

    let session = uuid::Uuid::new_v4().simple().to_string();
    let (conn, rx) = ConnHandle::new(
        state.next_conn_id(),
        session,
        identity.user.clone(),
        (state.settings.outbound_queue, state.settings.outbound_bytes),
        Some(Keepalive::new(identity.exp)),
        state.metrics.clone(),
    );
    state.metrics.connections.inc();
    let read_waker = std::task::Waker::from(conn.clone());
    let link = Link { ws, rx, conn: conn.clone(), read_waker, write: Write::Open, unflushed: false };
    conn.send(
        ServerFrame::Welcome {
            user: conn.user.as_str(),
            session: &conn.session,
            node: state.node.as_str(),
            heartbeat_ms: state.settings.heartbeat.as_millis() as u64,
        }
        .encode(),
    )
    .await;

    state.presence.session_started(&conn.user, conn.id);
    state.users.register(&conn);
    // Registered after the shutdown's last sweep: closed here.
    if state.shutdown.is_cancelled() {
        conn.close_now(close::RESTARTING);
    }
    Some((link, slot))
}

/// Answers a refused opening with the error frame, then `close`.
async fn refuse(ws: &mut WebSocket, e: ApiError, close: Message) {
    let frame =
        ServerFrame::Error { code: e.code, reference: "hello", message: &e.message, retry_after_ms: e.retry_after_ms };
    let _ = ws.send(Message::Text(frame.encode())).await;
    let _ = ws.send(close).await;
}

/// The connection's life after the welcome, to its close.
async fn connected(state: &AppState, link: &mut Link) {
    let conn = link.conn.clone();
    let mut session = Session {
        state,
        conn: conn.clone(),
        rooms: HashSet::new(),
        typing_in: HashSet::new(),
        watching: HashSet::new(),
        limits: state.limits.connection(),
        linger: false,
    };
    session.run(link).await;
    Box::pin(session.finish()).await;
    link.close().await;
    if session.linger {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    state.metrics.connections.dec();
    state.metrics.closed(conn.close_code());
}

/// Waits for `hello` (or uses the upgrade's bearer token).
async fn handshake(state: &AppState, ws: &mut WebSocket, bearer: Option<String>) -> Result<Identity, String> {
    let token = match bearer {
        Some(t) => t,
        None => {
            let first = tokio::time::timeout(state.settings.hello_timeout, ws.next())
                .await
                .map_err(|_| "no hello in time".to_owned())?;
            let text = match first {
                Some(Ok(Message::Text(t))) => t,
                _ => return Err("the first frame must be hello".to_owned()),
            };
            match protocol::decode(&text) {
                Ok(ClientFrame::Hello { token }) => token,
                _ => return Err("the first frame must be hello".to_owned()),
            }
        }
    };
    state.verifier.verify(&token).map_err(|e| match e {
        AuthError::Expired => "token expired".to_owned(),
        AuthError::Invalid(_) => "invalid token".to_owned(),
    })
}

fn close_msg(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from_static(reason) }))
}

/// The write side of a [`Link`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    Open,
    /// Closed at once: what is left of the queue (the frames telling an
    /// abusive client why, or nothing), then a close frame with this code.
    Closing(u16),
    /// A close frame went out, or the socket failed: nothing more is written.
    Done,
}

/// The socket and the queue that feeds it, both driven by the connection's
/// task: frames are written while the client's are read and handled.
struct Link {
    ws: Box<WebSocket>,
    rx: Outbox,
    conn: Arc<ConnHandle>,
    /// The waker the socket's read side is polled with (the connection's
    /// handle: it marks the read side ready, then wakes this task).
    read_waker: std::task::Waker,
    write: Write,
    /// Frames handed to the socket and not flushed yet.
    unflushed: bool,
}

impl Link {
    /// Writes what is queued, up to a batch per flush. `Ready` once the
    /// write side is done; `Pending` while it waits for frames or for the
    /// socket (and for a close at once, which wakes it too).
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.write == Write::Done {
            return Poll::Ready(());
        }
        self.rx.register(cx);
        if self.write == Write::Open && self.conn.is_killed() {
            let code = self.conn.close_code();
            // Senders waiting for room go on; an abusive client still
            // learns why from the frames already queued.
            self.rx.close(code != close::ABUSE);
            self.write = Write::Closing(code);
        }
        // Batches of up to WRITE_BATCH frames, one flush each, until the
        // queue is empty or the socket is full. No yield after a batch: a
        // writer that gives way while a room keeps queueing falls behind it
        // (tokio's budget still makes a long run yield to other tasks).
        loop {
            let mut fed = 0;
            while fed < WRITE_BATCH {
                match self.ws.poll_ready_unpin(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => return self.write_failed(),
                    Poll::Pending => return Poll::Pending,
                }
                let next = match self.write {
                    Write::Closing(_) => self.rx.try_recv(),
                    _ => match self.rx.poll_recv(cx) {
                        Poll::Ready(Some(out)) => Some(out),
                        Poll::Ready(None) => {
                            // Closed at once since the check above.
                            let code = self.conn.close_code();
                            self.rx.close(code != close::ABUSE);
                            self.write = Write::Closing(code);
                            continue;
                        }
                        Poll::Pending => None,
                    },
                };
                let msg = match (next, self.write) {
                    (Some(Out::Frame(f)), _) => {
                        self.conn.dequeued(f.len());
                        Message::Text(f)
                    }
                    (Some(Out::Ping), _) => Message::Ping(Bytes::new()),
                    (Some(Out::Close(code, reason)), _) => {
                        self.conn.close_now(code);
                        self.write = Write::Closing(code);
                        close_msg(code, reason)
                    }
                    (None, Write::Closing(code)) => close_msg(code, reason_of(code)),
                    (None, _) => break,
                };
                let is_close = matches!(msg, Message::Close(_));
                if self.ws.start_send_unpin(msg).is_err() {
                    return self.write_failed();
                }
                self.unflushed = true;
                fed += 1;
                if is_close {
                    self.write = Write::Done;
                    break;
                }
            }
            if self.unflushed {
                match self.ws.poll_flush_unpin(cx) {
                    Poll::Ready(Ok(())) => self.unflushed = false,
                    Poll::Ready(Err(_)) => return self.write_failed(),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.write == Write::Done {
                return Poll::Ready(());
            }
            if fed < WRITE_BATCH {
                return Poll::Pending;
            }
        }
    }

    fn write_failed(&mut self) -> Poll<()> {
        self.conn.close_now(close::NORMAL);
        self.rx.close(true);
        self.write = Write::Done;
        Poll::Ready(())
    }

    /// The client's next frame, writing meanwhile; `None` once the
    /// connection was closed at once or its write side is done.
    async fn next(&mut self) -> Option<Result<Message, axum::Error>> {
        std::future::poll_fn(|cx| {
            if self.poll_out(cx).is_ready() || self.write != Write::Open {
                return Poll::Ready(None);
            }
            self.poll_read()
        })
        .await
    }

    /// Polls the socket's read side if it was woken since it last came up
    /// empty: most wakes of a busy connection are for frames to write, and
    /// a read attempt each time cost ~3 % of the gateway's CPU in fan-out.
    /// (`poll_out` has registered this task's waker, which the read side's
    /// waker wakes.)
    fn poll_read(&mut self) -> Poll<Option<Result<Message, axum::Error>>> {
        if !self.conn.take_read_ready() {
            return Poll::Pending;
        }
        let mut cx = Context::from_waker(&self.read_waker);
        let polled = self.ws.poll_next_unpin(&mut cx);
        if polled.is_ready() {
            // More may be buffered: look again next time.
            self.conn.set_read_ready();
        }
        polled
    }

    /// Runs `work` (a frame's handling) to its end, writing meanwhile: its
    /// replies may wait for room in the queue.
    async fn drive<T>(&mut self, work: impl Future<Output = T>) -> T {
        let mut work = pin!(work);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(v) = work.as_mut().poll(cx) {
                return Poll::Ready(v);
            }
            if self.poll_out(cx).is_ready() {
                // Nothing more will be written: senders waiting for room go on.
                self.rx.close(true);
            }
            Poll::Pending
        })
        .await
    }

    /// Ends the connection: what is queued and a close frame go out (1000,
    /// unless closed at once with another code), and what the client still
    /// sends is read and dropped until its close — a socket closed with
    /// unread input is reset, and the client would miss the close code.
    /// Bounded by [`CLOSING`], for clients that do not read.
    async fn close(&mut self) {
        if !self.conn.is_killed() {
            self.conn.close_last(close::NORMAL, "");
        }
        let mut read_done = false;
        let closing = std::future::poll_fn(|cx| {
            let written = self.poll_out(cx).is_ready();
            while !read_done {
                match self.ws.poll_next_unpin(cx) {
                    Poll::Ready(Some(Ok(_))) => {}
                    Poll::Ready(_) => read_done = true,
                    Poll::Pending => break,
                }
            }
            if written && read_done { Poll::Ready(()) } else { Poll::Pending }
        });
        let _ = tokio::time::timeout(CLOSING, closing).await;
    }
}

fn reason_of(code: u16) -> &'static str {
    match code {
        close::SLOW_CONSUMER => "slow consumer",
        close::UNAUTHORIZED => "unauthorized",
        close::RESTARTING => "gateway restarting",
        close::ABUSE => "too many frames",
        close::IDLE => "idle timeout",
        close::TOO_BIG => "frame too large",
        close::INVALID_DATA => "invalid UTF-8",
        _ => "",
    }
}

/// The authenticated part of a connection.
struct Session<'a> {
    state: &'a AppState,
    conn: Arc<ConnHandle>,
    rooms: HashSet<RoomId>,
    /// Rooms where this connection last said it is typing.
    typing_in: HashSet<RoomId>,
    /// Users whose presence this connection watches.
    watching: HashSet<UserId>,
    limits: super::limits::ConnLimits,
    /// The read side failed with input left unread: wait a little before
    /// dropping the socket, so that the close frame reaches the client.
    linger: bool,
}

impl Session<'_> {
    async fn run(&mut self, link: &mut Link) {
        loop {
            let frame = tokio::select! {
                biased;
                ev = self.conn.next_event() => {
                    if !link.drive(Box::pin(self.user_event(ev))).await {
                        return;
                    }
                    continue;
                }
                f = link.next() => match f {
                    Some(f) => f,
                    None => return,
                },
            };
            if let Some(k) = self.conn.keepalive() {
                k.heard();
            }
            match frame {
                Ok(Message::Text(text)) => {
                    // Boxed: a frame's handling (database, NATS) is a large
                    // future; inline, every idle connection would carry its
                    // size (heaptrack: the task was most of an idle
                    // connection's memory).
                    if !link.drive(Box::pin(self.handle_text(&text))).await {
                        return;
                    }
                }
                Ok(Message::Binary(_)) => {
                    // Boxed, as every rarely taken path that awaits: inline,
                    // each would add its size to every connection.
                    let e = self.error(Code::BadRequest, "frame", "binary frames are not supported; send JSON text");
                    link.drive(Box::pin(e)).await
                }
                Ok(Message::Ping(_) | Message::Pong(_)) => {}
                Ok(Message::Close(_)) => return,
                Err(e) => {
                    tracing::debug!(conn = self.conn.id, error = %e, "socket read failed");
                    // An oversized or invalid frame ends the read side: tell the
                    // client if we still can, and linger so that the close frame
                    // is read before the socket (with unread input) is reset.
                    let inner = e.into_inner();
                    let (code, reason, message) = match inner.downcast_ref::<tungstenite::Error>() {
                        Some(tungstenite::Error::Capacity(_)) => (close::TOO_BIG, "frame too large", "frame too large"),
                        Some(tungstenite::Error::Utf8(_)) => {
                            (close::INVALID_DATA, "invalid UTF-8", "text frame is not valid UTF-8")
                        }
                        _ => return,
                    };
                    let code_of = if code == close::TOO_BIG { Code::TooLarge } else { Code::BadRequest };
                    link.drive(Box::pin(async {
                        self.error(code_of, "frame", message).await;
                        self.conn.close_after_queue(code, reason).await;
                    }))
                    .await;
                    self.linger = true;
                    return;
                }
            }
        }
    }

    /// Leaves every room, stops typing, drops presence watches and this
    /// session's share of the user's presence.
    async fn finish(&mut self) {
        let state = self.state;
        for room in std::mem::take(&mut self.typing_in) {
            let _ = publish_typing(state, &room, &self.conn.user, false).await;
        }
        for room in self.rooms.drain() {
            state.hub.leave(&room, self.conn.id);
        }
        state.presence.unwatch(self.conn.id, &self.watching);
        state.presence.session_ended(&self.conn.user, self.conn.id);
        state.users.unregister(&self.conn);
    }

    /// Acts on an event for this user; `false` ends the connection.
    async fn user_event(&mut self, ev: UserEvent) -> bool {
        match ev {
            UserEvent::RoomAdded { room, by } => {
                let f = serde_json::json!({"type": "room_added", "room": room, "by": by});
                self.conn.send(Utf8Bytes::from(f.to_string())).await;
            }
            UserEvent::RoomRemoved { room, by } => {
                if self.rooms.remove(&room) {
                    self.state.hub.leave(&room, self.conn.id);
                }
                self.typing_in.remove(&room);
                let f = serde_json::json!({"type": "room_removed", "room": room, "by": by});
                self.conn.send(Utf8Bytes::from(f.to_string())).await;
            }
            UserEvent::SessionRevoked { session } => {
                if session.is_none_or(|s| s == self.conn.session) {
                    self.error(Code::Unauthorized, "session", "session revoked").await;
                    self.conn.close_after_queue(close::UNAUTHORIZED, "session revoked").await;
                    return false;
                }
            }
            UserEvent::TokenExpired => {
                if self.conn.keepalive().is_some_and(|k| k.expired()) {
                    self.error(Code::Unauthorized, "token", "token expired").await;
                    self.conn.close_after_queue(close::UNAUTHORIZED, "token expired").await;
                    return false;
                }
            }
        }
        true
    }

    async fn typing(&mut self, room: &str, active: bool) -> Result<(), ApiError> {
        let room = self.member_room(room).await?;
        let was = self.typing_in.contains(&room);
        // Starting again while already typing is rate limited; a change never is.
        if active && was && self.state.typing_limit.check_key(&(self.conn.user.clone(), room.clone())).is_err() {
            return Ok(());
        }
        if !active && !was {
            return Ok(());
        }
        if active {
            self.typing_in.insert(room.clone());
        } else {
            self.typing_in.remove(&room);
        }
        publish_typing(self.state, &room, &self.conn.user, active).await
    }

    async fn presence_sub(&mut self, users: &[String]) -> Result<(), ApiError> {
        let users = users.iter().map(|u| UserId::parse(u)).collect::<Result<Vec<_>, _>>()?;
        let new: Vec<UserId> =
            users.into_iter().filter(|u| !self.watching.contains(u)).collect::<HashSet<_>>().into_iter().collect();
        let max = self.state.settings.presence_sub_max;
        if self.watching.len() + new.len() > max {
            return Err(ApiError::new(Code::TooLarge, format!("at most {max} presence subscriptions per connection")));
        }
        self.watching.extend(new.iter().cloned());
        self.state.presence.watch(&self.conn, &new).await.map_err(|e| ApiError::unavailable("presence", e))
    }

    async fn error(&self, code: Code, reference: &str, message: &str) {
        self.conn.send(ServerFrame::Error { code, reference, message, retry_after_ms: None }.encode()).await;
    }

    async fn api_error(&self, reference: &str, e: ApiError) {
        let frame =
            ServerFrame::Error { code: e.code, reference, message: &e.message, retry_after_ms: e.retry_after_ms };
        self.conn.send(frame.encode()).await;
    }

    /// Answers a frame over a limit; `false` once the client keeps at it
    /// (closed 4029).
    /// A refused send is always answered (the client must resend that id);
    /// other refused frames at most once a second, so a flood is not echoed.
    async fn refuse(&mut self, reference: &str, e: ApiError, is_send: bool) -> bool {
        self.state.metrics.dropped("rate_limited");
        if self.limits.strike() {
            // Abusive: close at once, ahead of whatever is still queued.
            self.conn.close_now(close::ABUSE);
            return false;
        }
        if is_send || self.limits.should_answer() {
            self.api_error(reference, e).await;
        }
        true
    }

    /// Handles one frame; `false` ends the connection.
    async fn handle_text(&mut self, text: &str) -> bool {
        let frame = match protocol::decode(text) {
            Ok(f) => {
                self.state.metrics.frame_in(protocol::type_name(&f));
                f
            }
            Err(u) => {
                self.state.metrics.frame_in("invalid");
                self.error(u.code, &u.reference, &u.message).await;
                return true;
            }
        };
        if let Err(e) = self.limits.frame() {
            let is_send = matches!(frame, ClientFrame::Send { .. });
            return self.refuse(protocol::reference(&frame), e, is_send).await;
        }
        match frame {
            ClientFrame::Hello { .. } => self.error(Code::BadRequest, "hello", "already authenticated").await,
            ClientFrame::Ping => self.conn.send(ServerFrame::Pong.encode()).await,
            ClientFrame::Join { room, since } => {
                if let Err(e) = self.limits.join() {
                    return self.refuse("join", e, false).await;
                }
                if let Err(e) = self.join(&room, since).await {
                    self.api_error("join", e).await;
                }
            }
            ClientFrame::Leave { room } => match RoomId::parse(&room) {
                Ok(room) => {
                    if self.rooms.remove(&room) {
                        self.state.hub.leave(&room, self.conn.id);
                    }
                    self.conn.send(ServerFrame::Left { room: room.as_str() }.encode()).await;
                }
                Err(e) => self.api_error("leave", e.into()).await,
            },
            ClientFrame::Send { room, id, body, kind, attachment } => {
                let reference: String = id.chars().take(64).collect();
                // Over a limit nothing is stored: the client resends the same id later.
                if let Err(e) = self.limits.send().and_then(|()| self.state.limits.user_send(&self.conn.user)) {
                    return self.refuse(&reference, e, true).await;
                }
                if let Err(e) = self.send(&room, &id, body, kind, attachment).await {
                    self.api_error(&reference, e).await;
                }
            }
            ClientFrame::Read { room, seq } => {
                if let Err(e) = self.read(&room, seq).await {
                    self.api_error("read", e).await;
                }
            }
            ClientFrame::Refresh { token } => return self.refresh(&token).await,
            ClientFrame::Typing { room, active } => {
                if let Err(e) = self.typing(&room, active).await {
                    self.api_error("typing", e).await;
                }
            }
            ClientFrame::Presence { status } => match status.as_str() {
                "online" => self.state.presence.set_status(&self.conn.user, self.conn.id, Status::Online),
                "away" => self.state.presence.set_status(&self.conn.user, self.conn.id, Status::Away),
                _ => self.error(Code::BadRequest, "presence", "status must be online or away").await,
            },
            ClientFrame::PresenceSub { users } => {
                if let Err(e) = self.presence_sub(&users).await {
                    self.api_error("presence_sub", e).await;
                }
            }
            ClientFrame::PresenceUnsub { users } => {
                let users: HashSet<UserId> = users.iter().filter_map(|u| UserId::parse(u).ok()).collect();
                self.watching.retain(|u| !users.contains(u));
                self.state.presence.unwatch(self.conn.id, &users);
            }
        }
        true
    }

    async fn member_room(&self, room: &str) -> Result<RoomId, ApiError> {
        let room = RoomId::parse(room)?;
        if !self.state.membership.is_member(&room, &self.conn.user).await? {
            return Err(ApiError::forbidden("not a member of this room"));
        }
        Ok(room)
    }

    async fn join(&mut self, room: &str, since: Option<u64>) -> Result<(), ApiError> {
        let room = self.member_room(room).await?;
        let state = self.state;
        let max = state.settings.limits.limit_rooms_per_conn;
        if !self.rooms.contains(&room) && max > 0 && self.rooms.len() >= max {
            return Err(ApiError::new(Code::TooLarge, format!("at most {max} rooms per connection; leave one first")));
        }
        if self.rooms.remove(&room) {
            state.hub.leave(&room, self.conn.id); // re-join: start over from `since`
        }
        let last =
            state.hub.join(&room, self.conn.clone()).await.map_err(|e| ApiError::unavailable("message stream", e))?;
        self.rooms.insert(room.clone());
        let replay = match since {
            Some(since) => match replay::read(state, &room, since, last).await {
                Ok(r) => r,
                Err(e) => {
                    self.rooms.remove(&room);
                    state.hub.leave(&room, self.conn.id);
                    return Err(ApiError::unavailable("message stream", e));
                }
            },
            None => replay::Replay::default(),
        };
        let joined =
            ServerFrame::Joined { room: room.as_str(), last_seq: last, truncated_before: replay.truncated_before };
        self.conn.send(joined.encode()).await;
        for m in replay.messages {
            if let Some(f) =
                envelope::message_frame(room.as_str(), m.seq, &m.payload).and_then(|b| Utf8Bytes::try_from(b).ok())
            {
                self.conn.send(f).await;
            }
        }
        let cursor = replay::cursor(since, last);
        state.hub.caught_up(&room, self.conn.id, cursor);
        Ok(())
    }

    async fn send(
        &mut self,
        room: &str,
        id: &str,
        body: String,
        kind: Kind,
        attachment: Option<String>,
    ) -> Result<(), ApiError> {
        let id = ClientMsgId::parse(id)?;
        let room = self.member_room(room).await?;
        let attachment = super::attachments::check_for_message(self.state, &room, kind, attachment).await?;
        let started = std::time::Instant::now();
        let (ts, fut) = messages::publish(
            &self.state.js,
            NewMessage { room: &room, from: &self.conn.user, id: &id, body, kind, attachment },
        )
        .await
        .map_err(|e| ApiError::unavailable("message stream", e))?;
        // The publish is issued in order; its ack is awaited off the read path.
        let conn = self.conn.clone();
        let state = self.state.clone();
        tokio::spawn(async move {
            let frame = match state.confirm_send(ts, fut).await {
                Ok(p) => {
                    state.metrics.publish_latency.observe(started.elapsed().as_secs_f64());
                    ServerFrame::Ack { id: id.as_str(), room: room.as_str(), seq: p.seq, ts: p.ts }.encode()
                }
                Err(e) => {
                    tracing::warn!(error = %e, "send not stored");
                    ServerFrame::Error {
                        code: Code::Unavailable,
                        reference: id.as_str(),
                        message: "message not stored; resend with the same id",
                        retry_after_ms: Some(1000),
                    }
                    .encode()
                }
            };
            conn.send(frame).await;
        });
        Ok(())
    }

    async fn read(&self, room: &str, seq: u64) -> Result<(), ApiError> {
        let room = RoomId::parse(room)?;
        publish_read(self.state, &room, &self.conn.user, seq, Some(&self.conn.session)).await
    }

    async fn refresh(&mut self, token: &str) -> bool {
        match self.state.verifier.verify(token) {
            Ok(id) if id.user == self.conn.user => {
                if let Some(k) = self.conn.keepalive() {
                    k.set_exp(id.exp);
                }
                self.conn.send(ServerFrame::Refreshed { exp: id.exp }.encode()).await;
                true
            }
            Ok(_) => {
                self.error(Code::Forbidden, "refresh", "token is for another user").await;
                true
            }
            Err(AuthError::Expired) => {
                self.error(Code::Unauthorized, "refresh", "token expired").await;
                true
            }
            Err(AuthError::Invalid(_)) => {
                self.error(Code::Unauthorized, "refresh", "invalid token").await;
                true
            }
        }
    }
}

/// Publishes a typing frame for the room's other members (core NATS).
pub async fn publish_typing(state: &AppState, room: &RoomId, user: &UserId, active: bool) -> Result<(), ApiError> {
    let frame = serde_json::json!({"type": "typing", "room": room, "user": user, "active": active});
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(subjects::ORIGIN_USER_HEADER, user.as_str());
    state
        .nats
        .publish_with_headers(subjects::room_typing(room), headers, Bytes::from(frame.to_string()))
        .await
        .map_err(|e| ApiError::unavailable("event bus", e))
}

/// An image message must name its attachment; a text message must not.
pub fn check_attachment(kind: Kind, attachment: Option<String>) -> Result<Option<String>, ApiError> {
    match (kind, attachment) {
        (Kind::Image, Some(a)) => Ok(Some(crate::ids::RoomId::parse(&a).map(|_| a)?)),
        (Kind::Image, None) => Err(ApiError::bad_request("an image message needs \"attachment\"")),
        (Kind::Text, Some(_)) => Err(ApiError::bad_request("\"attachment\" needs kind \"image\"")),
        (Kind::Text, None) => Ok(None),
    }
}

/// Persists a read marker (never backwards) and tells the room's other
/// sessions. `Err(forbidden)` when the user is not a member.
pub async fn publish_read(
    state: &AppState,
    room: &RoomId,
    user: &UserId,
    seq: u64,
    origin_session: Option<&str>,
) -> Result<(), ApiError> {
    let stored = crate::db::rooms::mark_read(&state.db, room, user, seq)
        .await?
        .ok_or_else(|| ApiError::forbidden("not a member of this room"))?;
    let frame = ServerFrame::Read { room: room.as_str(), user: user.as_str(), seq: stored as u64 }.encode();
    let mut headers = async_nats::HeaderMap::new();
    if let Some(s) = origin_session {
        headers.insert(subjects::ORIGIN_SESSION_HEADER, s);
    }
    let payload = Bytes::from(frame.as_str().to_owned());
    state
        .nats
        .publish_with_headers(subjects::room_event(room), headers, payload)
        .await
        .map_err(|e| ApiError::unavailable("event bus", e))?;
    Ok(())
}
