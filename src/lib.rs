//! natter: a horizontally scalable chat gateway on NATS JetStream.
//!
//! Layout (the data flow, one owner per arrow):
//! - `gateway::ws` upgrades a socket → `gateway::connection` runs it (reader +
//!   writer joined by a bounded queue, `gateway::outbound`);
//! - a `send` → `bus::messages::publish` → stream `CHAT` (dedupe by
//!   `Nats-Msg-Id`) → RePublish `live.room.<r>.msg` → `gateway::room` (one task per
//!   room with local members: gap repair, encode once) → every member's queue;
//! - `join` with `since` replays from the stream (`bus::directget`) and meets
//!   the live flow at a seam kept by the room task (`gateway::hub`);
//! - `db` holds rooms, members and read markers (PostgreSQL, sqlx);
//! - `auth` checks JWTs with one pinned algorithm; `ids` keeps ids out of
//!   subject injection; `config` + `cli` are the typed settings.

pub mod auth;
pub mod bench;
pub mod bus;
pub mod cli;
pub mod config;
pub mod db;
pub mod error;
pub mod gateway;
pub mod ids;
pub mod notifier;
pub mod push;
pub mod shutdown;
pub mod tasks;
pub mod telemetry;
