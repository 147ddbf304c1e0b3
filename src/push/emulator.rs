//! The push emulator (`natter push-emulator`): APNS over HTTP/2, FCM v1 and its
//! OAuth token endpoint on one port (axum serves HTTP/1.1 and h2c), checking
//! what the real providers check (provider JWT, access token, topic, payload)
//! with the development credentials of [`super::devkeys`]. Tests, the
//! benchmark and `dev up` point NATTER_APNS_URL / NATTER_FCM_URL at it.
//!
//! Control API (JSON): `POST /emulator/faults` (see [`Fault`]), `DELETE
//! /emulator/faults`, `GET|DELETE /emulator/requests` (see [`Recorded`];
//! `?token=` and `?provider=` filter), `GET|DELETE /emulator/stats`.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, Version, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::devkeys::{self, DevCredentials};
use crate::config::parse_duration;

/// Largest APNS payload Apple accepts for an alert.
const APNS_MAX_PAYLOAD: usize = 4096;
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const ACCESS_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Verified provider JWTs and issued access tokens kept before a sweep.
const TOKEN_CACHE: usize = 4096;

#[derive(Debug, Clone, clap::Args)]
pub struct EmulatorSettings {
    /// Listen address (APNS, FCM, OAuth and the control API on one port).
    #[arg(long, env = "NATTER_EMULATOR_LISTEN", default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// Base URL clients use to reach the emulator (the FCM `token_uri` is built
    /// from it); default `http://<listen>`.
    #[arg(long, env = "NATTER_EMULATOR_PUBLIC_URL")]
    pub public_url: Option<url::Url>,
    /// Where the development credentials are generated (or reused), with `push.env`.
    #[arg(long, env = "NATTER_EMULATOR_CREDENTIALS", default_value = ".dev/push")]
    pub credentials_dir: PathBuf,
    /// Simulated provider latency of every push.
    #[arg(long, env = "NATTER_EMULATOR_LATENCY", default_value = "0ms", value_parser = parse_duration)]
    pub latency: Duration,
    /// Recorded push requests kept (the oldest are dropped).
    #[arg(long, env = "NATTER_EMULATOR_RECORD_LIMIT", default_value_t = 100_000)]
    pub record_limit: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Apns,
    Fcm,
}

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

/// One push request as the emulator saw it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recorded {
    pub provider: Provider,
    pub token: String,
    /// The status answered.
    pub status: u16,
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

/// What every handler shares.
struct Shared {
    creds: DevCredentials,
    /// Verifies provider JWTs (APNS `.p8` public key).
    apns_key: DecodingKey,
    /// Verifies OAuth assertions (service-account public key).
    fcm_key: DecodingKey,
    latency: Duration,
    record_limit: usize,
    state: Mutex<EmulatorState>,
}

/// Mutable state behind one lock, held only for map updates (never across an await).
#[derive(Default)]
struct EmulatorState {
    faults: HashMap<String, Fault>,
    records: VecDeque<Recorded>,
    stats: Stats,
    /// Access tokens issued by `/token` → expiry.
    access_tokens: HashMap<String, Instant>,
    /// Provider JWTs already verified → their `iat`, so a JWT is checked once.
    provider_tokens: HashMap<String, u64>,
    messages: u64,
}

/// An error answer.
struct Refusal {
    status: StatusCode,
    /// The APNS `reason`, or the Google error `message`.
    reason: String,
    /// FCM `errorCode` (the `FcmError` detail).
    fcm_code: Option<String>,
    /// FCM `BadRequest` field violation.
    field: Option<String>,
    retry_after: Option<u64>,
}

impl Refusal {
    fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        Self { status, reason: reason.into(), fcm_code: None, field: None, retry_after: None }
    }

    fn fcm(status: StatusCode, code: &str, field: Option<String>, message: impl Into<String>) -> Self {
        Self { fcm_code: Some(code.to_owned()), field, ..Self::new(status, message) }
    }
}

/// Builds and starts emulators.
pub struct Emulator;

