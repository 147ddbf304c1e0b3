//! Development push credentials, made at run time and never committed: an
//! APNS `.p8` key (P-256) and an FCM service-account JSON (RSA 2048) whose
//! `token_uri` points at the push emulator, plus `push.env` for scripts.
//!
//! The private keys are reused when present; the derived files (public keys,
//! `fcm.json`, `push.env`) are rewritten every time, so one key directory
//! follows the emulator to another address.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context;
use p256::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _, EncodePublicKey as _, LineEnding};
use rand_core::OsRng;
use serde_json::json;

pub const APNS_KEY_ID: &str = "DEVKEY0001";
pub const APNS_TEAM_ID: &str = "DEVTEAM001";
pub const APNS_TOPIC: &str = "dev.natter.app";
pub const FCM_PROJECT: &str = "natter-dev";
pub const FCM_CLIENT_EMAIL: &str = "natter-dev@natter-dev.iam.gserviceaccount.com";
const FCM_PRIVATE_KEY_ID: &str = "devkey0000000000000000000000000000000001";

/// Where the development credentials live and what a client needs to use them.
#[derive(Debug, Clone)]
pub struct DevCredentials {
    pub dir: PathBuf,
    /// Base URL of the emulator the credentials point at.
    pub base_url: url::Url,
    /// `apns.p8`: PKCS#8 PEM, P-256.
    pub apns_key: PathBuf,
    pub apns_key_id: String,
    pub apns_team_id: String,
    pub apns_topic: String,
    /// SPKI PEM of the APNS key (what the emulator verifies with).
    pub apns_public_pem: String,
    /// `fcm.json`: a Google service-account key.
    pub fcm_credentials: PathBuf,
    pub fcm_project: String,
    pub fcm_client_email: String,
    /// `{base_url}/token`, the service account's `token_uri`.
    pub fcm_token_uri: String,
    /// SPKI PEM of the service-account key.
    pub fcm_public_pem: String,
    /// `push.env`: `NATTER_APNS_*` / `NATTER_FCM_*` lines.
    pub env_file: PathBuf,
}

impl DevCredentials {
    /// The push settings as `NATTER_*` variables.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let base = self.base_url.as_str().trim_end_matches('/').to_owned();
        vec![
            ("NATTER_APNS_URL", base.clone()),
            ("NATTER_APNS_KEY", self.apns_key.display().to_string()),
            ("NATTER_APNS_KEY_ID", self.apns_key_id.clone()),
            ("NATTER_APNS_TEAM_ID", self.apns_team_id.clone()),
            ("NATTER_APNS_TOPIC", self.apns_topic.clone()),
            ("NATTER_FCM_URL", base),
            ("NATTER_FCM_CREDENTIALS", self.fcm_credentials.display().to_string()),
            ("NATTER_FCM_PROJECT", self.fcm_project.clone()),
        ]
    }

    /// The push settings as command-line flags (`--apns-url …`), for tests.
    pub fn cli_args(&self) -> Vec<String> {
        self.env()
            .into_iter()
            .flat_map(|(var, value)| {
                let flag = format!("--{}", var.trim_start_matches("NATTER_").to_ascii_lowercase().replace('_', "-"));
                [flag, value]
            })
            .collect()
    }
}

/// Writes (or reuses) the development credentials in `dir` for an emulator at `emulator_base`.
pub fn generate(dir: &Path, emulator_base: &url::Url) -> anyhow::Result<DevCredentials> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize().with_context(|| format!("resolving {}", dir.display()))?;
    let base = emulator_base.as_str().trim_end_matches('/');
    let token_uri = format!("{base}/token");

    let apns_key = dir.join("apns.p8");
    let apns_secret = match fs::read_to_string(&apns_key) {
        Ok(pem) => p256::SecretKey::from_pkcs8_pem(&pem).with_context(|| format!("reading {}", apns_key.display()))?,
        Err(_) => {
            let key = p256::SecretKey::random(&mut OsRng);
            write_private(&apns_key, key.to_pkcs8_pem(LineEnding::LF)?.as_bytes())?;
            key
        }
    };
    let apns_public_pem = apns_secret.public_key().to_public_key_pem(LineEnding::LF)?;
    write(&dir.join("apns.pub.pem"), apns_public_pem.as_bytes())?;

    let fcm_credentials = dir.join("fcm.json");
    let fcm_secret = read_service_account_key(&fcm_credentials)?;
    let fcm_secret = match fcm_secret {
        Some(key) => key,
        None => rsa::RsaPrivateKey::new(&mut OsRng, 2048).context("generating the FCM RSA key")?,
    };
    let fcm_private_pem = fcm_secret.to_pkcs8_pem(LineEnding::LF)?;
    let fcm_public_pem = fcm_secret.to_public_key().to_public_key_pem(LineEnding::LF)?;
    let account = json!({
        "type": "service_account",
        "project_id": FCM_PROJECT,
        "private_key_id": FCM_PRIVATE_KEY_ID,
        "private_key": fcm_private_pem.as_str(),
        "client_email": FCM_CLIENT_EMAIL,
        "client_id": "100000000000000000001",
        "auth_uri": format!("{base}/o/oauth2/auth"),
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": format!("{base}/oauth2/v1/certs"),
        "client_x509_cert_url": format!("{base}/robot/v1/metadata/x509/natter-dev"),
        "universe_domain": "googleapis.com",
    });
    write_private(&fcm_credentials, serde_json::to_string_pretty(&account)?.as_bytes())?;
    write(&dir.join("fcm.pub.pem"), fcm_public_pem.as_bytes())?;

    let creds = DevCredentials {
        base_url: emulator_base.clone(),
        apns_key,
        apns_key_id: APNS_KEY_ID.into(),
        apns_team_id: APNS_TEAM_ID.into(),
        apns_topic: APNS_TOPIC.into(),
        apns_public_pem,
        fcm_credentials,
        fcm_project: FCM_PROJECT.into(),
        fcm_client_email: FCM_CLIENT_EMAIL.into(),
        fcm_token_uri: token_uri,
        fcm_public_pem,
        env_file: dir.join("push.env"),
        dir,
    };
    let mut env = String::from("# Development push credentials for the natter push emulator (generated).\n");
    for (var, value) in creds.env() {
        env.push_str(&format!("{var}={value}\n"));
    }
    write(&creds.env_file, env.as_bytes())?;
    Ok(creds)
}

/// The RSA key of an existing `fcm.json`, if there is one.
fn read_service_account_key(path: &Path) -> anyhow::Result<Option<rsa::RsaPrivateKey>> {
    let Ok(text) = fs::read_to_string(path) else { return Ok(None) };
    let account: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
    let pem = account["private_key"].as_str().with_context(|| format!("{}: no private_key", path.display()))?;
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(pem).with_context(|| format!("{}: private_key", path.display()))?;
    Ok(Some(key))
}

fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Writes a file only its owner may read.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    write(path, bytes)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    Ok(())
}
