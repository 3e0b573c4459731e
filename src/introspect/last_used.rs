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
use crate::domain::ports::{MAX_TOKEN_USES, Store};

use super::ActiveToken;

/// `last_used_at` is kept to the minute.
const RESOLUTION: chrono::TimeDelta = chrono::TimeDelta::minutes(1);

/// Pairs waiting for the next flush across all tokens, at most: a backstop for many tokens
/// each used from new places at once. What is over is dropped and counted.
const MAX_PENDING_SITES: usize = 50_000;

/// (token id, client IP, calling credential's id; empty = the token called tokend itself).
type SiteKey = (ArrayString<16>, Option<IpAddr>, ArrayString<16>);

/// How a caller outside the system tenant and the token's own is named in the token's uses:
/// which keys another tenant holds is that tenant's business.
pub const ANOTHER_TENANT: &str = "another-tenant";

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
    pending_sites: Mutex<PendingSites>,
}

/// Uses waiting for the next flush: per token, only the newest [`MAX_TOKEN_USES`] distinct
/// pairs (older ones would be pruned anyway), so a scan through one token (a new client IP
/// on every call) displaces only that token's own pairs.
#[derive(Debug, Default)]
struct PendingSites {
    by_token: HashMap<ArrayString<16>, Vec<TokenUse>>,
    len: usize,
}

impl PendingSites {
    /// Adds or refreshes `used`; false if it was dropped (every token's bound is full).
    fn note(&mut self, token: ArrayString<16>, used: TokenUse) -> bool {
        let known = self.by_token.contains_key(&token);
        if !known && self.len >= MAX_PENDING_SITES {
            return false;
        }
        let pairs = self.by_token.entry(token).or_default();
        if let Some(same) = pairs
            .iter_mut()
            .find(|p| p.client_ip == used.client_ip && p.service == used.service)
        {
            same.at = same.at.max(used.at);
            same.service_name = used.service_name;
        } else if pairs.len() < MAX_TOKEN_USES {
            if self.len >= MAX_PENDING_SITES {
                return false;
            }
            pairs.push(used);
            self.len += 1;
        } else if let Some(oldest) = pairs.iter_mut().min_by_key(|p| p.at) {
            *oldest = used;
        }
        true
    }

    fn drain(&mut self) -> Vec<TokenUse> {
        self.len = 0;
        self.by_token.drain().flat_map(|(_, pairs)| pairs).collect()
    }
}

impl LastUsed {
    /// A coalescer writing to `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            pending: Mutex::new(HashMap::new()),
            sites_seen: quick_cache::sync::Cache::new(100_000),
            pending_sites: Mutex::new(PendingSites::default()),
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
        let client_ip = client_ip.map(|ip| ip.to_canonical());
        let key = (token, client_ip, via);
        let millis = now.timestamp_millis();
        if let Some(seen) = self.sites_seen.get(&key)
            && (0..RESOLUTION.num_milliseconds()).contains(&(millis - seen))
        {
            return;
        }
        // Marked seen even if dropped below: a dropped pair must not take the lock on every
        // call until the next flush.
        self.sites_seen.insert(key, millis);
        let used = TokenUse {
            token_id: token_id.to_owned(),
            client_ip,
            service: service.map_or_else(String::new, |s| s.display_id.to_owned()),
            service_name: service.map_or_else(String::new, |s| s.name.to_owned()),
            at: now,
        };
        let noted = self
            .pending_sites
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .note(token, used);
        if !noted {
            metrics::counter!("tokend_token_uses_dropped_total").increment(1);
        }
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
        let uses = self
            .pending_sites
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .drain();
        if uses.is_empty() {
            return Ok(());
        }
        if let Err(err) = self.store.record_token_uses(&uses).await {
            // Put them back for the next round; newer uses of a pair keep their time.
            let mut pending = self
                .pending_sites
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for used in uses {
                let Ok(token) = ArrayString::from(&used.token_id) else {
                    continue;
                };
                if !pending.note(token, used) {
                    metrics::counter!("tokend_token_uses_dropped_total").increment(1);
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

#[cfg(test)]
mod tests {
    use chrono::{TimeDelta, TimeZone as _, Utc};

    use super::*;

    fn used(token: &str, ip: u8, minute: i64) -> TokenUse {
        TokenUse {
            token_id: token.to_owned(),
            client_ip: Some(IpAddr::from([192, 0, 2, ip])),
            service: "tkd_key_gateway00000".to_owned(),
            service_name: "gateway".to_owned(),
            at: Utc.timestamp_opt(1_700_000_000, 0).unwrap() + TimeDelta::minutes(minute),
        }
    }

    fn key(token: &str) -> ArrayString<16> {
        ArrayString::from(token).unwrap()
    }

    #[test]
    fn a_scan_through_one_token_displaces_only_its_own_older_pairs() {
        let mut pending = PendingSites::default();
        assert!(pending.note(key("other"), used("other", 1, 0)));
        for ip in 1..=50 {
            assert!(pending.note(key("scanned"), used("scanned", ip, i64::from(ip))));
        }
        let mut kept: Vec<(String, Option<IpAddr>)> = pending
            .drain()
            .into_iter()
            .map(|u| (u.token_id, u.client_ip))
            .collect();
        kept.sort();
        let mut expected = vec![("other".to_owned(), Some(IpAddr::from([192, 0, 2, 1])))];
        expected.extend(
            (46..=50).map(|ip| ("scanned".to_owned(), Some(IpAddr::from([192, 0, 2, ip])))),
        );
        assert_eq!(kept, expected);
        assert_eq!(pending.len, 0);
    }

    #[test]
    fn the_same_pair_again_keeps_one_entry_with_the_later_time() {
        let mut pending = PendingSites::default();
        assert!(pending.note(key("t"), used("t", 1, 5)));
        assert!(pending.note(key("t"), used("t", 1, 3)));
        assert!(pending.note(key("t"), used("t", 1, 9)));
        let drained = pending.drain();
        assert_eq!(drained.len(), 1);
        assert_eq!(drained[0].at, used("t", 1, 9).at);
    }

    #[test]
    fn past_the_global_bound_new_pairs_are_dropped() {
        let mut pending = PendingSites {
            len: MAX_PENDING_SITES,
            ..PendingSites::default()
        };
        assert!(!pending.note(key("t"), used("t", 1, 0)));
        assert!(pending.by_token.is_empty());
    }
}
