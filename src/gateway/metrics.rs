//! The gateway's Prometheus metrics (OpenMetrics text on `/metrics`). One
//! instance per gateway, shared by its connections and room tasks.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabel {
    pub stream: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

/// Latency buckets from 0.5 ms to 10 s.
fn latency() -> Histogram {
    Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
}

pub struct Metrics {
    /// Open WebSocket connections.
    pub connections: Gauge,
    /// Client frames received, by type (`invalid` = not decodable).
    pub frames_in: Family<TypeLabel, Counter>,
    /// Frames queued to clients: `message`, `ephemeral` (typing, presence, read), `reply`.
    pub frames_out: Family<TypeLabel, Counter>,
    /// Frames not delivered, by reason (`backpressure`: ephemeral frame to a
    /// backed-up client; `rate_limited`: refused client frame).
    pub drops: Family<ReasonLabel, Counter>,
    /// Connections closed as slow consumers (4008).
    pub slow_consumer_closes: Counter,
    /// Connections closed, by close code.
    pub closes: Family<CodeLabel, Counter>,
    /// From publishing a message to its JetStream ack.
    pub publish_latency: Histogram,
    /// From the sender's gateway stamping a message to it being queued to a
    /// local member (across gateways; clocks of one cluster).
    pub delivery_latency: Histogram,
    /// Lost live deliveries repaired from the stream.
    pub gap_repairs: Counter,
    /// Live messages of the shared subscription for rooms without a local
    /// member (received and dropped).
    pub live_unrouted: Counter,
    /// Presence changes written by this gateway.
    pub presence_updates: Counter,
    /// Times this gateway found a stream gone and made it again, by stream
    /// (`CHAT`: a send found it gone; `presence`: a presence write did;
    /// `attachments`: an upload did).
    pub stream_repairs: Family<StreamLabel, Counter>,
    /// PostgreSQL pool connections by state (`idle`, `used`), read at scrape.
    pub db_pool: Family<StateLabel, Gauge>,
    /// Rooms with a member on this gateway (each a room task, and with
    /// per-room subscriptions a NATS subscription), read at scrape.
    pub rooms: Gauge,
    /// Users whose presence clients of this gateway watch, read at scrape.
    pub presence_watches: Gauge,
    /// Users whose last presence write was not stored, read at scrape.
    pub presence_unstored: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            connections: Gauge::default(),
            frames_in: Family::default(),
            frames_out: Family::default(),
            drops: Family::default(),
            slow_consumer_closes: Counter::default(),
            closes: Family::default(),
            publish_latency: latency(),
            delivery_latency: latency(),
            gap_repairs: Counter::default(),
            live_unrouted: Counter::default(),
            presence_updates: Counter::default(),
            stream_repairs: Family::default(),
            db_pool: Family::default(),
            rooms: Gauge::default(),
            presence_watches: Gauge::default(),
            presence_unstored: Gauge::default(),
        }
    }
}

impl Metrics {
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("natter");
        r.register("connections", "Open WebSocket connections", self.connections.clone());
        r.register("frames_in", "Client frames received by type", self.frames_in.clone());
        r.register("frames_out", "Frames queued to clients by type", self.frames_out.clone());
        r.register("drops", "Frames not delivered by reason", self.drops.clone());
        r.register("slow_consumer_closes", "Connections closed as slow consumers", self.slow_consumer_closes.clone());
        r.register("closes", "Connections closed by close code", self.closes.clone());
        r.register("publish_latency_seconds", "Publish to JetStream ack", self.publish_latency.clone());
        r.register("delivery_latency_seconds", "Message stamp to local delivery", self.delivery_latency.clone());
        r.register("gap_repairs", "Lost live deliveries repaired from the stream", self.gap_repairs.clone());
        r.register(
            "live_unrouted",
            "Live messages of the shared subscription for rooms without a local member",
            self.live_unrouted.clone(),
        );
        r.register("presence_updates", "Presence changes written", self.presence_updates.clone());
        r.register(
            "stream_repairs",
            "Times this gateway found a stream (CHAT, presence, attachments) gone and made it again",
            self.stream_repairs.clone(),
        );

        r.register("db_pool_connections", "PostgreSQL pool connections by state", self.db_pool.clone());
        r.register("rooms", "Rooms with a member on this gateway", self.rooms.clone());
        r.register(
            "presence_watches",
            "Users whose presence this gateway's clients watch",
            self.presence_watches.clone(),
        );
        r.register(
            "presence_unstored_users",
            "Users whose last presence write was not stored (written again once NATS is connected)",
            self.presence_unstored.clone(),
        );
        r
    }

    pub fn stream_repaired(&self, stream: &'static str) {
        self.stream_repairs.get_or_create(&StreamLabel { stream }).inc();
    }

    pub fn frame_in(&self, kind: &'static str) {
        self.frames_in.get_or_create(&TypeLabel { r#type: kind }).inc();
    }

    pub fn frame_out(&self, kind: &'static str) {
        self.frames_out.get_or_create(&TypeLabel { r#type: kind }).inc();
    }

    pub fn frames_out_by(&self, kind: &'static str, n: u64) {
        if n > 0 {
            self.frames_out.get_or_create(&TypeLabel { r#type: kind }).inc_by(n);
        }
    }

    pub fn dropped(&self, reason: &'static str) {
        self.drops.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn closed(&self, code: u16) {
        self.closes.get_or_create(&CodeLabel { code }).inc();
        if code == super::outbound::close::SLOW_CONSUMER {
            self.slow_consumer_closes.inc();
        }
    }

    /// The page served on `/metrics`, with the pool read now.
    pub fn render(&self, pool: &sqlx::PgPool) -> String {
        let size = pool.size() as i64;
        let idle = pool.num_idle() as i64;
        self.db_pool.get_or_create(&StateLabel { state: "idle" }).set(idle);
        self.db_pool.get_or_create(&StateLabel { state: "used" }).set((size - idle).max(0));
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry());
        out
    }
}

/// The `ts` of a stored message without parsing the whole payload (natter
/// writes it as a top-level `"ts":<ms>` field).
pub fn stamped_ms(payload: &[u8]) -> Option<i64> {
    let at = payload.windows(5).position(|w| w == b"\"ts\":")? + 5;
    let digits = payload[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&payload[at..at + digits]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stamp_is_read_from_the_payload() {
        let p = br#"{"id":"m1","from":"alice","ts":1763900000123,"body":"\"ts\":5","kind":"text"}"#;
        assert_eq!(stamped_ms(p), Some(1_763_900_000_123));
        assert_eq!(stamped_ms(b"{}"), None);
    }

    #[test]
    fn the_page_names_what_operators_alert_on() {
        let m = Metrics::default();
        m.closed(super::super::outbound::close::SLOW_CONSUMER);
        m.frame_in("send");
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry()).unwrap();
        assert!(out.contains("natter_slow_consumer_closes_total 1"), "{out}");
        assert!(out.contains(r#"natter_frames_in_total{type="send"} 1"#), "{out}");
        assert!(out.contains("natter_connections 0"), "{out}");
    }
}
