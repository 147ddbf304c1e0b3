//! The configured JWT algorithm and key are the only way in, end to end: keys
//! are made at test time (none are kept in the repository), the gateway gets
//! the public one, and tokens signed any other way close 4001.

use std::{path::PathBuf, process::Command, time::Duration};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use natter::{
    auth::{Claims, Signer},
    config::{JwtAlg, JwtSettings},
};
use serde_json::{Value, json};

use crate::helpers::*;

/// A key pair as PEM files (PKCS#8 private, SPKI public), deleted on drop.
struct KeyPair {
    _dir: tempfile::TempDir,
    private: PathBuf,
    public: PathBuf,
}

impl KeyPair {
    /// None only for EdDSA without `openssl`: no crate among the dependencies
    /// writes an Ed25519 PEM (ed25519-dalek is only in the lock file).
    fn new(alg: JwtAlg) -> Option<Self> {
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
                let generated = Command::new("openssl")
                    .arg("genpkey")
                    .args(["-algorithm", "ed25519", "-out"])
                    .arg(&private)
                    .output();
                match generated {
                    Ok(o) if o.status.success() => {}
                    Ok(o) => panic!("openssl genpkey ed25519 failed: {}", String::from_utf8_lossy(&o.stderr)),
                    Err(e) => {
                        eprintln!("SKIPPED: EdDSA keys need the openssl command ({e})");
                        return None;
                    }
                }
                let mut pubout = Command::new("openssl");
                pubout.args(["pkey", "-pubout", "-in"]).arg(&private).arg("-out").arg(&public);
                assert!(pubout.output().unwrap().status.success(), "openssl pkey -pubout");
            }
            JwtAlg::Hs256 => unreachable!("HS256 has no key pair"),
        }
        Some(Self { _dir: dir, private, public })
    }

    fn signer(&self, alg: JwtAlg) -> Signer {
        let s = JwtSettings { jwt_alg: alg, jwt_secret: None, jwt_public_key: None };
        Signer::from_settings(&s, Some(&self.private)).unwrap()
    }

    fn public_pem(&self) -> String {
        std::fs::read_to_string(&self.public).unwrap()
    }

    /// The public key's DER (the PEM's base64 body).
    fn public_der(&self) -> Vec<u8> {
        let body: String = self.public_pem().lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD.decode(body).unwrap()
    }
}

fn alg_flag(alg: JwtAlg) -> &'static str {
    match alg {
        JwtAlg::Hs256 => "HS256",
        JwtAlg::Rs256 => "RS256",
        JwtAlg::Es256 => "ES256",
        JwtAlg::EdDsa => "EdDSA",
    }
}

fn hs256_with(secret: &[u8], claims: &Claims) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret)).unwrap()
}

/// Says hello with `token`: Ok(welcome) or Err(the close code after the error frame).
async fn hello(addr: std::net::SocketAddr, token: &str) -> Result<Value, Option<u16>> {
    let mut c = Client::raw(addr).await;
    c.send(json!({"type":"hello","token":token})).await;
    let v = c.recv().await;
    if v["type"] == "welcome" {
        return Ok(v);
    }
    assert_eq!((v["type"].as_str(), v["code"].as_str()), (Some("error"), Some("unauthorized")), "{v}");
    Err(c.expect_close().await)
}

