//! Push delivery to phones: APNS (token auth) and FCM v1 (service account),
//! each to a configurable base URL, with bounded retries. The notifier hands
//! every push here and acts on the [`Outcome`].

pub mod apns;
pub mod devkeys;
pub mod emulator;
pub mod fcm;

use serde::{Deserialize, Serialize};

/// Where a device gets its pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    Apns,
    Fcm,
}

impl Platform {
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Apns => "apns",
            Platform::Fcm => "fcm",
        }
    }
}

/// A registered device (a row of `devices`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub user: String,
    pub platform: Platform,
    pub token: String,
    /// APNS topic (bundle id) or FCM app; `None` = the configured default.
    pub topic: Option<String>,
}

/// One notification for one device.
#[derive(Debug, Clone)]
pub struct Push<'a> {
    pub device: &'a Device,
    pub room: &'a str,
    pub seq: u64,
    /// Client message id of the message.
    pub message_id: &'a str,
    pub from: &'a str,
    /// Preview text (already shortened).
    pub body: &'a str,
    /// The recipient's total unread count.
    pub badge: u32,
}

/// What became of a push after its retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted by the provider.
    Delivered,
    /// The token is unregistered or invalid: delete the device.
    InvalidToken(String),
    /// Rejected for another reason (other 4xx, or the platform is not configured): dropped, counted.
    Dropped(String),
    /// Still failing (429 / 5xx / timeout) when the attempts or the backoff bound ran out.
    Failed(String),
}

impl Outcome {
    /// The `outcome` label of `natter_push_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Delivered => "ok",
            Outcome::InvalidToken(_) => "invalid_token",
            Outcome::Dropped(_) => "dropped",
            Outcome::Failed(_) => "failed",
        }
    }
}

/// What one attempt came to: final, or worth another try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Done(Outcome),
    /// 429, 5xx, a connection error or a timeout; `after` is the provider's Retry-After.
    Retry {
        reason: String,
        after: Option<std::time::Duration>,
    },
}

/// The `Retry-After` header in seconds (the HTTP-date form is ignored).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<std::time::Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(std::time::Duration::from_secs)
}

/// How one push is retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Bound of one attempt (OAuth token included).
    pub timeout: std::time::Duration,
    /// Attempts in all (1 = no retry).
    pub attempts: u32,
    /// First backoff; it doubles per attempt, with jitter.
    pub first_backoff: std::time::Duration,
    /// Longest wait; a longer Retry-After fails the push at once.
    pub max_backoff: std::time::Duration,
}

impl RetryPolicy {
    pub fn from_settings(s: &crate::config::PushSettings) -> Self {
        Self {
            timeout: s.push_timeout,
            attempts: s.push_attempts.max(1),
            first_backoff: std::time::Duration::from_millis(200),
            max_backoff: s.push_max_backoff,
        }
    }

    /// The wait after failed attempt `attempt` (1-based): exponential, capped, half of it random.
    pub fn backoff(&self, attempt: u32) -> std::time::Duration {
        let full = self.first_backoff.saturating_mul(1 << attempt.saturating_sub(1).min(20)).min(self.max_backoff);
        let half = full / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// The configured providers, each optional, and the retry policy: the one
/// thing the notifier calls to deliver a push.
pub struct Pushers {
    apns: Option<apns::ApnsSender>,
    fcm: Option<fcm::FcmSender>,
    policy: RetryPolicy,
}

impl Pushers {
    /// APNS is on when `NATTER_APNS_KEY` is set, FCM when `NATTER_FCM_CREDENTIALS` is.
    pub async fn from_settings(s: &crate::config::PushSettings) -> anyhow::Result<Self> {
        Ok(Self {
            apns: apns::ApnsSender::from_settings(&s.apns, s.push_timeout)?,
            fcm: fcm::FcmSender::from_settings(&s.fcm, s.push_timeout).await?,
            policy: RetryPolicy::from_settings(s),
        })
    }

    pub fn enabled(&self, platform: Platform) -> bool {
        match platform {
            Platform::Apns => self.apns.is_some(),
            Platform::Fcm => self.fcm.is_some(),
        }
    }

    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// Delivers one push with bounded retries (429, 5xx, connection errors and
    /// timeouts), honouring Retry-After.
    pub async fn send(&self, push: &Push<'_>) -> Outcome {
        let platform = push.device.platform;
        if !self.enabled(platform) {
            return Outcome::Dropped(format!("{} not configured", platform.as_str()));
        }
        let RetryPolicy { timeout, attempts, max_backoff, .. } = self.policy;
        let mut attempt = 1;
        loop {
            let result = match tokio::time::timeout(timeout, self.send_once(push)).await {
                Ok(result) => result,
                Err(_) => {
                    Attempt::Retry { reason: format!("{} timed out after {timeout:?}", platform.as_str()), after: None }
                }
            };
            let (reason, after) = match result {
                Attempt::Done(outcome) => return outcome,
                Attempt::Retry { reason, after } => (reason, after),
            };
            if attempt >= attempts {
                return Outcome::Failed(format!("{reason} (attempt {attempt} of {attempts})"));
            }
            let wait = match after {
                Some(after) if after > max_backoff => {
                    return Outcome::Failed(format!("{reason}: Retry-After {after:?} exceeds {max_backoff:?}"));
                }
                Some(after) => after,
                None => self.policy.backoff(attempt),
            };
            tracing::debug!(platform = platform.as_str(), attempt, ?wait, %reason, "push retry");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// One attempt at the device's provider, without retry or time bound.
    pub async fn send_once(&self, push: &Push<'_>) -> Attempt {
        let not_configured =
            || Attempt::Done(Outcome::Dropped(format!("{} not configured", push.device.platform.as_str())));
        match push.device.platform {
            Platform::Apns => match &self.apns {
                Some(apns) => apns.send_once(push).await,
                None => not_configured(),
            },
            Platform::Fcm => match &self.fcm {
                Some(fcm) => fcm.send_once(push).await,
                None => not_configured(),
            },
        }
    }
}

/// The HTTP client both senders start from: rustls, the connect timeout, no
/// redirects (a push POST must not be replayed elsewhere), and HTTP/2 either
/// way: negotiated by ALPN for `https`, with prior knowledge for a cleartext
/// `http` URL (emulators, relays). `setting` names the URL's variable in the
/// error for any other scheme.
fn client_builder(
    url: &url::Url,
    setting: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<reqwest::ClientBuilder> {
    let builder = reqwest::Client::builder()
        .use_rustls_tls()
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none());
    match url.scheme() {
        "http" => Ok(builder.http2_prior_knowledge()),
        "https" => Ok(builder),
        other => anyhow::bail!("{setting}: scheme {other:?} is not http or https"),
    }
}
