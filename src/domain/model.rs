//! The directory and token records the rules work on.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use super::names::{Builtins, Group, Permission, RoleName, TenantId, TokenName, UserId};
use super::token_format::{PUBLIC_ID_LEN, TokenKind};

/// A point in time, UTC.
pub type Timestamp = chrono::DateTime<chrono::Utc>;
/// A span of time.
pub type Duration = chrono::TimeDelta;
/// A sorted, deduplicated set of permissions.
pub type PermissionSet = BTreeSet<Permission>;

/// Whether a tenant's tokens may be live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TenantStatus {
    /// Tokens may be live.
    Active,
    /// Every token of the tenant is inactive; none can be issued.
    Suspended,
}

/// A user's global status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserStatus {
    /// The user's tokens may be live.
    Active,
    /// Temporarily barred.
    Suspended,
    /// Gone from the identity provider.
    Removed,
}

/// Token rules of a tenant, checked at issue; never retroactive.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenPolicy {
    /// Every token must expire.
    pub require_expiry: bool,
    /// The longest lifetime a token may be issued with.
    pub max_lifetime: Option<Duration>,
    /// The longest a rotated token may stay live beside its successor.
    pub max_rotation_grace: Option<Duration>,
}

/// An organisation or subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenant {
    /// External id.
    pub id: TenantId,
    /// Display name.
    pub name: String,
    /// Active or suspended.
    pub status: TenantStatus,
    /// Token rules.
    pub policy: TokenPolicy,
    /// First stored.
    pub created_at: Timestamp,
    /// Last changed.
    pub updated_at: Timestamp,
}

/// A person, across tenants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// Id at the identity provider.
    pub id: UserId,
    /// Global status.
    pub status: UserStatus,
    /// Last changed.
    pub updated_at: Timestamp,
}

/// A named permission set within a tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Role {
    /// The tenant.
    pub tenant_id: TenantId,
    /// Unique in the tenant.
    pub name: RoleName,
    /// What the role may do.
    pub permissions: PermissionSet,
    /// Last changed.
    pub updated_at: Timestamp,
}

/// A user's role and groups in one tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The tenant.
    pub tenant_id: TenantId,
    /// The user.
    pub user_id: UserId,
    /// The user's role there.
    pub role: RoleName,
    /// Visibility groups.
    pub groups: BTreeSet<Group>,
    /// Last changed.
    pub updated_at: Timestamp,
}

/// An argon2id PHC string. Redacted in `Debug`: a hash is never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretHash(pub Box<str>);

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretHash(<redacted>)")
    }
}

/// Who revoked a token, when and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    /// When.
    pub at: Timestamp,
    /// A user id or a token's display id.
    pub by: String,
    /// Free text from the revoker.
    pub reason: String,
    /// Set by a rotation with a grace period: in force from `at` on. Any other revocation
    /// is in force as soon as it is written, whatever a replica's clock says of `at` (a
    /// clock running behind must not bring a revoked token back).
    pub scheduled: bool,
}

/// A token's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    /// The display id (`{prefix}_{kind}_{public id}`); the public id is its last part (see
    /// [`Token::id`]), not kept twice because a replica caches a million of these.
    pub display_id: String,
    /// The tenant it is bound to.
    pub tenant_id: TenantId,
    /// Personal token or API key.
    pub kind: TokenKind,
    /// Unique among the owner's live tokens of this kind in the tenant.
    pub name: TokenName,
    /// The owning user (personal tokens).
    pub owner_user_id: Option<UserId>,
    /// The role it is bound to (API keys).
    pub role: Option<RoleName>,
    /// What it is narrowed to; `None` = everything its role grants.
    pub scopes: Option<PermissionSet>,
    /// argon2id hash of the secret part.
    pub secret_hash: SecretHash,
    /// Issued at.
    pub created_at: Timestamp,
    /// A user id or the display id of the API key that issued it.
    pub created_by: String,
    /// Expires at; `None` = never.
    pub expires_at: Option<Timestamp>,
    /// Last seen in use, to the minute.
    pub last_used_at: Option<Timestamp>,
    /// Never cleared; its time may lie ahead (a rotation's grace period), and is then only
    /// ever brought forward. Boxed: most cached tokens are live, and an inline revocation
    /// would make every one of them 56 bytes bigger.
    pub revocation: Option<Box<Revocation>>,
}

