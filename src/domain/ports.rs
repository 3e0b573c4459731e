//! What the domain needs from the outside world. Adapters implement these; the services
//! depend on the traits only, so every backend runs the same behaviour.

use async_trait::async_trait;
use secrecy::SecretString;

use super::error::Result;
use super::model::{
    AuditEvent, AuditRecord, Invalidation, Member, Revocation, Role, Tenant, Timestamp, Token,
    TokenState, TokenUse, User, UserInTenant,
};
use super::names::{RoleName, TenantId, UserId};
use super::rules::Visibility;
use super::token_format::TokenKind;

/// The only source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Now.
    fn now(&self) -> Timestamp;
}

/// Where invalidations land: the live-state cache. Fed by local writes and, on PostgreSQL,
/// by the change listener, which also says whether the feed can be trusted.
pub trait InvalidationSink: Send + Sync + std::fmt::Debug + 'static {
    /// Evicts what `what` names.
    fn invalidate(&self, what: &Invalidation);
    /// Reports that this replica's own heartbeat, sent at `sent`, came back through the
    /// change feed: everything committed before it has been applied. Trust is a lease from
    /// `sent`; a feed that stops proving itself this way stops being trusted.
    fn renewed(&self, _sent: std::time::Instant) {}
    /// Whether every change is being seen. Becoming trusted starts from an empty cache.
    fn set_trusted(&self, trusted: bool);
}

/// Holds a committed write back until no replica can still serve what it changed.
#[async_trait]
pub trait WriteFence: Send + Sync + std::fmt::Debug + 'static {
    /// Returns once every replica that may answer from its cache has applied everything
    /// committed before `committed` (taken after the commit returned), or once the longest
    /// any replica can go on trusting its cache without having applied it has passed.
    async fn settle(&self, committed: std::time::Instant);
}

/// The outcome of checking a secret against a stored hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verification {
    /// The secret does not match.
    Mismatch,
    /// It matches; `needs_rehash` when the hash was made with other parameters than the
    /// current ones.
    Match {
        /// The stored hash should be replaced by one with the current parameters.
        needs_rehash: bool,
    },
}

/// Hashes and verifies token secrets. Implementations run the work off the async runtime.
#[async_trait]
pub trait SecretHasher: Send + Sync + std::fmt::Debug + 'static {
    /// A PHC string for a new secret.
    async fn hash(&self, secret: SecretString) -> Result<String>;
    /// Checks a secret against a PHC string, in constant time.
    async fn verify(&self, secret: SecretString, phc: String) -> Result<Verification>;
}

/// Which tokens to list, and where the page starts.
#[derive(Clone, Debug)]
pub struct TokenQuery {
    /// The tenant.
    pub tenant_id: TenantId,
    /// Which of its tokens the actor may see.
    pub visibility: Visibility,
    /// Only this kind.
    pub kind: Option<TokenKind>,
    /// Only names containing this, already case-folded.
    pub name_contains: Option<String>,
    /// Only tokens of this owner.
    pub owner: Option<UserId>,
    /// Leave out tokens revoked at or before this time (one in a rotation's grace period is
    /// still live and stays); `None` = list revoked tokens too.
    pub revoked_by_then: Option<Timestamp>,
    /// Start after this (created_at, id), newest first.
    pub after: Option<(Timestamp, String)>,
    /// At most this many.
    pub limit: u64,
}

/// How many distinct (client IP, calling service) pairs are kept per token.
pub const MAX_TOKEN_USES: usize = 5;

/// Which audit events to list.
#[derive(Clone, Debug)]
pub struct AuditQuery {
    /// Only this tenant's; `None` = every tenant (system callers).
    pub tenant_id: Option<TenantId>,
    /// Only about this token.
    pub token_id: Option<String>,
    /// Only events older than this id.
    pub before_id: Option<i64>,
    /// At most this many.
    pub limit: u64,
}

