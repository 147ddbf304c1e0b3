//! FCM HTTP v1: fcm_v1's message types and its service-account
//! `Authenticator` (yup-oauth2, which asks the key's `token_uri`, http or
//! https, and caches the access token), with our own client posting to
//! `{base}/v1/projects/{project}/messages:send` (fcm_v1 hardcodes Google's host).

use std::{collections::HashMap, time::Duration};

use anyhow::Context as _;
use fcm_v1::{
    android::{AndroidConfig, AndroidMessagePriority, AndroidNotification},
    apns::ApnsConfig,
    auth::{Authenticator, ServiceAccountKey},
    message::{Message, Notification},
    webpush::WebpushConfig,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Attempt, Outcome, Push, retry_after};
use crate::config::FcmSettings;

pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
const FCM_ERROR: &str = "type.googleapis.com/google.firebase.fcm.v1.FcmError";
const BAD_REQUEST: &str = "type.googleapis.com/google.rpc.BadRequest";

/// Sends to FCM v1.
pub struct FcmSender {
    client: reqwest::Client,
    /// `{base}/v1/projects/{project}/messages:send`, parsed once.
    url: reqwest::Url,
    auth: Authenticator,
    /// One token request at a time: yup-oauth2 caches the token but does not
    /// merge concurrent requests, so a burst would fetch one per push.
    token_fetch: tokio::sync::Mutex<()>,
}

impl FcmSender {
    /// `None` when no service account is configured (FCM off).
    pub async fn from_settings(s: &FcmSettings, timeout: Duration) -> anyhow::Result<Option<Self>> {
        let Some(path) = &s.fcm_credentials else { return Ok(None) };
        let text = tokio::fs::read_to_string(path)
            .await
            .with_context(|| format!("NATTER_FCM_CREDENTIALS: reading {}", path.display()))?;
        let key: ServiceAccountKey = serde_json::from_str(&text)
            .with_context(|| format!("NATTER_FCM_CREDENTIALS: {} is not a service-account key", path.display()))?;
        let project = s
            .fcm_project
            .clone()
            .or_else(|| key.project_id.clone())
            .with_context(|| format!("NATTER_FCM_PROJECT is required: {} has no project_id", path.display()))?;
        let builder = super::client_builder(&s.fcm_url, "NATTER_FCM_URL", timeout)?.pool_max_idle_per_host(1024);
        let auth = Authenticator::service_account::<&str>(key)
            .await
            .map_err(|e| anyhow::anyhow!("NATTER_FCM_CREDENTIALS: {} is not usable: {e}", path.display()))?;
        let client = builder.build().context("building the FCM client")?;
        let base = s.fcm_url.as_str().trim_end_matches('/');
        Ok(Some(Self {
            client,
            url: format!("{base}/v1/projects/{project}/messages:send").parse().context("the FCM URL")?,
            auth,
            token_fetch: Default::default(),
        }))
    }

    /// One attempt, without retry (the OAuth token comes from yup-oauth2's cache).
    pub async fn send_once(&self, push: &Push<'_>) -> Attempt {
        let fetching = self.token_fetch.lock().await;
        let token = self.auth.token(&[SCOPE]).await;
        drop(fetching);
        let token = match token {
            Ok(t) => t,
            Err(e) => return Attempt::Retry { reason: format!("fcm oauth token: {e}"), after: None },
        };
        let Some(token) = token.token() else {
            return Attempt::Retry { reason: "fcm oauth: no access token".into(), after: None };
        };
        let body = SendRequest { message: &message(push) };
        let response = match self.client.post(self.url.clone()).bearer_auth(token).json(&body).send().await {
            Ok(r) => r,
            Err(e) => return Attempt::Retry { reason: format!("fcm: {e}"), after: None },
        };
        let status = response.status().as_u16();
        let after = retry_after(response.headers());
        let body = response.bytes().await.unwrap_or_default();
        classify(status, after, &body)
    }
}

/// The body of `messages:send`, written straight from the message (not
/// through a `serde_json::Value`).
#[derive(Serialize)]
struct SendRequest<'a> {
    message: &'a Message,
}

