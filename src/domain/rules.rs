//! The rules of SPEC §2, §3 and §5 as pure functions: effective permissions, liveness,
//! "no token may grant more than its issuer holds", expiry policy, who sees which token.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::error::{Error, Result};
use super::model::{
    InactiveReason, LiveGrant, PermissionSet, TenantStatus, Timestamp, Token, TokenPolicy,
    TokenState, UserStatus,
};
use super::names::{BuiltinPermission, Builtins, Permission, TenantId, UserId};
use super::token_format::TokenKind;

/// Call Introspect.
pub const INTROSPECT: BuiltinPermission = Permission::builtin("tokend.introspect", 0);
/// See why a token is inactive.
pub const INTROSPECT_REASONS: BuiltinPermission =
    Permission::builtin("tokend.introspect.reasons", 1);
/// (System tenant only) act on behalf of the user named in the request.
pub const ACT_AS: BuiltinPermission = Permission::builtin("tokend.act_as", 2);
/// Issue new tokens as oneself.
pub const TOKENS_ISSUE: BuiltinPermission = Permission::builtin("tokend.tokens.issue", 3);
/// List and revoke any token of one's tenant.
pub const TOKENS_ADMIN: BuiltinPermission = Permission::builtin("tokend.tokens.admin", 4);
/// Issue, list and revoke the API keys of one's tenant.
pub const API_KEYS_MANAGE: BuiltinPermission = Permission::builtin("tokend.api_keys.manage", 5);
/// Change the directory.
pub const DIRECTORY_WRITE: BuiltinPermission = Permission::builtin("tokend.directory.write", 6);
/// Read the directory.
pub const DIRECTORY_READ: BuiltinPermission = Permission::builtin("tokend.directory.read", 7);
/// Read the audit log.
pub const AUDIT_READ: BuiltinPermission = Permission::builtin("tokend.audit.read", 8);

/// Every permission tokend defines: the bootstrap admin role holds them all.
pub const ALL_BUILTIN: [BuiltinPermission; 9] = [
    INTROSPECT,
    INTROSPECT_REASONS,
    ACT_AS,
    TOKENS_ISSUE,
    TOKENS_ADMIN,
    API_KEYS_MANAGE,
    DIRECTORY_WRITE,
    DIRECTORY_READ,
    AUDIT_READ,
];

/// Whether a set holds a builtin permission.
pub fn holds(set: &PermissionSet, permission: BuiltinPermission) -> bool {
    set.contains(permission.as_str())
}

/// The builtin permissions a set holds.
pub fn builtins(set: &PermissionSet) -> Builtins {
    ALL_BUILTIN
        .into_iter()
        .filter(|permission| holds(set, *permission))
        .fold(Builtins::default(), Builtins::with)
}

/// A token's permissions: its role's, narrowed to its scopes if it has any.
pub fn effective_permissions(
    role: &Arc<PermissionSet>,
    scopes: Option<&PermissionSet>,
) -> Arc<PermissionSet> {
    match scopes {
        Some(scopes) => Arc::new(role.intersection(scopes).cloned().collect()),
        None => Arc::clone(role),
    }
}

/// The members of `wanted` that `held` lacks, in order.
pub fn missing<'a>(wanted: &'a PermissionSet, held: &PermissionSet) -> Vec<&'a Permission> {
    wanted.iter().filter(|p| !held.contains(*p)).collect()
}

