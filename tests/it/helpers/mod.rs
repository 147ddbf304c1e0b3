//! Test support: real servers, isolated per test.

#![allow(dead_code)]

mod client;
mod cluster;
mod db;
mod gateway;
mod nats;
mod notifier;
mod proxy;

#[allow(unused_imports)]
pub use client::*;
#[allow(unused_imports)]
pub use cluster::*;
pub use db::TestDb;
#[allow(unused_imports)]
pub use gateway::*;
pub use nats::*;
#[allow(unused_imports)]
pub use notifier::*;
pub use proxy::CutProxy;

use std::time::Duration;

pub const SECRET: &str = "natter-test-secret-0123456789";

pub fn token(user: &str) -> String {
    natter::auth::Signer::hs256(SECRET).mint(user, Duration::from_secs(3600), None).unwrap()
}

/// Polls `cond` until it holds or `within` passes (no blind sleeps).
#[macro_export]
macro_rules! assert_eventually {
    ($within:expr, $cond:expr, $($msg:tt)+) => {{
        let until = std::time::Instant::now() + $within;
        loop {
            if $cond {
                break;
            }
            assert!(std::time::Instant::now() < until, $($msg)+);
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }};
}

/// One NATS server, one database and two gateways: the common set-up.
pub struct Stack {
    pub gw1: TestGateway,
    pub gw2: TestGateway,
    pub db: TestDb,
    pub nats: NatsServer,
}

impl Stack {
    pub async fn start() -> Self {
        Self::with(&[], &[]).await
    }

    pub async fn with(extra1: &[&str], extra2: &[&str]) -> Self {
        let nats = NatsServer::start();
        let db = TestDb::new().await;
        let gw1 = spawn_gateway(&nats, &db, "gw1", extra1).await;
        let gw2 = spawn_gateway(&nats, &db, "gw2", extra2).await;
        Self { gw1, gw2, db, nats }
    }
}
