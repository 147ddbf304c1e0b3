//! A fresh PostgreSQL database per test, migrated; dropped on Drop.

use natter::config::DatabaseSettings;
use sqlx::{Connection, PgConnection};

fn admin_url() -> String {
    std::env::var("NATTER_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

pub struct TestDb {
    pub url: String,
    name: String,
}

impl TestDb {
    pub async fn new() -> Self {
        let name = format!("natter_t_{}", uuid::Uuid::new_v4().simple());
        let mut base = url::Url::parse(&admin_url()).unwrap();
        base.set_path(&format!("/{name}"));
        let url = base.to_string();
        natter::db::migrate(&Self::settings_for(&url)).await.expect("migrate test database");
        Self { url, name }
    }

    fn settings_for(url: &str) -> DatabaseSettings {
        DatabaseSettings { database_url: url.to_owned(), database_pool: 4 }
    }

    pub fn settings(&self) -> DatabaseSettings {
        Self::settings_for(&self.url)
    }

    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(&self.url).await.unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                if let Ok(mut c) = PgConnection::connect(&admin_url()).await {
                    let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut c).await;
                }
            })
        })
        .join();
    }
}
