//! Abuse limits (governor): per connection (frames, sends, joins, rooms), per
//! user on this gateway (sends, connections, HTTP calls) and per client IP
//! (connections, HTTP calls). Over a limit the client gets `rate_limited` with
//! `retry_after_ms`; a connection that keeps hitting limits is closed 4029.
//! Nothing over a limit is stored, so no ack is ever sent for it.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    num::NonZeroU32,
    sync::{Arc, LazyLock},
    time::{Duration, Instant},
};

use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock, QuantaInstant},
    middleware::NoOpMiddleware,
    state::{InMemoryState, NotKeyed},
};
use parking_lot::Mutex;

use crate::{config::LimitSettings, error::ApiError, ids::UserId};

/// Refusals within this window that make a connection abusive.
const STRIKE_WINDOW: Duration = Duration::from_secs(10);

/// `per_sec` with a burst of two seconds' worth (a client catching up is not
/// punished); 0 = no limit.
fn quota(per_sec: u32) -> Quota {
    match NonZeroU32::new(per_sec) {
        Some(n) => Quota::per_second(n).allow_burst(n.saturating_mul(NonZeroU32::new(2).expect("non-zero"))),
        None => Quota::per_second(NonZeroU32::MAX),
    }
}

/// One clock for every limiter. A new quanta clock asks the CPU (CPUID)
/// whether its counter can be used, several times; in a VM each CPUID is
/// a trap to the hypervisor. Three new clocks per connection were 18 % of a
/// gateway's CPU while accepting connections (perf, 10 000 connects).
static CLOCK: LazyLock<DefaultClock> = LazyLock::new(DefaultClock::default);

/// [`CLOCK`] as a limiter's clock: zero bytes in each of a connection's
/// limiters, where a clock of their own is 40.
#[derive(Debug, Clone, Copy)]
struct SharedClock;

impl Clock for SharedClock {
    type Instant = QuantaInstant;

    fn now(&self) -> QuantaInstant {
        CLOCK.now()
    }
}

/// A connection's own limiter.
type ConnLimiter = RateLimiter<NotKeyed, InMemoryState, SharedClock, NoOpMiddleware<QuantaInstant>>;

fn wait_of(e: governor::NotUntil<governor::clock::QuantaInstant>) -> Duration {
    e.wait_time_from(CLOCK.now())
}

/// This gateway's shared limits.
pub struct Limits {
    s: LimitSettings,
    user_sends: DefaultKeyedRateLimiter<UserId>,
    http_ip: DefaultKeyedRateLimiter<IpAddr>,
    http_user: DefaultKeyedRateLimiter<UserId>,
    conns: Mutex<Conns>,
}

#[derive(Default)]
struct Conns {
    by_user: HashMap<UserId, u32>,
    by_ip: HashMap<IpAddr, u32>,
}

impl Limits {
    pub fn new(s: &LimitSettings) -> Arc<Self> {
        Arc::new(Self {
            s: s.clone(),
            user_sends: RateLimiter::keyed(quota(s.limit_user_sends_per_sec)),
            http_ip: RateLimiter::keyed(quota(s.limit_http_per_ip_per_sec)),
            http_user: RateLimiter::keyed(quota(s.limit_http_per_token_per_sec)),
            conns: Mutex::new(Conns::default()),
        })
    }

    pub fn settings(&self) -> &LimitSettings {
        &self.s
    }

    /// Forgets idle keys (keyed limiters otherwise keep every key seen).
    pub fn forget_idle(&self) {
        for l in [&self.user_sends, &self.http_user] {
            l.retain_recent();
            l.shrink_to_fit();
        }
        self.http_ip.retain_recent();
        self.http_ip.shrink_to_fit();
    }

    /// One HTTP request from `ip` (every route but health checks).
    pub fn http_from_ip(&self, ip: IpAddr) -> Result<(), ApiError> {
        self.http_ip
            .check_key(&ip)
            .map_err(|e| ApiError::rate_limited("too many requests from this address", wait_of(e)))
    }

    /// One authenticated HTTP request of `user`.
    pub fn http_from_user(&self, user: &UserId) -> Result<(), ApiError> {
        self.http_user
            .check_key(user)
            .map_err(|e| ApiError::rate_limited("too many requests for this token", wait_of(e)))
    }

    /// One send of `user`, across their connections on this gateway.
    pub fn user_send(&self, user: &UserId) -> Result<(), ApiError> {
        self.user_sends
            .check_key(user)
            .map_err(|e| ApiError::rate_limited("too many messages from this user", wait_of(e)))
    }

    /// Room for one more connection from `ip`? (checked at the upgrade)
    pub fn ip_has_room(&self, ip: IpAddr) -> bool {
        let max = self.s.limit_conns_per_ip;
        max == 0 || self.conns.lock().by_ip.get(&ip).copied().unwrap_or(0) < max
    }

