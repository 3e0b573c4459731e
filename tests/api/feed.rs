//! PostgreSQL's change feed across replicas: triggers, LISTEN, loss of the listener, a
//! half-open connection, and an unreachable database.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait as _, Database};
use secrecy::ExposeSecret as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use tokend::proto::v1 as pb;

use crate::helpers::{Backend, TestApp, slow_argon2, spawn_app, spawn_app_with};

async fn acme(app: &TestApp) -> (String, pb::TokenInfo) {
    app.tenant("acme", &[("dev", &["a:read"])]).await;
    app.member("acme", "alice", "dev", &[]).await;
    let issued = app.pat("acme", "alice", "laptop", &[]).await;
    for _ in 0..3 {
        assert!(app.introspect(&issued.0).await.active);
    }
    issued
}

async fn sql(app: &TestApp, statement: &str) {
    let db = Database::connect(&app.database_url).await.unwrap();
    db.execute_unprepared(statement).await.unwrap();
    db.close().await.unwrap();
}

/// Revokes a token the way a DBA would: plain SQL, behind tokend's back.
async fn revoke_by_hand(app: &TestApp, id: &str) {
    sql(
        app,
        &format!("UPDATE tokens SET revoked_at = 1, revoked_by = 'dba' WHERE id = '{id}'"),
    )
    .await;
}

/// Polls Introspect until the token is inactive; returns how long that took.
async fn until_inactive(app: &TestApp, token: &str, bound: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if !app.introspect(token).await.active {
            return start.elapsed();
        }
        assert!(start.elapsed() < bound, "still active after {bound:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn until_ready(app: &TestApp, ready: bool, bound: Duration) {
    let mut watch = app.cache.watch_trusted();
    tokio::time::timeout(bound, watch.wait_for(|trusted| *trusted == ready))
        .await
        .unwrap_or_else(|_| panic!("readiness did not become {ready} within {bound:?}"))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_sql_fix_is_seen_through_the_triggers() {
    let Some(app) = spawn_app(Backend::Postgres).await else {
        return;
    };
    let (token, info) = acme(&app).await;
    revoke_by_hand(&app, &info.id).await;
    let took = until_inactive(&app, &token, Duration::from_secs(1)).await;
    eprintln!("manual SQL revocation seen after {took:?}");

    // A role change by hand shrinks permissions too.
    let (other, _) = app.pat("acme", "alice", "phone", &[]).await;
    assert_eq!(
        app.introspect(&other).await.permissions,
        vec!["a:read".to_owned()]
    );
    sql(
        &app,
        "UPDATE roles SET permissions = '[]' WHERE tenant_id = 'acme' AND name = 'dev'",
    )
    .await;
    let start = Instant::now();
    while !app.introspect(&other).await.permissions.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_listener_is_noticed_and_revocations_still_hold() {
    let Some(app) = spawn_app(Backend::Postgres).await else {
        return;
    };
    let (token, info) = acme(&app).await;
    let database = app.database_url.rsplit('/').next().unwrap().to_owned();
    // Kill the LISTEN backend and, at once, revoke behind its back: that notification is
    // lost, and the replica must not keep answering from its cache.
    sql(
        &app,
        &format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = '{database}' AND query LIKE 'LISTEN%'"
        ),
    )
    .await;
    revoke_by_hand(&app, &info.id).await;
    let took = until_inactive(&app, &token, Duration::from_secs(5)).await;
    eprintln!("revocation during listener loss enforced after {took:?}");

    // The feed comes back and the cache is trusted again, from empty.
    until_ready(&app, true, Duration::from_secs(10)).await;
    let (other, other_info) = app.pat("acme", "alice", "phone", &[]).await;
    assert!(app.introspect(&other).await.active);
    app.tokens(&app.root)
        .revoke_token(pb::RevokeTokenRequest {
            tenant_id: "acme".into(),
            actor_user_id: "alice".into(),
            token_id: other_info.id,
            reason: String::new(),
        })
        .await
        .unwrap();
    assert!(!app.introspect(&other).await.active);
}

/// Busy pooled connections are handed out without a ping (a second round trip on every
/// cold Introspect), so one that the server dropped meanwhile is found only when a
/// statement fails on it. That costs a call UNAVAILABLE at most, once per dead connection:
/// never a verdict, never INTERNAL, and nothing remembered from the failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_server_dropped_costs_unavailable_at_most_never_a_verdict() {
    const POOL: u32 = 4;
    let Some(app) = spawn_app_with(Backend::Postgres, |settings| {
        settings.database.max_connections = POOL;
    })
    .await
    else {
        return;
    };
    let (warm, _) = acme(&app).await;
    let mut cold = Vec::new();
    for n in 0..20 {
        cold.push(app.pat("acme", "alice", &format!("cold-{n}"), &[]).await.0);
    }
    let database = app.database_url.rsplit('/').next().unwrap().to_owned();
    // Every connection of tokend's pool, as a server restart or a DBA would (the feed's
    // spare ones too); the listener stays, so the cache keeps its verdicts.
    sql(
        &app,
        &format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = '{database}' AND pid <> pg_backend_pid()
               AND query NOT LIKE 'LISTEN%'"
        ),
    )
    .await;
    assert!(app.introspect(&warm).await.active, "a remembered verdict");

    let mut unavailable = Vec::new();
    for token in &cold {
        match app
            .tokens(&app.root)
            .introspect(pb::IntrospectRequest {
                token: token.clone(),
                ..Default::default()
            })
            .await
        {
            Ok(answer) => assert!(answer.into_inner().active, "a live token answered inactive"),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                unavailable.push(token);
            }
        }
    }
    eprintln!("{} call(s) met a dropped connection", unavailable.len());
    // Each dead connection fails one statement and is discarded.
    assert!(
        unavailable.len() <= POOL as usize,
        "more failures than the pool holds connections"
    );
    assert!(unavailable.len() < cold.len(), "the pool never recovered");
    // Nothing of a failed attempt stays behind.
    for token in unavailable {
        assert!(app.introspect(token).await.active);
    }
}