/// The system of record. Every write commits in one transaction together with its audit
/// records, so an acknowledged change and its trail are never separated.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Creates or replaces a tenant (keeping its `created_at`); returns it as stored.
    async fn put_tenant(&self, tenant: &Tenant, audit: &AuditRecord) -> Result<Tenant>;
    /// One tenant.
    async fn get_tenant(&self, id: &TenantId) -> Result<Option<Tenant>>;
    /// Tenants by id after `after`; only `only` if given.
    async fn list_tenants(
        &self,
        only: Option<&TenantId>,
        after: Option<&TenantId>,
        limit: u64,
    ) -> Result<Vec<Tenant>>;

    /// Creates or replaces a role. NotFound if the tenant does not exist.
    async fn put_role(&self, role: &Role, audit: &AuditRecord) -> Result<()>;
    /// Deletes a role; false if there was none. FailedPrecondition while members hold it.
    async fn delete_role(
        &self,
        tenant: &TenantId,
        name: &RoleName,
        audit: &AuditRecord,
    ) -> Result<bool>;
    /// One role.
    async fn get_role(&self, tenant: &TenantId, name: &RoleName) -> Result<Option<Role>>;
    /// Every role of a tenant, by name.
    async fn list_roles(&self, tenant: &TenantId) -> Result<Vec<Role>>;

    /// Creates or replaces memberships, all or none, each with its audit record, creating
    /// unknown users (active). NotFound if a tenant or role does not exist.
    async fn put_members(&self, members: &[(Member, AuditRecord)]) -> Result<()>;
    /// Removes a membership; false if there was none.
    async fn remove_member(
        &self,
        tenant: &TenantId,
        user: &UserId,
        audit: &AuditRecord,
    ) -> Result<bool>;
    /// One membership.
    async fn get_member(&self, tenant: &TenantId, user: &UserId) -> Result<Option<Member>>;
    /// Memberships of a tenant by user id after `after`.
    async fn list_members(
        &self,
        tenant: &TenantId,
        after: Option<&UserId>,
        limit: u64,
    ) -> Result<Vec<Member>>;

    /// Creates or updates a user.
    async fn put_user(&self, user: &User, audit: &AuditRecord) -> Result<User>;
    /// One user.
    async fn get_user(&self, id: &UserId) -> Result<Option<User>>;

    /// The tenant `tenant` and `user`'s standing in it, in one read; `None` if the tenant
    /// does not exist.
    async fn user_in_tenant(
        &self,
        tenant: &TenantId,
        user: &UserId,
    ) -> Result<Option<UserInTenant>>;

    /// Stores a new token. AlreadyExists if its owner has a live token of the same kind and
    /// name (case-insensitive) in the tenant.
    async fn insert_token(&self, token: &Token, audit: &AuditRecord) -> Result<()>;
    /// Everything Introspect needs about a token, by public id, in one query.
    async fn token_state(&self, public_id: &str) -> Result<Option<TokenState>>;
    /// One token of a tenant.
    async fn get_token(&self, tenant: &TenantId, id: &str) -> Result<Option<Token>>;
    /// A page of tokens, newest first.
    async fn list_tokens(&self, query: &TokenQuery) -> Result<Vec<Token>>;
    /// Revokes a live token, or brings forward a revocation scheduled after
    /// `revocation.at` (a rotation's grace); a token already revoked by then keeps its
    /// revocation. Returns the row afterwards.
    async fn revoke_token(
        &self,
        tenant: &TenantId,
        id: &str,
        revocation: &Revocation,
        audit: &AuditRecord,
    ) -> Result<Option<Token>>;
    /// Rotates a token in one transaction: schedules `revocation` on the live token `id`
    /// (FailedPrecondition if it was revoked, rotated or expired meanwhile), stores its
    /// `successor` (AlreadyExists as for [`Store::insert_token`]) and appends `audit`.
    /// Returns the predecessor's row afterwards.
    async fn rotate_token(
        &self,
        tenant: &TenantId,
        id: &str,
        revocation: &Revocation,
        successor: &Token,
        audit: &[AuditRecord],
    ) -> Result<Token>;
    /// Deletes a token's row, appending `audit` (its revocation, if it was live, and its
    /// deletion) in the same transaction; false if there was none.
    async fn delete_token(
        &self,
        tenant: &TenantId,
        id: &str,
        audit: &[AuditRecord],
    ) -> Result<bool>;
    /// Records where tokens were used from (upserting each (token, client IP, service) pair's
    /// time, never backwards) and keeps only the most recent [`MAX_TOKEN_USES`] pairs per
    /// token. Uses of tokens that no longer exist are dropped.
    async fn record_token_uses(&self, uses: &[TokenUse]) -> Result<()>;
    /// The recorded uses of these tokens, newest first.
    async fn token_uses(&self, token_ids: &[String]) -> Result<Vec<TokenUse>>;
    /// Records when tokens were last used, in one batched write.
    async fn touch_last_used(&self, used: &[(String, Timestamp)]) -> Result<()>;
    /// Replaces a token's hash (after a parameter upgrade) if it is still `old`: of several
    /// concurrent upgrades, one wins. Returns whether this one did.
    async fn replace_hash(&self, id: &str, old: &str, new: &str) -> Result<bool>;

    /// A page of audit events, newest first.
    async fn list_audit(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>>;

    /// Creates the system tenant, its admin role and the root API key in one transaction.
    /// AlreadyExists if the system tenant exists.
    async fn bootstrap(
        &self,
        tenant: &Tenant,
        role: &Role,
        token: &Token,
        audit: &AuditRecord,
    ) -> Result<()>;

    /// Returns once no replica can still answer from a cache that lacks anything committed
    /// before this call: for a write that found its change already made (by a call that may
    /// still be waiting on its own fence), and after a batch (see [`one_fence_for`]). A
    /// no-op with one replica.
    async fn fence(&self) {}
}

tokio::task_local! {
    /// Set inside [`one_fence_for`]: whether a write there deferred its fence.
    static FENCE_DEFERRED: std::cell::Cell<bool>;
}

/// Runs `batch`, whose writes skip their own fences, then one fence for all of them (a fence
/// follows every commit before it): a bulk revocation waits for a silent replica once, not
/// once per token. The fence runs even if `batch` fails partway, for what it committed, and
/// even if it wrote nothing: what it found done may be an earlier call's, still unfenced.
pub async fn one_fence_for<F: std::future::Future>(store: &dyn Store, batch: F) -> F::Output {
    let output = FENCE_DEFERRED
        .scope(std::cell::Cell::new(false), batch)
        .await;
    store.fence().await;
    output
}

/// For a write that went through: `true` if it runs inside [`one_fence_for`], which then
/// fences for it; `false` if it must fence itself.
pub fn defer_fence() -> bool {
    FENCE_DEFERRED
        .try_with(|deferred| deferred.set(true))
        .is_ok()
}