/// Whether the token behind `state` is live at `now`, and with which rights.
///
/// The checks run in a fixed order so the reason is stable: the token's own state first,
/// then its tenant, then its owner, then its role.
pub fn evaluate(state: &TokenState, now: Timestamp) -> Result<LiveGrant, InactiveReason> {
    let token = &state.token;
    if token.revoked(now) {
        return Err(InactiveReason::Revoked);
    }
    if token.expires_at.is_some_and(|at| at <= now) {
        return Err(InactiveReason::Expired);
    }
    if state.tenant_status != TenantStatus::Active {
        return Err(InactiveReason::TenantSuspended);
    }
    let groups = match token.kind {
        TokenKind::Personal => {
            match state.owner_status {
                Some(UserStatus::Active) => {}
                Some(UserStatus::Suspended) => return Err(InactiveReason::OwnerSuspended),
                Some(UserStatus::Removed) | None => return Err(InactiveReason::OwnerRemoved),
            }
            state
                .membership
                .as_ref()
                .map(|m| Arc::clone(&m.groups))
                .ok_or(InactiveReason::NotAMember)?
        }
        TokenKind::ApiKey => no_groups(),
    };
    let role = state
        .role_permissions
        .as_ref()
        .ok_or(InactiveReason::RoleDeleted)?;
    let permissions = effective_permissions(role, token.scopes.as_ref());
    Ok(LiveGrant {
        builtins: builtins(&permissions),
        permissions,
        groups,
    })
}

/// The groups of a token without an owner: one empty set for all of them.
fn no_groups() -> Arc<BTreeSet<super::names::Group>> {
    static NONE: std::sync::OnceLock<Arc<BTreeSet<super::names::Group>>> =
        std::sync::OnceLock::new();
    Arc::clone(NONE.get_or_init(Arc::default))
}

/// Refuses a request for permissions the grantor lacks, naming every offending string.
///
/// `field` is the request field that asked for them (`scopes`, `role`).
pub fn require_subset(
    field: &str,
    wanted: &PermissionSet,
    held: &PermissionSet,
    whose: &str,
) -> Result<()> {
    let lacking = missing(wanted, held);
    if lacking.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = lacking.iter().map(|p| p.as_str()).collect();
    Err(Error::PermissionDenied(format!(
        "{field}: {whose} lacks {}",
        names.join(", ")
    )))
}

/// What a new token asked for as its expiry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpiryRequest {
    /// Never expires (unless the tenant's policy requires an expiry).
    Never,
    /// At this time.
    At(Timestamp),
    /// After this long from now.
    After(chrono::TimeDelta),
}

/// Resolves a requested expiry against `now` and the tenant's policy.
pub fn resolve_expiry(
    request: ExpiryRequest,
    policy: &TokenPolicy,
    tenant: &TenantId,
    now: Timestamp,
) -> Result<Option<Timestamp>> {
    let expires_at = match request {
        ExpiryRequest::Never => None,
        ExpiryRequest::At(at) => {
            if at <= now {
                return Err(Error::invalid("expires_at", "must be in the future"));
            }
            Some(at)
        }
        ExpiryRequest::After(ttl) => {
            if ttl <= chrono::TimeDelta::zero() {
                return Err(Error::invalid("ttl", "must be positive"));
            }
            Some(
                now.checked_add_signed(ttl)
                    .ok_or_else(|| Error::invalid("ttl", "is too long"))?,
            )
        }
    };
    match (expires_at, policy.max_lifetime) {
        (None, _) if policy.require_expiry => Err(Error::FailedPrecondition(format!(
            "policy require_expiry: tenant {tenant} requires every token to expire; set expires_at or ttl"
        ))),
        (None, Some(max)) => Err(Error::FailedPrecondition(format!(
            "policy max_lifetime: tenant {tenant} allows tokens to live at most {}s; set expires_at or ttl",
            max.num_seconds()
        ))),
        (Some(at), Some(max)) if at - now > max => Err(Error::FailedPrecondition(format!(
            "policy max_lifetime: tenant {tenant} allows tokens to live at most {}s",
            max.num_seconds()
        ))),
        _ => Ok(expires_at),
    }
}

/// The longest grace period any rotation may ask for, whatever the tenant's policy: an old
/// credential kept alive for longer is no longer a switch-over but a second credential.
pub const MAX_ROTATION_GRACE: chrono::TimeDelta = chrono::TimeDelta::days(30);

