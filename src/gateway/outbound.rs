//! One connection's outbound side as others see it: a bounded queue of ready
//! frames and a way to close it. Room tasks never wait on a client: a full
//! queue makes the client a slow consumer (close 4008; it resumes from its
//! last seq and loses nothing).
//!
//! The queue is a `VecDeque` under a lock with a waker for its one reader and
//! a `Notify` for senders waiting for room, not a tokio channel: a bounded
//! channel allocates its first block of 32 slots and its shared state up
//! front (~1.5 KiB per connection in heaptrack), while an empty `VecDeque`
//! holds nothing and shrinks back after a burst. Closing a connection is an
//! atomic close code and a wake of that reader, not a `CancellationToken`
//! (a shared tree node per connection).

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering},
    },
    task::{Context, Poll, Wake},
};

use axum::extract::ws::Utf8Bytes;
use futures::task::AtomicWaker;
use tokio::sync::Notify;

use super::{keepalive::Keepalive, metrics::Metrics, users::UserEvent};
use crate::ids::UserId;

/// Close codes of the protocol.
pub mod close {
    pub const NORMAL: u16 = 1000;
    /// No frame or pong within NATTER_IDLE_TIMEOUT (half-open connections).
    pub const IDLE: u16 = 1001;
    /// A text frame that is not UTF-8 (RFC 6455).
    pub const INVALID_DATA: u16 = 1007;
    pub const TOO_BIG: u16 = 1009;
    pub const RESTARTING: u16 = 1012;
    pub const UNAUTHORIZED: u16 = 4001;
    pub const SLOW_CONSUMER: u16 = 4008;
    pub const ABUSE: u16 = 4029;
}

/// User events held for a connection that has not read them yet.
const MAX_PENDING_EVENTS: usize = 16;

/// Slots kept by an emptied queue; more is given back after a burst.
const KEEP_SLOTS: usize = 16;

pub enum Out {
    Frame(Utf8Bytes),
    /// A WebSocket ping (the keepalive sweep's heartbeat).
    Ping,
    /// Close after the frames queued before it.
    Close(u16, &'static str),
}

/// A connection as seen by room tasks and the handlers' spawned work.
pub struct ConnHandle {
    pub id: u64,
    pub session: String,
    pub user: UserId,
    /// The frames for the writer, bounded by `capacity`.
    out: parking_lot::Mutex<Queue>,
    /// The writer: woken when something is queued or the connection is
    /// closed at once.
    out_waker: AtomicWaker,
    /// The socket may have something to read: set when the waker its read
    /// side was polled with (this handle, see `Wake`) is woken.
    read_ready: AtomicBool,
    /// A full queue gave a slot back (`send` waits on it).
    out_space: Notify,
    capacity: usize,
    /// User events for the connection's reader (rare; bounded). A queue and
    /// a Notify rather than a channel: a tokio channel allocates a block of
    /// 32 slots up front, ~1.8 KiB per connection for something rarely used.
    events: parking_lot::Mutex<VecDeque<UserEvent>>,
    events_ready: Notify,
    /// 0 while open; the close code once closed at once (or once the
    /// writer sent a queued close).
    close_code: AtomicU16,
    /// Liveness and token expiry, read by the keepalive sweep (WebSocket
    /// connections; an SSE stream keeps its own).
    keepalive: Option<Keepalive>,
    /// Bytes of the frames in the queue, and their bound.
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Out>,
    /// The writer is gone: nothing more is queued.
    closed: bool,
}

/// Why a frame was not queued.
enum Refused {
    Full,
    Closed,
}

/// The writer's end of a connection's queue. Dropping it closes the queue
/// (later frames are refused, waiting senders return), as dropping a
/// channel's receiver would.
pub struct Outbox(Arc<ConnHandle>);

impl Outbox {
    /// The next item, waiting for one; `None` once the queue is closed or
    /// the connection closed at once.
    pub async fn recv(&mut self) -> Option<Out> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// [`Outbox::recv`] as a poll: `Pending` registers the task's waker.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Out>> {
        if self.0.is_killed() {
            return Poll::Ready(None);
        }
        self.0.out_waker.register(cx.waker());
        match self.take() {
            (Some(out), _) => Poll::Ready(Some(out)),
            (None, closed) if closed || self.0.is_killed() => Poll::Ready(None),
            (None, _) => Poll::Pending,
        }
    }

