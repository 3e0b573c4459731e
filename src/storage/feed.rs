//! The PostgreSQL change feed: one `LISTEN` connection per replica turns trigger
//! notifications into cache invalidations, and says when the feed cannot be trusted.
//!
//! - LISTEN first, then trust: caches start empty once the listener is in place, so nothing
//!   committed after that point can be missed.
//! - A lost connection is seen (`try_recv` returns `None`, unlike `recv`, which reconnects
//!   silently and hides the gap); a half-open one is caught by this replica's own heartbeat,
//!   which must come back within a timeout. Either way the caches are untrusted until a new
//!   listener is up and its first heartbeat is back.
//! - The same channel carries the write fence's messages (`super::fence`).
//! - A slow poll of `change_log` is the backstop for anything a lost message missed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sea_orm::sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use sea_orm::sqlx::{self, Row as _};
use tokio::sync::mpsc;

use crate::domain::model::Invalidation;
use crate::domain::names::{RoleName, TenantId, UserId};
use crate::domain::ports::{InvalidationSink, WriteFence};

use super::SeaStore;
use super::fence::{CONTROL, Control, Fences, Key, Kind, LEGACY_HEARTBEAT};

const CHANGES: &str = "tokend_changes";
/// Change-log rows one poll reads.
const POLL_LIMIT: i64 = 10_000;

/// Timing of the feed.
#[derive(Clone, Copy, Debug)]
pub struct FeedTiming {
    /// How often a heartbeat is sent through the database.
    pub heartbeat: Duration,
    /// Silence (no own heartbeat back) after which the listener connection is presumed
    /// dead; also the lease a replica trusts its caches for after a heartbeat was sent.
    pub timeout: Duration,
    /// How often `change_log` is polled.
    pub poll: Duration,
}

impl Default for FeedTiming {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(500),
            timeout: Duration::from_millis(2000),
            poll: Duration::from_secs(2),
        }
    }
}

/// Splits a notification into its change-log sequence number and what it invalidates.
pub fn split_notification(notification: &str) -> (Option<i64>, Invalidation) {
    match notification.split_once(' ') {
        Some((seq, payload)) => match seq.parse() {
            Ok(seq) => (Some(seq), parse_payload(payload)),
            Err(_) => (None, Invalidation::All),
        },
        None => (None, parse_payload(notification)),
    }
}

/// Parses a trigger payload into what it invalidates. Anything unreadable invalidates
/// everything: a notification can only ever evict.
pub fn parse_payload(payload: &str) -> Invalidation {
    #[derive(serde::Deserialize)]
    struct Payload {
        k: String,
        id: Option<String>,
        tenant: Option<String>,
        user: Option<String>,
        name: Option<String>,
    }
    let Ok(p) = serde_json::from_str::<Payload>(payload) else {
        return Invalidation::All;
    };
    match (p.k.as_str(), p.id, p.tenant, p.user, p.name) {
        ("token", Some(id), ..) => Invalidation::Token(id),
        ("tenant", Some(id), ..) => Invalidation::Tenant(TenantId::from_trusted(id)),
        ("user", Some(id), ..) => Invalidation::User(UserId::from_trusted(id)),
        ("member", _, Some(tenant), Some(user), _) => {
            Invalidation::Member(TenantId::from_trusted(tenant), UserId::from_trusted(user))
        }
        ("role", _, Some(tenant), _, Some(name)) => {
            Invalidation::Role(TenantId::from_trusted(tenant), RoleName::from_trusted(name))
        }
        _ => Invalidation::All,
    }
}

/// A running change feed: the task, and the fence its replica's writers wait on.
#[derive(Debug)]
pub struct ChangeFeed {
    pub task: tokio::task::JoinHandle<()>,
    pub fence: Arc<dyn WriteFence>,
}

impl SeaStore {
    /// Runs the change feed into `sink` until the returned task is aborted. PostgreSQL only;
    /// on SQLite it returns `None` and the caller trusts local invalidation.
    pub fn spawn_change_feed(
        &self,
        sink: Arc<dyn InvalidationSink>,
        timing: FeedTiming,
    ) -> Option<ChangeFeed> {
        if !self.is_postgres() {
            return None;
        }
        let pool = self.db.get_postgres_connection_pool();
        let connect = (*pool.connect_options()).clone();
        let fences = Arc::new(Fences::new(pool.clone(), timing.timeout));
        let task = tokio::spawn(run(connect, sink, Arc::clone(&fences), timing));
        Some(ChangeFeed {
            task,
            fence: fences,
        })
    }
}

