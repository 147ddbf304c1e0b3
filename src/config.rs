//! Typed settings, from flags and `NATTER_*` variables, checked before anything
//! binds or connects. Tests build them with `GatewaySettings::try_parse_from`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};

use crate::ids::NodeId;

/// A secret that never appears in `Debug` output or logs.
#[derive(Clone, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// Parses `7d`, `2m`, `500ms`, … (humantime).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Args)]
pub struct LogSettings {
    /// Log filter (tracing EnvFilter syntax, e.g. `info` or `natter=debug`).
    #[arg(long = "log", env = "NATTER_LOG", default_value = "info", global = true)]
    pub level: String,
    /// Log format.
    #[arg(long = "log-format", env = "NATTER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty, global = true)]
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// How tokens are checked: the algorithm is pinned; only that one is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum JwtAlg {
    #[value(name = "HS256")]
    Hs256,
    #[value(name = "RS256")]
    Rs256,
    #[value(name = "ES256")]
    Es256,
    #[value(name = "EdDSA")]
    EdDsa,
}

/// How a gateway receives the live traffic of its rooms (messages, typing,
/// events).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoomSubscriptions {
    /// One NATS subscription per room with a local member: the gateway
    /// receives only its rooms' traffic, and each such room costs ~6.7 KiB
    /// (async-nats allocates a 32-message channel block per subscription).
    PerRoom,
    /// One NATS subscription for every room: each room costs ~1.5 KiB, and
    /// the gateway also receives (and drops) the traffic of rooms it has no
    /// member of, as a Socket.IO Redis adapter does.
    Shared,
}

/// How a gateway receives the presence events of the users its clients
/// watch (`presence_sub`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PresenceSubscriptions {
    /// One NATS subscription (and task) per watched user: ~12 KiB per
    /// watched user on the gateway, and only those users' events.
    PerUser,
    /// One NATS subscription for every user's events: a watched user costs
    /// no subscription, but the gateway receives every user's changes
    /// (connects, disconnects, away) and every gateway's lease refreshes.
    Shared,
}

#[derive(Debug, Clone, Args)]
pub struct JwtSettings {
    /// JWT algorithm; the only one accepted.
    #[arg(long, env = "NATTER_JWT_ALG", value_enum, default_value_t = JwtAlg::Hs256)]
    pub jwt_alg: JwtAlg,
    /// HS256 shared secret.
    #[arg(long, env = "NATTER_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,
    /// PEM public key file (RS256, ES256, EdDSA).
    #[arg(long, env = "NATTER_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseSettings {
    /// PostgreSQL URL.
    #[arg(
        long,
        env = "NATTER_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/natter",
        hide_env_values = true
    )]
    pub database_url: String,
    /// Largest number of PostgreSQL connections in the pool.
    #[arg(long, env = "NATTER_DATABASE_POOL", default_value_t = 16)]
    pub database_pool: u32,
}

#[derive(Debug, Clone, Args)]
pub struct NatsSettings {
    /// NATS servers, comma-separated.
    #[arg(long, env = "NATTER_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// NATS user name (with NATTER_NATS_PASSWORD; see nats.conf).
    #[arg(long, env = "NATTER_NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password.
    #[arg(long, env = "NATTER_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<Secret>,
    /// JetStream replicas of the CHAT stream and the KV buckets (3 on a production cluster).
    #[arg(long, env = "NATTER_STREAM_REPLICAS", default_value_t = 1)]
    pub stream_replicas: usize,
    /// How long the CHAT stream keeps messages (older ones live in the archive).
    #[arg(long, env = "NATTER_STREAM_MAX_AGE", default_value = "7d", value_parser = parse_duration)]
    pub stream_max_age: Duration,
    /// How many messages per room the CHAT stream keeps once the archiver
    /// and the notifier have read them (the archiver trims to it; -1: no trim).
    #[arg(long, env = "NATTER_STREAM_MAX_PER_ROOM", default_value_t = 10_000)]
    pub stream_max_per_room: i64,
    /// The most messages per room the CHAT stream holds at all, read or not:
    /// while the archiver or the notifier is behind, a room grows past
    /// NATTER_STREAM_MAX_PER_ROOM up to this; beyond it the oldest go (-1: no
    /// limit but NATTER_STREAM_MAX_AGE).
    #[arg(long, env = "NATTER_STREAM_HARD_MAX_PER_ROOM", default_value_t = 100_000)]
    pub stream_hard_max_per_room: i64,
}