async fn only_the_configured_key_connects(alg: JwtAlg) {
    let Some(keys) = KeyPair::new(alg) else { return };
    let public = keys.public.to_str().unwrap();
    let nats = NatsServer::start();
    let db = TestDb::new().await;
    // settings() also passes --jwt-secret: with an asymmetric algorithm it must be ignored.
    let gw = spawn_gateway(&nats, &db, "gw1", &["--jwt-alg", alg_flag(alg), "--jwt-public-key", public]).await;
    let ttl = Duration::from_secs(600);
    let now = natter::auth::unix_now();
    let claims = Claims { sub: "alice".into(), exp: now + 600, name: None };

    let good = keys.signer(alg).mint("alice", ttl, None).unwrap();
    let w = hello(gw.addr, &good).await.expect("the right key connects");
    assert_eq!(w["user"], "alice");

    let other_key = KeyPair::new(alg).unwrap().signer(alg).mint("alice", ttl, None).unwrap();
    let other_alg = if alg == JwtAlg::Es256 { JwtAlg::Rs256 } else { JwtAlg::Es256 };
    let other_alg_token = KeyPair::new(other_alg).unwrap().signer(other_alg).mint("alice", ttl, None).unwrap();
    let expired = {
        let pem = std::fs::read(&keys.private).unwrap();
        let key = match alg {
            JwtAlg::Rs256 => EncodingKey::from_rsa_pem(&pem),
            JwtAlg::Es256 => EncodingKey::from_ec_pem(&pem),
            _ => EncodingKey::from_ed_pem(&pem),
        }
        .unwrap();
        let header = Header::new(match alg {
            JwtAlg::Rs256 => Algorithm::RS256,
            JwtAlg::Es256 => Algorithm::ES256,
            _ => Algorithm::EdDSA,
        });
        jsonwebtoken::encode(&header, &Claims { exp: now - 3600, ..claims.clone() }, &key).unwrap()
    };
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let refused = [
        ("another key of the same algorithm", other_key),
        ("HS256 keyed with the public key PEM", hs256_with(keys.public_pem().as_bytes(), &claims)),
        ("HS256 keyed with the public key DER", hs256_with(&keys.public_der(), &claims)),
        ("HS256 keyed with the ignored --jwt-secret", hs256_with(SECRET.as_bytes(), &claims)),
        ("another asymmetric algorithm", other_alg_token),
        ("expired", expired),
        ("alg none", format!("{}.{}.", b64(json!({"alg":"none","typ":"JWT"})), b64(json!(claims)))),
    ];
    for (what, token) in refused {
        assert_eq!(hello(gw.addr, &token).await.err(), Some(Some(4001)), "{}: {what}", alg_flag(alg));
    }
    // The confusion token is refused on the Authorization header path too.
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
        "ws://{}/v1/ws",
        gw.addr
    ))
    .unwrap();
    let forged = hs256_with(keys.public_pem().as_bytes(), &claims);
    req.headers_mut().insert("authorization", format!("Bearer {forged}").parse().unwrap());
    if let Ok((mut ws, _)) = tokio_tungstenite::connect_async(req).await {
        use futures::StreamExt;
        let mut close = None;
        while let Ok(Some(Ok(m))) = tokio::time::timeout(RECV_TIMEOUT, ws.next()).await {
            if let tokio_tungstenite::tungstenite::Message::Close(f) = m {
                close = f.map(|f| u16::from(f.code));
                break;
            }
            let v: Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
            assert_ne!(v["type"], "welcome", "{}: forged bearer token accepted", alg_flag(alg));
        }
        assert_eq!(close, Some(4001), "{}: bearer", alg_flag(alg));
    }
    // Still serving the right key.
    assert!(hello(gw.addr, &good).await.is_ok());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_only_the_configured_key_connects() {
    only_the_configured_key_connects(JwtAlg::Rs256).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_only_the_configured_key_connects() {
    only_the_configured_key_connects(JwtAlg::Es256).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eddsa_only_the_configured_key_connects() {
    only_the_configured_key_connects(JwtAlg::EdDsa).await;
}

/// The HS256 gateway refuses asymmetric tokens (and a private key is no secret).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_gateway_refuses_asymmetric_tokens() {
    let nats = NatsServer::start();
    let db = TestDb::new().await;
    let gw = spawn_gateway(&nats, &db, "gw1", &[]).await;
    for alg in [JwtAlg::Rs256, JwtAlg::Es256] {
        let keys = KeyPair::new(alg).unwrap();
        let t = keys.signer(alg).mint("alice", Duration::from_secs(600), None).unwrap();
        assert_eq!(hello(gw.addr, &t).await.err(), Some(Some(4001)), "{}", alg_flag(alg));
    }
    assert!(hello(gw.addr, &token("alice")).await.is_ok());
    gw.stop().await;
}
