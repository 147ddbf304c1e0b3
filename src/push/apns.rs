//! APNS with token auth: a2's payload builders and error types, a provider JWT
//! (ES256, `kid` = key id, `iss` = team id) signed here and refreshed every
//! 50 minutes, and our own HTTP/2 client to the configured base URL (a2
//! hardcodes Apple's host and keeps its signer private).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use a2::{
    CollapseId, DefaultNotificationBuilder, ErrorBody, ErrorReason, NotificationBuilder as _, NotificationOptions,
    Priority, PushType,
    request::payload::{APS, PayloadLike as _},
};
use anyhow::Context as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parking_lot::Mutex;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use serde::Serialize;

use super::{Attempt, Outcome, Push, retry_after};
use crate::config::ApnsSettings;

/// Apple accepts a provider token for an hour and refuses a new one more often than every 20 minutes.
const JWT_REFRESH: Duration = Duration::from_secs(50 * 60);
/// How long Apple keeps a push for a device that is offline (the newest per collapse id).
const EXPIRY: Duration = Duration::from_secs(24 * 3600);

/// a2's payload as Apple reads it, with the `thread-id` (notification
/// grouping) that a2's `APS` lacks.
#[derive(Serialize)]
struct Body<'a> {
    aps: Aps<'a>,
    #[serde(flatten)]
    data: &'a BTreeMap<&'a str, serde_json::Value>,
}

#[derive(Serialize)]
struct Aps<'a> {
    #[serde(flatten)]
    aps: &'a APS<'a>,
    #[serde(rename = "thread-id")]
    thread_id: &'a str,
}

/// Sends to APNS (`POST {base}/3/device/{token}` over HTTP/2).
pub struct ApnsSender {
    client: reqwest::Client,
    /// The base URL, parsed once; each push appends `3/device/{token}`.
    base: reqwest::Url,
    key: EncodingKey,
    key_id: String,
    team_id: String,
    default_topic: Option<String>,
    /// The current provider token and when it was signed; shared by all pushes.
    jwt: Mutex<Option<(String, Instant)>>,
}

impl ApnsSender {
    /// `None` when no key is configured (APNS off).
    pub fn from_settings(s: &ApnsSettings, timeout: Duration) -> anyhow::Result<Option<Self>> {
        let Some(path) = &s.apns_key else { return Ok(None) };
        let key_id = s.apns_key_id.clone().context("NATTER_APNS_KEY_ID is required with NATTER_APNS_KEY")?;
        let team_id = s.apns_team_id.clone().context("NATTER_APNS_TEAM_ID is required with NATTER_APNS_KEY")?;
        let pem = std::fs::read(path).with_context(|| format!("NATTER_APNS_KEY: reading {}", path.display()))?;
        let key = EncodingKey::from_ec_pem(&pem)
            .with_context(|| format!("NATTER_APNS_KEY: {} is not a PKCS#8 P-256 key", path.display()))?;
        let builder = super::client_builder(&s.apns_url, "NATTER_APNS_URL", timeout)?
            .http2_keep_alive_interval(Duration::from_secs(60))
            .http2_keep_alive_while_idle(true);
        let sender = Self {
            client: builder.build().context("building the APNS client")?,
            base: s.apns_url.clone(),
            key,
            key_id,
            team_id,
            default_topic: s.apns_topic.clone(),
            jwt: Mutex::new(None),
        };
        sender.bearer().context("NATTER_APNS_KEY: signing a provider token")?;
        Ok(Some(sender))
    }

    /// One attempt, without retry.
    pub async fn send_once(&self, push: &Push<'_>) -> Attempt {
        let token = push.device.token.as_str();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Attempt::Done(Outcome::InvalidToken("BadDeviceToken (not sent)".into()));
        }
        let Some(topic) = push.device.topic.as_deref().or(self.default_topic.as_deref()) else {
            return Attempt::Done(Outcome::Dropped("no apns topic (set NATTER_APNS_TOPIC)".into()));
        };
        let request = match self.build_request(push, topic) {
            Ok(r) => r,
            Err(e) => return Attempt::Done(Outcome::Dropped(format!("apns request: {e:#}"))),
        };
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => return Attempt::Retry { reason: format!("apns: {e}"), after: None },
        };
        let status = response.status().as_u16();
        let after = retry_after(response.headers());
        let body = response.bytes().await.unwrap_or_default();
        let (reason, text) = reason(status, &body);
        if reason == Some(ErrorReason::ExpiredProviderToken) {
            *self.jwt.lock() = None;
        }
        classify(status, after, reason, text)
    }

    /// The request a2's `Client::build_request` would make, to our base URL.
    fn build_request(&self, push: &Push<'_>, topic: &str) -> anyhow::Result<reqwest::RequestBuilder> {
        let token = push.device.token.as_str();
        let seq = push.seq.to_string();
        let expiration = (SystemTime::now() + EXPIRY).duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let options = NotificationOptions {
            apns_id: None,
            apns_push_type: Some(PushType::Alert),
            apns_expiration: Some(expiration),
            apns_priority: Some(Priority::High),
            apns_topic: Some(topic),
            apns_collapse_id: CollapseId::new(push.room).ok(),
        };
        let mut payload = DefaultNotificationBuilder::new()
            .set_title(push.from)
            .set_body(push.body)
            .set_badge(push.badge)
            .set_sound("default")
            .build(token, options);
        payload.add_custom_data("room", &push.room)?;
        payload.add_custom_data("seq", &seq)?;
        payload.add_custom_data("id", &push.message_id)?;
        // a2's `APS` has no `thread-id`: it is added as the payload is
        // written, without a `serde_json::Value` in between.
        let body = Body { aps: Aps { aps: &payload.aps, thread_id: push.room }, data: &payload.data };

        let options = payload.get_options();
        let mut builder = self.client.post(device_url(&self.base, token)?).header(CONTENT_TYPE, "application/json");
        if let Some(priority) = &options.apns_priority {
            builder = builder.header("apns-priority", priority.to_string());
        }
        if let Some(id) = options.apns_id {
            builder = builder.header("apns-id", id);
        }
        if let Some(push_type) = &options.apns_push_type {
            builder = builder.header("apns-push-type", push_type.to_string());
        }
        if let Some(expiration) = options.apns_expiration {
            builder = builder.header("apns-expiration", expiration.to_string());
        }
        if let Some(collapse_id) = &options.apns_collapse_id {
            builder = builder.header("apns-collapse-id", collapse_id.value);
        }
        if let Some(topic) = options.apns_topic {
            builder = builder.header("apns-topic", topic);
        }
        builder = builder.header(AUTHORIZATION, format!("bearer {}", self.bearer()?));
        Ok(builder.body(serde_json::to_vec(&body)?))
    }

    /// The cached provider token, signed anew when 50 minutes old.
    fn bearer(&self) -> anyhow::Result<String> {
        let mut jwt = self.jwt.lock();
        if let Some((token, signed)) = &*jwt
            && signed.elapsed() < JWT_REFRESH
        {
            return Ok(token.clone());
        }
        #[derive(serde::Serialize)]
        struct Claims<'a> {
            iss: &'a str,
            iat: u64,
        }
        let mut header = Header::new(Algorithm::ES256);
        header.typ = None;
        header.kid = Some(self.key_id.clone());
        let iat = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let token = jsonwebtoken::encode(&header, &Claims { iss: &self.team_id, iat }, &self.key)?;
        *jwt = Some((token.clone(), Instant::now()));
        Ok(token)
    }
}