async fn run(
    connect: sqlx::postgres::PgConnectOptions,
    sink: Arc<dyn InvalidationSink>,
    fences: Arc<Fences>,
    timing: FeedTiming,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        // The feed's own few connections (listener, heartbeats and acknowledgements, poll):
        // calls that read through to the database while the caches are untrusted could
        // otherwise hold every pooled connection, so that the heartbeats that would restore
        // trust, and the acknowledgements writers wait on, queue behind them.
        //
        // A new pool for each listening: a connection the lost one used may have lost
        // bytes mid-stream (a TLS stream then never decrypts again), and heartbeats sent
        // on it would never come back, so the caches would stay untrusted for good.
        let pool = PgPoolOptions::new()
            .max_connections(3)
            .acquire_timeout(timing.timeout)
            .connect_lazy_with(connect.clone());
        match listen_until_lost(&pool, &sink, &fences, timing).await {
            Ok(()) => backoff = Duration::from_millis(50),
            Err(err) => tracing::warn!(error = %err, "change feed: cannot listen"),
        }
        sink.set_trusted(false);
        metrics::gauge!("tokend_change_feed_listening").set(0.0);
        metrics::counter!("tokend_change_feed_losses_total").increment(1);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Change-log entries already applied (sequence number → payload, when), so the poll does
/// not evict them again. The payload is kept because the number comes from a notification,
/// which any database user can forge: only a matching payload counts as applied.
type Applied = Arc<std::sync::Mutex<HashMap<i64, (String, Instant)>>>;

/// One listener connection's life: returns when it is lost.
///
/// The loop that applies notifications never waits on the database: heartbeats and
/// acknowledgements are sent, and the change log polled, by their own tasks, so a slow or
/// unreachable database cannot hold back an eviction or hide a silent connection.
async fn listen_until_lost(
    pool: &PgPool,
    sink: &Arc<dyn InvalidationSink>,
    fences: &Arc<Fences>,
    timing: FeedTiming,
) -> Result<(), sqlx::Error> {
    let key = match fences.key() {
        Some(key) => key.clone(),
        None => {
            let key = Key::load(pool).await?;
            fences.set_key(key.clone());
            key
        }
    };
    let mut listener = PgListener::connect_with(pool).await?;
    listener.eager_reconnect(false);
    listener
        .listen_all([CHANGES, CONTROL, LEGACY_HEARTBEAT])
        .await?;
    // Everything committed from here on will be delivered. The caches are trusted, from
    // empty, once our own heartbeat comes back: that is what every later renewal of the
    // lease rests on too (see `fence`).
    let since = Instant::now();
    fences.listening(Some(since));
    let _listening = NotListeningOnDrop(Arc::clone(fences));
    metrics::gauge!("tokend_change_feed_listening").set(1.0);
    tracing::info!("change feed: listening");

    // The receiver owns the listener in its own task, so it is never cancelled mid-message;
    // it is dropped (closing the connection) when this function returns.
    let (tx, mut rx) = mpsc::channel::<Option<(String, String)>>(4096);
    let _receiver = AbortOnDrop(tokio::spawn(async move {
        loop {
            let message = match listener.try_recv().await {
                Ok(Some(n)) => Some((n.channel().to_owned(), n.payload().to_owned())),
                Ok(None) | Err(_) => None,
            };
            let lost = message.is_none();
            if tx.send(message).await.is_err() || lost {
                break;
            }
        }
    }));
    let (acks, outgoing) = mpsc::channel::<String>(4096);
    let _sender = AbortOnDrop(tokio::spawn(send_control(
        pool.clone(),
        Arc::clone(fences),
        key.clone(),
        outgoing,
        timing,
    )));
    let applied: Applied = Arc::default();
    let _poll = AbortOnDrop(tokio::spawn({
        let (pool, sink, applied) = (pool.clone(), Arc::clone(sink), Arc::clone(&applied));
        async move {
            let mut tick = tokio::time::interval(timing.poll);
            let mut polled_until: Option<i64> = None;
            loop {
                tick.tick().await;
                let poll =
                    poll_change_log(&pool, sink.as_ref(), &mut polled_until, &applied, timing);
                match tokio::time::timeout(timing.poll * 4, poll).await {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => tracing::debug!(error = %err, "change feed: poll failed"),
                    Err(_) => tracing::debug!("change feed: poll timed out"),
                }
            }
        }
    }));

    let mut trusted = false;
    // Only our own heartbeat coming back proves the round trip works; anyone else's
    // traffic does not.
    let mut last_own = since;
    let mut answered = RecentNonces::default();
    loop {
        let silence = tokio::time::sleep_until((last_own + timing.timeout).into());
        // Silence first: after a pause longer than the timeout (a stopped or frozen process),
        // the feed counts as lost before any message queued meanwhile is looked at.
        tokio::select! {
            biased;
            () = silence => {
                tracing::warn!("change feed: own heartbeat not back in time; caches untrusted");
                return Ok(());
            },
            message = rx.recv() => match message {
                Some(Some((channel, payload))) if channel == CHANGES => {
                    let (seq, change) = split_notification(&payload);
                    if let (Some(seq), Some((_, body))) = (seq, payload.split_once(' ')) {
                        lock(&applied).insert(seq, (body.to_owned(), Instant::now()));
                    }
                    sink.invalidate(&change);
                }
                Some(Some((channel, _))) if channel == LEGACY_HEARTBEAT => fences.heard_legacy(),
                Some(Some((_, payload))) => {
                    let Some(message) = Control::verify(&payload, &key) else {
                        metrics::counter!("tokend_change_feed_forged_total").increment(1);
                        continue;
                    };
                    let own = message.from == fences.me();
                    match (message.kind, own) {
                        // A replayed heartbeat of ours (from this listener or an earlier
                        // one) proves nothing about now.
                        (Kind::Heartbeat, true) if !fences.own_heartbeat_back(message.value) => {}
                        (Kind::Heartbeat, true) => {
                            let sent = fences.sent_at(message.value);
                            let lag = sent.elapsed().as_secs_f64();
                            metrics::histogram!("tokend_invalidation_lag_seconds").record(lag);
                            sink.renewed(sent);
                            last_own = Instant::now();
                            if !trusted {
                                sink.set_trusted(true);
                                trusted = true;
                                tracing::info!("change feed: heartbeat back; caches trusted");
                            }
                        }
                        (Kind::Heartbeat, false) => {
                            fences.heard(message.from, message.value, message.lease_ms);
                        }
                        (Kind::Fence, true) => fences.echoed(message.value),
                        // A fence seen before is a replay: answering it again would only
                        // crowd out the acknowledgements writers are waiting on.
                        (Kind::Fence, false) if !answered.first_sight(message.value) => {}
                        (Kind::Fence, false) => {
                            // Everything committed before this fence has been applied. If
                            // the queue is full the writer waits out the lease instead.
                            let _ = acks.try_send(fences.ack(&key, message.value));
                        }
                        (Kind::Ack, false) => fences.acked(message.value, message.from),
                        (Kind::Ack, true) => {}
                    }
                }
                _ => {
                    tracing::warn!("change feed: listener connection lost; caches untrusted");
                    return Ok(());
                }
            },
        }
    }
}

/// Sends this replica's heartbeats (on a timer) and acknowledgements (as fences arrive),
/// in order, until aborted. A heartbeat also records the replica in `tokend_replicas`, in
/// the same statement, for writers whose listener is too young to have heard it.
async fn send_control(
    pool: PgPool,
    fences: Arc<Fences>,
    key: Key,
    mut outgoing: mpsc::Receiver<String>,
    timing: FeedTiming,
) {
    let mut tick = tokio::time::interval(timing.heartbeat);
    let mut batch = Vec::new();
    loop {
        let send = tokio::select! {
            _ = tick.tick() => sqlx::query(
                "WITH registered AS (
                     INSERT INTO tokend_replicas (id, seen, lease_ms)
                     VALUES ($1, clock_timestamp(), $4)
                     ON CONFLICT (id) DO UPDATE
                     SET seen = excluded.seen, lease_ms = excluded.lease_ms
                     RETURNING 1)
                 SELECT pg_notify($2, $3) FROM registered",
            )
            .bind(fences.me().to_owned())
            .bind(CONTROL)
            // Stamped now, before the statement runs: the lease it renews starts no later
            // than the heartbeat's commit.
            .bind(fences.heartbeat(&key))
            .bind(i64::try_from(fences.lease_ms()).unwrap_or(i64::MAX)),
            received = outgoing.recv_many(&mut batch, 256) => {
                if received == 0 {
                    return;
                }
                sqlx::query("SELECT pg_notify($1, m) FROM unnest($2::text[]) AS m")
                    .bind(CONTROL)
                    .bind(std::mem::take(&mut batch))
            }
        };
        if let Err(err) = tokio::time::timeout(timing.timeout, send.execute(&pool))
            .await
            .unwrap_or(Err(sqlx::Error::PoolTimedOut))
        {
            tracing::debug!(error = %err, "change feed: control message not sent");
        }
    }
}

