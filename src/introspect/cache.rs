//! The live-state cache: what Introspect needs about a token, kept in memory per entity
//! (token row, tenant, user, membership, role) so that one directory change evicts exactly
//! the entries it affects. Entries are invalidated, never merely aged: the TTL is a backstop.
//!
//! Two rules make it safe:
//! - A fill that began before an invalidation never survives it: every invalidation bumps a
//!   generation counter, and a fill that sees the counter moved after inserting evicts what
//!   it inserted.
//! - While the change feed is not trusted (PostgreSQL listener down or not yet up), nothing
//!   is served from or written to the cache: every Introspect reads the database.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::sync::Cache;

use crate::domain::Result;
use crate::domain::model::{
    AuditEvent, AuditRecord, Invalidation, Member, Membership, PermissionSet, Revocation, Role,
    Tenant, TenantStatus, Timestamp, Token, TokenState, TokenUse, User, UserInTenant, UserStatus,
};
use crate::domain::names::{RoleName, TenantId, UserId};
use crate::domain::ports::{AuditQuery, InvalidationSink, Store, TokenQuery, WriteFence};
use crate::domain::token_format::TokenKind;

/// Cache sizes and backstop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheSettings {
    /// Token rows kept (the other entities are far fewer).
    pub max_tokens: u64,
    /// Upper bound on any entry's age, seconds: a backstop, not the mechanism.
    pub ttl_secs: u64,
    /// How long after the change feed was lost cached answers may still be served when the
    /// database is unreachable, milliseconds. 0: never; an outage answers UNAVAILABLE.
    pub max_staleness_ms: u64,
    /// PostgreSQL change feed: heartbeat interval, milliseconds.
    pub feed_heartbeat_ms: u64,
    /// PostgreSQL change feed: silence after which the listener is presumed dead, ms.
    pub feed_timeout_ms: u64,
    /// PostgreSQL change feed: how often the change log is polled as a backstop, ms.
    pub feed_poll_ms: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            max_tokens: 1_000_000,
            ttl_secs: 300,
            max_staleness_ms: 0,
            feed_heartbeat_ms: 500,
            feed_timeout_ms: 2000,
            feed_poll_ms: 2000,
        }
    }
}

type TenantUser = (TenantId, UserId);
type TenantRole = (TenantId, RoleName);

/// A public id as a cache key, inline: a `String` key would cost a heap allocation per
/// cached token. Public ids are 12 characters; anything longer is simply not cached.
type TokenKey = arrayvec::ArrayString<16>;

/// Invalidations remembered for calls that decided across one.
const RECENT_INVALIDATIONS: usize = 1024;

/// A cached token row (`None`: no such id), and when it was read.
#[derive(Clone, Debug)]
struct TokenEntry {
    /// Seconds after the cache was created: the entry is dropped once `ttl` old.
    filled: u32,
    token: Option<Arc<Token>>,
}

/// The cached pieces of live state, and whether they may be used.
pub struct LiveCache {
    /// One entry per cached token, so on quick_cache: a fraction of moka's memory per entry
    /// (about 95 bytes against 450, measured). quick_cache has no expiry of its own; the age
    /// is checked on read.
    tokens: quick_cache::sync::Cache<TokenKey, TokenEntry>,
    ttl: Duration,
    tenants: Cache<TenantId, TenantStatus>,
    users: Cache<UserId, Option<UserStatus>>,
    members: Cache<TenantUser, Option<Arc<Membership>>>,
    roles: Cache<TenantRole, Option<Arc<PermissionSet>>>,
    generation: AtomicU64,
    /// The latest invalidations and the generation each was applied at (see
    /// [`LiveCache::touched_since`]).
    recent: std::sync::Mutex<std::collections::VecDeque<(u64, Invalidation)>>,
    trusted: AtomicBool,
    /// When trust was lost, for the staleness bound; `None` while trusted.
    untrusted_since: std::sync::Mutex<Option<Instant>>,
    /// Trust changes, for readiness.
    trust_watch: tokio::sync::watch::Sender<bool>,
    /// Whether a change feed (PostgreSQL) runs; without one (SQLite) there is no lease.
    has_feed: bool,
    /// When this replica's latest heartbeat that came back through the feed was sent, as
    /// microseconds since `born`: trust is a lease from there (see `storage::fence`).
    renewed: AtomicU64,
    born: Instant,
    lease: Duration,
    max_staleness: Duration,
}

impl std::fmt::Debug for LiveCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveCache")
            .field("tokens", &self.tokens.len())
            .field("trusted", &self.is_trusted())
            .finish_non_exhaustive()
    }
}