/// The expiry of a rotated token's successor: the predecessor's lifetime again, from `now`,
/// clamped to the tenant's maximum lifetime. A token that never expired gets the maximum
/// lifetime if the policy has one; with only `require_expiry` there is no lifetime to
/// recompute, and the rotation is refused (issue a new token with an expiry instead).
pub fn rotation_expiry(
    token: &Token,
    policy: &TokenPolicy,
    tenant: &TenantId,
    now: Timestamp,
) -> Result<Option<Timestamp>> {
    let lifetime = token.expires_at.map(|at| at - token.created_at);
    let lifetime = match (lifetime, policy.max_lifetime) {
        (Some(own), Some(max)) => Some(own.min(max)),
        (own, max) => own.or(max),
    };
    match lifetime {
        None if policy.require_expiry => Err(Error::FailedPrecondition(format!(
            "policy require_expiry: tenant {tenant} requires every token to expire and token {} never does; issue a new token with an expiry instead",
            token.id()
        ))),
        None => Ok(None),
        Some(lifetime) => now
            .checked_add_signed(lifetime)
            .map(Some)
            .ok_or_else(|| Error::invalid("token_id", "the token's lifetime is out of range")),
    }
}

/// Refuses a rotation grace period out of range, or longer than the tenant's policy allows.
pub fn check_rotation_grace(
    grace: chrono::TimeDelta,
    policy: &TokenPolicy,
    tenant: &TenantId,
) -> Result<()> {
    if grace < chrono::TimeDelta::zero() || grace > MAX_ROTATION_GRACE {
        return Err(Error::invalid(
            "grace",
            format!(
                "must be between 0 and {} days",
                MAX_ROTATION_GRACE.num_days()
            ),
        ));
    }
    match policy.max_rotation_grace {
        Some(max) if grace > max => Err(Error::FailedPrecondition(format!(
            "policy max_rotation_grace: tenant {tenant} allows a rotated token to stay live at most {}s beside its successor; ask for a shorter grace",
            max.num_seconds()
        ))),
        _ => Ok(()),
    }
}

/// Which tokens of one tenant an actor may see and touch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Visibility {
    /// Every token of the tenant (`tokend.tokens.admin`).
    pub all: bool,
    /// Every API key of the tenant (`tokend.api_keys.manage`).
    pub api_keys: bool,
    /// Personal tokens of this user (the actor's own).
    pub owner: Option<UserId>,
    /// The credential itself, which may always manage itself.
    pub itself: Option<String>,
}

