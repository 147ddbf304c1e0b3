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
#[derive(Clone)]
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

    /// A fresh key pair for `alg` as PEM files: (dir, private, public). None
    /// for EdDSA when `openssl` is missing (no crate here writes Ed25519 PEM).
    fn key_pair(alg: JwtAlg) -> Option<(tempfile::TempDir, std::path::PathBuf, std::path::PathBuf)> {
        use p256::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _, LineEnding};
        let dir = tempfile::tempdir().unwrap();
        let (private, public) = (dir.path().join("private.pem"), dir.path().join("public.pem"));
        match alg {
            JwtAlg::Rs256 => {
                let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).unwrap();
                std::fs::write(&private, key.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes()).unwrap();
                std::fs::write(&public, key.to_public_key().to_public_key_pem(LineEnding::LF).unwrap()).unwrap();
            }
            JwtAlg::Es256 => {
                let key = p256::SecretKey::random(&mut rand_core::OsRng);
                std::fs::write(&private, key.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes()).unwrap();
                std::fs::write(&public, key.public_key().to_public_key_pem(LineEnding::LF).unwrap()).unwrap();
            }
            JwtAlg::EdDsa => {
                let run = |args: &[&std::ffi::OsStr]| {
                    std::process::Command::new("openssl").args(args).output().ok().filter(|o| o.status.success())
                };
                run(&[
                    "genpkey".as_ref(),
                    "-algorithm".as_ref(),
                    "ed25519".as_ref(),
                    "-out".as_ref(),
                    private.as_ref(),
                ])?;
                run(&[
                    "pkey".as_ref(),
                    "-in".as_ref(),
                    private.as_ref(),
                    "-pubout".as_ref(),
                    "-out".as_ref(),
                    public.as_ref(),
                ])
                .expect("openssl pkey -pubout");
            }
            JwtAlg::Hs256 => unreachable!("symmetric"),
        }
        Some((dir, private, public))
    }

    fn settings(alg: JwtAlg, public: Option<&std::path::Path>) -> JwtSettings {
        JwtSettings { jwt_alg: alg, jwt_secret: Some(Secret::new(SECRET)), jwt_public_key: public.map(Into::into) }
    }

    #[test]
    fn asymmetric_algorithms_accept_only_their_own_key_and_algorithm() {
        let ttl = Duration::from_secs(60);
        let mut pairs = Vec::new();
        for alg in [JwtAlg::Rs256, JwtAlg::Es256, JwtAlg::EdDsa] {
            match key_pair(alg) {
                Some(p) => pairs.push((alg, p)),
                None => eprintln!("openssl missing: {alg:?} not tested"),
            }
        }
        for (alg, (_dir, private, public)) in &pairs {
            let (alg, v) = (*alg, Verifier::from_settings(&settings(*alg, Some(public))).unwrap());
            let signer = Signer::from_settings(&settings(alg, None), Some(private)).unwrap();
            let good = signer.mint("alice", ttl, None).unwrap();
            assert_eq!(v.verify(&good).unwrap().user.as_str(), "alice", "{alg:?}");

            // Same algorithm, another key.
            let (_d2, other_private, _) = key_pair(alg).unwrap();
            let other = Signer::from_settings(&settings(alg, None), Some(&other_private)).unwrap();
            assert!(
                matches!(v.verify(&other.mint("alice", ttl, None).unwrap()), Err(AuthError::Invalid(_))),
                "{alg:?}"
            );

            // Algorithm confusion: HS256 keyed with the public key's PEM (and DER-ish variants).
            let pem = std::fs::read_to_string(public).unwrap();
            for secret in [pem.as_str(), pem.trim_end()] {
                let forged = Signer::hs256(secret).mint("alice", ttl, None).unwrap();
                assert!(matches!(v.verify(&forged), Err(AuthError::Invalid(_))), "{alg:?}: HS256 with public key");
            }
            // The HS256 secret in the settings is not a way in either.
            let hs = Signer::hs256(SECRET).mint("alice", ttl, None).unwrap();
            assert!(matches!(v.verify(&hs), Err(AuthError::Invalid(_))), "{alg:?}: HS256 with the configured secret");

            // Another asymmetric algorithm's token.
            for (other_alg, (_, other_private, _)) in &pairs {
                if *other_alg != alg {
                    let t = Signer::from_settings(&settings(*other_alg, None), Some(other_private))
                        .unwrap()
                        .mint("alice", ttl, None)
                        .unwrap();
                    assert!(matches!(v.verify(&t), Err(AuthError::Invalid(_))), "{alg:?} took {other_alg:?}");
                }
            }

            // Expired beyond the leeway.
            let key = std::fs::read(private).unwrap();
            let key = match alg {
                JwtAlg::Rs256 => EncodingKey::from_rsa_pem(&key),
                JwtAlg::Es256 => EncodingKey::from_ec_pem(&key),
                _ => EncodingKey::from_ed_pem(&key),
            }
            .unwrap();
            let claims = Claims { sub: "alice".into(), exp: unix_now() - 120, name: None };
            let expired = jsonwebtoken::encode(&Header::new(algorithm(alg)), &claims, &key).unwrap();
            assert!(matches!(v.verify(&expired), Err(AuthError::Expired)), "{alg:?}");

            // And the HS256 verifier does not take the asymmetric token.
            assert!(verifier().verify(&good).is_err(), "{alg:?}");
        }
    }

    #[test]
    fn misconfigured_keys_are_refused_at_start() {
        let short =
            JwtSettings { jwt_alg: JwtAlg::Hs256, jwt_secret: Some(Secret::new("short")), jwt_public_key: None };
        assert!(Verifier::from_settings(&short).is_err());
        let none = JwtSettings { jwt_alg: JwtAlg::Hs256, jwt_secret: None, jwt_public_key: None };
        assert!(Verifier::from_settings(&none).is_err());
        assert!(Verifier::from_settings(&settings(JwtAlg::Rs256, None)).is_err(), "no public key");
        let missing = std::path::Path::new("/nonexistent/natter-public.pem");
        assert!(Verifier::from_settings(&settings(JwtAlg::Es256, Some(missing))).is_err());
        // An EC key where an RSA one is configured (and the reverse).
        let (_d1, _, ec_public) = key_pair(JwtAlg::Es256).unwrap();
        assert!(Verifier::from_settings(&settings(JwtAlg::Rs256, Some(&ec_public))).is_err());
        let (_d2, _, rsa_public) = key_pair(JwtAlg::Rs256).unwrap();
        assert!(Verifier::from_settings(&settings(JwtAlg::Es256, Some(&rsa_public))).is_err());
        let junk = _d1.path().join("junk.pem");
        std::fs::write(&junk, "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n").unwrap();
        assert!(Verifier::from_settings(&settings(JwtAlg::EdDsa, Some(&junk))).is_err());
    }

    mod props {
        use super::*;
        use base64::Engine as _;
        use proptest::prelude::*;
        use serde_json::{Value, json};

        fn b64(b: &[u8]) -> String {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
        }

        /// `header.claims.signature`, base64url without padding.
        fn compact(header: &Value, claims: &Value, sig: &[u8]) -> String {
            format!("{}.{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()), b64(sig))
        }

        fn header() -> impl Strategy<Value = Value> {
            let alg = prop_oneof![
                prop::sample::select(vec!["HS256", "HS384", "HS512", "RS256", "ES256", "EdDSA", "none", "None", ""])
                    .prop_map(Value::from),
                any::<String>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                Just(Value::Null),
            ];
            (alg, prop::option::of(any::<String>())).prop_map(|(alg, kid)| {
                let mut h = json!({"alg": alg, "typ": "JWT"});
                if let Some(k) = kid {
                    h["kid"] = json!(k);
                }
                h
            })
        }

        fn claims() -> impl Strategy<Value = Value> {
            let sub = prop_oneof![Just(json!("alice")), any::<String>().prop_map(Value::from), Just(Value::Null)];
            let exp = prop_oneof![
                Just(json!(unix_now() + 3600)),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                any::<String>().prop_map(Value::from),
            ];
            (sub, exp).prop_map(|(sub, exp)| json!({"sub": sub, "exp": exp}))
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

            /// Junk and forged tokens are refused, never a panic.
            #[test]
            fn verify_refuses_junk_without_panicking(
                token in prop_oneof![
                    any::<String>(),
                    "[A-Za-z0-9_=.-]{0,300}",
                    (header(), claims(), prop::collection::vec(any::<u8>(), 0..80))
                        .prop_map(|(h, c, sig)| compact(&h, &c, &sig)),
                    (header(), claims()).prop_map(|(h, c)| compact(&h, &c, &[])),
                ],
            ) {
                prop_assert!(verifier().verify(&token).is_err(), "{:?} was accepted", token);
            }

            /// A correctly signed token verifies iff its `sub` is a valid user id.
            #[test]
            fn a_signed_token_names_a_valid_user_or_is_refused(
                sub in prop_oneof!["[A-Za-z0-9_-]{1,64}", any::<String>()],
            ) {
                let t = Signer::hs256(SECRET).mint(&sub, Duration::from_secs(60), None).unwrap();
                match verifier().verify(&t) {
                    Ok(id) => prop_assert_eq!(id.user.as_str(), sub.as_str()),
                    Err(_) => prop_assert!(UserId::parse(&sub).is_err(), "{:?} refused", sub),
                }
            }
        }
    }
}
