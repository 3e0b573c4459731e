//! `last_used_at` and where from, coalesced: uses are noted in memory and written in one
//! batched write every few seconds (and on shutdown), and only when a token's time (or a
//! (client IP, calling service) pair's) moved by a minute. The warm Introspect path never
//! writes to the database.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ahash::RandomState;
use arrayvec::ArrayString;

use crate::domain::Result;
use crate::domain::model::{Timestamp, Token, TokenUse};
use crate::domain::ports::{MAX_TOKEN_USES, Store};

use super::ActiveToken;

// Token ids are keyed inline (`ArrayString<16>`); a longer id would never be noted.
const _: () = assert!(crate::domain::token_format::PUBLIC_ID_LEN <= 16);

/// `last_used_at` is kept to the minute.
pub(crate) const RESOLUTION: chrono::TimeDelta = chrono::TimeDelta::minutes(1);

/// Pairs waiting for the next flush across all tokens, at most: a backstop for many tokens
/// each used from new places at once. What is over is dropped and counted.
const MAX_PENDING_SITES: usize = 50_000;

/// Recently queued sites remembered beside each verdict's last one: enough for tokens used
/// from several places in turn, small because the common case never reaches it.
const SITES_SEEN: usize = 16_384;

/// How a caller outside the system tenant and the token's own is named in the token's uses:
/// which keys another tenant holds is that tenant's business.
pub const ANOTHER_TENANT: &str = "another-tenant";

/// `via` of a use by an anonymous caller (another tenant's): not a public id, which is
/// alphanumeric.
const ANONYMOUS: &str = "~";

/// The calling service as a use records it: the credential that asked about the token.
#[derive(Clone, Copy, Debug)]
pub struct Service<'a> {
    /// Its public id.
    pub id: &'a str,
    /// Its display id, or [`ANOTHER_TENANT`].
    pub display_id: &'a str,
    /// Its name (empty for another tenant's).
    pub name: &'a str,
}

/// Notes token uses and flushes them in batches.
#[derive(Debug)]
pub struct LastUsed {
    store: Arc<dyn Store>,
    /// Keys the site digests: random per process, so nobody can aim a client IP at a real
    /// site's digest to hide a use among it (a collision would at worst leave one use site
    /// unrecorded for a minute; authorization never reads these). aHash, keyed but no PRF,
    /// rather than std's SipHash, which cost some 450 instructions on every call.
    digests: RandomState,
    /// When each recently seen site (by digest) was last queued (Unix ms), for tokens used
    /// from several sites in turn; bounded (an evicted site is merely queued again).
    sites_seen: quick_cache::sync::Cache<u64, i64>,
    /// Everything noted since the last flush, by token.
    pending: Mutex<Pending>,
}

/// One place a token was used from, waiting for the next flush.
#[derive(Clone, Copy, Debug)]
struct PendingSite {
    client_ip: Option<IpAddr>,
    /// The calling credential's public id; empty = the token itself; [`ANONYMOUS`].
    via: ArrayString<16>,
    at: Timestamp,
}

/// Uses waiting for the next flush, one entry per token: its last use, and where from.
/// Per token only the newest [`MAX_TOKEN_USES`] distinct pairs are kept (older ones would be
/// pruned anyway), so a scan through one token (a new client IP on every call) displaces
/// only that token's own pairs. Callers' names are kept once each.
#[derive(Debug, Default)]
struct Pending {
    tokens: HashMap<ArrayString<16>, PendingToken>,
    /// Display id and name by public id, of the callers in `tokens`.
    callers: HashMap<ArrayString<16>, (String, String)>,
    /// How many sites `tokens` holds.
    sites: usize,
}

/// One token's pending uses. The first site is inline: most tokens are used from one place,
/// and a replica may hold a hundred thousand of these between two flushes.
#[derive(Debug, Default)]
struct PendingToken {
    used_at: Option<Timestamp>,
    first: Option<PendingSite>,
    more: Vec<PendingSite>,
}

impl PendingToken {
    fn sites_mut(&mut self) -> impl Iterator<Item = &mut PendingSite> {
        self.first.iter_mut().chain(self.more.iter_mut())
    }

    fn site_count(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.len()
    }

    fn push(&mut self, site: PendingSite) {
        if self.first.is_none() {
            self.first = Some(site);
        } else {
            self.more.push(site);
        }
    }
}

impl Pending {
    /// Notes a token's last use; `keep` keeps a time already noted (a failed flush's).
    fn note_used(&mut self, token: ArrayString<16>, at: Timestamp, keep: bool) {
        let used_at = &mut self.tokens.entry(token).or_default().used_at;
        if !(keep && used_at.is_some()) {
            *used_at = Some(at);
        }
    }