/// A cold Introspect is one round trip to PostgreSQL before it answers: a pooled connection
/// in use is not pinged before its statement (sqlx's default pings on every checkout). The
/// proxy counts tokend's lone `Sync` writes, which is what a ping is. sqlx still pings each
/// connection as it goes back to the pool, after the call has its answer: one per call. A
/// ping on checkout made it two (40 for 20 calls when this test was written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_introspect_on_a_busy_pool_is_one_round_trip_without_a_ping() {
    let Some((app, proxy)) = app_behind_proxy_adjusted(|settings| {
        // In the clear, so the proxy can read the messages.
        let url = format!("{}?sslmode=disable", settings.database_url.expose_secret());
        settings.database_url = url.into();
        // Few heartbeats and no flush of last uses during the calls: their pings would
        // count too.
        settings.cache.feed_heartbeat_ms = 1000;
        settings.cache.feed_timeout_ms = 5000;
        settings.last_used_flush_ms = 60_000;
        // Sequential calls take turns on the pool's connections: with two, none sits idle
        // for long enough to be pinged even on a slow, busy machine.
        settings.database.max_connections = 2;
    })
    .await
    else {
        return;
    };
    acme(&app).await;
    let mut cold = Vec::new();
    for n in 0..20 {
        cold.push(app.pat("acme", "alice", &format!("cold-{n}"), &[]).await.0);
    }
    let before = proxy.pings.load(Ordering::SeqCst);
    for token in &cold {
        assert!(app.introspect(token).await.active);
    }
    let pings = proxy.pings.load(Ordering::SeqCst) - before;
    eprintln!("{pings} ping(s) during {} cold calls", cold.len());
    assert!(
        pings <= cold.len() as u64 + 4,
        "{pings} pings for {} cold calls on a busy pool: pinged before the statement too",
        cold.len()
    );
}

/// A TCP proxy between tokend and PostgreSQL that can forward, swallow everything while
/// keeping sockets open (a half-open peer), or refuse and cut every connection.
struct Proxy {
    port: u16,
    mode: Arc<AtomicU8>,
    /// Writes from tokend that were a lone `Sync` message: sqlx's ping of a pooled connection.
    pings: Arc<AtomicU64>,
}

/// PostgreSQL's `Sync` message alone, as sqlx's ping writes it: `S`, then its length (4).
const LONE_SYNC: [u8; 5] = [b'S', 0, 0, 0, 4];