    /// Registers the task's waker to be woken when the connection is closed
    /// at once (as [`Outbox::poll_recv`] does when it waits).
    pub fn register(&self, cx: &mut Context<'_>) {
        self.0.out_waker.register(cx.waker());
    }

    /// Refuses further frames and lets waiting senders go on; what is
    /// queued can still be taken. `drop_queued` drops it as well.
    pub fn close(&mut self, drop_queued: bool) {
        let mut q = self.0.out.lock();
        q.closed = true;
        if drop_queued {
            for out in std::mem::take(&mut q.items) {
                if let Out::Frame(f) = out {
                    self.0.dequeued(f.len());
                }
            }
        }
        drop(q);
        self.0.out_space.notify_waiters();
    }

    /// The next item if one is queued.
    pub fn try_recv(&mut self) -> Option<Out> {
        self.take().0
    }

    /// The next item if one is queued, and whether the queue is closed,
    /// under one lock.
    fn take(&self) -> (Option<Out>, bool) {
        let conn = &self.0;
        let mut q = conn.out.lock();
        let was_full = q.items.len() >= conn.capacity;
        let out = q.items.pop_front();
        if q.items.is_empty() && q.items.capacity() > KEEP_SLOTS {
            q.items.shrink_to(KEEP_SLOTS);
        }
        let closed = q.closed;
        drop(q);
        if was_full && out.is_some() {
            conn.out_space.notify_waiters();
        }
        (out, closed)
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.close(true);
    }
}

/// A connection's handle is the waker its socket's read side is polled
/// with: a wake marks the read side ready and wakes the connection's task
/// (the same task as the writer). So a wake for queued frames does not
/// also poll the socket for input that cannot be there.
impl Wake for ConnHandle {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.read_ready.store(true, Ordering::Release);
        self.out_waker.wake();
    }
}

impl ConnHandle {
    /// Whether the socket's read side may have input, clearing the mark.
    pub fn take_read_ready(&self) -> bool {
        self.read_ready.swap(false, Ordering::AcqRel)
    }

    /// Marks the read side as worth polling (input may still be buffered).
    pub fn set_read_ready(&self) {
        self.read_ready.store(true, Ordering::Release);
    }

    /// The connection's handle and its writer's end of the queue, which
    /// holds up to `capacity` items and `max_bytes` bytes of frames.
    pub fn new(
        id: u64,
        session: String,
        user: UserId,
        (capacity, max_bytes): (usize, usize),
        keepalive: Option<Keepalive>,
        metrics: Arc<Metrics>,
    ) -> (Arc<Self>, Outbox) {
        let conn = Arc::new(Self {
            id,
            session,
            user,
            out: parking_lot::Mutex::new(Queue::default()),
            out_waker: AtomicWaker::new(),
            read_ready: AtomicBool::new(true),
            out_space: Notify::new(),
            capacity: capacity.max(1),
            events: parking_lot::Mutex::new(VecDeque::new()),
            events_ready: Notify::new(),
            close_code: AtomicU16::new(0),
            keepalive,
            queued_bytes: AtomicUsize::new(0),
            max_bytes,
            metrics,
        });
        (conn.clone(), Outbox(conn))
    }

    /// Appends `out` unless the queue is full or closed (then `out` comes back).
    fn push(&self, out: Out) -> Result<(), (Refused, Out)> {
        let mut q = self.out.lock();
        if q.closed {
            return Err((Refused::Closed, out));
        }
        if q.items.len() >= self.capacity {
            return Err((Refused::Full, out));
        }
        q.items.push_back(out);
        drop(q);
        self.out_waker.wake();
        Ok(())
    }

    /// Appends `out`, waiting while the queue is full; `false` once closed.
    async fn push_waiting(&self, mut out: Out) -> bool {
        loop {
            // Registered before the check, so a slot freed in between wakes it.
            let space = self.out_space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            out = match self.push(out) {
                Ok(()) => return true,
                Err((Refused::Closed, _)) => return false,
                Err((Refused::Full, out)) => out,
            };
            space.await;
        }
    }

