//! One integration binary against real servers: a nats-server and a fresh
//! PostgreSQL database per test.

mod helpers;

mod attachments;
mod bad_input;
mod bench;
mod browser;
mod cli;
mod cluster;
mod faults;
mod http_api;
mod limits;
mod messaging;
mod metrics;
mod notifier;
mod ops;
mod outage;
mod presence;
mod push;
mod sse;
mod tokens;