    /// Takes a connection slot for `user` from `ip`; the slot is given back on drop.
    pub fn admit(self: &Arc<Self>, user: &UserId, ip: IpAddr) -> Result<ConnSlot, ApiError> {
        let mut c = self.conns.lock();
        let (max_user, max_ip) = (self.s.limit_conns_per_user, self.s.limit_conns_per_ip);
        if max_user > 0 && c.by_user.get(user).copied().unwrap_or(0) >= max_user {
            return Err(ApiError::rate_limited(
                format!("at most {max_user} connections per user"),
                Duration::from_secs(5),
            ));
        }
        if max_ip > 0 && c.by_ip.get(&ip).copied().unwrap_or(0) >= max_ip {
            return Err(ApiError::rate_limited(
                format!("at most {max_ip} connections per address"),
                Duration::from_secs(5),
            ));
        }
        *c.by_user.entry(user.clone()).or_default() += 1;
        *c.by_ip.entry(ip).or_default() += 1;
        Ok(ConnSlot { limits: self.clone(), user: user.clone(), ip })
    }

    /// The limits of one new connection.
    pub fn connection(&self) -> ConnLimits {
        ConnLimits {
            frames: RateLimiter::direct_with_clock(quota(self.s.limit_frames_per_sec), SharedClock),
            sends: RateLimiter::direct_with_clock(quota(self.s.limit_sends_per_sec), SharedClock),
            joins: RateLimiter::direct_with_clock(quota(self.s.limit_joins_per_sec), SharedClock),
            strikes: VecDeque::new(),
            max_strikes: self.s.limit_abuse_strikes,
            last_answer: None,
        }
    }
}

/// A connection's place in the per-user and per-IP counts.
pub struct ConnSlot {
    limits: Arc<Limits>,
    user: UserId,
    ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut c = self.limits.conns.lock();
        if let Some(n) = c.by_user.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                c.by_user.remove(&self.user);
            }
        }
        if let Some(n) = c.by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.by_ip.remove(&self.ip);
            }
        }
    }
}

/// Limits of one connection.
pub struct ConnLimits {
    frames: ConnLimiter,
    sends: ConnLimiter,
    joins: ConnLimiter,
    strikes: VecDeque<Instant>,
    max_strikes: u32,
    last_answer: Option<Instant>,
}

impl ConnLimits {
    /// Whether a refused non-send frame gets an error frame now (one a second).
    pub fn should_answer(&mut self) -> bool {
        let now = Instant::now();
        if self.last_answer.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            return false;
        }
        self.last_answer = Some(now);
        true
    }

    /// Any frame.
    pub fn frame(&self) -> Result<(), ApiError> {
        self.frames.check().map_err(|e| ApiError::rate_limited("too many frames", wait_of(e)))
    }

    pub fn send(&self) -> Result<(), ApiError> {
        self.sends.check().map_err(|e| ApiError::rate_limited("too many messages", wait_of(e)))
    }

    pub fn join(&self) -> Result<(), ApiError> {
        self.joins.check().map_err(|e| ApiError::rate_limited("too many joins", wait_of(e)))
    }

    /// Records a refused frame; `true` once refusals are sustained (close 4029).
    pub fn strike(&mut self) -> bool {
        let now = Instant::now();
        while self.strikes.front().is_some_and(|t| now.duration_since(*t) > STRIKE_WINDOW) {
            self.strikes.pop_front();
        }
        self.strikes.push_back(now);
        self.max_strikes > 0 && self.strikes.len() as u32 > self.max_strikes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> LimitSettings {
        use clap::Parser;
        #[derive(Parser)]
        struct W {
            #[command(flatten)]
            l: LimitSettings,
        }
        W::parse_from(["t", "--limit-conns-per-user", "2", "--limit-sends-per-sec", "1", "--limit-abuse-strikes", "3"])
            .l
    }

    #[test]
    fn connection_slots_are_counted_and_given_back() {
        let limits = Limits::new(&settings());
        let alice = UserId::parse("alice").unwrap();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let a = limits.admit(&alice, ip).unwrap();
        let _b = limits.admit(&alice, ip).unwrap();
        let third = limits.admit(&alice, ip).err().expect("a third connection is refused");
        assert_eq!(third.code, crate::error::Code::RateLimited);
        assert!(third.retry_after_ms.is_some());
        drop(a);
        assert!(limits.admit(&alice, ip).is_ok(), "a freed slot can be taken again");
    }

    #[test]
    fn a_burst_is_allowed_then_refused_with_a_wait_and_strikes_add_up() {
        let limits = Limits::new(&settings());
        let mut conn = limits.connection();
        assert!(conn.send().is_ok());
        assert!(conn.send().is_ok(), "burst of two seconds' worth");
        let e = conn.send().expect_err("third send in the same instant is refused");
        assert!(e.retry_after_ms.unwrap() <= 1000);
        assert!(!conn.strike() && !conn.strike() && !conn.strike());
        assert!(conn.strike(), "the fourth refusal within the window is abuse");
    }
}
