//! The one place that sees everything: builds the store, hasher, core and server from
//! [`Settings`], binds the listener (port 0 in tests), and runs until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use secrecy::SecretString;
use tokio::net::TcpListener;

use crate::clock::SystemClock;
use crate::config::Settings;
use crate::domain::ports::{Clock, SecretHasher, Store};
use crate::domain::token_format::TokenFormat;
use crate::hashing::Argon2Hasher;
use crate::service::{self, Tokend};
use crate::storage::SeaStore;

/// A built, bound, not yet running tokend.
#[derive(Debug)]
pub struct App {
    listener: TcpListener,
    core: Arc<Tokend>,
    store: Arc<SeaStore>,
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
    let core = core(
        settings,
        Arc::clone(&store) as Arc<dyn Store>,
        Arc::new(SystemClock),
    )?;
    Ok(service::bootstrap(&core).await?)
}

fn core(
    settings: &Settings,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Tokend> {
    let format = TokenFormat::new(&settings.token_prefix).context("token_prefix")?;
    let pepper = settings.resolve_pepper()?;
    let hasher: Arc<dyn SecretHasher> = Arc::new(Argon2Hasher::new(&settings.argon2, pepper)?);
    Ok(Tokend::new(store, hasher, clock, format))
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
        let core = Arc::new(core(
            settings,
            Arc::clone(&store) as Arc<dyn Store>,
            Arc::clone(&clock),
        )?);
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("cannot listen on {}", settings.listen))?;
        Ok(Self {
            listener,
            core,
            store,
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

    /// Serves until `shutdown` resolves, then reports NOT_SERVING and drains in-flight calls.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let address = self.local_addr();
        let health = tonic_health::server::health_reporter();
        tracing::info!(%address, "tokend is serving");
        crate::grpc::serve(self.listener, self.core, self.clock, health, shutdown).await?;
        tracing::info!("tokend stopped");
        Ok(())
    }
}