    /// Adds or refreshes a use; false if it was dropped (every token's bound is full).
    fn note(
        &mut self,
        token: ArrayString<16>,
        site: PendingSite,
        caller: Option<Service<'_>>,
    ) -> bool {
        let full = self.sites >= MAX_PENDING_SITES;
        let Some(pending) = self.tokens.get_mut(&token) else {
            if full {
                return false;
            }
            let mut pending = PendingToken::default();
            pending.push(site);
            self.tokens.insert(token, pending);
            self.sites += 1;
            self.note_caller(site, caller);
            return true;
        };
        if let Some(same) = pending
            .sites_mut()
            .find(|p| p.client_ip == site.client_ip && p.via == site.via)
        {
            same.at = same.at.max(site.at);
        } else if pending.site_count() < MAX_TOKEN_USES {
            if full {
                return false;
            }
            pending.push(site);
            self.sites += 1;
        } else if let Some(oldest) = pending.sites_mut().min_by_key(|p| p.at) {
            *oldest = site;
        }
        self.note_caller(site, caller);
        true
    }

    fn note_caller(&mut self, site: PendingSite, caller: Option<Service<'_>>) {
        if let Some(caller) = caller
            && !site.via.is_empty()
            && site.via.as_str() != ANONYMOUS
        {
            self.callers
                .entry(site.via)
                .or_insert_with(|| (caller.display_id.to_owned(), caller.name.to_owned()));
        }
    }

    /// Adds back a use a failed flush took out.
    fn restore(&mut self, used: &TokenUse) -> bool {
        let via = match used.service.as_str() {
            "" => "",
            ANOTHER_TENANT => ANONYMOUS,
            display_id => display_id.rsplit('_').next().unwrap_or_default(),
        };
        let (Ok(token), Ok(via)) = (ArrayString::from(&used.token_id), ArrayString::from(via))
        else {
            return false;
        };
        let site = PendingSite {
            client_ip: used.client_ip,
            via,
            at: used.at,
        };
        let caller = Service {
            id: &via,
            display_id: &used.service,
            name: &used.service_name,
        };
        self.note(token, site, Some(caller))
    }

    /// Takes everything out: the last-use times, and the uses with their callers named.
    fn drain(&mut self) -> (Vec<(String, Timestamp)>, Vec<TokenUse>) {
        self.sites = 0;
        let callers = std::mem::take(&mut self.callers);
        let mut times = Vec::new();
        let mut uses = Vec::new();
        for (token, pending) in self.tokens.drain() {
            if let Some(at) = pending.used_at {
                times.push((token.to_string(), at));
            }
            for site in pending.first.into_iter().chain(pending.more) {
                let (service, service_name) = match site.via.as_str() {
                    "" => (String::new(), String::new()),
                    ANONYMOUS => (ANOTHER_TENANT.to_owned(), String::new()),
                    via => callers
                        .get(&site.via)
                        .cloned()
                        .unwrap_or_else(|| (via.to_owned(), String::new())),
                };
                uses.push(TokenUse {
                    token_id: token.to_string(),
                    client_ip: site.client_ip,
                    service,
                    service_name,
                    at: site.at,
                });
            }
        }
        (times, uses)
    }
}