impl Emulator {
    /// Binds, generates (or reuses) the credentials for its own URL, and serves until stopped.
    pub async fn start(settings: EmulatorSettings) -> anyhow::Result<RunningEmulator> {
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("NATTER_EMULATOR_LISTEN: binding {}", settings.listen))?;
        let addr = listener.local_addr()?;
        let base = match settings.public_url {
            Some(url) => url,
            None => {
                let ip = if addr.ip().is_unspecified() { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { addr.ip() };
                url::Url::parse(&format!("http://{}", SocketAddr::new(ip, addr.port())))?
            }
        };
        let dir = settings.credentials_dir.clone();
        let creds_base = base.clone();
        let creds = tokio::task::spawn_blocking(move || devkeys::generate(&dir, &creds_base)).await??;
        let shared = Arc::new(Shared {
            apns_key: DecodingKey::from_ec_pem(creds.apns_public_pem.as_bytes())?,
            fcm_key: DecodingKey::from_rsa_pem(creds.fcm_public_pem.as_bytes())?,
            creds,
            latency: settings.latency,
            record_limit: settings.record_limit,
            state: Mutex::default(),
        });
        let app = Router::new()
            .route("/3/device/{token}", post(apns_push))
            .route("/token", post(oauth_token))
            .route("/v1/projects/{project}/messages:send", post(fcm_send))
            .route("/emulator/faults", get(list_faults).post(add_fault).delete(clear_faults))
            .route("/emulator/requests", get(list_requests).delete(clear_requests))
            .route("/emulator/stats", get(stats).delete(clear_stats))
            .with_state(shared.clone());
        let stop = CancellationToken::new();
        let serve = axum::serve(listener, app).with_graceful_shutdown(stop.clone().cancelled_owned());
        let task = tokio::spawn(async move { serve.await });
        Ok(RunningEmulator { addr, base, shared, stop, task: Some(task) })
    }
}

/// A serving emulator; dropping it stops it.
pub struct RunningEmulator {
    pub addr: SocketAddr,
    base: url::Url,
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl RunningEmulator {
    /// What NATTER_APNS_URL and NATTER_FCM_URL should be.
    pub fn base_url(&self) -> &url::Url {
        &self.base
    }

    pub fn credentials(&self) -> &DevCredentials {
        &self.shared.creds
    }

    /// The recorded push requests, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.state.lock().records.iter().cloned().collect()
    }

    pub fn stats(&self) -> Stats {
        self.shared.state.lock().stats
    }

    pub fn add_fault(&self, fault: Fault) {
        self.shared.state.lock().faults.insert(fault.token.clone(), fault);
    }

    pub fn clear_faults(&self) {
        self.shared.state.lock().faults.clear();
    }

    /// Stops serving: open connections get at most 5 s to finish.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        let Some(mut task) = self.task.take() else { return Ok(()) };
        match tokio::time::timeout(Duration::from_secs(5), &mut task).await {
            Ok(result) => Ok(result??),
            Err(_) => {
                task.abort();
                Ok(())
            }
        }
    }
}

