//! `POST /v1/dev/token` (only with `--dev`): mints a token for any user with
//! the gateway's own HS256 secret, so that the web client can sign in without
//! an identity provider. Anyone who can reach it can be anyone: development
//! only, 404 otherwise.

use std::time::Duration;

use axum::{Json, extract::State};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use crate::{
    auth::Signer,
    config::{GatewaySettings, JwtAlg},
    error::ApiError,
    ids::UserId,
};

/// Lifetime of a dev token.
const TTL: Duration = Duration::from_secs(12 * 3600);

/// The signer for dev tokens: `Some` only with `--dev` and an HS256 secret.
/// Warns loudly when dev mode is on.
pub fn signer(settings: &GatewaySettings) -> Option<Signer> {
    if !settings.dev {
        return None;
    }
    match (&settings.jwt.jwt_alg, &settings.jwt.jwt_secret) {
        (JwtAlg::Hs256, Some(secret)) => {
            tracing::warn!(
                "DEV MODE (--dev / NATTER_DEV): POST /v1/dev/token gives anyone a token for any user. \
                 Never run this in production."
            );
            Some(Signer::hs256(secret.expose()))
        }
        _ => {
            tracing::warn!("--dev is on but NATTER_JWT_ALG is not HS256 with a secret: /v1/dev/token stays off");
            None
        }
    }
}

#[derive(Deserialize)]
struct DevTokenBody {
    user: String,
}

/// `POST /v1/dev/token {"user":"alice"}` → `{"token","user","expires_in"}` (seconds).
pub async fn token(State(state): State<AppState>, body: Bytes) -> Result<Json<serde_json::Value>, ApiError> {
    let Some(signer) = state.dev_signer.as_deref() else {
        return Err(ApiError::not_found("no such endpoint (dev mode is off)"));
    };
    let req: DevTokenBody =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    let user = UserId::parse(&req.user)?;
    let token = signer
        .mint(user.as_str(), TTL, Some(user.to_string()))
        .map_err(|e| ApiError::internal("minting a dev token", e))?;
    Ok(Json(json!({"token": token, "user": user, "expires_in": TTL.as_secs()})))
}