#[derive(Debug, Clone, Args)]
pub struct GatewaySettings {
    #[command(flatten)]
    pub nats: NatsSettings,
    #[command(flatten)]
    pub db: DatabaseSettings,
    #[command(flatten)]
    pub jwt: JwtSettings,
    /// HTTP/WebSocket listen address.
    #[arg(long, env = "NATTER_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// This process's id in presence and logs (default: the host name).
    #[arg(long, env = "NATTER_NODE_ID")]
    pub node_id: Option<String>,
    /// Largest WebSocket frame or HTTP JSON body, in bytes.
    #[arg(long, env = "NATTER_MAX_FRAME_BYTES", default_value_t = 64 * 1024)]
    pub max_frame_bytes: usize,
    /// Largest image attachment accepted by `POST /v1/rooms/{id}/attachments`, in bytes.
    #[arg(long, env = "NATTER_ATTACHMENT_MAX_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub attachment_max_bytes: usize,
    /// Time a new WebSocket has to send `hello`.
    #[arg(long, env = "NATTER_HELLO_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub hello_timeout: Duration,
    /// Server ping interval, also announced in `welcome`.
    #[arg(long, env = "NATTER_HEARTBEAT", default_value = "25s", value_parser = parse_duration)]
    pub heartbeat: Duration,
    /// How long a membership answer is cached per gateway.
    #[arg(long, env = "NATTER_MEMBERSHIP_CACHE_TTL", default_value = "30s", value_parser = parse_duration)]
    pub membership_cache_ttl: Duration,
    /// Frames queued per connection before it counts as a slow consumer.
    #[arg(long, env = "NATTER_OUTBOUND_QUEUE", default_value_t = 1024)]
    pub outbound_queue: usize,
    /// Bytes queued per connection before it counts as a slow consumer (4008).
    /// Typing and presence frames are dropped first, once the queue is half full.
    #[arg(long, env = "NATTER_OUTBOUND_BYTES", default_value_t = 2 * 1024 * 1024)]
    pub outbound_bytes: usize,
    /// Lifetime of a gateway's presence lease unless its heartbeat refreshes
    /// it (a crashed gateway's users go offline after this).
    #[arg(long, env = "NATTER_PRESENCE_TTL", default_value = "30s", value_parser = parse_duration)]
    pub presence_ttl: Duration,
    /// How long after a user's last session closes before they show offline.
    #[arg(long, env = "NATTER_PRESENCE_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub presence_grace: Duration,
    /// Most users one connection may watch with `presence_sub`.
    #[arg(long, env = "NATTER_PRESENCE_SUB_MAX", default_value_t = 1000)]
    pub presence_sub_max: usize,
    /// Typing frames per second per user and room (more are dropped).
    #[arg(long, env = "NATTER_TYPING_PER_SEC", default_value_t = 2)]
    pub typing_per_sec: u32,
    #[command(flatten)]
    pub limits: LimitSettings,
    /// Close a connection after this long without any frame or pong from it
    /// (reaps half-open TCP connections).
    #[arg(long, env = "NATTER_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Origins allowed to open a WebSocket, comma-separated (e.g.
    /// `https://chat.example.com`); empty = any. Upgrades without an Origin
    /// header (native apps) are always allowed.
    #[arg(long, env = "NATTER_ALLOWED_ORIGINS", default_value = "")]
    pub allowed_origins: String,
    /// On SIGTERM, sockets are closed (1012) spread over this window, so that
    /// clients do not all reconnect at once; the process exits within it.
    #[arg(long, env = "NATTER_DRAIN_WINDOW", default_value = "30s", value_parser = parse_duration)]
    pub drain_window: Duration,
    /// Header with the client's address set by a trusted load balancer (e.g.
    /// `x-forwarded-for`: its first entry is used); unset = the peer address.
    #[arg(long, env = "NATTER_CLIENT_IP_HEADER")]
    pub client_ip_header: Option<String>,
    /// Development only: `POST /v1/dev/token` mints a token for any user with
    /// the HS256 secret (the web client's sign-in). Never in production.
    #[arg(long, env = "NATTER_DEV", default_value_t = false)]
    pub dev: bool,
    /// How the gateway receives its rooms' live traffic: `per-room` (a NATS
    /// subscription per room with a local member) or `shared` (one for all
    /// rooms; far less memory per room, but every room's traffic reaches
    /// every gateway). docs/architecture.md says which to choose.
    #[arg(long, env = "NATTER_ROOM_SUBSCRIPTIONS", value_enum, default_value_t = RoomSubscriptions::PerRoom)]
    pub room_subscriptions: RoomSubscriptions,
    /// How the gateway receives the presence events of watched users:
    /// `shared` (one subscription for every user's changes; far less memory
    /// per watched user) or `per-user` (a NATS subscription per watched
    /// user). docs/architecture.md says which to choose.
    #[arg(long, env = "NATTER_PRESENCE_SUBSCRIPTIONS", value_enum, default_value_t = PresenceSubscriptions::Shared)]
    pub presence_subscriptions: PresenceSubscriptions,
    /// Test hook: drop every Nth live delivery before gap detection (0 = off).
    #[arg(long, env = "NATTER_FAULT_DROP_LIVE_EVERY", default_value_t = 0, hide = true)]
    pub fault_drop_live_every: u64,
}