impl Drop for RunningEmulator {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// `natter push-emulator`: serves until `stop`.
pub async fn run(settings: EmulatorSettings, stop: CancellationToken) -> anyhow::Result<()> {
    let emulator = Emulator::start(settings).await?;
    let creds = emulator.credentials();
    println!(
        "push emulator on {} (APNS HTTP/2, FCM v1, OAuth); credentials in {}, settings in {}",
        emulator.base_url().as_str().trim_end_matches('/'),
        creds.dir.display(),
        creds.env_file.display()
    );
    stop.cancelled().await;
    emulator.stop().await
}

// ---- APNS ------------------------------------------------------------------

async fn apns_push(
    State(s): State<Arc<Shared>>,
    Path(token): Path<String>,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let verdict = s.check_apns(version, &headers, &token, &body);
    let (verdict, delay) = s.apply_fault(&token, verdict);
    s.wait(delay).await;
    let status = verdict.as_ref().map_or_else(|r| r.status, |()| StatusCode::OK);
    s.record(Provider::Apns, &token, status, &headers, &body);
    let apns_id = match headers.get("apns-id") {
        Some(id) => id.clone(),
        None => HeaderValue::try_from(uuid::Uuid::new_v4().to_string()).expect("a uuid is a header value"),
    };
    let mut response = match verdict {
        Ok(()) => StatusCode::OK.into_response(),
        Err(refusal) => {
            let mut body = json!({ "reason": refusal.reason });
            if refusal.status == StatusCode::GONE {
                body["timestamp"] = now_ms().into();
            }
            with_retry_after((refusal.status, Json(body)).into_response(), refusal.retry_after)
        }
    };
    response.headers_mut().insert("apns-id", apns_id);
    response
}

impl Shared {
    /// What Apple would say about this request before delivering it.
    fn check_apns(&self, version: Version, headers: &HeaderMap, token: &str, body: &[u8]) -> Result<(), Refusal> {
        let bad = |reason: &str| Err(Refusal::new(StatusCode::BAD_REQUEST, reason));
        if version != Version::HTTP_2 {
            return bad("Http2Required");
        }
        self.check_provider_token(headers)?;
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let Some(_topic) = header("apns-topic") else { return bad("MissingTopic") };
        const PUSH_TYPES: [&str; 10] = [
            "alert",
            "background",
            "location",
            "voip",
            "complication",
            "fileprovider",
            "mdm",
            "liveactivity",
            "pushtotalk",
            "widgets",
        ];
        if header("apns-push-type").is_some_and(|t| !PUSH_TYPES.contains(&t)) {
            return bad("InvalidPushType");
        }
        if header("apns-priority").is_some_and(|p| !matches!(p, "1" | "5" | "10")) {
            return bad("BadPriority");
        }
        if header("apns-collapse-id").is_some_and(|c| c.len() > 64) {
            return bad("BadCollapseId");
        }
        if header("apns-expiration").is_some_and(|e| e.parse::<u64>().is_err()) {
            return bad("BadExpirationDate");
        }
        if header("apns-id").is_some_and(|id| uuid::Uuid::parse_str(id).is_err()) {
            return bad("BadMessageId");
        }
        if token.is_empty() || token.len() > 200 || !token.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return bad("BadDeviceToken");
        }
        if body.is_empty() {
            return bad("PayloadEmpty");
        }
        if body.len() > APNS_MAX_PAYLOAD {
            return Err(Refusal::new(StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge"));
        }
        match serde_json::from_slice::<Value>(body) {
            Ok(v) if v["aps"].is_object() => Ok(()),
            _ => bad("BadPayload"),
        }
    }

    /// `authorization: bearer <ES256 JWT>` with our `kid`, `iss` = team id and an `iat` under an hour old.
    fn check_provider_token(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let forbidden = |reason: &str| Err(Refusal::new(StatusCode::FORBIDDEN, reason));
        let Some(auth) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
            return forbidden("MissingProviderToken");
        };
        let Some(jwt) = auth.get(..7).filter(|s| s.eq_ignore_ascii_case("bearer ")).map(|_| &auth[7..]) else {
            return forbidden("MissingProviderToken");
        };
        let cached = self.state.lock().provider_tokens.get(jwt).copied();
        let iat = match cached {
            Some(iat) => iat,
            None => {
                let Some(iat) = self.verify_provider_token(jwt) else { return forbidden("InvalidProviderToken") };
                let mut state = self.state.lock();
                if state.provider_tokens.len() >= TOKEN_CACHE {
                    state.provider_tokens.clear();
                }
                state.provider_tokens.insert(jwt.to_owned(), iat);
                iat
            }
        };
        let now = now_ms() / 1000;
        if iat > now + 60 {
            return forbidden("InvalidProviderToken");
        }
        if now.saturating_sub(iat) > 3600 {
            return forbidden("ExpiredProviderToken");
        }
        Ok(())
    }

