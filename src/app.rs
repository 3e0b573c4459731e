//! The one place that sees everything: builds the store, hasher, core and server from
//! [`Settings`], binds the listener (port 0 in tests), and runs until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use secrecy::SecretString;
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::clock::SystemClock;
use crate::config::{Settings, TlsSettings};
use crate::domain::ports::{Clock, InvalidationSink, SecretHasher, Store};
use crate::domain::token_format::TokenFormat;
use crate::hashing::Argon2Hasher;
use crate::introspect::cache::{CachingStore, LiveCache};
use crate::introspect::last_used::LastUsed;
use crate::service::{self, Tokend};
use crate::storage::{FeedTiming, SeaStore};

/// The longest the last-use flush may hold up an exit.
const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

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
    tls: Option<ServerTlsConfig>,
    drain: Duration,
    health_listener: Option<TcpListener>,
    metrics_listener: Option<TcpListener>,
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

/// The TLS configuration, if TLS is on; a file that cannot be read is named.
fn tls_config(settings: &TlsSettings) -> anyhow::Result<Option<ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&settings.cert_file, &settings.key_file) else {
        return Ok(None);
    };
    let read = |what: &str, path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("tls.{what}: cannot read {}", path.display()))
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
        read("cert_file", cert)?,
        read("key_file", key)?,
    ));
    if let Some(ca) = &settings.client_ca_file {
        tls = tls
            .client_ca_root(Certificate::from_pem(read("client_ca_file", ca)?))
            .client_auth_optional(settings.client_auth_optional);
    }
    // Parsed now, so a bad certificate or key stops startup naming the setting, before
    // anything listens.
    tonic::transport::Server::builder()
        .tls_config(tls.clone())
        .context("tls: the certificate, key or client CA is not usable")?;
    Ok(Some(tls))
}

async fn bind(what: &str, address: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("{what}: cannot listen on {address}"))
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
        let tls = tls_config(&settings.tls)?;
        if settings.metrics.listen.is_some() {
            // Installed before anything records, so no series is lost.
            crate::telemetry::metrics::handle();
        }
        let store = Arc::new(open_store(settings).await?);
        if settings.migrate_on_start {
            store.migrate().await.context("migration failed")?;
        }
        // PostgreSQL replicas trust their caches only once the change feed is up; until then
        // every Introspect reads the database. SQLite is one replica: trusted from the start.
        let cache = Arc::new(LiveCache::new(&settings.cache, store.is_postgres()));
        let feed = store.spawn_change_feed(
            Arc::clone(&cache) as Arc<dyn InvalidationSink>,
            FeedTiming {
                heartbeat: Duration::from_millis(settings.cache.feed_heartbeat_ms.max(10)),
                timeout: Duration::from_millis(settings.cache.feed_timeout_ms.max(20)),
                poll: Duration::from_millis(settings.cache.feed_poll_ms.max(10)),
            },
        );
        let cached: Arc<dyn Store> = Arc::new(CachingStore::new(
            Arc::clone(&store) as Arc<dyn Store>,
            Arc::clone(&cache),
            feed.as_ref().map(|feed| Arc::clone(&feed.fence)),
        ));
        let feed = feed.map(|feed| feed.task);
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
        let listener = bind("listen", settings.listen).await?;
        let health_listener = match settings.health_listen {
            Some(address) => Some(bind("health_listen", address).await?),
            None => None,
        };
        let metrics_listener = match settings.metrics.listen {
            Some(address) => Some(bind("metrics.listen", address).await?),
            None => None,
        };
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
            tls,
            drain: Duration::from_millis(settings.drain_timeout_ms),
            health_listener,
            metrics_listener,
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
        let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
        let metrics = self.metrics_listener.map(|listener| {
            let sample = sampler(
                Arc::clone(&self.core),
                Arc::clone(&self.cache),
                Arc::clone(&self.store),
                Arc::clone(&self.last_used),
            );
            tokio::spawn(crate::telemetry::metrics::serve(listener, sample, async {
                let _ = metrics_stopped.await;
            }))
        });
        tracing::info!(
            %address,
            tls = self.tls.is_some(),
            "tokend is serving"
        );
        let served = crate::grpc::serve(
            self.listener,
            self.core,
            self.clock,
            health,
            self.cache.watch_trusted(),
            crate::grpc::ServeOptions {
                tls: self.tls,
                drain: self.drain,
                health_listener: self.health_listener,
            },
            shutdown,
        )
        .await;
        flusher.abort();
        if let Some(feed) = &self.feed {
            feed.abort();
        }
        // In-flight calls are drained: what they noted is written before exit, unless the
        // database is out of reach (a stuck write must not hold the exit past the grace
        // period, when the orchestrator would kill it anyway).
        match tokio::time::timeout(FINAL_FLUSH_TIMEOUT, self.last_used.flush()).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "could not record the last uses on shutdown");
            }
            Err(_) => tracing::warn!("recording the last uses on shutdown timed out"),
        }
        // Scraped to the end: the last flush shows in the series.
        let _ = metrics_stop.send(());
        if let Some(metrics) = metrics {
            let _ = metrics.await;
        }
        served?;
        tracing::info!("tokend stopped");
        Ok(())
    }
}

/// The gauges read at scrape time: cache sizes, database pool, pending last uses.
fn sampler(
    core: Arc<Tokend>,
    cache: Arc<LiveCache>,
    store: Arc<SeaStore>,
    last_used: Arc<LastUsed>,
) -> crate::telemetry::metrics::Sampler {
    Arc::new(move || {
        metrics::gauge!("tokend_cache_trusted").set(if cache.is_trusted() { 1.0 } else { 0.0 });
        metrics::gauge!("tokend_cache_entries", "cache" => "live_state")
            .set(cache.token_entries() as f64);
        for (name, entries) in core.cache_entries() {
            metrics::gauge!("tokend_cache_entries", "cache" => name).set(entries as f64);
        }
        let (open, idle, max) = store.pool_connections();
        metrics::gauge!("tokend_db_pool_connections", "state" => "idle").set(idle as f64);
        metrics::gauge!("tokend_db_pool_connections", "state" => "in_use")
            .set(f64::from(open).max(idle as f64) - idle as f64);
        metrics::gauge!("tokend_db_pool_connections", "state" => "max").set(f64::from(max));
        metrics::gauge!("tokend_last_used_pending").set(last_used.pending_tokens() as f64);
    })
}
