//! Fault injection, recording and stats, and the control API that drives them:
//! `GET|POST|DELETE /emulator/faults`, `GET|DELETE /emulator/requests`
//! (`?token=` and `?provider=` filter), `GET|DELETE /emulator/stats`.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use axum::{
    Json,
    body::Bytes,
    extract::{Query, State},
    http::{HeaderMap, StatusCode, Version},
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Provider, Refusal, Shared, apns::default_apns_reason, fcm::default_fcm_code, now_ms};

/// An injected failure for one device token (`"*"`: every token).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fault {
    pub token: String,
    /// HTTP status to answer; absent = answer normally (after `delay_ms`).
    #[serde(default)]
    pub status: Option<u16>,
    /// APNS `reason` or FCM `errorCode`; default from the status.
    #[serde(default)]
    pub reason: Option<String>,
    /// How many requests it applies to; absent = until cleared.
    #[serde(default)]
    pub times: Option<u32>,
    /// `Retry-After` header, in seconds.
    #[serde(default)]
    pub retry_after_secs: Option<u64>,
    /// Extra latency of the answer.
    #[serde(default)]
    pub delay_ms: Option<u64>,
}

/// A push request as it arrived, kept until asked for: it is parsed into a
/// [`Recorded`] only then, so a benchmark's hundred thousand pushes cost the
/// emulator no JSON trees it never shows.
pub(super) struct Raw {
    provider: Provider,
    token: String,
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
    at_ms: u64,
}

impl Raw {
    pub(super) fn recorded(&self) -> Recorded {
        let headers = self
            .headers
            .iter()
            .map(|(name, value)| (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
            .collect();
        let body = match serde_json::from_slice(&self.body) {
            Ok(v) => v,
            Err(_) if self.body.is_empty() => Value::Null,
            Err(_) => Value::String(String::from_utf8_lossy(&self.body).into_owned()),
        };
        Recorded {
            provider: self.provider,
            token: self.token.clone(),
            status: self.status.as_u16(),
            version: format!("{:?}", self.version),
            headers,
            body,
            at_ms: self.at_ms,
        }
    }
}

/// One push request as the emulator saw it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recorded {
    pub provider: Provider,
    pub token: String,
    /// The status answered.
    pub status: u16,
    /// The HTTP version the request came over (`HTTP/2.0`, `HTTP/1.1`).
    #[serde(default)]
    pub version: String,
    /// Request headers, lower-case names.
    pub headers: BTreeMap<String, String>,
    /// The JSON body (a string if it was not JSON).
    pub body: Value,
    /// Arrival, milliseconds since the Unix epoch.
    pub at_ms: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub ok: u64,
    pub failed: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub apns: Counts,
    pub fcm: Counts,
    pub oauth_tokens: u64,
}

impl Shared {
    /// Applies the fault set for `token` (or `"*"`) to an accepted request; returns the extra delay.
    pub(super) fn apply_fault<T>(&self, token: &str, verdict: Result<T, Refusal>) -> (Result<T, Refusal>, Duration) {
        if verdict.is_err() {
            return (verdict, Duration::ZERO);
        }
        let mut state = self.state.lock();
        if state.faults.is_empty() {
            return (verdict, Duration::ZERO);
        }
        let key = if state.faults.contains_key(token) { token } else { "*" };
        let Some(fault) = state.faults.get_mut(key) else { return (verdict, Duration::ZERO) };
        let delay = Duration::from_millis(fault.delay_ms.unwrap_or(0));
        let refusal = fault.status.filter(|s| *s != 200).map(|status| {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let reason = fault.reason.clone();
            Refusal {
                status,
                fcm_code: reason.clone().or_else(|| default_fcm_code(status).map(str::to_owned)),
                reason: reason.unwrap_or_else(|| default_apns_reason(status).to_owned()),
                field: None,
                retry_after: fault.retry_after_secs,
            }
        });
        let exhausted = fault.times.as_mut().is_some_and(|times| {
            *times = times.saturating_sub(1);
            *times == 0
        });
        if exhausted {
            state.faults.remove(key);
        }
        match refusal {
            Some(refusal) => (Err(refusal), delay),
            None => (verdict, delay),
        }
    }

    pub(super) fn record(
        &self,
        provider: Provider,
        token: &str,
        status: StatusCode,
        version: Version,
        headers: &HeaderMap,
        body: Bytes,
    ) {
        let record =
            Raw { provider, token: token.to_owned(), status, version, headers: headers.clone(), body, at_ms: now_ms() };
        let mut state = self.state.lock();
        let counts = match provider {
            Provider::Apns => &mut state.stats.apns,
            Provider::Fcm => &mut state.stats.fcm,
        };
        if status == StatusCode::OK {
            counts.ok += 1;
        } else {
            counts.failed += 1;
        }
        if self.record_limit > 0 {
            if state.records.len() >= self.record_limit {
                state.records.pop_front();
            }
            state.records.push_back(record);
        }
    }
}

pub(super) async fn add_fault(State(s): State<Arc<Shared>>, Json(fault): Json<Fault>) -> StatusCode {
    if fault.times == Some(0) {
        return StatusCode::NO_CONTENT;
    }
    s.state.lock().faults.insert(fault.token.clone(), fault);
    StatusCode::NO_CONTENT
}

pub(super) async fn list_faults(State(s): State<Arc<Shared>>) -> Json<Vec<Fault>> {
    Json(s.state.lock().faults.values().cloned().collect())
}

pub(super) async fn clear_faults(State(s): State<Arc<Shared>>) -> StatusCode {
    s.state.lock().faults.clear();
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
pub(super) struct RequestFilter {
    token: Option<String>,
    provider: Option<Provider>,
}

pub(super) async fn list_requests(
    State(s): State<Arc<Shared>>,
    Query(filter): Query<RequestFilter>,
) -> Json<Vec<Recorded>> {
    let state = s.state.lock();
    let matches = |r: &&Raw| {
        filter.token.as_ref().is_none_or(|t| *t == r.token) && filter.provider.is_none_or(|p| p == r.provider)
    };
    Json(state.records.iter().filter(matches).map(Raw::recorded).collect())
}

pub(super) async fn clear_requests(State(s): State<Arc<Shared>>) -> StatusCode {
    s.state.lock().records.clear();
    StatusCode::NO_CONTENT
}

pub(super) async fn stats(State(s): State<Arc<Shared>>) -> Json<Stats> {
    Json(s.state.lock().stats)
}

pub(super) async fn clear_stats(State(s): State<Arc<Shared>>) -> StatusCode {
    s.state.lock().stats = Stats::default();
    StatusCode::NO_CONTENT
}