    /// The writer took a frame of `len` bytes off the queue.
    pub fn dequeued(&self, len: usize) {
        self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
    }

    /// Whether the queue is more than half full, by frames or by bytes.
    fn backed_up(&self) -> bool {
        self.out.lock().items.len() > self.capacity / 2
            || self.queued_bytes.load(Ordering::Acquire) > self.max_bytes / 2
    }

    /// Queues a frame that may be lost (typing, presence, read markers of
    /// others): dropped, not queued, once the queue is half full, so that a
    /// slow client's room is kept for messages. Returns whether it was queued.
    pub fn deliver_ephemeral(&self, frame: Utf8Bytes) -> bool {
        if self.backed_up() {
            self.metrics.dropped("backpressure");
            return false;
        }
        self.queue(frame, "ephemeral")
    }

    /// Hands a user event to the connection's reader.
    pub fn event(&self, ev: UserEvent) {
        let mut q = self.events.lock();
        if q.len() >= MAX_PENDING_EVENTS {
            tracing::warn!(conn = self.id, "user event dropped: connection not reading its events");
            return;
        }
        q.push_back(ev);
        drop(q);
        self.events_ready.notify_one();
    }

    /// The next user event for the reader (cancel-safe).
    pub async fn next_event(&self) -> UserEvent {
        loop {
            if let Some(ev) = self.events.lock().pop_front() {
                return ev;
            }
            self.events_ready.notified().await;
        }
    }

    /// Queues a frame without waiting. A full queue closes the connection
    /// as a slow consumer. Returns whether the frame was queued. Not counted
    /// here: the room counts a message's deliveries once (one shared counter
    /// touched per delivery was a cache line bouncing between cores).
    pub fn deliver(&self, frame: Utf8Bytes) -> bool {
        self.try_queue(frame)
    }

    /// `deliver`, counted as a frame of `kind`.
    pub fn deliver_counted(&self, frame: Utf8Bytes, kind: &'static str) -> bool {
        self.queue(frame, kind)
    }

    fn queue(&self, frame: Utf8Bytes, kind: &'static str) -> bool {
        let queued = self.try_queue(frame);
        if queued {
            self.metrics.frame_out(kind);
        }
        queued
    }

    fn try_queue(&self, frame: Utf8Bytes) -> bool {
        let len = frame.len();
        if self.queued_bytes.fetch_add(len, Ordering::AcqRel) + len > self.max_bytes {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            self.close_now(close::SLOW_CONSUMER);
            return false;
        }
        match self.push(Out::Frame(frame)) {
            Ok(()) => true,
            Err((Refused::Full, _)) => {
                self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
                self.close_now(close::SLOW_CONSUMER);
                false
            }
            Err((Refused::Closed, _)) => {
                self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
                false
            }
        }
    }

    /// Queues a frame, waiting for room (the connection's own replies: the
    /// client that does not read them stops being read, TCP pushes back).
    pub async fn send(&self, frame: Utf8Bytes) {
        let len = frame.len();
        self.queued_bytes.fetch_add(len, Ordering::AcqRel);
        if self.push_waiting(Out::Frame(frame)).await {
            self.metrics.frame_out("reply");
        } else {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
        }
    }

    /// Queues a close after what is already queued.
    pub async fn close_after_queue(&self, code: u16, reason: &'static str) {
        self.push_waiting(Out::Close(code, reason)).await;
    }

    /// Queues a close after what is already queued, even past the queue's
    /// bound (the connection is ending: nothing more follows it).
    pub fn close_last(&self, code: u16, reason: &'static str) {
        let mut q = self.out.lock();
        if !q.closed {
            q.items.push_back(Out::Close(code, reason));
        }
        drop(q);
        self.out_waker.wake();
    }

    /// Queues a ping unless the queue is full (then frames are flowing).
    pub fn ping(&self) {
        let _ = self.push(Out::Ping);
    }

    /// Closes at once with `code` (the first code set wins).
    pub fn close_now(&self, code: u16) {
        let _ = self.close_code.compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
        self.out_waker.wake();
    }