const FORWARD: u8 = 0;
const BLACKHOLE: u8 = 1;
const DOWN: u8 = 2;
/// Everything arrives, three seconds late: a database that is up but slow.
const SLOW: u8 = 3;

impl Proxy {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(AtomicU8::new(FORWARD));
        let accept_mode = Arc::clone(&mode);
        let pings = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&pings);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if accept_mode.load(Ordering::SeqCst) == DOWN {
                    continue; // dropped: refused
                }
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let pings = Some(Arc::clone(&counted));
                tokio::spawn(pump(cr, sw, Arc::clone(&accept_mode), pings));
                tokio::spawn(pump(sr, cw, Arc::clone(&accept_mode), None));
            }
        });
        Self { port, mode, pings }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: Arc<AtomicU8>,
    pings: Option<Arc<AtomicU64>>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                if mode.load(Ordering::SeqCst) == DOWN { return; }
                continue;
            }
        };
        let Ok(n) = read else { return };
        if n == 0 {
            return;
        }
        // sqlx flushes a ping on its own and waits for the answer, so it is one read here.
        if let Some(pings) = &pings
            && buffer[..n] == LONE_SYNC
        {
            pings.fetch_add(1, Ordering::SeqCst);
        }
        match mode.load(Ordering::SeqCst) {
            FORWARD => {
                if to.write_all(&buffer[..n]).await.is_err() {
                    return;
                }
            }
            BLACKHOLE => {}
            SLOW => {
                tokio::time::sleep(Duration::from_secs(3)).await;
                if to.write_all(&buffer[..n]).await.is_err() {
                    return;
                }
            }
            _ => return,
        }
    }
}

async fn app_behind_proxy() -> Option<(TestApp, Proxy)> {
    app_behind_proxy_with(0).await
}

async fn app_behind_proxy_with(max_staleness_ms: u64) -> Option<(TestApp, Proxy)> {
    app_behind_proxy_adjusted(|settings| settings.cache.max_staleness_ms = max_staleness_ms).await
}

