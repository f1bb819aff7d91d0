//! `breakwater up --redis URL --database URL --redis-prefix P`: the same contracts as
//! with no flags (the checks of `up_survives_instance_crash`), and the state really is
//! in Redis (keys under `{P:registry}`, `P:analytics`, `P:data`) and in PostgreSQL (rows
//! in this run's schema), with the order created reaching analytics through the outbox.
//!
//! Needs `REDIS_URL` and `DATABASE_URL` (skipped without them, unless
//! `BREAKWATER_REQUIRE_SERVICES=1`). The run gets a schema `bw_e2e_<pid>_<nanos>`
//! (through `options=-c search_path=...` in the URL, so the migrations run inside it)
//! and the key prefix `bw-e2e-<pid>-<nanos>`; both are removed at the end, also when
//! the test fails.

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use redis::AsyncCommands as _;
use sqlx::Connection as _;

use crate::system::{System, url_of};
use crate::up_survives_instance_crash::{check_contracts, check_more_contracts};

fn required() -> bool {
    std::env::var("BREAKWATER_REQUIRE_SERVICES").as_deref() == Ok("1")
}

fn env_url(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                !required(),
                "BREAKWATER_REQUIRE_SERVICES=1 but {name} is not set"
            );
            eprintln!("SKIPPED (no {name})");
            None
        }
    }
}

/// This run's schema and key prefix.
#[derive(Clone)]
struct RunState {
    redis_url: String,
    database_url: String,
    schema: String,
    prefix: String,
}

impl RunState {
    /// The database URL with this run's schema first on the search path.
    fn schema_url(&self) -> String {
        let join = if self.database_url.contains('?') {
            '&'
        } else {
            '?'
        };
        format!(
            "{}{join}options=-c%20search_path%3D{}",
            self.database_url, self.schema
        )
    }

    async fn pg(&self) -> sqlx::PgConnection {
        sqlx::PgConnection::connect(&self.database_url)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.database_url))
    }

    async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis_url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    async fn keys(&self, pattern: &str) -> Vec<String> {
        let mut conn = self.redis().await;
        let mut iter = conn.scan_match::<_, String>(pattern).await.unwrap();
        let mut keys = Vec::new();
        while let Some(key) = iter.next_item().await {
            keys.push(key.unwrap());
        }
        keys
    }

    async fn count(&self, sql: &str) -> i64 {
        let sql = sql.replace("{schema}", &self.schema);
        sqlx::query_scalar::<_, i64>(&sql)
            .fetch_one(&mut self.pg().await)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    async fn clean_up(&self) {
        if let Ok(mut pg) = sqlx::PgConnection::connect(&self.database_url).await {
            let drop = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema);
            if let Err(e) = sqlx::query(&drop).execute(&mut pg).await {
                eprintln!("{drop}: {e}");
            }
        }
        let mut keys = self.keys(&format!("{}:*", self.prefix)).await;
        keys.extend(self.keys(&format!("{{{}:*", self.prefix)).await);
        if !keys.is_empty() {
            let deleted: redis::RedisResult<u64> = self.redis().await.del(keys).await;
            if let Err(e) = deleted {
                eprintln!("deleting {}:*: {e}", self.prefix);
            }
        }
    }
}

/// Removes a run's schema and keys when dropped, on a thread of its own, so it also
/// works while a failed test unwinds.
struct CleanUp(RunState);

impl Drop for CleanUp {
    fn drop(&mut self) {
        let run = self.0.clone();
        let cleaner = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(run.clean_up());
        });
        let _ = cleaner.join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_on_redis_and_postgres_serves_the_contracts_from_shared_state() {
    let (Some(redis_url), Some(database_url)) = (env_url("REDIS_URL"), env_url("DATABASE_URL"))
    else {
        return;
    };
    let run = format!(
        "{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let run = RunState {
        redis_url,
        database_url,
        schema: format!("bw_e2e_{run}"),
        prefix: format!("bw-e2e-{}", run.replace('_', "-")),
    };
    sqlx::query(&format!("CREATE SCHEMA {}", run.schema))
        .execute(&mut run.pg().await)
        .await
        .unwrap();
    let clean_up = CleanUp(run.clone());

    let mut system = System::start_with(&[
        "--redis".into(),
        run.redis_url.clone(),
        "--redis-prefix".into(),
        run.prefix.clone(),
        "--database".into(),
        run.schema_url(),
    ]);
    let state = system.wait_ready().await;
    let gw = url_of(&state, "gateway");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    check_contracts(&http, &gw, &url_of(&state, "registry")).await;
    check_more_contracts(&http, &gw, &url_of(&state, "unstable-1")).await;

    // Redis: every component that keeps state there wrote under its part of the prefix
    // (the gateway only writes for rate-limited or cached routes, which the embedded
    // config has none of).
    // The registry's keys carry its prefix as a Redis Cluster hash tag: `{P:registry}:`.
    for pattern in [
        format!("{{{}:registry}}:*", run.prefix),
        format!("{}:analytics:*", run.prefix),
        format!("{}:data:*", run.prefix),
    ] {
        assert!(
            !run.keys(&pattern).await.is_empty(),
            "no keys match {pattern}"
        );
    }

    // PostgreSQL: the seed plus this run's writes, in this run's schema.
    assert_eq!(
        run.count("SELECT count(*) FROM {schema}.users").await,
        3,
        "the seed users (the created one was deleted)"
    );
    assert_eq!(
        run.count("SELECT count(*) FROM {schema}.orders").await,
        6,
        "the seed orders and the one created"
    );
    assert_eq!(
        run.count(
            "SELECT count(*) FROM {schema}.outbox \
             WHERE topic = 'order.created' AND delivered_at IS NOT NULL"
        )
        .await,
        1,
        "order.created delivered"
    );
    assert_eq!(
        run.count("SELECT count(*) FROM {schema}.processed_events WHERE type = 'order.created'")
            .await,
        1,
        "and processed by analytics exactly once"
    );
    assert_eq!(
        run.count("SELECT count(*) FROM {schema}.metrics WHERE type = 'cpu'")
            .await,
        1
    );
    assert_eq!(
        run.count(
            "SELECT count(*) FROM information_schema.tables \
             WHERE table_schema = '{schema}' AND table_name = '_sqlx_migrations'"
        )
        .await,
        1,
        "the migrations ran inside the schema"
    );

    // Stop the system before the schema and keys go, so nothing writes them again.
    kill(
        Pid::from_raw(i32::try_from(system.up.id()).unwrap()),
        Signal::SIGINT,
    )
    .unwrap();
    for _ in 0..600 {
        if system.up.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(system);
    drop(clean_up);
    for pattern in [format!("{}:*", run.prefix), format!("{{{}:*", run.prefix)] {
        assert!(run.keys(&pattern).await.is_empty(), "{pattern} removed");
    }
    assert_eq!(
        run.count(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = '{schema}'"
        )
        .await,
        0,
        "schema dropped"
    );
}
