//! `last_used_at` and where from, coalesced: uses are noted in memory and written in one
//! batched write every few seconds (and on shutdown), and only when a token's time (or a
//! (client IP, calling service) pair's) moved by a minute. The warm Introspect path never
//! writes to the database.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrayvec::ArrayString;

use crate::domain::Result;
use crate::domain::model::{Timestamp, Token, TokenUse};
use crate::domain::ports::Store;

use super::ActiveToken;

/// `last_used_at` is kept to the minute.
const RESOLUTION: chrono::TimeDelta = chrono::TimeDelta::minutes(1);

/// Distinct (token, client IP, service) uses waiting for the next flush, at most. A gateway
/// reporting a new client IP on every call (a scan through it) must not grow memory or the
/// next write without bound; what is over is dropped and counted.
const MAX_PENDING_SITES: usize = 10_000;

/// (token id, client IP, calling credential's id; empty = the token called tokend itself).
type SiteKey = (ArrayString<16>, Option<IpAddr>, ArrayString<16>);

/// The calling service as a use records it: the credential that asked about the token.
#[derive(Clone, Copy, Debug)]
pub struct Service<'a> {
    /// Its public id.
    pub id: &'a str,
    /// Its display id.
    pub display_id: &'a str,
    /// Its name.
    pub name: &'a str,
}

/// Notes token uses and flushes them in batches.
#[derive(Debug)]
pub struct LastUsed {
    store: Arc<dyn Store>,
    pending: Mutex<HashMap<String, Timestamp>>,
    /// When each recently seen site was last queued (Unix ms): the check that keeps a busy
    /// site to one write a minute, bounded (an evicted site is merely queued again).
    sites_seen: quick_cache::sync::Cache<SiteKey, i64>,
    pending_sites: Mutex<HashMap<SiteKey, TokenUse>>,
}

impl LastUsed {
    /// A coalescer writing to `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            pending: Mutex::new(HashMap::new()),
            sites_seen: quick_cache::sync::Cache::new(100_000),
            pending_sites: Mutex::new(HashMap::new()),
        }
    }

    /// Notes that token `token_id` was used at `now` from `client_ip` through `service`
    /// (`None`: the token was itself the credential of a call to tokend). A pair seen less
    /// than a minute ago costs one cache lookup. Never waits on I/O.
    pub fn note_site(
        &self,
        token_id: &str,
        client_ip: Option<IpAddr>,
        service: Option<Service<'_>>,
        now: Timestamp,
    ) {
        let (Ok(token), Ok(via)) = (
            ArrayString::from(token_id),
            ArrayString::from(service.map_or("", |s| s.id)),
        ) else {
            return;
        };
        let key = (token, client_ip.map(|ip| ip.to_canonical()), via);
        let millis = now.timestamp_millis();
        if let Some(seen) = self.sites_seen.get(&key)
            && (0..RESOLUTION.num_milliseconds()).contains(&(millis - seen))
        {
            return;
        }
        let mut pending = self
            .pending_sites
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if pending.len() >= MAX_PENDING_SITES && !pending.contains_key(&key) {
            metrics::counter!("tokend_token_uses_dropped_total").increment(1);
            return;
        }
        pending.insert(
            key,
            TokenUse {
                token_id: token_id.to_owned(),
                client_ip: key.1,
                service: service.map_or_else(String::new, |s| s.display_id.to_owned()),
                service_name: service.map_or_else(String::new, |s| s.name.to_owned()),
                at: now,
            },
        );
        drop(pending);
        self.sites_seen.insert(key, millis);
    }

    /// Notes that `token` was used at `now`, and returns the use time now on record (`now`,
    /// or a time less than a minute before it). `noted` is the use time the token's previous
    /// verdict carried (Unix ms), which is newer than the row's while a write is pending: a
    /// token used every second is then written once a minute, however often its verdict is
    /// recomputed. Never waits on I/O.
    pub fn record(&self, token: &Token, now: Timestamp, noted: Option<i64>) -> Timestamp {
        let noted = noted.and_then(chrono::DateTime::from_timestamp_millis);
        let last = noted.max(token.last_used_at);
        // A clock stepped back makes `last` look recent forever; record anew instead.
        if let Some(last) = last
            && (chrono::TimeDelta::zero()..RESOLUTION).contains(&(now - last))
        {
            return last;
        }
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(token.id().to_owned(), now);
        now
    }

    /// [`record`](Self::record) for a remembered verdict: while the use time it carries is
    /// less than a minute old this is one atomic load, so the warm path touches no map.
    pub fn touch(&self, active: &ActiveToken, now: Timestamp) {
        let millis = now.timestamp_millis();
        let since = millis - active.last_noted.load(Ordering::Relaxed);
        if (0..RESOLUTION.num_milliseconds()).contains(&since) {
            return;
        }
        let noted = self.record(&active.token, now, None);
        active
            .last_noted
            .store(noted.timestamp_millis(), Ordering::Relaxed);
    }

    /// Writes every noted use; returns how many tokens' last use was written.
    pub async fn flush(&self) -> Result<usize> {
        let sites = self.flush_sites().await;
        let written = self.flush_times().await?;
        sites?;
        Ok(written)
    }

    async fn flush_sites(&self) -> Result<()> {
        let batch: Vec<(SiteKey, TokenUse)> = {
            let mut pending = self
                .pending_sites
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            pending.drain().collect()
        };
        if batch.is_empty() {
            return Ok(());
        }
        let uses: Vec<TokenUse> = batch.iter().map(|(_, u)| u.clone()).collect();
        if let Err(err) = self.store.record_token_uses(&uses).await {
            // Put them back for the next round, unless newer uses arrived meanwhile.
            let mut pending = self
                .pending_sites
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for (key, record) in batch {
                if pending.len() < MAX_PENDING_SITES {
                    pending.entry(key).or_insert(record);
                }
            }
            return Err(err);
        }
        metrics::counter!("tokend_token_uses_flushed_total").increment(uses.len() as u64);
        Ok(())
    }

    async fn flush_times(&self) -> Result<usize> {
        let batch: Vec<(String, Timestamp)> = {
            let mut pending = self
                .pending
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            pending.drain().collect()
        };
        if batch.is_empty() {
            return Ok(0);
        }
        if let Err(err) = self.store.touch_last_used(&batch).await {
            // Put them back for the next round, unless newer uses arrived meanwhile.
            let mut pending = self
                .pending
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for (id, at) in batch {
                pending.entry(id).or_insert(at);
            }
            return Err(err);
        }
        metrics::counter!("tokend_last_used_flushed_total").increment(batch.len() as u64);
        Ok(batch.len())
    }

    /// Flushes every `every` until the returned task is aborted.
    pub fn spawn_flusher(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(err) = this.flush().await {
                    tracing::warn!(error = %err, "could not record last use; will retry");
                }
            }
        })
    }
}