/// Where a token was used from: one of the few most recent distinct (client IP, calling
/// service) pairs kept per token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenUse {
    /// The token's public id.
    pub token_id: String,
    /// The end user's IP as the calling service reported it; `None` = not reported.
    pub client_ip: Option<std::net::IpAddr>,
    /// The display id of the credential that introspected the token (the calling service);
    /// empty when the token itself was the credential of a call to tokend, `client_ip`
    /// then being that connection's peer.
    pub service: String,
    /// That credential's name when it called.
    pub service_name: String,
    /// The latest use from this pair, to the minute.
    pub at: Timestamp,
}

/// Where a token stands in its own lifecycle (not counting owner, role or tenant).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenStatus {
    /// Neither revoked nor expired.
    Active,
    /// Past its expiry.
    Expired,
    /// Revoked.
    Revoked,
}

impl Token {
    /// An active API key of tenant `acme` with role `reader`, public id `id`: for tests.
    #[cfg(test)]
    pub(crate) fn sample(id: &str) -> Self {
        Self {
            display_id: format!("tkd_key_{id}"),
            tenant_id: TenantId::parse("t", "acme").unwrap(),
            kind: TokenKind::ApiKey,
            name: TokenName::parse("n", "robot").unwrap(),
            owner_user_id: None,
            role: Some(RoleName::parse("r", "reader").unwrap()),
            scopes: None,
            secret_hash: SecretHash("h".into()),
            created_at: chrono::DateTime::UNIX_EPOCH,
            created_by: "x".into(),
            expires_at: None,
            last_used_at: None,
            revocation: None,
        }
    }

    /// The public id: the display id's last part (neither prefix nor id contain `_`).
    pub fn id(&self) -> &str {
        // The id is the display id's fixed-length tail; read off without a search, as a
        // live answer asks for it several times. Exactly what the search would find: a
        // tail without `_` right after one; anything else (a row written by hand) searches.
        let display_id = self.display_id.as_str();
        match display_id.len().checked_sub(PUBLIC_ID_LEN + 1) {
            Some(at)
                if display_id.as_bytes()[at] == b'_'
                    && !display_id.as_bytes()[at + 1..].contains(&b'_') =>
            {
                &display_id[at + 1..]
            }
            _ => display_id.rsplit_once('_').map_or(display_id, |(_, id)| id),
        }
    }

    /// Whether a revocation is in force at `now`. A rotation with a grace period records
    /// its revocation ahead of time, and the token stays live until then.
    pub fn revoked(&self, now: Timestamp) -> bool {
        self.revocation
            .as_ref()
            .is_some_and(|r| !r.scheduled || r.at <= now)
    }

    /// The end of a rotation's grace period, if the token is in one or past it.
    pub fn grace_ends_at(&self) -> Option<Timestamp> {
        self.revocation
            .as_ref()
            .filter(|r| r.scheduled)
            .map(|r| r.at)
    }

    /// When the token stops being live by itself: its expiry or a scheduled revocation,
    /// whichever comes first; `None` = not by itself.
    pub fn ends_at(&self) -> Option<Timestamp> {
        let revoked_at = self.grace_ends_at();
        match (self.expires_at, revoked_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The token's status at `now`. Revocation wins over expiry.
    pub fn status(&self, now: Timestamp) -> TokenStatus {
        if self.revoked(now) {
            TokenStatus::Revoked
        } else if self.expires_at.is_some_and(|at| at <= now) {
            TokenStatus::Expired
        } else {
            TokenStatus::Active
        }
    }

    /// The user id or display id that stands for this token's subject: the owner of a
    /// personal token, the key itself for an API key.
    pub fn subject(&self) -> String {
        match &self.owner_user_id {
            Some(owner) if self.kind == TokenKind::Personal => owner.to_string(),
            _ => self.id().to_owned(),
        }
    }
}

/// Everything Introspect needs about one token, read in one query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenState {
    /// The token row, shared with the cache that holds it.
    pub token: Arc<Token>,
    /// Its tenant's status.
    pub tenant_status: TenantStatus,
    /// The owner's status (personal tokens); `None` if the user is unknown.
    pub owner_status: Option<UserStatus>,
    /// The owner's role and groups in the token's tenant, if still a member (personal
    /// tokens).
    pub membership: Option<Membership>,
    /// The permissions of the role in force: the owner's current role for a personal token,
    /// the bound role for an API key; `None` if that role no longer exists.
    pub role_permissions: Option<Arc<PermissionSet>>,
}

/// Everything acting as a user in a tenant depends on, read in one query: acting as
/// someone is checked on every token request made that way, and four separate reads were
/// four round trips (and four wakeups of the embedded database's worker, on the core that
/// answers Introspect).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserInTenant {
    /// The tenant.
    pub tenant: Tenant,
    /// The user's status; `None` if the user is unknown.
    pub user_status: Option<UserStatus>,
    /// The user's role there; `None` if not a member.
    pub role: Option<RoleName>,
    /// That role's permissions; `None` if not a member or the role no longer exists.
    pub role_permissions: Option<PermissionSet>,
}

