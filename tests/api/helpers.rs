//! `spawn_app()`: a real tokend on 127.0.0.1:0 with a fresh database, a manual clock and a
//! bootstrapped root key; plus typed clients and a few builders for common arrangements.

use std::net::SocketAddr;
use std::sync::{Arc, Once};

use chrono::TimeDelta;
use sea_orm::{ConnectionTrait as _, Database};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

use secrecy::ExposeSecret as _;
use tokend::App;
use tokend::clock::ManualClock;
use tokend::config::Settings;
use tokend::hashing::Argon2Hasher;
use tokend::introspect::cache::LiveCache;
use tokend::proto::v1 as pb;
use tokend::proto::v1::audit_service_client::AuditServiceClient;
use tokend::proto::v1::directory_service_client::DirectoryServiceClient;
use tokend::proto::v1::token_service_client::TokenServiceClient;
use tokend::storage::SeaStore;

/// Which database a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Sends `authorization: Bearer <token>` with every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub type Tokens = TokenServiceClient<InterceptedService<Channel, Bearer>>;
pub type Directory = DirectoryServiceClient<InterceptedService<Channel, Bearer>>;
pub type Audit = AuditServiceClient<InterceptedService<Channel, Bearer>>;

/// A running tokend and what a test needs to talk to it.
pub struct TestApp {
    pub addr: SocketAddr,
    pub root: String,
    pub clock: Arc<ManualClock>,
    pub store: Arc<SeaStore>,
    pub hasher: Arc<Argon2Hasher>,
    pub cache: Arc<LiveCache>,
    pub core: Arc<tokend::service::Tokend>,
    pub backend: Backend,
    /// The database, reached directly (not through any proxy a test put in between).
    pub database_url: String,
    channel: Channel,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    _database: TestDatabase,
}

/// A database that exists for one test and is dropped after it.
pub enum TestDatabase {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Postgres { admin_url: String, name: String },
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let TestDatabase::Postgres { admin_url, name } = self {
            let (admin_url, name) = (admin_url.clone(), name.clone());
            // Drop runs inside the test's runtime; a fresh thread may block.
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(runtime) = runtime {
                    runtime.block_on(async {
                        if let Ok(db) = Database::connect(&admin_url).await {
                            let _ = db
                                .execute_unprepared(&format!(
                                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                                ))
                                .await;
                            let _ = db.close().await;
                        }
                    });
                }
            })
            .join();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

fn say_postgres_skipped() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Written past the test harness's capture, so it shows even for passing tests.
        use std::io::Write as _;
        if let Ok(mut tty) = std::fs::OpenOptions::new().write(true).open("/dev/stderr") {
            let _ = writeln!(
                tty,
                "\nSKIPPED: the PostgreSQL half of tests/api (TOKEND_TEST_POSTGRES_URL is not set)\n"
            );
        }
    });
}

/// `postgres://user@host:port/db?params` → (server part, params).
fn split_postgres_url(url: &str) -> (String, String) {
    let (without_query, query) = match url.split_once('?') {
        Some((u, q)) => (u.to_owned(), format!("?{q}")),
        None => (url.to_owned(), String::new()),
    };
    let scheme_end = without_query.find("://").map_or(0, |i| i + 3);
    let server = match without_query[scheme_end..].find('/') {
        Some(slash) => without_query[..scheme_end + slash].to_owned(),
        None => without_query,
    };
    (server, query)
}

/// A fresh, empty database on `backend` and its URL; `None` when the PostgreSQL half is not
/// configured on this machine.
pub async fn fresh_database(backend: Backend) -> Option<(String, TestDatabase)> {
    Some(match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("temp dir");
            let url = format!(
                "sqlite://{}?mode=rwc",
                dir.path().join("tokend.db").display()
            );
            (url, TestDatabase::Sqlite(dir))
        }
        Backend::Postgres => {
            let Ok(admin_url) = std::env::var("TOKEND_TEST_POSTGRES_URL") else {
                say_postgres_skipped();
                return None;
            };
            let name = format!("tokend_test_{}", uuid::Uuid::new_v4().simple());
            let admin = Database::connect(&admin_url)
                .await
                .expect("TOKEND_TEST_POSTGRES_URL is set but the server cannot be reached");
            admin
                .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
                .await
                .expect("create a fresh test database");
            admin.close().await.expect("close admin connection");
            let (server, query) = split_postgres_url(&admin_url);
            (
                format!("{server}/{name}{query}"),
                TestDatabase::Postgres { admin_url, name },
            )
        }
    })
}