impl Visibility {
    /// Whether `token` is visible. Anything invisible must be answered exactly as if it did
    /// not exist.
    pub fn sees(&self, token: &Token) -> bool {
        self.all
            || (self.api_keys && token.kind == TokenKind::ApiKey)
            || (token.kind == TokenKind::Personal
                && self.owner.is_some()
                && token.owner_user_id == self.owner)
            || self.itself.as_deref() == Some(token.id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::model::{Membership, Revocation, SecretHash};
    use crate::domain::names::{Group, RoleName, TokenName};
    use chrono::{TimeDelta, TimeZone, Utc};

    fn perms(list: &[&str]) -> PermissionSet {
        list.iter()
            .map(|p| Permission::parse("p", p).unwrap())
            .collect()
    }

    fn now() -> Timestamp {
        Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap()
    }

    fn token(kind: TokenKind) -> Token {
        Token {
            display_id: "tkd_pat_AAAAAAAAAAAA".into(),
            tenant_id: TenantId::parse("t", "acme").unwrap(),
            kind,
            name: TokenName::parse("n", "ci").unwrap(),
            owner_user_id: (kind == TokenKind::Personal)
                .then(|| UserId::parse("u", "alice").unwrap()),
            role: (kind == TokenKind::ApiKey).then(|| RoleName::parse("r", "reader").unwrap()),
            scopes: None,
            secret_hash: SecretHash("".into()),
            created_at: now() - TimeDelta::days(1),
            created_by: "alice".into(),
            expires_at: None,
            last_used_at: None,
            revocation: None,
        }
    }

    #[test]
    fn the_public_id_is_the_display_ids_last_part() {
        let mut t = token(TokenKind::Personal);
        assert_eq!(t.id(), "AAAAAAAAAAAA");
        t.display_id = "acme2_key_0123456789ab".into();
        assert_eq!(t.id(), "0123456789ab");
        // A row written by hand with an id of another length: the part after the last `_`,
        // never a tail of fixed length that spans it.
        t.display_id = "tkd_pat_abcdefgh".into();
        assert_eq!(t.id(), "abcdefgh");
        t.display_id = "tkd_pat_abcdefghijklmnop".into();
        assert_eq!(t.id(), "abcdefghijklmnop");
    }

    fn live_state(kind: TokenKind) -> TokenState {
        TokenState {
            token: Arc::new(token(kind)),
            tenant_status: TenantStatus::Active,
            owner_status: (kind == TokenKind::Personal).then_some(UserStatus::Active),
            membership: (kind == TokenKind::Personal).then(|| Membership {
                role: RoleName::parse("r", "dev").unwrap(),
                groups: Arc::new([Group::parse("g", "eng").unwrap()].into()),
            }),
            role_permissions: Some(Arc::new(perms(&["a:read", "a:write"]))),
        }
    }

    #[test]
    fn scopes_narrow_the_role() {
        let role = Arc::new(perms(&["a:read", "a:write"]));
        // Unscoped: the role's own set, shared rather than copied.
        assert!(Arc::ptr_eq(&effective_permissions(&role, None), &role));
        assert_eq!(
            *effective_permissions(&role, Some(&perms(&["a:read", "b:read"]))),
            perms(&["a:read"])
        );
    }

    #[test]
    fn a_live_personal_token_carries_role_and_groups() {
        let grant = evaluate(&live_state(TokenKind::Personal), now()).unwrap();
        assert_eq!(*grant.permissions, perms(&["a:read", "a:write"]));
        assert_eq!(grant.groups.len(), 1);
    }

    #[test]
    fn a_grant_knows_its_builtin_permissions_as_its_set_does() {
        // Each builtin its own bit, so no permission can pass for another.
        let mut seen = Builtins::default();
        for permission in ALL_BUILTIN {
            assert!(!seen.has(permission), "{permission} shares a bit");
            seen = seen.with(permission);
        }
        // Scoped to two of them (and one of the role's own), the grant holds exactly those.
        let mut state = live_state(TokenKind::Personal);
        state.role_permissions = Some(Arc::new(
            ALL_BUILTIN
                .iter()
                .map(|p| p.as_str())
                .chain(["a:read"])
                .map(|p| Permission::parse("p", p).unwrap())
                .collect(),
        ));
        Arc::make_mut(&mut state.token).scopes =
            Some(perms(&[INTROSPECT.as_str(), AUDIT_READ.as_str(), "a:read"]));
        let grant = evaluate(&state, now()).unwrap();
        for permission in ALL_BUILTIN {
            assert_eq!(
                grant.builtins.has(permission),
                permission == INTROSPECT || permission == AUDIT_READ,
                "{permission}"
            );
            assert_eq!(
                grant.builtins.has(permission),
                holds(&grant.permissions, permission)
            );
        }
    }

    #[test]
    fn every_inactive_reason_is_detected() {
        let mut s = live_state(TokenKind::Personal);
        Arc::make_mut(&mut s.token).revocation = Some(Box::new(Revocation {
            at: now(),
            by: "x".into(),
            reason: String::new(),
            scheduled: false,
        }));
        assert_eq!(evaluate(&s, now()), Err(InactiveReason::Revoked));
        // Written by a replica whose clock runs ahead of this one: in force all the same.
        Arc::make_mut(&mut s.token).revocation.as_mut().unwrap().at = now() + TimeDelta::hours(1);
        assert_eq!(evaluate(&s, now()), Err(InactiveReason::Revoked));
        assert_eq!(s.token.ends_at(), None);

        let mut s = live_state(TokenKind::Personal);
        Arc::make_mut(&mut s.token).expires_at = Some(now());
        assert_eq!(evaluate(&s, now()), Err(InactiveReason::Expired));
        Arc::make_mut(&mut s.token).expires_at = Some(now() + TimeDelta::seconds(1));
        assert!(evaluate(&s, now()).is_ok());

        let mut s = live_state(TokenKind::ApiKey);
        s.tenant_status = TenantStatus::Suspended;
        assert_eq!(evaluate(&s, now()), Err(InactiveReason::TenantSuspended));

        let mut s = live_state(TokenKind::Personal);
        s.owner_status = Some(UserStatus::Suspended);
        assert_eq!(evaluate(&s, now()), Err(InactiveReason::OwnerSuspended));
        s.owner_status = Some(UserStatus::Removed);
        assert_eq!(evaluate(&s, now()), Err(InactiveReason::OwnerRemoved));
        s.owner_status = None;
        assert_eq!(evaluate(&s, now()), Err(InactiveReason::OwnerRemoved));

        let mut s = live_state(TokenKind::Personal);
        s.membership = None;
        assert_eq!(evaluate(&s, now()), Err(InactiveReason::NotAMember));

        let mut s = live_state(TokenKind::ApiKey);
        s.role_permissions = None;
        assert_eq!(evaluate(&s, now()), Err(InactiveReason::RoleDeleted));
    }

    #[test]
    fn api_keys_ignore_owner_and_membership() {
        let mut s = live_state(TokenKind::ApiKey);
        s.owner_status = Some(UserStatus::Removed);
        s.membership = None;
        let grant = evaluate(&s, now()).unwrap();
        assert!(grant.groups.is_empty());
    }

    #[test]
    fn a_subset_check_names_every_offender() {
        let held = perms(&["a:read"]);
        assert!(require_subset("scopes", &perms(&["a:read"]), &held, "the owner").is_ok());
        let err = require_subset(
            "scopes",
            &perms(&["b:x", "a:read", "c:y"]),
            &held,
            "the owner",
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "scopes: the owner lacks b:x, c:y");
    }

    #[test]
    fn expiry_must_be_in_the_future_and_within_policy() {
        let acme = TenantId::parse("t", "acme").unwrap();
        let open = TokenPolicy::default();
        assert_eq!(
            resolve_expiry(ExpiryRequest::Never, &open, &acme, now()).unwrap(),
            None
        );
        assert!(matches!(
            resolve_expiry(ExpiryRequest::At(now()), &open, &acme, now()),
            Err(Error::InvalidArgument { field, .. }) if field == "expires_at"
        ));
        assert!(matches!(
            resolve_expiry(ExpiryRequest::After(TimeDelta::zero()), &open, &acme, now()),
            Err(Error::InvalidArgument { field, .. }) if field == "ttl"
        ));
        assert_eq!(
            resolve_expiry(
                ExpiryRequest::After(TimeDelta::hours(1)),
                &open,
                &acme,
                now()
            )
            .unwrap(),
            Some(now() + TimeDelta::hours(1))
        );

        let strict = TokenPolicy {
            require_expiry: true,
            max_lifetime: Some(TimeDelta::days(30)),
            ..TokenPolicy::default()
        };
        let err = resolve_expiry(ExpiryRequest::Never, &strict, &acme, now()).unwrap_err();
        assert!(err.to_string().starts_with("policy require_expiry"));
        let err = resolve_expiry(
            ExpiryRequest::After(TimeDelta::days(31)),
            &strict,
            &acme,
            now(),
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("policy max_lifetime"));
        assert!(
            resolve_expiry(
                ExpiryRequest::After(TimeDelta::days(30)),
                &strict,
                &acme,
                now()
            )
            .is_ok()
        );

        let capped = TokenPolicy {
            require_expiry: false,
            max_lifetime: Some(TimeDelta::days(1)),
            ..TokenPolicy::default()
        };
        assert!(resolve_expiry(ExpiryRequest::Never, &capped, &acme, now()).is_err());
    }

    #[test]
    fn a_successor_lives_as_long_as_its_predecessor_within_policy() {
        let acme = TenantId::parse("t", "acme").unwrap();
        let later = now() + TimeDelta::days(10);
        let mut month = token(TokenKind::Personal);
        month.expires_at = Some(month.created_at + TimeDelta::days(30));
        let forever = token(TokenKind::Personal);
        let open = TokenPolicy::default();
        assert_eq!(
            rotation_expiry(&month, &open, &acme, later).unwrap(),
            Some(later + TimeDelta::days(30))
        );
        assert_eq!(
            rotation_expiry(&forever, &open, &acme, later).unwrap(),
            None
        );

        let week = TokenPolicy {
            max_lifetime: Some(TimeDelta::days(7)),
            ..TokenPolicy::default()
        };
        assert_eq!(
            rotation_expiry(&month, &week, &acme, later).unwrap(),
            Some(later + TimeDelta::days(7))
        );
        assert_eq!(
            rotation_expiry(&forever, &week, &acme, later).unwrap(),
            Some(later + TimeDelta::days(7))
        );

        let must_expire = TokenPolicy {
            require_expiry: true,
            ..TokenPolicy::default()
        };
        let err = rotation_expiry(&forever, &must_expire, &acme, later).unwrap_err();
        assert!(
            err.to_string().starts_with("policy require_expiry"),
            "{err}"
        );
    }

    #[test]
    fn a_rotation_grace_is_bounded_by_policy() {
        let acme = TenantId::parse("t", "acme").unwrap();
        let hour = TokenPolicy {
            max_rotation_grace: Some(TimeDelta::hours(1)),
            ..TokenPolicy::default()
        };
        assert!(check_rotation_grace(TimeDelta::hours(1), &hour, &acme).is_ok());
        let err = check_rotation_grace(TimeDelta::seconds(3601), &hour, &acme).unwrap_err();
        assert!(
            err.to_string().starts_with("policy max_rotation_grace"),
            "{err}"
        );
        assert!(check_rotation_grace(TimeDelta::days(30), &TokenPolicy::default(), &acme).is_ok());
    }

    #[test]
    fn a_scheduled_revocation_takes_effect_at_its_time() {
        let mut s = live_state(TokenKind::ApiKey);
        Arc::make_mut(&mut s.token).revocation = Some(Box::new(Revocation {
            at: now() + TimeDelta::minutes(5),
            by: "alice".to_owned(),
            reason: "rotated".to_owned(),
            scheduled: true,
        }));
        assert!(evaluate(&s, now()).is_ok());
        assert_eq!(
            s.token.status(now()),
            crate::domain::model::TokenStatus::Active
        );
        assert_eq!(s.token.ends_at(), Some(now() + TimeDelta::minutes(5)));
        let then = now() + TimeDelta::minutes(5);
        assert_eq!(evaluate(&s, then), Err(InactiveReason::Revoked));
        assert_eq!(
            s.token.status(then),
            crate::domain::model::TokenStatus::Revoked
        );
    }

    #[test]
    fn visibility_follows_ownership_and_admin_rights() {
        let pat = token(TokenKind::Personal);
        let key = token(TokenKind::ApiKey);
        let alice = Visibility {
            all: false,
            api_keys: false,
            owner: Some(UserId::parse("u", "alice").unwrap()),
            itself: None,
        };
        let bob = Visibility {
            owner: Some(UserId::parse("u", "bob").unwrap()),
            ..alice.clone()
        };
        assert!(alice.sees(&pat));
        assert!(!alice.sees(&key));
        assert!(!bob.sees(&pat));
        let manager = Visibility {
            api_keys: true,
            ..bob.clone()
        };
        assert!(manager.sees(&key) && !manager.sees(&pat));
        let admin = Visibility {
            all: true,
            ..bob.clone()
        };
        assert!(admin.sees(&key) && admin.sees(&pat));
        let key_itself = Visibility {
            all: false,
            api_keys: false,
            owner: None,
            itself: Some(key.id().to_owned()),
        };
        assert!(key_itself.sees(&key));
        let nobody = Visibility {
            all: false,
            api_keys: false,
            owner: None,
            itself: None,
        };
        assert!(!nobody.sees(&pat));
    }
}
