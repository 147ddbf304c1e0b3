//! PostgreSQL: the pool, migrations and the schema check. Queries live in one
//! file per table group.

pub mod archive;
pub mod devices;
pub mod rooms;
pub mod unread;

use std::{collections::HashSet, str::FromStr, time::Duration};

use anyhow::{Context, bail};
use sqlx::{
    ConnectOptions, Connection, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::config::DatabaseSettings;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

fn options(url: &str) -> anyhow::Result<PgConnectOptions> {
    Ok(PgConnectOptions::from_str(url)
        .context("NATTER_DATABASE_URL is not a PostgreSQL URL")?
        .log_statements(tracing::log::LevelFilter::Trace))
}

/// Connects (failing within a few seconds if PostgreSQL is unreachable) and
/// refuses to go on when the schema is behind this binary's migrations.
pub async fn connect(s: &DatabaseSettings) -> anyhow::Result<PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(s.database_pool)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options(&s.database_url)?)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {}", redact(&s.database_url)))?;
    check_schema(&pool).await?;
    Ok(pool)
}

async fn check_schema(pool: &PgPool) -> anyhow::Result<()> {
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
        .fetch_all(pool)
        .await
        .unwrap_or_default();
    let applied: HashSet<i64> = applied.into_iter().collect();
    let missing = MIGRATOR.iter().filter(|m| !applied.contains(&m.version)).count();
    if missing > 0 {
        bail!("the database schema is behind this binary by {missing} migration(s): run `natter migrate`");
    }
    Ok(())
}

/// Creates the database if it does not exist, then applies every migration.
pub async fn migrate(s: &DatabaseSettings) -> anyhow::Result<usize> {
    let opts = options(&s.database_url)?;
    let name = opts.get_database().unwrap_or("postgres").to_owned();
    let admin = opts.clone().database("postgres");
    let mut conn = tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect_with(&admin))
        .await
        .map_err(|_| anyhow::anyhow!("timed out"))
        .and_then(|r| r.map_err(Into::into))
        .with_context(|| format!("cannot connect to PostgreSQL at {}", redact(&s.database_url)))?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&name)
        .fetch_one(&mut conn)
        .await?;
    if !exists {
        // The name comes from the operator's URL; quote it as an identifier.
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {quoted}"))).execute(&mut conn).await?;
    }
    conn.close().await.ok();

    let mut conn = sqlx::PgConnection::connect_with(&opts).await?;
    let before: usize = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&mut conn)
        .await
        .map(|n| n as usize)
        .unwrap_or(0);
    MIGRATOR.run(&mut conn).await.context("migration failed")?;
    Ok(MIGRATOR.iter().count().saturating_sub(before))
}

/// The URL without its password, for error messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparsable URL>".to_owned(),
    }
}

/// True when PostgreSQL answers within a second.
pub async fn ping(pool: &PgPool) -> bool {
    tokio::time::timeout(Duration::from_secs(1), sqlx::query("SELECT 1").execute(pool)).await.is_ok_and(|r| r.is_ok())
}
