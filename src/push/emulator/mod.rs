//! The push emulator (`natter push-emulator`): APNS over HTTP/2, FCM v1 and its
//! OAuth token endpoint on one port (axum serves HTTP/1.1 and h2c), checking
//! what the real providers check (provider JWT, access token, topic, payload)
//! with the development credentials of [`super::devkeys`]. Tests, the
//! benchmark and `dev up` point NATTER_APNS_URL / NATTER_FCM_URL at it.
//!
//! Control API (JSON): `POST /emulator/faults` (see [`Fault`]), `DELETE
//! /emulator/faults`, `GET|DELETE /emulator/requests` (see [`Recorded`];
//! `?token=` and `?provider=` filter), `GET|DELETE /emulator/stats`.
//!
//! Layout: this module holds the settings, [`Emulator`] / [`RunningEmulator`],
//! the state every handler shares and the router; `apns` checks and answers
//! APNS pushes, `fcm` the OAuth token endpoint and FCM v1 sends, `control` the
//! fault injection, recording and stats behind `/emulator/*`.

mod apns;
mod control;
mod fcm;

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use axum::{
    Router,
    http::{HeaderValue, StatusCode, header},
    response::Response,
    routing::{get, post},
};
use jsonwebtoken::DecodingKey;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub use control::{Counts, Fault, Recorded, Stats};

use super::devkeys::{self, DevCredentials};
use crate::config::parse_duration;

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
    records: VecDeque<control::Raw>,
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
            .route("/3/device/{token}", post(apns::apns_push))
            .route("/token", post(fcm::oauth_token))
            .route("/v1/projects/{project}/messages:send", post(fcm::fcm_send))
            .route("/emulator/faults", get(control::list_faults).post(control::add_fault).delete(control::clear_faults))
            .route("/emulator/requests", get(control::list_requests).delete(control::clear_requests))
            .route("/emulator/stats", get(control::stats).delete(control::clear_stats))
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
        self.shared.state.lock().records.iter().map(control::Raw::recorded).collect()
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

impl Shared {
    async fn wait(&self, extra: Duration) {
        let delay = self.latency + extra;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
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