impl LiveCache {
    /// An empty cache. With a change feed (`has_feed`, PostgreSQL) it is untrusted until
    /// the feed reports in; without one (SQLite, one replica) local writes are every change
    /// there is and it is trusted from the start.
    pub fn new(settings: &CacheSettings, has_feed: bool) -> Self {
        let trusted = !has_feed;
        let ttl = Duration::from_secs(settings.ttl_secs.max(1));
        let small = (settings.max_tokens / 4).max(1024);
        Self {
            tokens: quick_cache::sync::Cache::new(
                usize::try_from(settings.max_tokens).unwrap_or(usize::MAX),
            ),
            ttl,
            tenants: Cache::builder()
                .max_capacity(small)
                .time_to_live(ttl)
                .build(),
            users: Cache::builder()
                .max_capacity(small)
                .time_to_live(ttl)
                .build(),
            members: Cache::builder()
                .max_capacity(small)
                .time_to_live(ttl)
                .build(),
            roles: Cache::builder()
                .max_capacity(small)
                .time_to_live(ttl)
                .build(),
            generation: AtomicU64::new(0),
            recent: std::sync::Mutex::default(),
            trusted: AtomicBool::new(trusted),
            untrusted_since: std::sync::Mutex::new((!trusted).then(Instant::now)),
            trust_watch: tokio::sync::watch::Sender::new(trusted),
            has_feed,
            renewed: AtomicU64::new(0),
            born: Instant::now(),
            lease: Duration::from_millis(settings.feed_timeout_ms.max(20)),
            max_staleness: Duration::from_millis(settings.max_staleness_ms),
        }
    }

    /// Drops a token row without bumping the generation: for brand-new tokens only.
    fn forget_token(&self, id: &str) {
        self.tokens.remove(id);
    }

    /// Bumped by every invalidation; anything computed from the cache at an older value is
    /// void.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Bumps the generation, noting what changed at the new value.
    fn bump(&self, what: &Invalidation) {
        let mut recent = self
            .recent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        if recent.len() == RECENT_INVALIDATIONS {
            recent.pop_front();
        }
        recent.push_back((generation, what.clone()));
    }

    /// Whether anything invalidated after generation `since` may concern `token` (its row,
    /// tenant, owner, membership or a role of its tenant). `true` when the record of recent
    /// invalidations no longer reaches back that far.
    pub fn touched_since(&self, since: u64, token: &Token) -> bool {
        let recent = self
            .recent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if recent.front().is_none_or(|(first, _)| *first > since + 1) {
            return self.generation() != since;
        }
        let owner = token.owner_user_id.as_ref();
        recent
            .iter()
            .filter(|(generation, _)| *generation > since)
            .any(|(_, what)| match what {
                Invalidation::Token(id) => id == token.id(),
                Invalidation::Tenant(tenant) | Invalidation::Role(tenant, _) => {
                    *tenant == token.tenant_id
                }
                Invalidation::User(user) => owner == Some(user),
                Invalidation::Member(tenant, user) => {
                    *tenant == token.tenant_id && owner == Some(user)
                }
                Invalidation::All => true,
            })
    }

    /// Whether state read at `read` is too old to answer from now: with a change feed, a
    /// write waits at most the lease for a replica that cannot acknowledge it.
    pub fn outlived(&self, read: Instant) -> bool {
        self.has_feed && read.elapsed() >= self.lease
    }

    /// Whether cached state may be served.
    pub fn is_trusted(&self) -> bool {
        self.trusted.load(Ordering::SeqCst) && (!self.has_feed || self.lease_held())
    }

    /// Whether this replica's own heartbeat came back within the lease since it was sent:
    /// a feed that went quiet (a half-open socket, a stuck task, a paused process) stops the
    /// cache being served before the feed's own timer notices.
    fn lease_held(&self) -> bool {
        let renewed = Duration::from_micros(self.renewed.load(Ordering::SeqCst));
        self.born.elapsed().saturating_sub(renewed) < self.lease
    }

    /// Follows trust changes: readiness is trust.
    pub fn watch_trusted(&self) -> tokio::sync::watch::Receiver<bool> {
        self.trust_watch.subscribe()
    }