/// A tokend with a fresh database on `backend`, bootstrapped; `None` when the PostgreSQL
/// half is not configured on this machine.
pub async fn spawn_app(backend: Backend) -> Option<TestApp> {
    spawn_app_with(backend, |_| {}).await
}

/// Like [`spawn_app`], with settings adjusted first.
pub async fn spawn_app_with(
    backend: Backend,
    adjust: impl FnOnce(&mut Settings),
) -> Option<TestApp> {
    let (url, database) = fresh_database(backend).await?;
    let mut settings = Settings::load(None, Vec::new()).expect("default settings");
    settings.listen = "127.0.0.1:0".parse().expect("address");
    settings.database_url = url.clone().into();
    settings.database.max_connections = 5;
    settings.last_used_flush_ms = 50;
    // Under a full parallel test run on two cores a heartbeat can be late; tests that are
    // about the heartbeat set their own.
    settings.cache.feed_timeout_ms = 5000;
    adjust(&mut settings);

    let clock = Arc::new(ManualClock::starting_now());
    let app = App::build_with_clock(&settings, clock.clone())
        .await
        .expect("app builds");
    let addr = app.local_addr();
    let store = app.store();
    let hasher = app.hasher();
    let root = tokend::service::bootstrap(&app.core())
        .await
        .expect("bootstrap")
        .expose_secret()
        .to_owned();
    // A replica is ready once its caches are trusted (on PostgreSQL: its change feed is
    // up). Tests start from there, as a load balancer would.
    let mut ready = app.cache().watch_trusted();
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        ready.wait_for(|trusted| *trusted),
    )
    .await
    .expect("the replica becomes ready")
    .expect("readiness is reported");
    let cache = app.cache();
    let core = app.core();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        app.run_until(async {
            let _ = rx.await;
        })
        .await
        .expect("server runs");
    });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect to tokend");
    Some(TestApp {
        addr,
        root,
        clock,
        store,
        hasher,
        cache,
        core,
        backend,
        database_url: url,
        channel,
        shutdown: Some(tx),
        server: Some(server),
        _database: database,
    })
}

fn bearer(token: Option<&str>) -> Bearer {
    Bearer(token.map(|t| format!("Bearer {t}").parse().expect("ascii token")))
}

/// Settings under which one argon2 verification takes most of a second here: long enough for
/// a test to act while a first sight is being decided.
pub fn slow_argon2(settings: &mut Settings) {
    settings.argon2.memory_kib = 64 * 1024;
    settings.argon2.iterations = 16;
}

/// The answer to an Introspect still being decided.
pub type Deciding = JoinHandle<Result<tonic::Response<pb::IntrospectResponse>, Status>>;