/// The FCM message for one push: a notification with the room as collapse key,
/// tag and thread, the badge for Android and iOS, and the ids as data.
pub fn message(push: &Push<'_>) -> Message {
    let data = HashMap::from([
        ("room".to_owned(), Value::from(push.room)),
        ("seq".to_owned(), Value::from(push.seq.to_string())),
        ("id".to_owned(), Value::from(push.message_id)),
    ]);
    let android = AndroidConfig {
        collapse_key: Some(push.room.to_owned()),
        priority: Some(AndroidMessagePriority::High),
        notification: Some(AndroidNotification {
            tag: Some(push.room.to_owned()),
            notification_count: Some(push.badge.min(i8::MAX as u32) as i8),
            default_sound: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    };
    let apns = ApnsConfig {
        headers: Some(HashMap::from([
            ("apns-collapse-id".to_owned(), Value::from(push.room)),
            ("apns-priority".to_owned(), Value::from("10")),
        ])),
        payload: Some(HashMap::from([(
            "aps".to_owned(),
            json!({ "badge": push.badge, "thread-id": push.room, "sound": "default" }),
        )])),
        ..Default::default()
    };
    let webpush = WebpushConfig {
        headers: Some(HashMap::from([("Urgency".to_owned(), Value::from("high"))])),
        notification: Some(HashMap::from([("tag".to_owned(), Value::from(push.room))])),
        ..Default::default()
    };
    Message {
        token: Some(push.device.token.clone()),
        notification: Some(Notification {
            title: Some(push.from.to_owned()),
            body: Some(push.body.to_owned()),
            image: None,
        }),
        data: Some(data),
        android: Some(android),
        apns: Some(apns),
        webpush: Some(webpush),
        ..Default::default()
    }
}

/// Google's error body: `{"error":{"code","message","status","details":[…]}}`.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: GoogleError,
}

#[derive(Debug, Deserialize)]
struct GoogleError {
    #[serde(default)]
    message: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    details: Vec<Value>,
}

impl GoogleError {
    /// The `errorCode` of the `FcmError` detail (`UNREGISTERED`, `INVALID_ARGUMENT`, …).
    fn error_code(&self) -> Option<&str> {
        self.details.iter().find(|d| d["@type"] == FCM_ERROR).and_then(|d| d["errorCode"].as_str())
    }

    /// Whether a 400 is about the token: no field named, or `message.token` among them.
    fn concerns_token(&self) -> bool {
        let fields: Vec<&str> = self
            .details
            .iter()
            .filter(|d| d["@type"] == BAD_REQUEST)
            .flat_map(|d| d["fieldViolations"].as_array().into_iter().flatten())
            .filter_map(|v| v["field"].as_str())
            .collect();
        fields.is_empty() || fields.contains(&"message.token")
    }
}

/// What an FCM answer means for the push.
fn classify(status: u16, after: Option<Duration>, body: &[u8]) -> Attempt {
    if status == 200 {
        return Attempt::Done(Outcome::Delivered);
    }
    let error = serde_json::from_slice::<ErrorBody>(body).ok().map(|b| b.error);
    let code = error.as_ref().and_then(GoogleError::error_code);
    let reason = match &error {
        Some(e) => format!("fcm {status} {}: {}", code.unwrap_or(&e.status), e.message),
        None => format!("fcm {status}"),
    };
    let invalid_argument = code == Some("INVALID_ARGUMENT") && error.as_ref().is_some_and(GoogleError::concerns_token);
    match (status, code) {
        (_, Some("UNREGISTERED")) => Attempt::Done(Outcome::InvalidToken(reason)),
        (400, _) if invalid_argument => Attempt::Done(Outcome::InvalidToken(reason)),
        (429 | 500..=599, _) => Attempt::Retry { reason, after },
        _ => Attempt::Done(Outcome::Dropped(reason)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn google(status: u16, code: &str, field: Option<&str>) -> Vec<u8> {
        let mut details = vec![json!({ "@type": FCM_ERROR, "errorCode": code })];
        if let Some(field) = field {
            details.push(json!({ "@type": BAD_REQUEST, "fieldViolations": [{ "field": field }] }));
        }
        json!({ "error": { "code": status, "message": "m", "status": code, "details": details } })
            .to_string()
            .into_bytes()
    }

    #[test]
    fn classifies_google_answers() {
        assert_eq!(classify(200, None, b"{}"), Attempt::Done(Outcome::Delivered));
        assert!(matches!(
            classify(404, None, &google(404, "UNREGISTERED", None)),
            Attempt::Done(Outcome::InvalidToken(_))
        ));
        assert!(matches!(
            classify(400, None, &google(400, "INVALID_ARGUMENT", Some("message.token"))),
            Attempt::Done(Outcome::InvalidToken(_))
        ));
        assert!(matches!(
            classify(400, None, &google(400, "INVALID_ARGUMENT", Some("message.android.ttl"))),
            Attempt::Done(Outcome::Dropped(_))
        ));
        assert!(matches!(
            classify(403, None, &google(403, "SENDER_ID_MISMATCH", None)),
            Attempt::Done(Outcome::Dropped(_))
        ));
        assert!(matches!(classify(503, None, &google(503, "UNAVAILABLE", None)), Attempt::Retry { .. }));
        assert!(matches!(classify(429, None, b""), Attempt::Retry { .. }));
    }
}