/// A member's standing in one tenant, as liveness needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    /// The member's role.
    pub role: RoleName,
    /// The member's groups, shared with the verdicts of the member's tokens.
    pub groups: Arc<BTreeSet<Group>>,
}

/// A change that makes cached live state stale. Raised locally by every write and, on
/// PostgreSQL, by database triggers for any writer. It can only evict: it never carries
/// state, so a forged notification cannot make anything live.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Invalidation {
    /// A token row changed (revoked, deleted, rehashed, issued).
    Token(String),
    /// A tenant changed (status).
    Tenant(TenantId),
    /// A user changed (status).
    User(UserId),
    /// A membership changed or went.
    Member(TenantId, UserId),
    /// A role changed or went.
    Role(TenantId, RoleName),
    /// Anything may have changed: after a gap in the change feed.
    All,
}

/// Why a token string is not live. Logged and counted; shown only to trusted callers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InactiveReason {
    /// Not a token of this format, or a bad checksum.
    Malformed,
    /// No such token, or a wrong secret.
    Unknown,
    /// Past its expiry.
    Expired,
    /// Revoked.
    Revoked,
    /// The owner is suspended.
    OwnerSuspended,
    /// The owner was removed (or is unknown).
    OwnerRemoved,
    /// The owner is no longer a member of the token's tenant.
    NotAMember,
    /// The tenant is suspended.
    TenantSuspended,
    /// The role it draws from is gone.
    RoleDeleted,
}

impl InactiveReason {
    /// A stable label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            InactiveReason::Malformed => "malformed",
            InactiveReason::Unknown => "unknown",
            InactiveReason::Expired => "expired",
            InactiveReason::Revoked => "revoked",
            InactiveReason::OwnerSuspended => "owner_suspended",
            InactiveReason::OwnerRemoved => "owner_removed",
            InactiveReason::NotAMember => "not_a_member",
            InactiveReason::TenantSuspended => "tenant_suspended",
            InactiveReason::RoleDeleted => "role_deleted",
        }
    }
}

/// A live token's rights right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveGrant {
    /// The role's permissions narrowed to the token's scopes (the role's own set, shared,
    /// when it has none).
    pub permissions: Arc<PermissionSet>,
    /// The owner's groups in the tenant (empty for API keys). Shared with the cached
    /// membership: even one group is a B-tree node of some 280 bytes, per cached token if
    /// each verdict kept its own copy.
    pub groups: Arc<BTreeSet<Group>>,
    /// Which of tokend's own permissions `permissions` holds.
    pub builtins: Builtins,
}

/// One audit record to append, in the same transaction as the change it describes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    /// When.
    pub at: Timestamp,
    /// The tenant concerned (`system` for global changes).
    pub tenant_id: TenantId,
    /// On whose behalf.
    pub actor: String,
    /// The credential's display id.
    pub caller: String,
    /// What happened (`token.issued`, ...).
    pub action: String,
    /// The token concerned.
    pub token_id: Option<String>,
    /// Further facts; never a secret.
    pub detail: std::collections::BTreeMap<String, String>,
}

/// A stored audit record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    /// Increasing id.
    pub id: i64,
    /// The record.
    pub record: AuditRecord,
}