/// The nonces of the latest fences answered: a fence's nonce is random, so one seen again
/// is a replay. A bounded cache, so a flood of fences cannot grow it.
struct RecentNonces(quick_cache::unsync::Cache<u64, ()>);

impl Default for RecentNonces {
    fn default() -> Self {
        Self(quick_cache::unsync::Cache::new(Self::KEPT))
    }
}

impl RecentNonces {
    const KEPT: usize = 8192;

    /// Whether `nonce` is new; remembers it.
    fn first_sight(&mut self, nonce: u64) -> bool {
        if self.0.contains_key(&nonce) {
            return false;
        }
        self.0.insert(nonce, ());
        true
    }
}

/// Marks the replica as not listening when dropped, however the connection ended.
struct NotListeningOnDrop(Arc<Fences>);

impl Drop for NotListeningOnDrop {
    fn drop(&mut self) {
        self.0.listening(None);
    }
}

fn lock(applied: &Applied) -> std::sync::MutexGuard<'_, HashMap<i64, (String, Instant)>> {
    applied
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Applies every change logged since the last poll, with a margin for transactions that
/// committed late. Invalidations are idempotent, so seeing one twice costs a cache miss.
async fn poll_change_log(
    pool: &PgPool,
    sink: &dyn InvalidationSink,
    polled_until: &mut Option<i64>,
    applied: &Applied,
    timing: FeedTiming,
) -> Result<(), sqlx::Error> {
    // The database's clock, in microseconds, on both sides of the comparison.
    let now: i64 =
        sqlx::query("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint AS now")
            .fetch_one(pool)
            .await?
            .try_get("now")?;
    let margin = i64::try_from((timing.poll * 2).as_micros()).unwrap_or(i64::MAX);
    let first = polled_until.is_none();
    let since = polled_until.unwrap_or(now);
    let rows = sqlx::query(
        "SELECT seq, payload FROM change_log
         WHERE at > to_timestamp($1::float8 / 1000000) ORDER BY seq LIMIT $2",
    )
    .bind(since.saturating_sub(margin))
    .bind(POLL_LIMIT)
    .fetch_all(pool)
    .await?;
    let mut missed = Vec::new();
    {
        let mut applied = lock(applied);
        applied.retain(|_, (_, at)| at.elapsed() < timing.poll * 8);
        for row in &rows {
            let seq: i64 = row.try_get("seq")?;
            let payload: String = row.try_get("payload")?;
            let seen = applied.get(&seq).is_some_and(|(body, _)| *body == payload);
            applied.insert(seq, (payload.clone(), Instant::now()));
            if seen || first {
                // Applied already; or, on the first poll, visible now and so committed
                // before it: after LISTEN it was notified, before LISTEN it predates the
                // (empty) cache. Either way nothing to evict.
                continue;
            }
            missed.push(parse_payload(&payload));
        }
        if rows.len() == POLL_LIMIT as usize && !first {
            // More than one page changed: evict everything rather than page through.
            missed.push(Invalidation::All);
        }
    }
    for change in missed {
        // Found by the poll, not the listener: a notification went missing.
        metrics::counter!("tokend_change_feed_backstop_total").increment(1);
        sink.invalidate(&change);
    }
    *polled_until = Some(now);
    // Keep the log and the replica table short; any replica may prune.
    sqlx::query(
        "DELETE FROM change_log WHERE at < to_timestamp($1::float8 / 1000000) - interval '1 hour'",
    )
    .bind(now)
    .execute(pool)
    .await?;
    sqlx::query(
        "DELETE FROM tokend_replicas
         WHERE seen < to_timestamp($1::float8 / 1000000) - interval '1 hour'",
    )
    .bind(now)
    .execute(pool)
    .await?;
    Ok(())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_is_answered_once() {
        let mut answered = RecentNonces::default();
        assert!(answered.first_sight(7));
        assert!(!answered.first_sight(7), "a replay");
        for nonce in 100..100 + 4 * RecentNonces::KEPT as u64 {
            answered.first_sight(nonce);
        }
        // Bounded: a flood of fences does not grow it.
        assert!(answered.0.len() <= RecentNonces::KEPT);
    }

    #[test]
    fn payloads_name_keys_and_anything_else_evicts_everything() {
        assert_eq!(
            parse_payload(r#"{"k":"token","id":"AAAAAAAAAAAA"}"#),
            Invalidation::Token("AAAAAAAAAAAA".into())
        );
        assert_eq!(
            parse_payload(r#"{"k":"member","tenant":"a:b","user":"u|1"}"#),
            Invalidation::Member(
                TenantId::from_trusted("a:b".into()),
                UserId::from_trusted("u|1".into())
            )
        );
        assert_eq!(parse_payload("garbage"), Invalidation::All);
        assert_eq!(
            split_notification(r#"42 {"k":"user","id":"bob"}"#),
            (
                Some(42),
                Invalidation::User(UserId::from_trusted("bob".into()))
            )
        );
        assert_eq!(split_notification("x {}"), (None, Invalidation::All));
        assert_eq!(
            parse_payload(r#"{"k":"role","tenant":"x"}"#),
            Invalidation::All
        );
    }
}