    /// The `iat` of a provider JWT whose signature, `kid` and `iss` check out.
    fn verify_provider_token(&self, jwt: &str) -> Option<u64> {
        #[derive(Deserialize)]
        struct Claims {
            iat: u64,
        }
        let header = jsonwebtoken::decode_header(jwt).ok()?;
        if header.kid.as_deref() != Some(self.creds.apns_key_id.as_str()) {
            return None;
        }
        let mut validation = Validation::new(Algorithm::ES256);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.set_issuer(&[&self.creds.apns_team_id]);
        validation.set_required_spec_claims(&["iss"]);
        jsonwebtoken::decode::<Claims>(jwt, &self.apns_key, &validation).ok().map(|t| t.claims.iat)
    }
}

// ---- FCM -------------------------------------------------------------------

async fn oauth_token(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let invalid = |description: &str| {
        let body = json!({ "error": "invalid_grant", "error_description": description });
        (StatusCode::BAD_REQUEST, Json(body)).into_response()
    };
    if form.get("grant_type").map(String::as_str) != Some(JWT_BEARER) {
        return invalid("grant_type must be urn:ietf:params:oauth:grant-type:jwt-bearer");
    }
    let Some(assertion) = form.get("assertion") else { return invalid("no assertion") };
    #[derive(Deserialize)]
    struct Claims {
        #[serde(default)]
        scope: String,
    }
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[&s.creds.fcm_token_uri]);
    validation.set_issuer(&[&s.creds.fcm_client_email]);
    validation.set_required_spec_claims(&["exp", "iat", "aud", "iss"]);
    // yup-oauth2 pads its base64url segments (Google accepts that); jsonwebtoken does not.
    let assertion: Vec<&str> = assertion.split('.').map(|part| part.trim_end_matches('=')).collect();
    let claims = match jsonwebtoken::decode::<Claims>(assertion.join("."), &s.fcm_key, &validation) {
        Ok(t) => t.claims,
        Err(e) => return invalid(&format!("Invalid JWT: {e}")),
    };
    if !claims.scope.split(' ').any(|sc| sc == super::fcm::SCOPE) {
        return invalid("scope must include https://www.googleapis.com/auth/firebase.messaging");
    }
    let token = format!("ya29.dev-{}", uuid::Uuid::new_v4().simple());
    {
        let mut state = s.state.lock();
        if state.access_tokens.len() >= TOKEN_CACHE {
            let now = Instant::now();
            state.access_tokens.retain(|_, expiry| *expiry > now);
        }
        state.access_tokens.insert(token.clone(), Instant::now() + ACCESS_TOKEN_TTL);
        state.stats.oauth_tokens += 1;
    }
    Json(json!({ "access_token": token, "expires_in": ACCESS_TOKEN_TTL.as_secs(), "token_type": "Bearer" }))
        .into_response()
}

async fn fcm_send(
    State(s): State<Arc<Shared>>,
    Path(project): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let parsed = serde_json::from_slice::<Value>(&body).ok();
    let token = parsed.as_ref().and_then(|b| b["message"]["token"].as_str()).unwrap_or_default().to_owned();
    let verdict = s.check_fcm(&project, &headers, parsed.as_ref());
    let (verdict, delay) = s.apply_fault(&token, verdict);
    s.wait(delay).await;
    let status = verdict.as_ref().map_or_else(|r| r.status, |_| StatusCode::OK);
    s.record(Provider::Fcm, &token, status, &headers, &body);
    match verdict {
        Ok(n) => Json(json!({ "name": format!("projects/{project}/messages/{n}") })).into_response(),
        Err(refusal) => {
            let code = refusal.status.as_u16();
            let mut details = Vec::new();
            if let Some(error_code) = &refusal.fcm_code {
                details.push(json!({
                    "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                    "errorCode": error_code,
                }));
            }
            if let Some(field) = &refusal.field {
                details.push(json!({
                    "@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [{ "field": field, "description": refusal.reason }],
                }));
            }
            let error = json!({
                "code": code,
                "message": refusal.reason,
                "status": google_status(code),
                "details": details,
            });
            with_retry_after((refusal.status, Json(json!({ "error": error }))).into_response(), refusal.retry_after)
        }
    }
}

/// Google's canonical status name of an HTTP status.
fn google_status(code: u16) -> &'static str {
    match code {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        500 => "INTERNAL",
        503 => "UNAVAILABLE",
        _ => "UNKNOWN",
    }
}

/// FCM's `errorCode` for a status, when a fault names none.
fn default_fcm_code(status: StatusCode) -> Option<&'static str> {
    match status.as_u16() {
        400 => Some("INVALID_ARGUMENT"),
        401 => None,
        403 => Some("SENDER_ID_MISMATCH"),
        404 => Some("UNREGISTERED"),
        429 => Some("QUOTA_EXCEEDED"),
        503 => Some("UNAVAILABLE"),
        _ => Some("INTERNAL"),
    }
}