/// The reason of an APNS error body: a2's enum when it knows it, and as text.
fn reason(status: u16, body: &[u8]) -> (Option<ErrorReason>, String) {
    let parsed = serde_json::from_slice::<ErrorBody>(body).ok().map(|b| b.reason);
    let text = match &parsed {
        Some(r) => format!("{r:?}"),
        // Reasons newer than a2 (`ExpiredToken`) or a body that is not Apple's.
        None => serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["reason"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("HTTP {status}")),
    };
    (parsed, text)
}

/// What an APNS answer means for the push.
fn classify(status: u16, after: Option<Duration>, parsed: Option<ErrorReason>, reason: String) -> Attempt {
    if status == 200 {
        return Attempt::Done(Outcome::Delivered);
    }
    match (status, parsed) {
        (410, _) | (400, Some(ErrorReason::BadDeviceToken | ErrorReason::DeviceTokenNotForTopic)) => {
            Attempt::Done(Outcome::InvalidToken(reason))
        }
        (403, Some(ErrorReason::ExpiredProviderToken)) | (429, _) | (500..=599, _) => {
            Attempt::Retry { reason: format!("apns {status} {reason}"), after }
        }
        _ => Attempt::Done(Outcome::Dropped(format!("apns {status} {reason}"))),
    }
}

/// `{base}/3/device/{token}`, without parsing the base again (a URL string
/// parsed per push, host and all, showed as ~6 % of the notifier's samples).
fn device_url(base: &reqwest::Url, token: &str) -> anyhow::Result<reqwest::Url> {
    let mut url = base.clone();
    url.path_segments_mut()
        .map_err(|()| anyhow::anyhow!("NATTER_APNS_URL cannot be a base"))?
        .pop_if_empty()
        .extend(["3", "device", token]);
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(status: u16, after: Option<Duration>, body: &[u8]) -> Attempt {
        let (parsed, text) = reason(status, body);
        super::classify(status, after, parsed, text)
    }

    #[test]
    fn classifies_apple_answers() {
        let body = |r: &str| format!(r#"{{"reason":"{r}"}}"#).into_bytes();
        assert!(matches!(classify(200, None, b""), Attempt::Done(Outcome::Delivered)));
        assert_eq!(
            classify(410, None, &body("ExpiredToken")),
            Attempt::Done(Outcome::InvalidToken("ExpiredToken".into()))
        );
        assert_eq!(
            classify(400, None, &body("BadDeviceToken")),
            Attempt::Done(Outcome::InvalidToken("BadDeviceToken".into()))
        );
        assert_eq!(classify(400, None, &body("BadTopic")), Attempt::Done(Outcome::Dropped("apns 400 BadTopic".into())));
        let after = Some(Duration::from_secs(2));
        assert_eq!(
            classify(503, after, &body("ServiceUnavailable")),
            Attempt::Retry { reason: "apns 503 ServiceUnavailable".into(), after }
        );
        assert!(matches!(classify(429, None, b"not json"), Attempt::Retry { .. }));
    }

    #[test]
    fn the_device_url_is_under_the_base_path() {
        let url = |base: &str| device_url(&base.parse().unwrap(), "ab12").unwrap().to_string();
        assert_eq!(url("https://api.push.apple.com"), "https://api.push.apple.com/3/device/ab12");
        assert_eq!(url("http://127.0.0.1:8090/"), "http://127.0.0.1:8090/3/device/ab12");
        assert_eq!(url("http://relay:80/apns/"), "http://relay/apns/3/device/ab12");
        assert_eq!(url("http://relay/apns"), "http://relay/apns/3/device/ab12");
    }
}
