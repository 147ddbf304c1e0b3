//! APNS (`POST /3/device/{token}`, HTTP/2 only): what Apple checks before
//! delivering — provider JWT (ES256, our `kid`, `iss` = team id, fresh `iat`),
//! topic, push type, priority, collapse id, expiration, `apns-id`, device token
//! and payload — and Apple's answer shapes.

use std::sync::Arc;

use axum::{
    Json,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, Version, header},
    response::{IntoResponse, Response},
};
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Provider, Refusal, Shared, TOKEN_CACHE, now_ms, with_retry_after};

/// Largest APNS payload Apple accepts for an alert.
const APNS_MAX_PAYLOAD: usize = 4096;

pub(super) async fn apns_push(
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
    s.record(Provider::Apns, &token, status, version, &headers, body.clone());
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

/// Apple's reason for a status, when a fault names none.
pub(super) fn default_apns_reason(status: StatusCode) -> &'static str {
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