async fn app_behind_proxy_adjusted(
    adjust: impl FnOnce(&mut tokend::config::Settings),
) -> Option<(TestApp, Proxy)> {
    let admin = std::env::var("TOKEND_TEST_POSTGRES_URL").ok()?;
    let authority = admin
        .split("://")
        .nth(1)?
        .split('/')
        .next()?
        .rsplit('@')
        .next()?
        .to_owned();
    let proxy = Proxy::start(authority.clone()).await;
    let port = proxy.port;
    let app = spawn_app_with(Backend::Postgres, |settings| {
        let url = settings
            .database_url
            .expose_secret()
            .replace(&authority, &format!("127.0.0.1:{port}"));
        settings.database_url = url.into();
        settings.database.acquire_timeout_ms = 1000;
        settings.cache.feed_timeout_ms = 1500;
        adjust(settings);
    })
    .await?;
    Some((app, proxy))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_listener_is_caught_by_the_heartbeat() {
    let Some((app, proxy)) = app_behind_proxy().await else {
        return;
    };
    let (token, info) = acme(&app).await;
    // Packets vanish but no socket closes: only the heartbeat can tell.
    proxy.set(BLACKHOLE);
    revoke_by_hand(&app, &info.id).await;
    until_ready(&app, false, Duration::from_secs(5)).await;
    assert_eq!(
        health(&app).await,
        ServingStatus::NotServing as i32,
        "the overall status says the caches are untrusted"
    );
    assert_eq!(
        health_of(&app, "readiness").await,
        ServingStatus::Serving as i32,
        "but the probe's readiness holds: a database blip must not empty the Service"
    );
    // Untrusted now: the replica reads through, and the database is out of reach.
    let result = app
        .tokens(&app.root)
        .introspect(pb::IntrospectRequest {
            token: token.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(
        result.unwrap_err().code(),
        Code::Unavailable,
        "never a stale active"
    );
    proxy.set(FORWARD);
    until_ready(&app, true, Duration::from_secs(15)).await;
    assert_eq!(health(&app).await, ServingStatus::Serving as i32);
    until_inactive(&app, &token, Duration::from_secs(5)).await;
}

async fn health(app: &TestApp) -> i32 {
    health_of(app, "").await
}

async fn health_of(app: &TestApp, service: &str) -> i32 {
    // Readiness follows trust through a watch; give the reporter its moment.
    tokio::time::sleep(Duration::from_millis(50)).await;
    HealthClient::new(app.channel())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_unavailable_never_a_verdict() {
    let Some((app, proxy)) = app_behind_proxy().await else {
        return;
    };
    let (token, _) = acme(&app).await;
    proxy.set(DOWN);
    until_ready(&app, false, Duration::from_secs(5)).await;
    for candidate in [token.as_str(), app.root.as_str()] {
        let result = app
            .tokens_anonymous()
            .introspect(pb::IntrospectRequest {
                token: candidate.into(),
                ..Default::default()
            })
            .await;
        assert_eq!(
            result.unwrap_err().code(),
            Code::Unauthenticated,
            "no credential is still no credential"
        );
        let result = app
            .tokens(&app.root)
            .introspect(pb::IntrospectRequest {
                token: candidate.into(),
                ..Default::default()
            })
            .await;
        let status = result.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            !status.message().contains("postgres://"),
            "no connection details leak"
        );
    }
    proxy.set(FORWARD);
    until_ready(&app, true, Duration::from_secs(15)).await;
    assert!(app.introspect(&token).await.active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_chosen_staleness_bound_serves_cached_answers_through_a_short_outage() {
    let Some((app, proxy)) = app_behind_proxy_with(60_000).await else {
        return;
    };
    let (token, _) = acme(&app).await;
    let (cold, _) = app.pat("acme", "alice", "never-introspected", &[]).await;
    proxy.set(DOWN);
    until_ready(&app, false, Duration::from_secs(5)).await;
    // Known and recently confirmed: served from the cache, within the bound.
    assert!(app.introspect(&token).await.active);
    // Never seen: nothing trustworthy is cached, so no verdict.
    let result = app
        .tokens(&app.root)
        .introspect(pb::IntrospectRequest {
            token: cold,
            ..Default::default()
        })
        .await;
    assert_eq!(result.unwrap_err().code(), Code::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_database_is_unavailable_within_the_read_deadline() {
    // A connection is handed out at once; the read itself is what is slow.
    let Some((app, proxy)) = app_behind_proxy_adjusted(|settings| {
        settings.database.acquire_timeout_ms = 20_000;
        settings.database.state_read_timeout_ms = 500;
    })
    .await
    else {
        return;
    };
    acme(&app).await;
    // Never introspected, so its state must be read; the root key is warm.
    let (token, _) = app.pat("acme", "alice", "fresh", &[]).await;
    assert!(app.introspect(&app.root).await.active);
    proxy.set(SLOW);
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        app.tokens(&app.root).introspect(pb::IntrospectRequest {
            token: token.clone(),
            ..Default::default()
        }),
    )
    .await
    .expect("answered, not hung");
    let status = result.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    eprintln!(
        "a slow database answered UNAVAILABLE after {:?}",
        started.elapsed()
    );
    proxy.set(FORWARD);
    until_ready(&app, true, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(4)).await; // slow packets still in flight
    assert!(app.introspect(&token).await.active);
}

/// What one call of the load saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Active,
    Inactive,
    Unavailable,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_under_load_gives_no_wrong_verdict_and_enforces_what_changed_meanwhile()
{
    let Some((app, proxy)) = app_behind_proxy().await else {
        return;
    };
    let (live, _) = acme(&app).await;
    let (doomed, doomed_info) = app.pat("acme", "alice", "doomed", &[]).await;
    assert!(app.introspect(&doomed).await.active);

    // Load: both tokens introspected back to back, each answer kept with when its call began.
    let app = Arc::new(app);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn({
        let (app, stop) = (Arc::clone(&app), Arc::clone(&stop));
        let (live, doomed) = (live.clone(), doomed.clone());
        async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                for (which, token) in [(0, &live), (1, &doomed)] {
                    let began = Instant::now();
                    let answer = app
                        .tokens(&app.root)
                        .introspect(pb::IntrospectRequest {
                            token: token.clone(),
                            ..Default::default()
                        })
                        .await;
                    let outcome = match answer {
                        Ok(answer) if answer.get_ref().active => Seen::Active,
                        Ok(_) => Seen::Inactive,
                        Err(status) => {
                            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                            Seen::Unavailable
                        }
                    };
                    seen.push((which, began, outcome));
                }
            }
            seen
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    // What a restart looks like from here: every connection cut, new ones refused.
    proxy.set(DOWN);
    until_ready(&app, false, Duration::from_secs(5)).await;
    // Meanwhile the token is revoked elsewhere (another replica, a DBA): this replica's
    // listener is gone and misses the notification.
    revoke_by_hand(&app, &doomed_info.id).await;
    let revoked = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set(FORWARD);
    let back = Instant::now();
    until_ready(&app, true, Duration::from_secs(15)).await;
    let enforced = loop {
        if !app.introspect(&doomed).await.active {
            break back.elapsed();
        }
        assert!(
            back.elapsed() < Duration::from_secs(15),
            "the revocation was missed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let seen = load.await.unwrap();

    let count = |which: usize, outcome: Seen| {
        seen.iter()
            .filter(|(w, _, o)| *w == which && *o == outcome)
            .count()
    };
    // The live token was never called inactive: an outage is UNAVAILABLE, not a verdict.
    assert_eq!(count(0, Seen::Inactive), 0, "a wrong inactive");
    assert!(
        count(0, Seen::Unavailable) > 0,
        "the outage was not under load"
    );
    // Nothing begun after the revocation called the doomed token active.
    let stale = seen
        .iter()
        .filter(|(w, began, o)| *w == 1 && *began > revoked && *o == Seen::Active)
        .count();
    assert_eq!(stale, 0, "a stale active after the revocation");
    // And the replica recovered: the load ends with real verdicts again.
    let last_live = seen.iter().rev().find(|(w, _, _)| *w == 0).unwrap().2;
    assert_eq!(last_live, Seen::Active);
    eprintln!(
        "database back: trusted again and the revocation enforced {} ms later; {} calls under load",
        enforced.as_millis(),
        seen.len()
    );
}

/// A first sight whose cache stops being trusted while argon2 runs (the listener killed and
/// kept from coming back) decides again, from the database, before it answers: here the
/// token is revoked by hand meanwhile, a change the lost listener never delivers. Neither of
/// the other causes applies: the lease (5 s in tests) outlasts the call, and no re-trust
/// has bumped the generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_whose_cache_lost_trust_meanwhile_is_made_again() {
    let Some(app) = spawn_app_with(Backend::Postgres, slow_argon2).await else {
        return;
    };
    app.tenant("acme", &[("dev", &["a:read"])]).await;
    app.member("acme", "alice", "dev", &[]).await;
    let (token, info) = app.pat("acme", "alice", "laptop", &[]).await;
    let untrusted = || {
        app.core
            .redecisions(tokend::introspect::Redecision::Untrusted)
    };
    let before = untrusted();
    let call = app.first_sight_deciding(token).await;

    // No new connection to the test database, then every connection tokend has to it goes
    // (the feed's spare ones too, or the listener would come back on one of them): only
    // the DBA's stays.
    // One connection, kept: a pool could reach for a new one, which will be refused.
    let dba = Database::connect(
        sea_orm::ConnectOptions::new(app.database_url.clone())
            .max_connections(1)
            .min_connections(1)
            .to_owned(),
    )
    .await
    .unwrap();
    let database = app.database_url.rsplit('/').next().unwrap().to_owned();
    let admin_url = std::env::var("TOKEND_TEST_POSTGRES_URL").unwrap();
    let admin = Database::connect(&admin_url).await.unwrap();
    admin
        .execute_unprepared(&format!(
            "ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS false"
        ))
        .await
        .unwrap();
    dba.execute_unprepared(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = '{database}' AND pid <> pg_backend_pid()"
    ))
    .await
    .unwrap();
    until_ready(&app, false, Duration::from_secs(5)).await;
    dba.execute_unprepared(&format!(
        "UPDATE tokens SET revoked_at = 1, revoked_by = 'dba' WHERE id = '{}'",
        info.id
    ))
    .await
    .unwrap();
    assert!(
        !call.is_finished(),
        "the first sight ended before the revocation: argon2 was not slow enough"
    );
    let answer = call.await.unwrap();
    dba.close().await.unwrap();
    admin
        .execute_unprepared(&format!(
            "ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS true"
        ))
        .await
        .unwrap();
    admin.close().await.unwrap();

    // Made again from the database: UNAVAILABLE while it cannot be reached (inactive, had
    // a connection survived). Never active.
    match answer {
        Ok(response) => assert!(
            !response.into_inner().active,
            "answered active from state read before a revocation it could not hear of"
        ),
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
    }
    assert!(
        untrusted() > before,
        "a decision from a cache that lost trust meanwhile was answered without being made again"
    );
}

/// A token whose state changes under every attempt to decide it gets UNAVAILABLE after a
/// bounded number of attempts: never a verdict from state already replaced, and no call
/// that loops for as long as the changes go on. Deterministic on PostgreSQL: the test holds
/// the tokens table locked, so each attempt's read waits; the token's row is invalidated
/// while it waits, and the lock is handed to the next holder (queued behind the read, which
/// PostgreSQL grants first), so the attempt after it waits in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_changing_under_every_decision_is_unavailable_never_a_stale_verdict() {
    use sea_orm::TransactionTrait as _;
    use tokend::domain::model::Invalidation;
    use tokend::domain::ports::InvalidationSink as _;

    let Some(app) = spawn_app(Backend::Postgres).await else {
        return;
    };
    app.tenant("acme", &[("dev", &["a:read"])]).await;
    app.member("acme", "alice", "dev", &[]).await;
    let (token, info) = app.pat("acme", "alice", "laptop", &[]).await;
    let (steady, _) = app.pat("acme", "alice", "desktop", &[]).await;
    // The caller's own verdict, remembered now: its call below reads nothing.
    assert!(app.introspect(&steady).await.active);
    let touched = || {
        app.core
            .redecisions(tokend::introspect::Redecision::Touched)
    };
    let before = touched();

    let one_connection = || {
        Database::connect(
            sea_orm::ConnectOptions::new(app.database_url.clone())
                .max_connections(1)
                .min_connections(1)
                .to_owned(),
        )
    };
    let (lockers, watcher) = (
        [
            one_connection().await.unwrap(),
            one_connection().await.unwrap(),
        ],
        one_connection().await.unwrap(),
    );
    let lock = |locker: sea_orm::DatabaseConnection| async move {
        let held = locker.begin().await.unwrap();
        held.execute_unprepared("LOCK TABLE tokens IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
        held
    };
    // Whether a statement whose text starts with `what` waits for a lock.
    let waiting = |what: &'static str| {
        let watcher = watcher.clone();
        async move {
            let row = watcher
                .query_one_raw(sea_orm::Statement::from_string(
                    sea_orm::DbBackend::Postgres,
                    format!(
                        "SELECT count(*) AS n FROM pg_stat_activity
                         WHERE datname = current_database() AND wait_event_type = 'Lock'
                           AND query LIKE '{what}%'"
                    ),
                ))
                .await
                .unwrap()
                .unwrap();
            row.try_get::<i64>("", "n").unwrap() > 0
        }
    };

    let mut held = lock(lockers[0].clone()).await;
    let call = app.introspect_in_task(token);
    // Each read of the token's state (a statement can wait twice, for its parse and for
    // its execution) finds the token changed by the time it is let through, until the
    // call gives up.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut turn = 0;
    while !call.is_finished() {
        assert!(Instant::now() < deadline, "the call kept deciding");
        if !waiting("SELECT t.*").await {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        app.cache.invalidate(&Invalidation::Token(info.id.clone()));
        turn += 1;
        let next = tokio::spawn(lock(lockers[turn % 2].clone()));
        while !waiting("LOCK TABLE").await {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        held.commit().await.unwrap();
        // Granted once the read's statement has run: PostgreSQL grants in queue order.
        held = next.await.unwrap();
    }
    held.commit().await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("the call ended")
        .unwrap();
    let status = answer.expect_err("a token changing under every decision got a verdict");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        touched() - before,
        5,
        "made again after each change, and no more"
    );
    assert!(
        app.introspect(&app.pat("acme", "alice", "later", &[]).await.0)
            .await
            .active,
        "tokens are decided as usual once the changes stop"
    );
}
