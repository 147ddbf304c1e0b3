//! The notifier's Prometheus metrics (OpenMetrics text on `/metrics`).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PushLabels {
    pub provider: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabels {
    pub consumer: String,
}

#[derive(Default)]
pub struct Metrics {
    /// Pushes by provider and outcome (ok, invalid_token, dropped, failed).
    pub pushes: Family<PushLabels, Counter>,
    /// Messages whose notifier work is done (acked).
    pub messages: Counter,
    /// Unread rows added (a redelivered message adds none).
    pub unread_bumps: Counter,
    /// Messages copied into the archive.
    pub archived: Counter,
    /// Messages given up on, by consumer.
    pub dead_letters: Family<ConsumerLabels, Counter>,
    /// Messages not yet delivered to each consumer.
    pub consumer_lag: Family<ConsumerLabels, Gauge>,
    /// Messages the archiver removed from the CHAT stream, beyond a room's window.
    pub trimmed: Counter,
    /// Passes of the window's trim over the rooms due (with the consumers'
    /// floor read).
    pub trim_passes: Counter,
}

impl Metrics {
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("natter");
        r.register("push", "Pushes by provider and outcome", self.pushes.clone());
        r.register("notifier_messages", "Messages handled by the notifier", self.messages.clone());
        r.register("unread_bumps", "Unread counts added", self.unread_bumps.clone());
        r.register("archived_messages", "Messages copied into the archive", self.archived.clone());
        r.register("dead_letters", "Messages given up on", self.dead_letters.clone());
        r.register("consumer_lag", "Messages pending for a consumer", self.consumer_lag.clone());
        r.register(
            "stream_trimmed_messages",
            "Messages trimmed from the CHAT stream beyond a room's window",
            self.trimmed.clone(),
        );
        r.register("stream_trim_passes", "Passes of the window's trim over the rooms due", self.trim_passes.clone());
        r
    }

    pub fn push(&self, provider: &str, outcome: &str) {
        self.pushes.get_or_create(&PushLabels { provider: provider.to_owned(), outcome: outcome.to_owned() }).inc();
    }

    pub fn dead_letter(&self, consumer: &str) {
        self.dead_letters.get_or_create(&ConsumerLabels { consumer: consumer.to_owned() }).inc();
    }
}
