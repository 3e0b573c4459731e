//! The one place that sees everything: builds the store, hasher, core and server from
//! [`Settings`], binds the listener (port 0 in tests), and runs until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use secrecy::SecretString;
use tokio::net::TcpListener;

use crate::clock::SystemClock;
use crate::config::Settings;
use crate::domain::ports::{Clock, InvalidationSink, SecretHasher, Store};
use crate::domain::token_format::TokenFormat;
use crate::hashing::Argon2Hasher;
use crate::introspect::cache::{CachingStore, LiveCache};
use crate::introspect::last_used::LastUsed;
use crate::service::{self, Tokend};
use crate::storage::{FeedTiming, SeaStore};

/// A built, bound, not yet running tokend.
#[derive(Debug)]
pub struct App {
    listener: TcpListener,
    core: Arc<Tokend>,
    store: Arc<SeaStore>,
    cache: Arc<LiveCache>,
    hasher: Arc<Argon2Hasher>,
    last_used: Arc<LastUsed>,
    last_used_every: Duration,
    feed: Option<tokio::task::JoinHandle<()>>,
    clock: Arc<dyn Clock>,
}

/// Connects to the configured database.
pub async fn open_store(settings: &Settings) -> anyhow::Result<SeaStore> {
    let format = TokenFormat::new(&settings.token_prefix).context("token_prefix")?;
    SeaStore::connect(
        settings.database_url(),
        &settings.database.options(),
        format,
    )
    .await
    .context("cannot connect to the database")
}

/// Applies migrations and returns.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let store = open_store(settings).await?;
    store.migrate().await.context("migration failed")?;
    store.close().await?;
    Ok(())
}

/// Creates the system tenant, its admin role and the root API key; returns the key.
pub async fn bootstrap(settings: &Settings) -> anyhow::Result<SecretString> {
    let store = Arc::new(open_store(settings).await?);
    store.migrate().await.context("migration failed")?;
    let store: Arc<dyn Store> = store;
    let core = Tokend::new(
        Arc::clone(&store),
        hasher(settings)?,
        Arc::new(SystemClock),
        TokenFormat::new(&settings.token_prefix).context("token_prefix")?,
        Arc::new(LastUsed::new(store)),
        None,
    );
    Ok(service::bootstrap(&core).await?)
}

fn hasher(settings: &Settings) -> anyhow::Result<Arc<Argon2Hasher>> {
    let pepper = settings.resolve_pepper()?;
    Ok(Arc::new(Argon2Hasher::new(&settings.argon2, pepper)?))
}

impl App {
    /// Builds tokend on the system clock.
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        Self::build_with_clock(settings, Arc::new(SystemClock)).await
    }

    /// Builds tokend on a given clock (tests move time with a manual one).
    pub async fn build_with_clock(
        settings: &Settings,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Self> {
        let store = Arc::new(open_store(settings).await?);
        if settings.migrate_on_start {
            store.migrate().await.context("migration failed")?;
        }
        // PostgreSQL replicas trust their caches only once the change feed is up; until then
        // every Introspect reads the database. SQLite is one replica: trusted from the start.
        let cache = Arc::new(LiveCache::new(&settings.cache, store.is_postgres()));
        let cached: Arc<dyn Store> = Arc::new(CachingStore::new(
            Arc::clone(&store) as Arc<dyn Store>,
            Arc::clone(&cache),
        ));
        let feed = store.spawn_change_feed(
            Arc::clone(&cache) as Arc<dyn InvalidationSink>,
            FeedTiming {
                heartbeat: Duration::from_millis(settings.cache.feed_heartbeat_ms.max(10)),
                timeout: Duration::from_millis(settings.cache.feed_timeout_ms.max(20)),
                poll: Duration::from_millis(settings.cache.feed_poll_ms.max(10)),
            },
        );
        let hasher = hasher(settings)?;
        let last_used = Arc::new(LastUsed::new(Arc::clone(&cached)));
        let core = Arc::new(Tokend::new(
            cached,
            Arc::clone(&hasher) as Arc<dyn SecretHasher>,
            Arc::clone(&clock),
            TokenFormat::new(&settings.token_prefix).context("token_prefix")?,
            Arc::clone(&last_used),
            Some(Arc::clone(&cache)),
        ));
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("cannot listen on {}", settings.listen))?;
        Ok(Self {
            listener,
            core,
            store,
            cache,
            hasher,
            last_used,
            last_used_every: Duration::from_millis(settings.last_used_flush_ms.max(10)),
            feed,
            clock,
        })
    }

    /// The bound address (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The service core, for in-process use such as bootstrapping a test database.
    pub fn core(&self) -> Arc<Tokend> {
        Arc::clone(&self.core)
    }

    /// The store, for tests that observe its counters.
    pub fn store(&self) -> Arc<SeaStore> {
        Arc::clone(&self.store)
    }

    /// The live-state cache, for tests and figures.
    pub fn cache(&self) -> Arc<LiveCache> {
        Arc::clone(&self.cache)
    }

    /// The hasher, for tests that count argon2 verifications.
    pub fn hasher(&self) -> Arc<Argon2Hasher> {
        Arc::clone(&self.hasher)
    }

    /// Serves until `shutdown` resolves, then reports NOT_SERVING and drains in-flight calls.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let address = self.local_addr();
        let health = tonic_health::server::health_reporter();
        let flusher = self.last_used.spawn_flusher(self.last_used_every);
        tracing::info!(%address, "tokend is serving");
        let served = crate::grpc::serve(
            self.listener,
            self.core,
            self.clock,
            health,
            self.cache.watch_trusted(),
            shutdown,
        )
        .await;
        flusher.abort();
        if let Some(feed) = &self.feed {
            feed.abort();
        }
        // In-flight calls are drained: what they noted is written before exit.
        if let Err(err) = self.last_used.flush().await {
            tracing::warn!(error = %err, "could not record the last uses on shutdown");
        }
        served?;
        tracing::info!("tokend stopped");
        Ok(())
    }
}