/// Abuse limits; 0 turns a limit off.
#[derive(Debug, Clone, Args)]
pub struct LimitSettings {
    /// Frames of any kind per second per connection (bursts of twice as many pass).
    #[arg(long, env = "NATTER_LIMIT_FRAMES_PER_SEC", default_value_t = 100)]
    pub limit_frames_per_sec: u32,
    /// `send` frames per second per connection.
    #[arg(long, env = "NATTER_LIMIT_SENDS_PER_SEC", default_value_t = 20)]
    pub limit_sends_per_sec: u32,
    /// Sends per second per user, over all their connections and HTTP on this gateway.
    #[arg(long, env = "NATTER_LIMIT_USER_SENDS_PER_SEC", default_value_t = 50)]
    pub limit_user_sends_per_sec: u32,
    /// `join` frames per second per connection.
    #[arg(long, env = "NATTER_LIMIT_JOINS_PER_SEC", default_value_t = 20)]
    pub limit_joins_per_sec: u32,
    /// Messages one resume (`join` with `since`, SSE `Last-Event-ID`) replays
    /// at most: the newest; the client pages older ones over HTTP.
    #[arg(long, env = "NATTER_LIMIT_REPLAY", default_value_t = 10_000)]
    pub limit_replay: usize,
    /// Bytes of stored messages one resume holds and replays at most (the
    /// newest that fit).
    #[arg(long, env = "NATTER_LIMIT_REPLAY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub limit_replay_bytes: usize,
    /// Rooms one connection may have joined at once.
    #[arg(long, env = "NATTER_LIMIT_ROOMS_PER_CONN", default_value_t = 1000)]
    pub limit_rooms_per_conn: usize,
    /// Open WebSocket connections per user on this gateway.
    #[arg(long, env = "NATTER_LIMIT_CONNS_PER_USER", default_value_t = 20)]
    pub limit_conns_per_user: u32,
    /// Open WebSocket connections per client address on this gateway.
    #[arg(long, env = "NATTER_LIMIT_CONNS_PER_IP", default_value_t = 5000)]
    pub limit_conns_per_ip: u32,
    /// HTTP requests per second per client address (WebSocket upgrades included).
    #[arg(long, env = "NATTER_LIMIT_HTTP_PER_IP_PER_SEC", default_value_t = 500)]
    pub limit_http_per_ip_per_sec: u32,
    /// Authenticated HTTP requests per second per user (token subject).
    #[arg(long, env = "NATTER_LIMIT_HTTP_PER_TOKEN_PER_SEC", default_value_t = 50)]
    pub limit_http_per_token_per_sec: u32,
    /// Refused frames within 10 s after which a connection is closed 4029.
    #[arg(long, env = "NATTER_LIMIT_ABUSE_STRIKES", default_value_t = 100)]
    pub limit_abuse_strikes: u32,
}

impl GatewaySettings {
    /// The node id, from the setting or the host name, validated.
    pub fn node_id(&self) -> anyhow::Result<NodeId> {
        let raw = match &self.node_id {
            Some(id) => id.clone(),
            None => hostname(),
        };
        NodeId::parse(&raw).map_err(|e| anyhow::anyhow!("NATTER_NODE_ID {raw:?}: {e}"))
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| {
            h.trim().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).take(64).collect()
        })
        .filter(|h: &String| !h.is_empty())
        .unwrap_or_else(|| "natter".to_owned())
}

#[derive(Debug, Clone, Args)]
pub struct MigrateSettings {
    #[command(flatten)]
    pub db: DatabaseSettings,
}

#[derive(Debug, Clone, Args)]
pub struct TokenSettings {
    /// The user id (`sub`).
    #[arg(long)]
    pub user: String,
    /// Display name claim.
    #[arg(long)]
    pub name: Option<String>,
    /// Lifetime of the token.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub ttl: Duration,
    #[command(flatten)]
    pub jwt: JwtSettings,
    /// PEM private key file for RS256, ES256 or EdDSA.
    #[arg(long, env = "NATTER_JWT_PRIVATE_KEY")]
    pub jwt_private_key: Option<PathBuf>,
}