impl TestApp {
    /// Introspects `token` (never seen before) as root in a task, and returns once its
    /// argon2 verification has started: its state has been read by then.
    pub async fn first_sight_deciding(&self, token: String) -> Deciding {
        let verifications = self.hasher.verifications();
        let call = self.introspect_in_task(token);
        while self.hasher.verifications() == verifications {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        call
    }

    /// Introspects `token` as root in a task of its own.
    pub fn introspect_in_task(&self, token: String) -> Deciding {
        let mut client = self.tokens(&self.root);
        tokio::spawn(async move {
            client
                .introspect(pb::IntrospectRequest {
                    token,
                    ..Default::default()
                })
                .await
        })
    }

    pub fn tokens(&self, credential: &str) -> Tokens {
        TokenServiceClient::with_interceptor(self.channel.clone(), bearer(Some(credential)))
    }

    /// A client on a connection of its own, which remembers `credential` (and its verdict)
    /// undisturbed by the test's other calls.
    pub async fn tokens_on_a_connection_of_its_own(&self, credential: &str) -> Tokens {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect to tokend");
        TokenServiceClient::with_interceptor(channel, bearer(Some(credential)))
    }

    pub fn tokens_anonymous(&self) -> Tokens {
        TokenServiceClient::with_interceptor(self.channel.clone(), bearer(None))
    }

    pub fn directory(&self, credential: &str) -> Directory {
        DirectoryServiceClient::with_interceptor(self.channel.clone(), bearer(Some(credential)))
    }

    pub fn audit(&self, credential: &str) -> Audit {
        AuditServiceClient::with_interceptor(self.channel.clone(), bearer(Some(credential)))
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Creates (or replaces) an active tenant with these roles.
    pub async fn tenant(&self, id: &str, roles: &[(&str, &[&str])]) {
        self.put_tenant(pb::Tenant {
            id: id.into(),
            name: format!("Tenant {id}"),
            ..Default::default()
        })
        .await;
        for (name, permissions) in roles {
            self.role(id, name, permissions).await;
        }
    }

    pub async fn put_tenant(&self, tenant: pb::Tenant) -> pb::Tenant {
        self.directory(&self.root)
            .put_tenant(pb::PutTenantRequest {
                tenant: Some(tenant),
            })
            .await
            .expect("put tenant")
            .into_inner()
            .tenant
            .expect("tenant")
    }

    pub async fn role(&self, tenant: &str, name: &str, permissions: &[&str]) {
        self.directory(&self.root)
            .put_role(pb::PutRoleRequest {
                tenant_id: tenant.into(),
                name: name.into(),
                permissions: permissions.iter().map(|p| p.to_string()).collect(),
            })
            .await
            .expect("put role");
    }

    pub async fn member(&self, tenant: &str, user: &str, role: &str, groups: &[&str]) {
        self.directory(&self.root)
            .put_member(pb::PutMemberRequest {
                tenant_id: tenant.into(),
                user_id: user.into(),
                role: role.into(),
                groups: groups.iter().map(|g| g.to_string()).collect(),
            })
            .await
            .expect("put member");
    }

    pub async fn remove_member(&self, tenant: &str, user: &str) {
        self.directory(&self.root)
            .remove_member(pb::RemoveMemberRequest {
                tenant_id: tenant.into(),
                user_id: user.into(),
            })
            .await
            .expect("remove member");
    }

    pub async fn set_user_status(&self, user: &str, status: pb::UserStatus) {
        self.directory(&self.root)
            .set_user_status(pb::SetUserStatusRequest {
                user_id: user.into(),
                status: status.into(),
            })
            .await
            .expect("set user status");
    }

    /// Issues a personal token for `user` in `tenant` through the root key's act_as.
    pub async fn pat(
        &self,
        tenant: &str,
        user: &str,
        name: &str,
        scopes: &[&str],
    ) -> (String, pb::TokenInfo) {
        let issued = self
            .tokens(&self.root)
            .issue_token(pat_request(tenant, user, name, scopes))
            .await
            .expect("issue personal token")
            .into_inner();
        (issued.secret, issued.token.expect("token info"))
    }

    /// Revokes `user`'s token `id` in `tenant` through the root key's act_as.
    pub async fn revoke_as(&self, tenant: &str, user: &str, id: &str) {
        self.tokens(&self.root)
            .revoke_token(pb::RevokeTokenRequest {
                tenant_id: tenant.into(),
                actor_user_id: user.into(),
                token_id: id.into(),
                reason: String::new(),
            })
            .await
            .expect("revoke token");
    }

    /// `user`'s tokens in `tenant`, listed through the root key's act_as.
    pub async fn list_as(&self, tenant: &str, user: &str) -> Vec<pb::TokenInfo> {
        self.tokens(&self.root)
            .list_tokens(pb::ListTokensRequest {
                tenant_id: tenant.into(),
                actor_user_id: user.into(),
                ..Default::default()
            })
            .await
            .expect("list tokens")
            .into_inner()
            .tokens
    }

    /// Issues an API key in `tenant` bound to `role`, as `user` (who needs
    /// tokend.api_keys.manage there) through the root key's act_as.
    pub async fn api_key(
        &self,
        tenant: &str,
        user: &str,
        name: &str,
        role: &str,
    ) -> (String, pb::TokenInfo) {
        let issued = self
            .tokens(&self.root)
            .issue_token(pb::IssueTokenRequest {
                tenant_id: tenant.into(),
                actor_user_id: user.into(),
                kind: pb::TokenKind::ApiKey.into(),
                name: name.into(),
                role: role.into(),
                ..Default::default()
            })
            .await
            .expect("issue API key")
            .into_inner();
        (issued.secret, issued.token.expect("token info"))
    }

    /// A service's API key named `name` in the system tenant, bound to its existing `role`,
    /// issued by the root key.
    pub async fn system_key(&self, name: &str, role: &str) -> (String, pb::TokenInfo) {
        let issued = self
            .tokens(&self.root)
            .issue_token(pb::IssueTokenRequest {
                tenant_id: "system".into(),
                kind: pb::TokenKind::ApiKey.into(),
                name: name.into(),
                role: role.into(),
                ..Default::default()
            })
            .await
            .expect("issue a system key")
            .into_inner();
        (issued.secret, issued.token.expect("token info"))
    }

    /// Introspects with the root key (which may see reasons).
    pub async fn introspect(&self, token: &str) -> pb::IntrospectResponse {
        self.introspect_requiring(token, &[]).await
    }

    pub async fn introspect_requiring(
        &self,
        token: &str,
        required: &[&str],
    ) -> pb::IntrospectResponse {
        self.tokens(&self.root)
            .introspect(pb::IntrospectRequest {
                token: token.into(),
                required_permissions: required.iter().map(|p| p.to_string()).collect(),
                client_ip: String::new(),
            })
            .await
            .expect("introspect")
            .into_inner()
    }

    /// A `SELECT COUNT(*) …` read straight from the database, past tokend.
    pub async fn count(&self, sql: &str) -> i64 {
        let db = Database::connect(&self.database_url)
            .await
            .expect("database");
        let statement = sea_orm::Statement::from_string(db.get_database_backend(), sql);
        let row = db
            .query_one_raw(statement)
            .await
            .expect("count")
            .expect("a row");
        let count = row.try_get_by_index::<i64>(0).expect("a count");
        db.close().await.expect("close");
        count
    }

    /// The audit events about token `id`, newest first, read with the root key.
    pub async fn audit_of(&self, id: &str) -> Vec<pb::AuditEvent> {
        self.audit(&self.root)
            .list_audit_events(pb::ListAuditEventsRequest {
                token_id: id.into(),
                ..Default::default()
            })
            .await
            .expect("list audit events")
            .into_inner()
            .events
    }

    /// Stops the server, as an outage would; the database stays.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), server).await;
        }
    }

