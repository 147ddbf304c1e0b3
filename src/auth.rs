//! JWT checking and minting. The algorithm is pinned by configuration: a token
//! signed with any other one (including `alg: none`) is refused.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::{
    config::{JwtAlg, JwtSettings},
    ids::UserId,
};

/// The claims natter reads. `sub` is the user id; `exp` is required.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A verified token: who, and until when.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: UserId,
    pub exp: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

fn algorithm(alg: JwtAlg) -> Algorithm {
    match alg {
        JwtAlg::Hs256 => Algorithm::HS256,
        JwtAlg::Rs256 => Algorithm::RS256,
        JwtAlg::Es256 => Algorithm::ES256,
        JwtAlg::EdDsa => Algorithm::EdDSA,
    }
}

/// Checks tokens against the one configured key and algorithm.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn from_settings(s: &JwtSettings) -> anyhow::Result<Self> {
        let key = match s.jwt_alg {
            JwtAlg::Hs256 => {
                let secret =
                    s.jwt_secret.as_ref().context("NATTER_JWT_SECRET is required with NATTER_JWT_ALG=HS256")?;
                if secret.expose().len() < 16 {
                    bail!("NATTER_JWT_SECRET must be at least 16 bytes");
                }
                DecodingKey::from_secret(secret.expose().as_bytes())
            }
            alg => {
                let path = s
                    .jwt_public_key
                    .as_ref()
                    .context("NATTER_JWT_PUBLIC_KEY (a PEM file) is required with an asymmetric NATTER_JWT_ALG")?;
                let pem = std::fs::read(path)
                    .with_context(|| format!("NATTER_JWT_PUBLIC_KEY: cannot read {}", path.display()))?;
                let key = match alg {
                    JwtAlg::Rs256 => DecodingKey::from_rsa_pem(&pem),
                    JwtAlg::Es256 => DecodingKey::from_ec_pem(&pem),
                    _ => DecodingKey::from_ed_pem(&pem),
                };
                key.with_context(|| format!("NATTER_JWT_PUBLIC_KEY: {} is not a usable PEM key", path.display()))?
            }
        };
        let mut validation = Validation::new(algorithm(s.jwt_alg));
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        validation.validate_aud = false;
        Ok(Self { key, validation })
    }

    /// Verifies signature, algorithm and expiry, and that `sub` is a valid user id.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            other => AuthError::Invalid(format!("{other:?}")),
        })?;
        let user = UserId::parse(&data.claims.sub).map_err(|e| AuthError::Invalid(e.to_string()))?;
        Ok(Identity { user, exp: data.claims.exp })
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// Mints tokens (the `token` subcommand, tests and the load generator).
pub struct Signer {
    key: EncodingKey,
    header: Header,
}

impl Signer {
    pub fn hs256(secret: &str) -> Self {
        Self { key: EncodingKey::from_secret(secret.as_bytes()), header: Header::new(Algorithm::HS256) }
    }

    pub fn from_settings(s: &JwtSettings, private_key: Option<&std::path::Path>) -> anyhow::Result<Self> {
        if s.jwt_alg == JwtAlg::Hs256 {
            let secret = s.jwt_secret.as_ref().context("NATTER_JWT_SECRET is required with NATTER_JWT_ALG=HS256")?;
            return Ok(Self::hs256(secret.expose()));
        }
        let path = private_key.context("NATTER_JWT_PRIVATE_KEY (a PEM file) is required to mint asymmetric tokens")?;
        let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let key = match s.jwt_alg {
            JwtAlg::Rs256 => EncodingKey::from_rsa_pem(&pem),
            JwtAlg::Es256 => EncodingKey::from_ec_pem(&pem),
            _ => EncodingKey::from_ed_pem(&pem),
        }
        .with_context(|| format!("{} is not a usable PEM private key", path.display()))?;
        Ok(Self { key, header: Header::new(algorithm(s.jwt_alg)) })
    }

    pub fn mint(&self, user: &str, ttl: Duration, name: Option<String>) -> anyhow::Result<String> {
        let claims = Claims { sub: user.to_owned(), exp: unix_now() + ttl.as_secs(), name };
        Ok(jsonwebtoken::encode(&self.header, &claims, &self.key)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    const SECRET: &str = "0123456789abcdef-test-secret";

    fn verifier() -> Verifier {
        Verifier::from_settings(&JwtSettings {
            jwt_alg: JwtAlg::Hs256,
            jwt_secret: Some(Secret::new(SECRET)),
            jwt_public_key: None,
        })
        .unwrap()
    }

    #[test]
    fn round_trip() {
        let t = Signer::hs256(SECRET).mint("alice", Duration::from_secs(60), None).unwrap();
        assert_eq!(verifier().verify(&t).unwrap().user.as_str(), "alice");
    }

    #[test]
    fn refuses_expired_wrong_key_none_and_bad_sub() {
        let v = verifier();
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims { sub: "alice".into(), exp: unix_now() - 120, name: None },
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(matches!(v.verify(&expired), Err(AuthError::Expired)));

        let other = Signer::hs256("another-secret-of-16+").mint("alice", Duration::from_secs(60), None).unwrap();
        assert!(matches!(v.verify(&other), Err(AuthError::Invalid(_))));

        // alg:none — header and claims, empty signature.
        use base64::Engine as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let none = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(format!(r#"{{"sub":"alice","exp":{}}}"#, unix_now() + 60).as_bytes())
        );
        assert!(v.verify(&none).is_err());

        let bad_sub = Signer::hs256(SECRET).mint("a.b", Duration::from_secs(60), None).unwrap();
        assert!(v.verify(&bad_sub).is_err());
    }
}