/// Apple Push Notification service (token auth with a .p8 key).
#[derive(Debug, Clone, Args)]
pub struct ApnsSettings {
    /// APNS base URL: `https://` for Apple, `http://` (HTTP/2 prior knowledge) for emulators and relays.
    #[arg(long, env = "NATTER_APNS_URL", default_value = "https://api.push.apple.com")]
    pub apns_url: url::Url,
    /// Path of the .p8 signing key (PKCS#8 PEM, P-256); APNS is off without it.
    #[arg(long, env = "NATTER_APNS_KEY")]
    pub apns_key: Option<PathBuf>,
    /// Key id of the .p8 key (the JWT `kid`).
    #[arg(long, env = "NATTER_APNS_KEY_ID")]
    pub apns_key_id: Option<String>,
    /// Apple developer team id (the JWT `iss`).
    #[arg(long, env = "NATTER_APNS_TEAM_ID")]
    pub apns_team_id: Option<String>,
    /// Default `apns-topic` (the app's bundle id) for devices registered without one.
    #[arg(long, env = "NATTER_APNS_TOPIC")]
    pub apns_topic: Option<String>,
}

/// Firebase Cloud Messaging HTTP v1 (service account).
#[derive(Debug, Clone, Args)]
pub struct FcmSettings {
    /// FCM base URL: `https://` for Google (h2 by ALPN), `http://` (HTTP/2 prior knowledge) for emulators and relays.
    #[arg(long, env = "NATTER_FCM_URL", default_value = "https://fcm.googleapis.com")]
    pub fcm_url: url::Url,
    /// Path of the service-account JSON; its `token_uri` is the OAuth endpoint. FCM is off without it.
    #[arg(long, env = "NATTER_FCM_CREDENTIALS")]
    pub fcm_credentials: Option<PathBuf>,
    /// Firebase project id (default: the service account's `project_id`).
    #[arg(long, env = "NATTER_FCM_PROJECT")]
    pub fcm_project: Option<String>,
}

/// How pushes are sent, whichever the provider.
#[derive(Debug, Clone, Args)]
pub struct PushSettings {
    #[command(flatten)]
    pub apns: ApnsSettings,
    #[command(flatten)]
    pub fcm: FcmSettings,
    /// Time limit of one push request.
    #[arg(long, env = "NATTER_PUSH_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub push_timeout: Duration,
    /// Attempts per push on 429, 5xx and timeouts (1 = no retry).
    #[arg(long, env = "NATTER_PUSH_ATTEMPTS", default_value_t = 5)]
    pub push_attempts: u32,
    /// Longest wait between two attempts (Retry-After beyond it counts as a failure).
    #[arg(long, env = "NATTER_PUSH_MAX_BACKOFF", default_value = "30s", value_parser = parse_duration)]
    pub push_max_backoff: Duration,
    /// Pushes in flight at once per notifier.
    #[arg(long, env = "NATTER_PUSH_CONCURRENCY", default_value_t = 128)]
    pub push_concurrency: usize,
}

#[derive(Debug, Clone, Args)]
pub struct NotifierSettings {
    #[command(flatten)]
    pub nats: NatsSettings,
    #[command(flatten)]
    pub db: DatabaseSettings,
    #[command(flatten)]
    pub push: PushSettings,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "NATTER_LISTEN", default_value = "0.0.0.0:8081")]
    pub listen: SocketAddr,
    /// Messages fetched per batch from the `notifier` consumer.
    #[arg(long = "notifier-batch", env = "NATTER_NOTIFIER_BATCH", default_value_t = 256)]
    pub batch: usize,
    /// Batches of one consumer worked on at once: while one waits on
    /// PostgreSQL or the push providers, the next is under way.
    #[arg(long = "notifier-pipeline", env = "NATTER_NOTIFIER_PIPELINE", default_value_t = 4)]
    pub pipeline: usize,
    /// Deliveries of one message before it is dead-lettered.
    #[arg(long = "notifier-max-deliver", env = "NATTER_NOTIFIER_MAX_DELIVER", default_value_t = 5)]
    pub max_deliver: i64,
    /// How long a fetched message may stay unacknowledged before redelivery.
    #[arg(long = "notifier-ack-wait", env = "NATTER_NOTIFIER_ACK_WAIT", default_value = "60s", value_parser = parse_duration)]
    pub ack_wait: Duration,
    /// When every push of a message failed (provider down), the message is
    /// redelivered after this times its delivery count (at most 6×), up to
    /// NATTER_NOTIFIER_MAX_DELIVER deliveries.
    #[arg(long, env = "NATTER_PUSH_REDELIVERY", default_value = "10s", value_parser = parse_duration)]
    pub push_redelivery: Duration,
    /// Away users count as offline: unread bumps and pushes for them too.
    #[arg(long, env = "NATTER_PUSH_WHEN_AWAY", default_value_t = false)]
    pub push_when_away: bool,
    /// Copy messages into the PostgreSQL archive (durable consumer `archiver`).
    #[arg(long, env = "NATTER_ARCHIVE", default_value_t = true, action = clap::ArgAction::Set)]
    pub archive: bool,
}
