//! Command line: one binary, one subcommand per deployment or tool.
//!
//! Every setting is a flag and a `NATTER_*` environment variable (flags win);
//! the argument structs double as the typed settings (`config.rs` validates
//! what clap cannot).

use clap::{Parser, Subcommand};

use crate::config::{GatewaySettings, LogSettings, MigrateSettings, NotifierSettings, TokenSettings};

#[derive(Debug, Parser)]
#[command(name = "natter", version, about = "Chat gateway on NATS JetStream", long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogSettings,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve WebSocket and HTTP clients (stateless; run several behind a load balancer).
    Gateway(Box<GatewaySettings>),
    /// Offline delivery: unread counts, APNS / FCM pushes and the message archive (scale on consumer lag).
    Notifier(Box<NotifierSettings>),
    /// Local APNS + FCM stand-in speaking their wire protocols (development, tests, benchmarks).
    PushEmulator(crate::push::emulator::EmulatorSettings),
    /// Apply the PostgreSQL migrations (creates the database if needed; safe to re-run).
    Migrate(MigrateSettings),
    /// Load generator: drive running gateways and print one JSON line per scenario.
    Bench(crate::bench::BenchSettings),
    /// Mint a JWT for a user with the configured key (for development and tests).
    Token(TokenSettings),
}
