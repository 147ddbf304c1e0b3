//! The timers of every WebSocket connection of a gateway, in one task: a
//! ping every heartbeat, a 1001 close for a connection not heard from within
//! the idle timeout, a 4001 close (through the connection, which says why)
//! once its token expires, and on shutdown a 1012 close for each, spread over
//! the drain window. A connection keeps two atomics for this instead of
//! timers of its own: three timers per connection cost memory, and the two
//! reset on every frame read cost a timer-wheel update each.
//!
//! Precision: a close or ping comes up to one tick late (3.1 s with the
//! default 25 s heartbeat and 60 s idle timeout).

use std::{
    sync::{
        Arc, LazyLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rand::seq::SliceRandom;
use tokio_util::sync::CancellationToken;

use super::{
    outbound::{ConnHandle, close},
    users::{UserEvent, Users},
};
use crate::auth::unix_now;

/// What the sweep reads of one connection.
pub struct Keepalive {
    /// When the client was last heard from (ms on [`now_ms`]'s clock).
    heard_ms: AtomicU64,
    /// The token's expiry (unix s); `u64::MAX` once the expiry was signalled.
    exp: AtomicU64,
}

impl Keepalive {
    pub fn new(exp: u64) -> Self {
        Self { heard_ms: AtomicU64::new(now_ms()), exp: AtomicU64::new(exp) }
    }

    /// The client sent something (a frame or a pong).
    pub fn heard(&self) {
        self.heard_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// A refreshed token.
    pub fn set_exp(&self, exp: u64) {
        self.exp.store(exp, Ordering::Release);
    }

    /// Whether the token has expired, as the connection acts on the sweep's
    /// [`UserEvent::TokenExpired`]: not if a refresh came in between.
    pub fn expired(&self) -> bool {
        let exp = self.exp.load(Ordering::Acquire);
        exp == u64::MAX || exp <= unix_now()
    }
}

/// Milliseconds on a clock of the process's own.
fn now_ms() -> u64 {
    static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
    EPOCH.elapsed().as_millis() as u64
}

/// How often the sweep looks at every connection: often enough for the
/// idle timeout and heartbeat to hold to an eighth (3.1 s with the
/// defaults), at least every 5 s. Each look costs ~0.2 µs per connection
/// (measured: a sweep every second was 0.2 µs per idle connection per
/// second of gateway CPU).
fn tick_of(heartbeat: Duration, idle: Duration) -> Duration {
    (heartbeat.min(idle) / 8).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

pub struct Timing {
    pub heartbeat: Duration,
    pub idle_timeout: Duration,
    /// On shutdown, the 1012 closes are spread over this.
    pub drain_spread: Duration,
}

/// Sweeps `users`' WebSocket connections until `shutdown`, then closes them
/// all with 1012 over the drain spread.
pub async fn run(users: Arc<Users>, timing: Timing, shutdown: CancellationToken) {
    let tick = tick_of(timing.heartbeat, timing.idle_timeout);
    // Each connection is pinged on its own tick of the heartbeat, so the
    // pings of thousands of connections do not all go out at once.
    let ping_every = (timing.heartbeat.as_millis() / tick.as_millis()).max(1) as u64;
    let idle_ms = timing.idle_timeout.as_millis() as u64;
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        n += 1;
        let (now, unix) = (now_ms(), unix_now());
        users.for_each(|conn| sweep(conn, now, unix, idle_ms, (n + conn.id).is_multiple_of(ping_every)));
    }
    drain(&users, timing.drain_spread).await;
}

fn sweep(conn: &ConnHandle, now: u64, unix: u64, idle_ms: u64, ping: bool) {
    let Some(k) = conn.keepalive() else { return };
    if now.saturating_sub(k.heard_ms.load(Ordering::Relaxed)) > idle_ms {
        tracing::debug!(conn = conn.id, "idle timeout");
        conn.close_now(close::IDLE);
        return;
    }
    let exp = k.exp.load(Ordering::Acquire);
    if exp <= unix && k.exp.compare_exchange(exp, u64::MAX, Ordering::AcqRel, Ordering::Acquire).is_ok() {
        conn.event(UserEvent::TokenExpired);
    }
    if ping {
        conn.ping();
    }
}

/// Closes every WebSocket connection with 1012, one after another in a
/// random order over `spread`, so that their reconnections spread out too;
/// then any that came in meanwhile.
async fn drain(users: &Users, spread: Duration) {
    let mut conns = users.collect(|c| c.keepalive().is_some());
    conns.shuffle(&mut rand::rng());
    let start = tokio::time::Instant::now();
    let n = conns.len().max(1) as f64;
    for (i, conn) in conns.iter().enumerate() {
        let at = start + spread.mul_f64(i as f64 / n);
        if at > tokio::time::Instant::now() {
            tokio::time::sleep_until(at).await;
        }
        conn.close_now(close::RESTARTING);
    }
    for conn in users.collect(|c| c.keepalive().is_some()) {
        conn.close_now(close::RESTARTING);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{gateway::metrics::Metrics, ids::UserId};

    fn conn(id: u64, exp: u64) -> Arc<ConnHandle> {
        let metrics = Arc::new(Metrics::default());
        let keepalive = Some(Keepalive::new(exp));
        ConnHandle::new(id, "s".into(), UserId::parse("u").unwrap(), (8, 1 << 20), keepalive, metrics).0
    }

    #[test]
    fn the_tick_follows_the_shorter_of_heartbeat_and_idle_timeout_within_bounds() {
        assert_eq!(tick_of(Duration::from_secs(25), Duration::from_secs(60)), Duration::from_millis(3125));
        assert_eq!(tick_of(Duration::from_secs(300), Duration::from_secs(600)), Duration::from_secs(5));
        assert_eq!(tick_of(Duration::from_secs(2), Duration::from_secs(60)), Duration::from_millis(250));
        assert_eq!(tick_of(Duration::from_millis(300), Duration::from_secs(1)), Duration::from_millis(100));
    }

    #[test]
    fn a_silent_connection_is_closed_idle_a_heard_one_is_not() {
        let c = conn(1, u64::MAX - 1);
        let heard = c.keepalive().unwrap().heard_ms.load(Ordering::Relaxed);
        sweep(&c, heard + 1_000, unix_now(), 1_000, false);
        assert!(!c.is_killed(), "within the idle timeout");
        sweep(&c, heard + 1_001, unix_now(), 1_000, false);
        assert_eq!(c.close_code(), close::IDLE);
    }

    #[test]
    fn an_expired_token_is_signalled_once_and_a_refresh_in_between_wins() {
        let unix = unix_now();
        let c = conn(1, unix + 10);
        let k = c.keepalive().unwrap();
        let now = now_ms();
        sweep(&c, now, unix, 60_000, false);
        assert!(!k.expired());
        sweep(&c, now, unix + 10, 60_000, false);
        assert!(k.expired(), "signalled");
        sweep(&c, now, unix + 11, 60_000, false);
        let ev = futures::FutureExt::now_or_never(c.next_event());
        assert!(matches!(ev, Some(UserEvent::TokenExpired)), "{ev:?}");
        assert!(futures::FutureExt::now_or_never(c.next_event()).is_none(), "once");
        k.set_exp(unix + 3_600);
        assert!(!k.expired(), "refreshed after the signal: the connection stays");
        assert!(!c.is_killed(), "the connection closes itself, saying why");
    }
}
