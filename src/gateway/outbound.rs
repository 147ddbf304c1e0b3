//! One connection's outbound side as others see it: a bounded queue of ready
//! frames and a way to close it. Room tasks never wait on a client: a full
//! queue makes the client a slow consumer (close 4008; it resumes from its
//! last seq and loses nothing).

use std::sync::{
    Arc,
    atomic::{AtomicU16, Ordering},
};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::users::UserEvent;
use crate::ids::UserId;

/// Close codes of the protocol.
pub mod close {
    pub const NORMAL: u16 = 1000;
    /// No frame or pong within NATTER_IDLE_TIMEOUT (half-open connections).
    pub const IDLE: u16 = 1001;
    pub const TOO_BIG: u16 = 1009;
    pub const RESTARTING: u16 = 1012;
    pub const UNAUTHORIZED: u16 = 4001;
    pub const SLOW_CONSUMER: u16 = 4008;
    pub const ABUSE: u16 = 4029;
}

pub enum Out {
    Frame(Utf8Bytes),
    /// Close after the frames queued before it.
    Close(u16, &'static str),
}

/// A connection as seen by room tasks and the handlers' spawned work.
pub struct ConnHandle {
    pub id: u64,
    pub session: String,
    pub user: UserId,
    tx: mpsc::Sender<Out>,
    /// User events for the connection's reader (rare; bounded).
    events: mpsc::Sender<UserEvent>,
    kill: CancellationToken,
    close_code: AtomicU16,
}

impl ConnHandle {
    pub fn new(
        id: u64,
        session: String,
        user: UserId,
        tx: mpsc::Sender<Out>,
        events: mpsc::Sender<UserEvent>,
    ) -> Arc<Self> {
        Arc::new(Self { id, session, user, tx, events, kill: CancellationToken::new(), close_code: AtomicU16::new(0) })
    }

    /// Hands a user event to the connection's reader.
    pub fn event(&self, ev: UserEvent) {
        if self.events.try_send(ev).is_err() {
            tracing::warn!(conn = self.id, "user event dropped: connection not reading its events");
        }
    }

    /// Queues a frame without waiting. A full queue closes the connection
    /// as a slow consumer. Returns whether the frame was queued.
    pub fn deliver(&self, frame: Utf8Bytes) -> bool {
        match self.tx.try_send(Out::Frame(frame)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.close_now(close::SLOW_CONSUMER);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Queues a frame, waiting for room (the connection's own replies).
    pub async fn send(&self, frame: Utf8Bytes) {
        let _ = self.tx.send(Out::Frame(frame)).await;
    }

    /// Queues a close after what is already queued.
    pub async fn close_after_queue(&self, code: u16, reason: &'static str) {
        let _ = self.tx.send(Out::Close(code, reason)).await;
    }

    /// Closes at once with `code` (the first code set wins).
    pub fn close_now(&self, code: u16) {
        let _ = self.close_code.compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
        self.kill.cancel();
    }

    pub fn killed(&self) -> &CancellationToken {
        &self.kill
    }

    pub fn close_code(&self) -> u16 {
        match self.close_code.load(Ordering::Acquire) {
            0 => close::NORMAL,
            c => c,
        }
    }
}