impl Shared {
    /// What FCM would say before delivering; `Ok` carries the message number.
    fn check_fcm(&self, project: &str, headers: &HeaderMap, body: Option<&Value>) -> Result<u64, Refusal> {
        let bearer =
            headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        let authorized = bearer.is_some_and(|t| {
            let state = self.state.lock();
            state.access_tokens.get(t).is_some_and(|expiry| *expiry > Instant::now())
        });
        if !authorized {
            let message = "Request had invalid authentication credentials. Expected OAuth 2 access token.";
            return Err(Refusal::new(StatusCode::UNAUTHORIZED, message));
        }
        if project != self.creds.fcm_project {
            let message =
                format!("Permission 'cloudmessaging.messages.create' denied on resource 'projects/{project}'");
            return Err(Refusal::fcm(StatusCode::FORBIDDEN, "SENDER_ID_MISMATCH", None, message));
        }
        let invalid = |message: &str| Err(Refusal::new(StatusCode::BAD_REQUEST, message));
        let Some(message) = body.and_then(|b| b.get("message")).and_then(Value::as_object) else {
            return invalid("Invalid JSON payload received. Expected a \"message\" object.");
        };
        const FIELDS: [&str; 10] = [
            "name",
            "data",
            "notification",
            "android",
            "webpush",
            "apns",
            "fcm_options",
            "token",
            "topic",
            "condition",
        ];
        if let Some(unknown) = message.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return invalid(&format!("Invalid JSON payload received. Unknown name \"{unknown}\" at 'message'"));
        }
        let token = message.get("token").and_then(Value::as_str).unwrap_or_default();
        let token_ok = !token.is_empty()
            && token.len() <= 4096
            && token.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'));
        if !token_ok {
            let message = "The registration token is not a valid FCM registration token";
            return Err(Refusal::fcm(
                StatusCode::BAD_REQUEST,
                "INVALID_ARGUMENT",
                Some("message.token".into()),
                message,
            ));
        }
        if let Some(data) = message.get("data").and_then(Value::as_object)
            && let Some((key, _)) = data.iter().find(|(_, v)| !v.is_string())
        {
            let field = format!("message.data[{key}]");
            let message = format!("Invalid value at '{field}': data values must be strings");
            return Err(Refusal::fcm(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", Some(field), message));
        }
        let mut state = self.state.lock();
        state.messages += 1;
        Ok(state.messages)
    }
}

// ---- faults, recording, control API ----------------------------------------

impl Shared {
    /// Applies the fault set for `token` (or `"*"`) to an accepted request; returns the extra delay.
    fn apply_fault<T>(&self, token: &str, verdict: Result<T, Refusal>) -> (Result<T, Refusal>, Duration) {
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

    async fn wait(&self, extra: Duration) {
        let delay = self.latency + extra;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }

    fn record(&self, provider: Provider, token: &str, status: StatusCode, headers: &HeaderMap, body: &[u8]) {
        let headers = headers
            .iter()
            .map(|(name, value)| (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
            .collect();
        let body = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(_) if body.is_empty() => Value::Null,
            Err(_) => Value::String(String::from_utf8_lossy(body).into_owned()),
        };
        let record =
            Recorded { provider, token: token.to_owned(), status: status.as_u16(), headers, body, at_ms: now_ms() };
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

/// Apple's reason for a status, when a fault names none.
fn default_apns_reason(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "BadTopic",
        403 => "Forbidden",
        404 => "BadPath",
        405 => "MethodNotAllowed",
        410 => "Unregistered",
        413 => "PayloadTooLarge",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        _ => "InternalServerError",
    }
}

fn with_retry_after(mut response: Response, secs: Option<u64>) -> Response {
    if let Some(secs) = secs {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

async fn add_fault(State(s): State<Arc<Shared>>, Json(fault): Json<Fault>) -> StatusCode {
    if fault.times == Some(0) {
        return StatusCode::NO_CONTENT;
    }
    s.state.lock().faults.insert(fault.token.clone(), fault);
    StatusCode::NO_CONTENT
}

async fn list_faults(State(s): State<Arc<Shared>>) -> Json<Vec<Fault>> {
    Json(s.state.lock().faults.values().cloned().collect())
}

async fn clear_faults(State(s): State<Arc<Shared>>) -> StatusCode {
    s.state.lock().faults.clear();
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct RequestFilter {
    token: Option<String>,
    provider: Option<Provider>,
}

async fn list_requests(State(s): State<Arc<Shared>>, Query(filter): Query<RequestFilter>) -> Json<Vec<Recorded>> {
    let state = s.state.lock();
    let matches = |r: &&Recorded| {
        filter.token.as_ref().is_none_or(|t| *t == r.token) && filter.provider.is_none_or(|p| p == r.provider)
    };
    Json(state.records.iter().filter(matches).cloned().collect())
}

async fn clear_requests(State(s): State<Arc<Shared>>) -> StatusCode {
    s.state.lock().records.clear();
    StatusCode::NO_CONTENT
}

async fn stats(State(s): State<Arc<Shared>>) -> Json<Stats> {
    Json(s.state.lock().stats)
}

async fn clear_stats(State(s): State<Arc<Shared>>) -> StatusCode {
    s.state.lock().stats = Stats::default();
    StatusCode::NO_CONTENT
}