    pub fn advance(&self, by: TimeDelta) {
        self.clock.advance(by);
    }
}

/// Asserts a call failed with `code` and a message containing `needle`.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, needle: &str) {
    match result {
        Ok(value) => panic!("expected {code:?} containing {needle:?}, got Ok({value:?})"),
        Err(status) => {
            assert_eq!(status.code(), code, "status: {status:?}");
            assert!(
                status.message().contains(needle),
                "message {:?} does not contain {needle:?}",
                status.message()
            );
        }
    }
}

/// Sorted strings, for comparing repeated fields.
pub fn strings(list: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// Generates a `#[tokio::test]` per backend for each named test function. Each function
/// takes a freshly spawned [`TestApp`].
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let app = $crate::helpers::spawn_app($crate::helpers::Backend::Sqlite)
                        .await
                        .expect("SQLite is always available");
                    super::$name(app).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(app) = $crate::helpers::spawn_app($crate::helpers::Backend::Postgres).await {
                        super::$name(app).await;
                    }
                }
            )*
        }
    };
}

/// IssueToken of a personal token for `user` in `tenant`, acting as them.
pub fn pat_request(tenant: &str, user: &str, name: &str, scopes: &[&str]) -> pb::IssueTokenRequest {
    pb::IssueTokenRequest {
        tenant_id: tenant.into(),
        actor_user_id: user.into(),
        kind: pb::TokenKind::Personal.into(),
        name: name.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}