    /// Whether the connection was closed at once (or its writer sent a close).
    pub fn is_killed(&self) -> bool {
        self.close_code.load(Ordering::Acquire) != 0
    }

    pub fn keepalive(&self) -> Option<&Keepalive> {
        self.keepalive.as_ref()
    }

    pub fn close_code(&self) -> u16 {
        match self.close_code.load(Ordering::Acquire) {
            0 => close::NORMAL,
            c => c,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(frames: usize, bytes: usize) -> (Arc<ConnHandle>, Outbox) {
        let metrics = Arc::new(Metrics::default());
        ConnHandle::new(1, "s".into(), UserId::parse("u").unwrap(), (frames, bytes), None, metrics)
    }

    #[test]
    fn ephemeral_frames_give_way_before_messages_then_a_full_queue_is_a_slow_consumer() {
        let (c, mut rx) = conn(4, 1 << 20);
        assert!(c.deliver_ephemeral(Utf8Bytes::from_static("typing")));
        assert!(c.deliver(Utf8Bytes::from_static("m1")));
        assert!(c.deliver(Utf8Bytes::from_static("m2")), "half full now");
        assert!(!c.deliver_ephemeral(Utf8Bytes::from_static("typing")), "dropped, not queued");
        assert!(c.deliver(Utf8Bytes::from_static("m3")), "messages still fit");
        assert!(!c.is_killed());
        assert!(!c.deliver(Utf8Bytes::from_static("m4")), "the queue is full");
        assert_eq!(c.close_code(), close::SLOW_CONSUMER);
        let mut got = Vec::new();
        while let Some(Out::Frame(f)) = rx.try_recv() {
            got.push(f.to_string());
        }
        assert_eq!(got, ["typing", "m1", "m2", "m3"]);
    }

    #[test]
    fn queued_bytes_are_bounded_and_given_back_by_the_writer() {
        let (c, mut rx) = conn(100, 10);
        assert!(c.deliver(Utf8Bytes::from_static("12345678")));
        let Some(Out::Frame(f)) = rx.try_recv() else { panic!("queued") };
        c.dequeued(f.len());
        assert!(c.deliver(Utf8Bytes::from_static("12345678")), "room again once written");
        assert!(!c.deliver(Utf8Bytes::from_static("abc")), "over 10 bytes queued");
        assert_eq!(c.close_code(), close::SLOW_CONSUMER);
    }

    #[tokio::test]
    async fn a_reply_waits_for_room_and_the_writer_sees_items_in_order() {
        let (c, mut rx) = conn(2, 1 << 20);
        c.send(Utf8Bytes::from_static("r1")).await;
        c.send(Utf8Bytes::from_static("r2")).await;
        let waiting = c.send(Utf8Bytes::from_static("r3"));
        tokio::pin!(waiting);
        assert!(futures::poll!(waiting.as_mut()).is_pending(), "the queue is full: the reply waits");
        let Some(Out::Frame(first)) = rx.recv().await else { panic!("a frame") };
        assert!(futures::poll!(waiting.as_mut()).is_ready(), "a slot was given back");
        let mut got = vec![first.to_string()];
        for _ in 0..2 {
            let Some(Out::Frame(f)) = rx.recv().await else { panic!("a frame") };
            got.push(f.to_string());
        }
        assert_eq!(got, ["r1", "r2", "r3"]);
        assert!(!c.is_killed(), "replies wait, they never make a slow consumer");
    }

    #[tokio::test]
    async fn a_gone_writer_releases_waiting_senders_and_refuses_frames() {
        let (c, rx) = conn(1, 1 << 20);
        c.send(Utf8Bytes::from_static("r1")).await;
        let waiting = c.close_after_queue(close::NORMAL, "");
        tokio::pin!(waiting);
        assert!(futures::poll!(waiting.as_mut()).is_pending(), "the queue is full: the close waits");
        drop(rx);
        assert!(futures::poll!(waiting.as_mut()).is_ready(), "released when the writer is gone");
        assert!(!c.deliver(Utf8Bytes::from_static("m")), "nobody will write it");
        assert!(!c.is_killed(), "a closed queue is not a slow consumer");
    }
}
