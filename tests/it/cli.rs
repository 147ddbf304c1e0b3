//! The binary's contract with operators: one-line errors, non-zero exits,
//! idempotent migrations, tokens.

use std::process::Output;

use crate::helpers::*;

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = natter_bin();
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_settings_and_unreachable_servers_give_one_line_errors() {
    let db = TestDb::new().await;
    let nats = NatsServer::start();

    // No JWT secret.
    let o = run(&["gateway", "--nats-url", &nats.url(), "--database-url", &db.url], &[]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("NATTER_JWT_SECRET"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(!e.contains("panicked"));

    // Unreachable PostgreSQL.
    let dead = format!("postgres://postgres@127.0.0.1:{}/x", free_port());
    let o = run(&["gateway", "--database-url", &dead, "--jwt-secret", SECRET, "--nats-url", &nats.url()], &[]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("cannot connect to PostgreSQL"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");

    // Unreachable NATS.
    let dead = format!("nats://127.0.0.1:{}", free_port());
    let o = run(
        &["gateway", "--database-url", &db.url, "--jwt-secret", SECRET, "--nats-url", &dead, "--listen", "127.0.0.1:0"],
        &[],
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("cannot connect to NATS"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");

    // Settings come from NATTER_* variables too, and --help lists them.
    let o = run(&["gateway", "--help"], &[]);
    let help = String::from_utf8_lossy(&o.stdout);
    for var in ["NATTER_NATS_URL", "NATTER_DATABASE_URL", "NATTER_LISTEN", "NATTER_JWT_ALG", "NATTER_STREAM_MAX_AGE"] {
        assert!(help.contains(var), "{var} missing from --help");
    }
    let o = run(
        &["gateway"],
        &[("NATTER_JWT_SECRET", SECRET), ("NATTER_NATS_URL", &dead), ("NATTER_DATABASE_URL", &db.url)],
    );
    assert!(stderr(&o).contains("cannot connect to NATS"), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent_and_a_behind_schema_is_refused() {
    let db = TestDb::new().await; // already migrated once
    let o = run(&["migrate", "--database-url", &db.url], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("0 applied"), "{}", stderr(&o));

    // A database without the schema: the gateway refuses to start.
    let pool = db.pool().await;
    sqlx::query("DELETE FROM _sqlx_migrations").execute(&pool).await.unwrap();
    let nats = NatsServer::start();
    let o = run(&["gateway", "--database-url", &db.url, "--jwt-secret", SECRET, "--nats-url", &nats.url()], &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("natter migrate"), "{}", stderr(&o));
}

#[test]
fn token_mints_a_verifiable_jwt() {
    let o = run(&["token", "--user", "alice", "--ttl", "1h"], &[("NATTER_JWT_SECRET", SECRET)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = String::from_utf8(o.stdout).unwrap();
    let v = natter::auth::Verifier::from_settings(&natter::config::JwtSettings {
        jwt_alg: natter::config::JwtAlg::Hs256,
        jwt_secret: Some(natter::config::Secret::new(SECRET)),
        jwt_public_key: None,
    })
    .unwrap();
    assert_eq!(v.verify(t.trim()).unwrap().user.as_str(), "alice");
    let o = run(&["token", "--user", "a.b"], &[("NATTER_JWT_SECRET", SECRET)]);
    assert!(!o.status.success());
}

/// The Kubernetes ConfigMap sets only settings the binary knows: a
/// misspelt name would be ignored in silence and leave the default.
#[test]
fn every_setting_in_the_config_map_is_one_the_binary_reads() {
    let map = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/k8s/base/natter-config.yaml")).unwrap();
    let names: Vec<&str> = map
        .lines()
        .filter_map(|l| l.trim_start().split_once(':').map(|(k, _)| k))
        .filter(|k| k.starts_with("NATTER_"))
        .collect();
    assert!(names.len() > 20, "the ConfigMap's settings were not found: {names:?}");
    // `--help` shows each setting's variable as `[env: NAME=…]` or `[env: NAME]`.
    let mut known = std::collections::HashSet::new();
    for cmd in ["gateway", "notifier"] {
        let help = String::from_utf8_lossy(&run(&[cmd, "--help"], &[]).stdout).into_owned();
        for at in help.split("[env: ").skip(1) {
            known.insert(
                at.split(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                    .next()
                    .unwrap()
                    .to_owned(),
            );
        }
    }
    for name in names {
        assert!(known.contains(name), "{name} is not a setting of `natter gateway` or `natter notifier`");
    }
}
