//! FCM v1: the OAuth 2 token endpoint (`POST /token`, service-account JWT
//! bearer grant) and `POST /v1/projects/{project}/messages:send`, with what
//! Google checks (access token, project, message fields, registration token,
//! string data) and Google's error shapes (`FcmError`, `BadRequest`).

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, Version, header},
    response::{IntoResponse, Response},
};
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Provider, Refusal, Shared, TOKEN_CACHE, with_retry_after};

const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const ACCESS_TOKEN_TTL: Duration = Duration::from_secs(3600);

pub(super) async fn oauth_token(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
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
    if !claims.scope.split(' ').any(|sc| sc == crate::push::fcm::SCOPE) {
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

pub(super) async fn fcm_send(
    State(s): State<Arc<Shared>>,
    Path(project): Path<String>,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let parsed = serde_json::from_slice::<Value>(&body).ok();
    let token = parsed.as_ref().and_then(|b| b["message"]["token"].as_str()).unwrap_or_default().to_owned();
    let verdict = s.check_fcm(&project, &headers, parsed.as_ref());
    let (verdict, delay) = s.apply_fault(&token, verdict);
    s.wait(delay).await;
    let status = verdict.as_ref().map_or_else(|r| r.status, |_| StatusCode::OK);
    s.record(Provider::Fcm, &token, status, version, &headers, body.clone());
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
pub(super) fn default_fcm_code(status: StatusCode) -> Option<&'static str> {
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