impl LastUsed {
    /// A coalescer writing to `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            digests: RandomState::new(),
            sites_seen: quick_cache::sync::Cache::new(SITES_SEEN),
            pending: Mutex::new(Pending::default()),
        }
    }

    /// Notes that the live token of `active` was used at `now` from `client_ip` through
    /// `service` (`None`: the token was itself the credential of a call to tokend). A token
    /// used from the same site as last time within the minute costs a digest and two atomic
    /// loads; another recent site, one cache lookup. Never waits on I/O.
    pub fn note_site(
        &self,
        active: &ActiveToken,
        client_ip: Option<IpAddr>,
        service: Option<Service<'_>>,
        now: Timestamp,
    ) {
        let via = match service {
            None => "",
            Some(s) if s.display_id == ANOTHER_TENANT => ANONYMOUS,
            Some(s) => s.id,
        };
        let (Ok(token), Ok(via)) = (ArrayString::from(active.token.id()), ArrayString::from(via))
        else {
            return;
        };
        let client_ip = client_ip.map(|ip| ip.to_canonical());
        let digest = self.digests.hash_one((token, client_ip, via));
        let millis = now.timestamp_millis();
        let fresh =
            |seen: i64| (0..RESOLUTION.num_milliseconds()).contains(&millis.saturating_sub(seen));
        if active.last_site.load(Ordering::Relaxed) == digest
            && fresh(active.last_site_ms.load(Ordering::Relaxed))
        {
            return;
        }
        let seen = self.sites_seen.get(&digest).filter(|seen| fresh(*seen));
        active.last_site.store(digest, Ordering::Relaxed);
        active
            .last_site_ms
            .store(seen.unwrap_or(millis), Ordering::Relaxed);
        if seen.is_some() {
            return;
        }
        // Marked seen even if dropped below: a dropped pair must not take the lock on every
        // call until the next flush.
        self.sites_seen.insert(digest, millis);
        let site = PendingSite {
            client_ip,
            via,
            at: now,
        };
        let noted = self
            .pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .note(token, site, service);
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
        if let Ok(id) = ArrayString::from(token.id()) {
            self.lock().note_used(id, now, false);
        }
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
        let started = std::time::Instant::now();
        let (times, uses) = self.lock().drain();
        let sites = self.flush_sites(uses).await;
        let written = self.flush_times(times).await;
        metrics::histogram!("tokend_last_used_flush_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        if written.is_err() || sites.is_err() {
            metrics::counter!("tokend_last_used_flush_failures_total").increment(1);
        }
        let written = written?;
        sites?;
        Ok(written)
    }

    /// Tokens whose last use waits for the next flush.
    pub fn pending_tokens(&self) -> usize {
        self.lock().tokens.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn flush_sites(&self, uses: Vec<TokenUse>) -> Result<()> {
        if uses.is_empty() {
            return Ok(());
        }
        if let Err(err) = self.store.record_token_uses(&uses).await {
            // Put them back for the next round; newer uses of a pair keep their time.
            let mut pending = self.lock();
            for used in &uses {
                if !pending.restore(used) {
                    metrics::counter!("tokend_token_uses_dropped_total").increment(1);
                }
            }
            return Err(err);
        }
        metrics::counter!("tokend_token_uses_flushed_total").increment(uses.len() as u64);
        Ok(())
    }

    async fn flush_times(&self, batch: Vec<(String, Timestamp)>) -> Result<usize> {
        if batch.is_empty() {
            return Ok(0);
        }
        if let Err(err) = self.store.touch_last_used(&batch).await {
            // Put them back for the next round, unless newer uses arrived meanwhile.
            let mut pending = self.lock();
            for (id, at) in &batch {
                if let Ok(id) = ArrayString::from(id) {
                    pending.note_used(id, *at, true);
                }
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

    fn site(ip: u8, minute: i64) -> PendingSite {
        PendingSite {
            client_ip: Some(IpAddr::from([192, 0, 2, ip])),
            via: ArrayString::from("gateway00000").unwrap(),
            at: Utc.timestamp_opt(1_700_000_000, 0).unwrap() + TimeDelta::minutes(minute),
        }
    }

    const GATEWAY: Service<'static> = Service {
        id: "gateway00000",
        display_id: "tkd_key_gateway00000",
        name: "gateway",
    };

    fn key(token: &str) -> ArrayString<16> {
        ArrayString::from(token).unwrap()
    }

    #[test]
    fn a_scan_through_one_token_displaces_only_its_own_older_pairs() {
        let mut pending = Pending::default();
        assert!(pending.note(key("other"), site(1, 0), Some(GATEWAY)));
        for ip in 1..=50 {
            assert!(pending.note(key("scanned"), site(ip, i64::from(ip)), Some(GATEWAY)));
        }
        let mut kept: Vec<(String, Option<IpAddr>, String)> = pending
            .drain()
            .1
            .into_iter()
            .map(|u| (u.token_id, u.client_ip, u.service_name))
            .collect();
        kept.sort();
        let ip = |last: u8| Some(IpAddr::from([192, 0, 2, last]));
        let mut expected = vec![("other".to_owned(), ip(1), "gateway".to_owned())];
        expected
            .extend((46..=50).map(|last| ("scanned".to_owned(), ip(last), "gateway".to_owned())));
        assert_eq!(kept, expected);
        assert_eq!(pending.sites, 0);
    }

    #[test]
    fn the_same_pair_again_keeps_one_entry_with_the_later_time() {
        let mut pending = Pending::default();
        assert!(pending.note(key("t"), site(1, 5), Some(GATEWAY)));
        assert!(pending.note(key("t"), site(1, 3), Some(GATEWAY)));
        assert!(pending.note(key("t"), site(1, 9), Some(GATEWAY)));
        let drained = pending.drain().1;
        assert_eq!(drained.len(), 1);
        assert_eq!(drained[0].at, site(1, 9).at);
        assert_eq!(drained[0].service, "tkd_key_gateway00000");
    }

    #[test]
    fn a_use_taken_out_by_a_failed_flush_goes_back_as_it_was() {
        let mut pending = Pending::default();
        let anonymous = PendingSite {
            via: ArrayString::from(ANONYMOUS).unwrap(),
            ..site(2, 1)
        };
        let itself = PendingSite {
            via: ArrayString::new(),
            ..site(3, 2)
        };
        assert!(pending.note(key("t"), site(1, 0), Some(GATEWAY)));
        assert!(pending.note(key("t"), anonymous, None));
        assert!(pending.note(key("t"), itself, None));
        let mut first = pending.drain().1;
        for used in &first {
            assert!(pending.restore(used));
        }
        let mut again = pending.drain().1;
        first.sort_by_key(|u| u.client_ip);
        again.sort_by_key(|u| u.client_ip);
        assert_eq!(first, again);
        assert_eq!(first[1].service, ANOTHER_TENANT);
        assert_eq!(first[2].service, "");
    }

    #[test]
    fn past_the_global_bound_new_pairs_are_dropped() {
        let mut pending = Pending {
            sites: MAX_PENDING_SITES,
            ..Pending::default()
        };
        assert!(!pending.note(key("t"), site(1, 0), Some(GATEWAY)));
        assert!(pending.tokens.is_empty());
    }
}