    /// Seconds since the cache was created (the clock of token entries' age).
    fn age_secs(&self) -> u32 {
        u32::try_from(self.born.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    fn entry(&self, token: Option<Arc<Token>>) -> TokenEntry {
        TokenEntry {
            filled: self.age_secs(),
            token,
        }
    }

    /// Cached token rows, for the memory figures.
    pub fn token_entries(&self) -> u64 {
        self.tokens.len() as u64
    }

    /// Every piece of a token's state, if all are cached (`Some(None)`: a known-unknown id).
    fn lookup(&self, id: &str) -> Option<Option<TokenState>> {
        let entry = self.tokens.get(id)?;
        if self.age_secs().saturating_sub(entry.filled) >= self.ttl.as_secs() as u32 {
            // Only this expired entry: a fresh fill may have replaced it meanwhile.
            self.tokens.remove_if(id, |e| e.filled == entry.filled);
            return None;
        }
        let Some(token) = entry.token else {
            return Some(None);
        };
        let tenant_status = self.tenants.get(&token.tenant_id)?;
        let (owner_status, membership, role_name) = match (&token.kind, &token.owner_user_id) {
            (TokenKind::Personal, Some(owner)) => {
                let status = self.users.get(owner)?;
                let member = self
                    .members
                    .get(&(token.tenant_id.clone(), owner.clone()))?;
                let role = member.as_ref().map(|m| m.role.clone());
                (status, member.map(|m| (*m).clone()), role)
            }
            _ => (None, None, token.role.clone()),
        };
        let role_permissions = match role_name {
            Some(role) => self.roles.get(&(token.tenant_id.clone(), role))?,
            None => None,
        };
        Some(Some(TokenState {
            token,
            tenant_status,
            owner_status,
            membership,
            role_permissions,
        }))
    }

    /// Stores what a query read, unless an invalidation raced it.
    fn fill(&self, id: &str, state: Option<&TokenState>, generation: u64) {
        let Ok(key) = TokenKey::from(id) else {
            return;
        };
        let Some(state) = state else {
            self.tokens.insert(key, self.entry(None));
            if self.generation.load(Ordering::SeqCst) != generation {
                self.tokens.remove(id);
            }
            return;
        };
        let token = &state.token;
        let tenant = token.tenant_id.clone();
        self.tokens.insert(key, self.entry(Some(Arc::clone(token))));
        self.tenants.insert(tenant.clone(), state.tenant_status);
        let role = match (&token.kind, &token.owner_user_id) {
            (TokenKind::Personal, Some(owner)) => {
                self.users.insert(owner.clone(), state.owner_status);
                self.members.insert(
                    (tenant.clone(), owner.clone()),
                    state.membership.clone().map(Arc::new),
                );
                state.membership.as_ref().map(|m| m.role.clone())
            }
            _ => token.role.clone(),
        };
        if let Some(role) = &role {
            self.roles.insert(
                (tenant.clone(), role.clone()),
                state.role_permissions.clone(),
            );
        }
        // Insert first, check after: an invalidation that bumped the generation before our
        // check is undone here; one that bumps it after our check evicts on its own.
        if self.generation.load(Ordering::SeqCst) != generation {
            self.tokens.remove(id);
            self.tenants.invalidate(&tenant);
            if let (TokenKind::Personal, Some(owner)) = (&token.kind, &token.owner_user_id) {
                self.users.invalidate(owner);
                self.members.invalidate(&(tenant.clone(), owner.clone()));
            }
            if let Some(role) = role {
                self.roles.invalidate(&(tenant, role));
            }
        }
    }

    /// Swaps the permission set a query read for the cached one of the same role when the
    /// two are equal, so the verdicts of all of a role's tokens share one set instead of
    /// each keeping its own copy (a few hundred bytes per cached token).
    fn share_role_set(&self, state: &mut TokenState) {
        let token = &state.token;
        let role = match (&token.kind, &token.owner_user_id) {
            (TokenKind::Personal, Some(_)) => state.membership.as_ref().map(|m| m.role.clone()),
            _ => token.role.clone(),
        };
        if let (Some(role), Some(read)) = (role, &state.role_permissions)
            && let Some(Some(cached)) = self.roles.get(&(token.tenant_id.clone(), role))
            && cached == *read
        {
            state.role_permissions = Some(cached);
        }
    }

    /// The same for the owner's groups: all of a member's tokens share the cached set.
    fn share_member_groups(&self, state: &mut TokenState) {
        let token = &state.token;
        if let (TokenKind::Personal, Some(owner), Some(read)) =
            (&token.kind, &token.owner_user_id, state.membership.as_mut())
            && let Some(Some(cached)) = self.members.get(&(token.tenant_id.clone(), owner.clone()))
            && cached.groups == read.groups
        {
            read.groups = Arc::clone(&cached.groups);
        }
    }

    fn flush(&self) {
        self.tokens.clear();
        self.tenants.invalidate_all();
        self.users.invalidate_all();
        self.members.invalidate_all();
        self.roles.invalidate_all();
    }

    /// Whether a cached answer may stand in for an unreachable database.
    fn within_staleness_bound(&self) -> bool {
        if self.max_staleness.is_zero() {
            return false;
        }
        let since = *self
            .untrusted_since
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        since.is_some_and(|since| since.elapsed() <= self.max_staleness)
    }
}

impl InvalidationSink for LiveCache {
    fn invalidate(&self, what: &Invalidation) {
        // Bump first: a fill in flight then sees that it raced us.
        self.bump(what);
        match what {
            Invalidation::Token(id) => {
                self.tokens.remove(id.as_str());
            }
            Invalidation::Tenant(id) => self.tenants.invalidate(id),
            Invalidation::User(id) => self.users.invalidate(id),
            Invalidation::Member(tenant, user) => {
                self.members.invalidate(&(tenant.clone(), user.clone()))
            }
            Invalidation::Role(tenant, role) => {
                self.roles.invalidate(&(tenant.clone(), role.clone()))
            }
            Invalidation::All => self.flush(),
        }
        metrics::counter!("tokend_cache_invalidations_total").increment(1);
    }

    fn renewed(&self, sent: Instant) {
        let sent = sent.saturating_duration_since(self.born).as_micros();
        self.renewed
            .fetch_max(u64::try_from(sent).unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    fn set_trusted(&self, trusted: bool) {
        let mut since = self
            .untrusted_since
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if trusted {
            // Whatever happened while untrusted went unseen: start from nothing.
            self.bump(&Invalidation::All);
            self.flush();
            *since = None;
        } else if since.is_none() {
            *since = Some(Instant::now());
        }
        self.trusted.store(trusted, Ordering::SeqCst);
        self.trust_watch.send_replace(trusted);
        metrics::gauge!("tokend_cache_trusted").set(if trusted { 1.0 } else { 0.0 });
    }
}

/// Invalidates its changes when dropped, whether the write finished or was cancelled.
struct EvictOnDrop<'a>(&'a LiveCache, Vec<Invalidation>);

impl Drop for EvictOnDrop<'_> {
    fn drop(&mut self) {
        for change in &self.1 {
            self.0.invalidate(change);
        }
    }
}

/// A [`Store`] that answers `token_state` from a [`LiveCache`] and evicts on every write
/// it carries. Everything else passes straight through.
#[derive(Debug)]
pub struct CachingStore {
    inner: Arc<dyn Store>,
    cache: Arc<LiveCache>,
    /// What holds a write back until every replica has it (PostgreSQL); `None` for one
    /// replica alone (SQLite).
    fence: Option<Arc<dyn WriteFence>>,
}

impl CachingStore {
    /// Wraps `inner`.
    pub fn new(
        inner: Arc<dyn Store>,
        cache: Arc<LiveCache>,
        fence: Option<Arc<dyn WriteFence>>,
    ) -> Self {
        Self {
            inner,
            cache,
            fence,
        }
    }

    fn evict(&self, what: Invalidation) {
        self.cache.invalidate(&what);
    }

    /// Evicts locally; then, if the write went through (`done`), holds it back until no
    /// other replica can still answer from a cache that lacks it. Also when it changed
    /// nothing: what it found may be another call's change, still waiting on its fence.
    async fn settle(&self, done: bool, what: Invalidation) {
        let committed = Instant::now();
        self.cache.invalidate(&what);
        if let (true, Some(fence)) = (done, &self.fence)
            && !crate::domain::ports::defer_fence()
        {
            fence.settle(committed).await;
        }
    }
}

#[async_trait]
impl Store for CachingStore {
    async fn token_state(&self, public_id: &str) -> Result<Option<TokenState>> {
        let trusted = self.cache.is_trusted();
        if trusted && let Some(state) = self.cache.lookup(public_id) {
            metrics::counter!("tokend_cache_lookups_total", "result" => "hit").increment(1);
            return Ok(state);
        }
        metrics::counter!("tokend_cache_lookups_total", "result" => "miss").increment(1);
        let generation = self.cache.generation.load(Ordering::SeqCst);
        match self.inner.token_state(public_id).await {
            Ok(mut state) => {
                if trusted && self.cache.is_trusted() {
                    if let Some(state) = state.as_mut() {
                        self.cache.share_role_set(state);
                        self.cache.share_member_groups(state);
                    }
                    self.cache.fill(public_id, state.as_ref(), generation);
                }
                Ok(state)
            }
            Err(err @ crate::domain::Error::Unavailable(_)) => {
                if self.cache.within_staleness_bound()
                    && let Some(state) = self.cache.lookup(public_id)
                {
                    metrics::counter!("tokend_cache_lookups_total", "result" => "stale")
                        .increment(1);
                    return Ok(state);
                }
                Err(err)
            }
            Err(err) => Err(err),
        }
    }

    async fn put_tenant(&self, tenant: &Tenant, audit: &AuditRecord) -> Result<Tenant> {
        // Evicts even if this call is cancelled after the commit (a client deadline).
        let _evict = EvictOnDrop(&self.cache, vec![Invalidation::Tenant(tenant.id.clone())]);
        let stored = self.inner.put_tenant(tenant, audit).await;
        let done = stored.is_ok();
        self.settle(done, Invalidation::Tenant(tenant.id.clone()))
            .await;
        stored
    }

    async fn get_tenant(&self, id: &TenantId) -> Result<Option<Tenant>> {
        self.inner.get_tenant(id).await
    }

    async fn list_tenants(
        &self,
        only: Option<&TenantId>,
        after: Option<&TenantId>,
        limit: u64,
    ) -> Result<Vec<Tenant>> {
        self.inner.list_tenants(only, after, limit).await
    }

    async fn put_role(&self, role: &Role, audit: &AuditRecord) -> Result<()> {
        // Evicts even if this call is cancelled after the commit (a client deadline).
        let _evict = EvictOnDrop(
            &self.cache,
            vec![Invalidation::Role(
                role.tenant_id.clone(),
                role.name.clone(),
            )],
        );
        let result = self.inner.put_role(role, audit).await;
        let done = result.is_ok();
        self.settle(
            done,
            Invalidation::Role(role.tenant_id.clone(), role.name.clone()),
        )
        .await;
        result
    }

    async fn delete_role(
        &self,
        tenant: &TenantId,
        name: &RoleName,
        audit: &AuditRecord,
    ) -> Result<bool> {
        // Evicts even if this call is cancelled after the commit (a client deadline).
        let _evict = EvictOnDrop(
            &self.cache,
            vec![Invalidation::Role(tenant.clone(), name.clone())],
        );
        let result = self.inner.delete_role(tenant, name, audit).await;
        let done = result.is_ok();
        self.settle(done, Invalidation::Role(tenant.clone(), name.clone()))
            .await;
        result
    }

    async fn get_role(&self, tenant: &TenantId, name: &RoleName) -> Result<Option<Role>> {
        self.inner.get_role(tenant, name).await
    }

    async fn list_roles(&self, tenant: &TenantId) -> Result<Vec<Role>> {
        self.inner.list_roles(tenant).await
    }

    async fn put_members(&self, members: &[(Member, AuditRecord)]) -> Result<()> {
        // Evicts even if this call is cancelled after the commit (a client deadline).
        let _evict = EvictOnDrop(
            &self.cache,
            members
                .iter()
                .flat_map(|(m, _)| {
                    [
                        Invalidation::Member(m.tenant_id.clone(), m.user_id.clone()),
                        Invalidation::User(m.user_id.clone()),
                    ]
                })
                .collect(),
        );
        let result = self.inner.put_members(members).await;
        for (member, _) in members {
            self.evict(Invalidation::User(member.user_id.clone()));
        }
        // One fence covers the whole batch: it follows the commit of all of it.
        if let Some((member, _)) = members.last() {
            for (member, _) in members {
                self.evict(Invalidation::Member(
                    member.tenant_id.clone(),
                    member.user_id.clone(),
                ));
            }
            let last = Invalidation::Member(member.tenant_id.clone(), member.user_id.clone());
            self.settle(result.is_ok(), last).await;
        }
        result
    }

    async fn remove_member(
        &self,
        tenant: &TenantId,
        user: &UserId,
        audit: &AuditRecord,
    ) -> Result<bool> {
        // Evicts even if this call is cancelled after the commit (a client deadline).
        let _evict = EvictOnDrop(
            &self.cache,
            vec![Invalidation::Member(tenant.clone(), user.clone())],
        );
        let result = self.inner.remove_member(tenant, user, audit).await;
        let done = result.is_ok();
        self.settle(done, Invalidation::Member(tenant.clone(), user.clone()))
            .await;
        result
    }

    async fn get_member(&self, tenant: &TenantId, user: &UserId) -> Result<Option<Member>> {
        self.inner.get_member(tenant, user).await
    }

    async fn list_members(
        &self,
        tenant: &TenantId,
        after: Option<&UserId>,
        limit: u64,
    ) -> Result<Vec<Member>> {
        self.inner.list_members(tenant, after, limit).await
    }

    async fn put_user(&self, user: &User, audit: &AuditRecord) -> Result<User> {
        // Evicts even if this call is cancelled after the commit (a client deadline).
        let _evict = EvictOnDrop(&self.cache, vec![Invalidation::User(user.id.clone())]);
        let result = self.inner.put_user(user, audit).await;
        let done = result.is_ok();
        self.settle(done, Invalidation::User(user.id.clone())).await;
        result
    }

    async fn get_user(&self, id: &UserId) -> Result<Option<User>> {
        self.inner.get_user(id).await
    }

    async fn user_in_tenant(
        &self,
        tenant: &TenantId,
        user: &UserId,
    ) -> Result<Option<UserInTenant>> {
        self.inner.user_in_tenant(tenant, user).await
    }

    async fn insert_token(&self, token: &Token, audit: &AuditRecord) -> Result<()> {
        let result = self.inner.insert_token(token, audit).await;
        // A new token changes nothing anyone holds; only a cached "no such id" (which needs
        // someone to have guessed a fresh 72-bit id) could be stale. Evict that key alone,
        // without voiding every remembered verdict: issuing at a high rate must not cost
        // the warm path. A guessed id's stale miss would fail closed (inactive) until TTL.
        self.cache.forget_token(token.id());
        result
    }

    async fn get_token(&self, tenant: &TenantId, id: &str) -> Result<Option<Token>> {
        self.inner.get_token(tenant, id).await
    }

    async fn list_tokens(&self, query: &TokenQuery) -> Result<Vec<Token>> {
        self.inner.list_tokens(query).await
    }

    async fn revoke_token(
        &self,
        tenant: &TenantId,
        id: &str,
        revocation: &Revocation,
        audit: &AuditRecord,
    ) -> Result<Option<Token>> {
        // Evicts even if this call is cancelled after the commit (a client deadline).
        let _evict = EvictOnDrop(&self.cache, vec![Invalidation::Token(id.to_owned())]);
        let result = self.inner.revoke_token(tenant, id, revocation, audit).await;
        let done = result.is_ok();
        self.settle(done, Invalidation::Token(id.to_owned())).await;
        result
    }

    async fn rotate_token(
        &self,
        tenant: &TenantId,
        id: &str,
        revocation: &Revocation,
        successor: &Token,
        audit: &[AuditRecord],
    ) -> Result<Token> {
        // The predecessor's cached row lacks its revocation (due now or at the end of the
        // grace): evict it everywhere, as for a revocation.
        let _evict = EvictOnDrop(&self.cache, vec![Invalidation::Token(id.to_owned())]);
        let result = self
            .inner
            .rotate_token(tenant, id, revocation, successor, audit)
            .await;
        self.cache.forget_token(successor.id());
        let done = result.is_ok();
        self.settle(done, Invalidation::Token(id.to_owned())).await;
        result
    }

    async fn delete_token(
        &self,
        tenant: &TenantId,
        id: &str,
        audit: &[AuditRecord],
    ) -> Result<bool> {
        // Evicts even if this call is cancelled after the commit (a client deadline).
        let _evict = EvictOnDrop(&self.cache, vec![Invalidation::Token(id.to_owned())]);
        let result = self.inner.delete_token(tenant, id, audit).await;
        let done = result.is_ok();
        self.settle(done, Invalidation::Token(id.to_owned())).await;
        result
    }

    async fn record_token_uses(&self, uses: &[TokenUse]) -> Result<()> {
        // Not part of liveness: nothing to evict.
        self.inner.record_token_uses(uses).await
    }

    async fn token_uses(&self, token_ids: &[String]) -> Result<Vec<TokenUse>> {
        self.inner.token_uses(token_ids).await
    }

    async fn touch_last_used(&self, used: &[(String, Timestamp)]) -> Result<()> {
        // last_used_at plays no part in liveness: no eviction, or every flush would empty
        // the cache.
        self.inner.touch_last_used(used).await
    }

    async fn replace_hash(&self, id: &str, old: &str, new: &str) -> Result<bool> {
        let result = self.inner.replace_hash(id, old, new).await;
        // Another replica winning the upgrade changed nothing here (its own notification
        // evicts); evicting anyway would void every remembered verdict on each first sight
        // after a parameter change.
        if !matches!(result, Ok(false)) {
            self.evict(Invalidation::Token(id.to_owned()));
        }
        result
    }

    async fn list_audit(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>> {
        self.inner.list_audit(query).await
    }

    async fn bootstrap(
        &self,
        tenant: &Tenant,
        role: &Role,
        token: &Token,
        audit: &AuditRecord,
    ) -> Result<()> {
        let result = self.inner.bootstrap(tenant, role, token, audit).await;
        self.evict(Invalidation::All);
        result
    }

    async fn fence(&self) {
        if let Some(fence) = &self.fence {
            fence.settle(Instant::now()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(id: &str) -> TokenState {
        TokenState {
            token: Arc::new(Token::sample(id)),
            tenant_status: TenantStatus::Active,
            owner_status: None,
            membership: None,
            role_permissions: Some(Arc::new(PermissionSet::new())),
        }
    }

    #[test]
    fn a_fill_is_served_until_something_it_read_is_invalidated() {
        let cache = LiveCache::new(&CacheSettings::default(), false);
        let s = state("AAAAAAAAAAAA");
        cache.fill(
            "AAAAAAAAAAAA",
            Some(&s),
            cache.generation.load(Ordering::SeqCst),
        );
        assert_eq!(cache.lookup("AAAAAAAAAAAA"), Some(Some(s.clone())));
        cache.invalidate(&Invalidation::Role(
            s.token.tenant_id.clone(),
            RoleName::parse("r", "reader").unwrap(),
        ));
        assert_eq!(
            cache.lookup("AAAAAAAAAAAA"),
            None,
            "a role change is a miss"
        );
    }

    #[test]
    fn a_token_entry_is_dropped_once_its_ttl_old() {
        let settings = CacheSettings {
            ttl_secs: 1,
            ..CacheSettings::default()
        };
        let cache = LiveCache::new(&settings, false);
        let s = state("AAAAAAAAAAAA");
        cache.fill("AAAAAAAAAAAA", Some(&s), cache.generation());
        assert!(cache.lookup("AAAAAAAAAAAA").is_some());
        std::thread::sleep(Duration::from_millis(1050));
        assert_eq!(cache.lookup("AAAAAAAAAAAA"), None, "expired: a miss");
        assert_eq!(cache.token_entries(), 0);
    }

    #[test]
    fn tokens_of_one_role_share_its_permission_set_but_only_while_equal() {
        let cache = LiveCache::new(&CacheSettings::default(), false);
        let first = state("AAAAAAAAAAAA");
        cache.fill("AAAAAAAAAAAA", Some(&first), cache.generation());
        let cached = first.role_permissions.clone().unwrap();

        let mut second = state("BBBBBBBBBBBB");
        cache.share_role_set(&mut second);
        assert!(Arc::ptr_eq(
            second.role_permissions.as_ref().unwrap(),
            &cached
        ));

        // A set that differs from the cached one (the role changed since) is kept as read.
        let mut changed = state("CCCCCCCCCCCC");
        let read = Arc::new(PermissionSet::from([
            crate::domain::names::Permission::parse("p", "a:read").unwrap(),
        ]));
        changed.role_permissions = Some(Arc::clone(&read));
        cache.share_role_set(&mut changed);
        assert!(Arc::ptr_eq(
            changed.role_permissions.as_ref().unwrap(),
            &read
        ));
    }

    #[test]
    fn tokens_of_one_member_share_their_groups_but_only_while_equal() {
        use crate::domain::names::Group;
        let personal = |id: &str, groups: &[&str]| {
            let mut state = state(id);
            let token = Arc::make_mut(&mut state.token);
            token.kind = TokenKind::Personal;
            token.owner_user_id = Some(UserId::parse("u", "alice").unwrap());
            token.role = None;
            state.owner_status = Some(crate::domain::model::UserStatus::Active);
            state.membership = Some(Membership {
                role: RoleName::parse("r", "reader").unwrap(),
                groups: Arc::new(
                    groups
                        .iter()
                        .map(|g| Group::parse("g", g).unwrap())
                        .collect(),
                ),
            });
            state
        };
        let groups = |state: &TokenState| Arc::clone(&state.membership.as_ref().unwrap().groups);
        let cache = LiveCache::new(&CacheSettings::default(), false);
        let first = personal("AAAAAAAAAAAA", &["eng"]);
        cache.fill("AAAAAAAAAAAA", Some(&first), cache.generation());

        let mut second = personal("BBBBBBBBBBBB", &["eng"]);
        assert!(!Arc::ptr_eq(&groups(&second), &groups(&first)));
        cache.share_member_groups(&mut second);
        assert!(Arc::ptr_eq(&groups(&second), &groups(&first)));

        // Groups that differ from the cached ones (changed since) are kept as read.
        let mut changed = personal("CCCCCCCCCCCC", &["eng", "ops"]);
        let read = groups(&changed);
        cache.share_member_groups(&mut changed);
        assert!(Arc::ptr_eq(&groups(&changed), &read));
    }

    #[test]
    fn a_fill_that_raced_an_invalidation_is_not_kept() {
        let cache = LiveCache::new(&CacheSettings::default(), false);
        let s = state("BBBBBBBBBBBB");
        // The fill read the database, then a revocation invalidated, then the fill lands.
        let generation = cache.generation.load(Ordering::SeqCst);
        cache.invalidate(&Invalidation::Token("BBBBBBBBBBBB".into()));
        cache.fill("BBBBBBBBBBBB", Some(&s), generation);
        assert_eq!(cache.lookup("BBBBBBBBBBBB"), None);
        // The same holds for "no such token".
        let generation = cache.generation.load(Ordering::SeqCst);
        cache.invalidate(&Invalidation::Token("CCCCCCCCCCCC".into()));
        cache.fill("CCCCCCCCCCCC", None, generation);
        assert_eq!(cache.lookup("CCCCCCCCCCCC"), None);
    }

    #[test]
    fn becoming_trusted_starts_from_nothing_and_untrusted_serves_nothing_stale_by_default() {
        let cache = LiveCache::new(&CacheSettings::default(), false);
        let s = state("DDDDDDDDDDDD");
        cache.fill(
            "DDDDDDDDDDDD",
            Some(&s),
            cache.generation.load(Ordering::SeqCst),
        );
        cache.set_trusted(false);
        assert!(!cache.is_trusted());
        assert!(!cache.within_staleness_bound());
        cache.set_trusted(true);
        assert_eq!(cache.lookup("DDDDDDDDDDDD"), None);
    }

    #[test]
    fn a_token_is_touched_only_by_invalidations_of_what_it_depends_on() {
        let cache = LiveCache::new(&CacheSettings::default(), false);
        let mut s = state("AAAAAAAAAAAA");
        Arc::make_mut(&mut s.token).owner_user_id = Some(UserId::from_trusted("alice".into()));
        let token = &s.token;
        let acme = token.tenant_id.clone();
        let other = TenantId::parse("t", "globex").unwrap();
        let alice = UserId::from_trusted("alice".into());
        let bob = UserId::from_trusted("bob".into());
        let since = cache.generation();
        assert!(!cache.touched_since(since, token));
        for unrelated in [
            Invalidation::Token("BBBBBBBBBBBB".into()),
            Invalidation::Tenant(other.clone()),
            Invalidation::User(bob.clone()),
            Invalidation::Member(acme.clone(), bob.clone()),
            Invalidation::Member(other.clone(), alice.clone()),
            Invalidation::Role(other.clone(), RoleName::from_trusted("dev".into())),
        ] {
            cache.invalidate(&unrelated);
            assert!(!cache.touched_since(since, token), "{unrelated:?}");
        }
        for related in [
            Invalidation::Token("AAAAAAAAAAAA".into()),
            Invalidation::Tenant(acme.clone()),
            Invalidation::User(alice.clone()),
            Invalidation::Member(acme.clone(), alice.clone()),
            Invalidation::Role(acme.clone(), RoleName::from_trusted("viewer".into())),
            Invalidation::All,
        ] {
            let before = cache.generation();
            cache.invalidate(&related);
            assert!(cache.touched_since(before, token), "{related:?}");
        }
        // Once the record no longer reaches back, anything since counts.
        let before = cache.generation();
        for _ in 0..=RECENT_INVALIDATIONS {
            cache.invalidate(&Invalidation::Tenant(other.clone()));
        }
        assert!(cache.touched_since(before, token));
    }

    #[test]
    fn trust_is_a_lease_from_the_sending_of_a_heartbeat_that_came_back() {
        let settings = CacheSettings {
            feed_timeout_ms: 30,
            ..CacheSettings::default()
        };
        let cache = LiveCache::new(&settings, true);
        assert!(!cache.is_trusted(), "a feed-backed cache starts untrusted");
        cache.set_trusted(true);
        cache.renewed(Instant::now());
        assert!(cache.is_trusted());
        std::thread::sleep(Duration::from_millis(40));
        assert!(
            !cache.is_trusted(),
            "a quiet feed stops the cache being served"
        );
        // A heartbeat that took longer than the lease to come back renews nothing.
        cache.renewed(Instant::now() - Duration::from_millis(35));
        assert!(!cache.is_trusted());
        cache.renewed(Instant::now());
        assert!(cache.is_trusted());
        // A late (or replayed) older heartbeat does not move the lease back.
        cache.renewed(Instant::now() - Duration::from_secs(1));
        assert!(cache.is_trusted());
    }

    #[test]
    fn a_staleness_bound_counts_from_the_loss_of_the_feed() {
        let settings = CacheSettings {
            max_staleness_ms: 60_000,
            ..CacheSettings::default()
        };
        let cache = LiveCache::new(&settings, false);
        assert!(
            !cache.within_staleness_bound(),
            "trusted: no fallback needed"
        );
        cache.set_trusted(false);
        assert!(cache.within_staleness_bound());
    }
}
