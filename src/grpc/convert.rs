//! proto ⇄ domain. Every request is parsed into validated domain values here, naming the
//! field of any bad input; every response is built from domain records here.

use std::collections::BTreeSet;

use prost_types::{Duration as PbDuration, Timestamp as PbTimestamp};

use crate::domain::model::{
    AuditEvent, InactiveReason, Member, PermissionSet, Role, Tenant, TenantStatus, Timestamp,
    Token, TokenPolicy, TokenStatus, TokenUse, User, UserStatus,
};
use crate::domain::names::{Group, Permission, RoleName, TenantId, TokenName, UserId};
use crate::domain::rules::{self, ExpiryRequest};
use crate::domain::token_format::{TokenFormat, TokenKind};
use crate::domain::{Error, Result};
use crate::introspect::Outcome;
use crate::proto::v1 as pb;
use crate::service::{
    IntrospectAnswer, IssueToken, ListAudit, ListTokens, MAX_LEAK_REPORT, Page, PutMember, PutRole,
    RevokeMany, RotateToken, TokenRef,
};

/// Longest list a request may carry in one repeated field.
const MAX_LIST: usize = 256;
/// Longest free-text field (reasons, names of tenants).
const MAX_TEXT: usize = 200;

pub fn timestamp(at: Timestamp) -> PbTimestamp {
    PbTimestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

fn from_timestamp(field: &str, ts: &PbTimestamp) -> Result<Timestamp> {
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(Error::invalid(field, "nanos must be within 0..1e9"));
    }
    chrono::DateTime::from_timestamp(ts.seconds, ts.nanos as u32)
        .ok_or_else(|| Error::invalid(field, "is out of range"))
}

fn from_duration(field: &str, d: &PbDuration) -> Result<chrono::TimeDelta> {
    let normalised = d.nanos.abs() < 1_000_000_000
        && !(d.seconds > 0 && d.nanos < 0)
        && !(d.seconds < 0 && d.nanos > 0);
    if !normalised {
        return Err(Error::invalid(field, "is not a normalised duration"));
    }
    chrono::TimeDelta::try_seconds(d.seconds)
        .and_then(|s| s.checked_add(&chrono::TimeDelta::nanoseconds(d.nanos.into())))
        .ok_or_else(|| Error::invalid(field, "is out of range"))
}

fn duration(d: chrono::TimeDelta) -> PbDuration {
    PbDuration {
        seconds: d.num_seconds(),
        nanos: d.subsec_nanos(),
    }
}

fn optional<T>(value: &str, parse: impl FnOnce(&str) -> Result<T>) -> Result<Option<T>> {
    if value.is_empty() {
        Ok(None)
    } else {
        parse(value).map(Some)
    }
}

fn tenant_opt(value: &str) -> Result<Option<TenantId>> {
    optional(value, |v| TenantId::parse("tenant_id", v))
}

fn tenant_req(value: &str) -> Result<TenantId> {
    if value.is_empty() {
        return Err(Error::invalid("tenant_id", "is required"));
    }
    TenantId::parse("tenant_id", value)
}

fn actor_opt(value: &str) -> Result<Option<UserId>> {
    optional(value, |v| UserId::parse("actor_user_id", v))
}

fn bounded<'a>(field: &str, list: &'a [String]) -> Result<&'a [String]> {
    if list.len() > MAX_LIST {
        return Err(Error::invalid(field, format!("at most {MAX_LIST} entries")));
    }
    Ok(list)
}

fn permissions(field: &str, list: &[String]) -> Result<PermissionSet> {
    // Most Introspect calls ask for none: no iterator to build and collect.
    if list.is_empty() {
        return Ok(PermissionSet::new());
    }
    bounded(field, list)?
        .iter()
        .enumerate()
        .map(|(i, p)| Permission::parse(&format!("{field}[{i}]"), p))
        .collect()
}

fn groups(field: &str, list: &[String]) -> Result<BTreeSet<Group>> {
    bounded(field, list)?
        .iter()
        .enumerate()
        .map(|(i, g)| Group::parse(&format!("{field}[{i}]"), g))
        .collect()
}

fn free_text(field: &str, value: &str) -> Result<String> {
    if value.chars().count() > MAX_TEXT {
        return Err(Error::invalid(
            field,
            format!("at most {MAX_TEXT} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(value.to_owned())
}

fn kind(field: &str, value: i32, required: bool) -> Result<Option<TokenKind>> {
    match pb::TokenKind::try_from(value) {
        Ok(pb::TokenKind::Personal) => Ok(Some(TokenKind::Personal)),
        Ok(pb::TokenKind::ApiKey) => Ok(Some(TokenKind::ApiKey)),
        Ok(pb::TokenKind::Unspecified) if !required => Ok(None),
        _ => Err(Error::invalid(
            field,
            "must be TOKEN_KIND_PERSONAL or TOKEN_KIND_API_KEY",
        )),
    }
}

fn kind_to_pb(kind: TokenKind) -> pb::TokenKind {
    match kind {
        TokenKind::Personal => pb::TokenKind::Personal,
        TokenKind::ApiKey => pb::TokenKind::ApiKey,
    }
}

fn token_id(format: &TokenFormat, value: &str) -> Result<String> {
    format.token_id(value).map(str::to_owned).ok_or_else(|| {
        Error::invalid(
            "token_id",
            "must be a token id (12 characters of [0-9A-Za-z]) or a display id",
        )
    })
}

pub fn issue_request(req: pb::IssueTokenRequest) -> Result<IssueToken> {
    let kind = kind("kind", req.kind, true)?.unwrap_or(TokenKind::Personal);
    let expiry = match (&req.expires_at, &req.ttl) {
        (Some(_), Some(_)) => {
            return Err(Error::invalid(
                "ttl",
                "set at most one of expires_at and ttl",
            ));
        }
        (Some(at), None) => ExpiryRequest::At(from_timestamp("expires_at", at)?),
        (None, Some(ttl)) => ExpiryRequest::After(from_duration("ttl", ttl)?),
        (None, None) => ExpiryRequest::Never,
    };
    Ok(IssueToken {
        tenant_id: tenant_opt(&req.tenant_id)?,
        actor_user_id: actor_opt(&req.actor_user_id)?,
        kind,
        name: TokenName::parse("name", &req.name)?,
        scopes: permissions("scopes", &req.scopes)?,
        role: optional(&req.role, |v| RoleName::parse("role", v))?,
        expiry,
    })
}

pub fn list_request(req: pb::ListTokensRequest) -> Result<ListTokens> {
    let name_contains = match req.name_contains.as_str() {
        "" => None,
        text => Some(free_text("name_contains", text)?),
    };
    if name_contains
        .as_ref()
        .is_some_and(|n| n.chars().count() > 100)
    {
        return Err(Error::invalid("name_contains", "at most 100 characters"));
    }
    Ok(ListTokens {
        tenant_id: tenant_opt(&req.tenant_id)?,
        actor_user_id: actor_opt(&req.actor_user_id)?,
        kind: kind("kind", req.kind, false)?,
        name_contains,
        include_revoked: req.include_revoked,
        owner_user_id: optional(&req.owner_user_id, |v| UserId::parse("owner_user_id", v))?,
        page: Page::parse(req.page_size, req.page_token)?,
    })
}

pub fn revoke_request(
    format: &TokenFormat,
    req: pb::RevokeTokenRequest,
) -> Result<(TokenRef, String)> {
    Ok((
        TokenRef {
            tenant_id: tenant_opt(&req.tenant_id)?,
            actor_user_id: actor_opt(&req.actor_user_id)?,
            token_id: token_id(format, &req.token_id)?,
        },
        free_text("reason", &req.reason)?,
    ))
}

pub fn delete_request(format: &TokenFormat, req: pb::DeleteTokenRequest) -> Result<TokenRef> {
    Ok(TokenRef {
        tenant_id: tenant_opt(&req.tenant_id)?,
        actor_user_id: actor_opt(&req.actor_user_id)?,
        token_id: token_id(format, &req.token_id)?,
    })
}

pub fn rotate_request(format: &TokenFormat, req: pb::RotateTokenRequest) -> Result<RotateToken> {
    let grace = match &req.grace {
        None => chrono::TimeDelta::zero(),
        Some(d) => from_duration("grace", d)?,
    };
    // The range is the rules' to check (with the tenant's policy).
    Ok(RotateToken {
        target: TokenRef {
            tenant_id: tenant_opt(&req.tenant_id)?,
            actor_user_id: actor_opt(&req.actor_user_id)?,
            token_id: token_id(format, &req.token_id)?,
        },
        // Microseconds, as the database stores the revocation time it leads to.
        grace: grace
            .num_microseconds()
            .map_or(grace, chrono::TimeDelta::microseconds),
    })
}

pub fn revoke_many_request(req: pb::RevokeTokensRequest) -> Result<RevokeMany> {
    let owner_user_id = optional(&req.owner_user_id, |v| UserId::parse("owner_user_id", v))?;
    let issued_before = req
        .issued_before
        .as_ref()
        .map(|at| from_timestamp("issued_before", at))
        .transpose()?;
    if owner_user_id.is_none() && issued_before.is_none() && !req.all {
        return Err(Error::invalid(
            "all",
            "set owner_user_id, issued_before, or all = true to revoke every token of the tenant",
        ));
    }
    if req.all && (owner_user_id.is_some() || issued_before.is_some()) {
        return Err(Error::invalid(
            "all",
            "must not be combined with owner_user_id or issued_before",
        ));
    }
    Ok(RevokeMany {
        tenant_id: tenant_opt(&req.tenant_id)?,
        actor_user_id: actor_opt(&req.actor_user_id)?,
        owner_user_id,
        issued_before,
        reason: free_text("reason", &req.reason)?,
    })
}

/// A leak report's strings and source. The strings themselves are never judged here: a
/// report answers the same whatever they are.
pub fn leak_report(req: pb::ReportLeakedTokenRequest) -> Result<(Vec<String>, String)> {
    if req.tokens.is_empty() {
        return Err(Error::invalid(
            "tokens",
            "must name at least one token string",
        ));
    }
    if req.tokens.len() > MAX_LEAK_REPORT {
        return Err(Error::invalid(
            "tokens",
            format!("at most {MAX_LEAK_REPORT} per call"),
        ));
    }
    let source = free_text("source", &req.source)?;
    Ok((req.tokens, source))
}

/// The permissions Introspect should check and the end user's IP, if reported. The token
/// string itself is never rejected here: whatever it is, the answer is a verdict.
pub fn introspect_request(
    req: &pb::IntrospectRequest,
) -> Result<(PermissionSet, Option<std::net::IpAddr>)> {
    let client_ip = match req.client_ip.as_str() {
        "" => None,
        ip => Some(
            ip.parse::<std::net::IpAddr>()
                .map_err(|_| Error::invalid("client_ip", "must be an IPv4 or IPv6 address"))?,
        ),
    };
    Ok((
        permissions("required_permissions", &req.required_permissions)?,
        client_ip,
    ))
}

pub fn token_info(token: &Token, now: Timestamp) -> pb::TokenInfo {
    let status = match token.status(now) {
        TokenStatus::Active => pb::TokenStatus::Active,
        TokenStatus::Expired => pb::TokenStatus::Expired,
        TokenStatus::Revoked => pb::TokenStatus::Revoked,
    };
    pb::TokenInfo {
        id: token.id().to_owned(),
        display_id: token.display_id.clone(),
        tenant_id: token.tenant_id.to_string(),
        kind: kind_to_pb(token.kind).into(),
        name: token.name.to_string(),
        owner_user_id: token
            .owner_user_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        created_by: token.created_by.clone(),
        role: token
            .role
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        scopes: token
            .scopes
            .iter()
            .flatten()
            .map(ToString::to_string)
            .collect(),
        created_at: Some(timestamp(token.created_at)),
        last_used_at: token.last_used_at.map(timestamp),
        expires_at: token.expires_at.map(timestamp),
        status: status.into(),
        revoked_at: token.revocation.as_ref().map(|r| timestamp(r.at)),
        revoked_by: token
            .revocation
            .as_ref()
            .map(|r| r.by.clone())
            .unwrap_or_default(),
        revoke_reason: token
            .revocation
            .as_ref()
            .map(|r| r.reason.clone())
            .unwrap_or_default(),
        // ListTokens fills these in; other answers name one token the caller just acted on.
        recent_uses: Vec::new(),
    }
}

pub fn token_use(u: &TokenUse) -> pb::TokenUse {
    pb::TokenUse {
        client_ip: u.client_ip.map_or_else(String::new, |ip| ip.to_string()),
        service: u.service.clone(),
        service_name: u.service_name.clone(),
        last_used_at: Some(timestamp(u.at)),
    }
}

fn reason_to_pb(reason: InactiveReason) -> pb::InactiveReason {
    match reason {
        InactiveReason::Malformed => pb::InactiveReason::Malformed,
        InactiveReason::Unknown => pb::InactiveReason::Unknown,
        InactiveReason::Expired => pb::InactiveReason::Expired,
        InactiveReason::Revoked => pb::InactiveReason::Revoked,
        InactiveReason::OwnerSuspended => pb::InactiveReason::OwnerSuspended,
        InactiveReason::OwnerRemoved => pb::InactiveReason::OwnerRemoved,
        InactiveReason::NotAMember => pb::InactiveReason::NotAMember,
        InactiveReason::TenantSuspended => pb::InactiveReason::TenantSuspended,
        InactiveReason::RoleDeleted => pb::InactiveReason::RoleDeleted,
    }
}

pub fn introspect_response(answer: IntrospectAnswer) -> pb::IntrospectResponse {
    match answer.outcome {
        Outcome::Active(active) => {
            let token = &active.token;
            // `as_str().to_owned()` rather than `to_string()`, which formats through
            // `Display`: this runs on every live answer.
            pb::IntrospectResponse {
                active: true,
                allowed: answer.allowed,
                token_id: token.id().to_owned(),
                display_id: token.display_id.clone(),
                kind: kind_to_pb(token.kind).into(),
                tenant_id: token.tenant_id.as_str().to_owned(),
                subject: token.subject(),
                name: token.name.as_str().to_owned(),
                permissions: active
                    .grant
                    .permissions
                    .iter()
                    .map(|name| name.as_str().to_owned())
                    .collect(),
                groups: active
                    .grant
                    .groups
                    .iter()
                    .map(|name| name.as_str().to_owned())
                    .collect(),
                scopes: token
                    .scopes
                    .iter()
                    .flatten()
                    .map(|name| name.as_str().to_owned())
                    .collect(),
                issued_at: Some(timestamp(token.created_at)),
                // A token in a rotation's grace period ends with it: a caller caching this
                // answer until expires_at must not outlive the grace.
                expires_at: token.ends_at().map(timestamp),
                reason: pb::InactiveReason::Unspecified.into(),
            }
        }
        // RFC 7662 §2.2: an inactive answer carries nothing else.
        Outcome::Inactive(_) => pb::IntrospectResponse {
            reason: answer
                .reason
                .map_or(pb::InactiveReason::Unspecified, reason_to_pb)
                .into(),
            ..Default::default()
        },
    }
}

// ---- directory ----

pub fn tenant_request(
    req: pb::PutTenantRequest,
) -> Result<(TenantId, String, TenantStatus, TokenPolicy)> {
    let tenant = req
        .tenant
        .ok_or_else(|| Error::invalid("tenant", "is required"))?;
    let id = if tenant.id.is_empty() {
        return Err(Error::invalid("tenant.id", "is required"));
    } else {
        TenantId::parse("tenant.id", &tenant.id)?
    };
    let name = free_text("tenant.name", &tenant.name)?;
    let status = match pb::TenantStatus::try_from(tenant.status) {
        Ok(pb::TenantStatus::Unspecified | pb::TenantStatus::Active) => TenantStatus::Active,
        Ok(pb::TenantStatus::Suspended) => TenantStatus::Suspended,
        Err(_) => {
            return Err(Error::invalid(
                "tenant.status",
                "must be TENANT_STATUS_ACTIVE or TENANT_STATUS_SUSPENDED",
            ));
        }
    };
    let policy = match tenant.policy {
        None => TokenPolicy::default(),
        Some(p) => TokenPolicy {
            require_expiry: p.require_expiry,
            max_lifetime: match p.max_lifetime {
                None => None,
                Some(d) => {
                    let d = from_duration("tenant.policy.max_lifetime", &d)?;
                    if d < chrono::TimeDelta::seconds(1) {
                        return Err(Error::invalid(
                            "tenant.policy.max_lifetime",
                            "must be at least one second",
                        ));
                    }
                    Some(d)
                }
            },
            max_rotation_grace: match p.max_rotation_grace {
                None => None,
                Some(d) => {
                    let field = "tenant.policy.max_rotation_grace";
                    let d = from_duration(field, &d)?;
                    if d < chrono::TimeDelta::zero() || d > rules::MAX_ROTATION_GRACE {
                        return Err(Error::invalid(
                            field,
                            format!(
                                "must be between 0 and {} days",
                                rules::MAX_ROTATION_GRACE.num_days()
                            ),
                        ));
                    }
                    // Stored in seconds: half a second would silently become "at once".
                    if d.subsec_nanos() != 0 {
                        return Err(Error::invalid(field, "must be whole seconds"));
                    }
                    Some(d)
                }
            },
        },
    };
    Ok((id, name, status, policy))
}

pub fn tenant(t: &Tenant) -> pb::Tenant {
    pb::Tenant {
        id: t.id.to_string(),
        name: t.name.clone(),
        status: match t.status {
            TenantStatus::Active => pb::TenantStatus::Active,
            TenantStatus::Suspended => pb::TenantStatus::Suspended,
        }
        .into(),
        policy: Some(pb::TokenPolicy {
            require_expiry: t.policy.require_expiry,
            max_lifetime: t.policy.max_lifetime.map(duration),
            max_rotation_grace: t.policy.max_rotation_grace.map(duration),
        }),
        created_at: Some(timestamp(t.created_at)),
        updated_at: Some(timestamp(t.updated_at)),
    }
}

pub fn tenant_id(value: &str) -> Result<TenantId> {
    tenant_req(value)
}

pub fn role_name(field: &str, value: &str) -> Result<RoleName> {
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    RoleName::parse(field, value)
}

pub fn user_id(field: &str, value: &str) -> Result<UserId> {
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    UserId::parse(field, value)
}

pub fn put_role_request(req: pb::PutRoleRequest) -> Result<PutRole> {
    Ok(PutRole {
        tenant_id: tenant_req(&req.tenant_id)?,
        name: role_name("name", &req.name)?,
        permissions: permissions("permissions", &req.permissions)?,
    })
}

pub fn role(r: &Role) -> pb::Role {
    pb::Role {
        tenant_id: r.tenant_id.to_string(),
        name: r.name.to_string(),
        permissions: r.permissions.iter().map(ToString::to_string).collect(),
        updated_at: Some(timestamp(r.updated_at)),
    }
}

pub fn put_member_request(req: pb::PutMemberRequest) -> Result<PutMember> {
    Ok(PutMember {
        tenant_id: tenant_req(&req.tenant_id)?,
        user_id: user_id("user_id", &req.user_id)?,
        role: role_name("role", &req.role)?,
        groups: groups("groups", &req.groups)?,
    })
}

pub fn put_members_request(req: pb::PutMembersRequest) -> Result<(TenantId, Vec<PutMember>)> {
    let tenant = tenant_req(&req.tenant_id)?;
    if req.members.is_empty() {
        return Err(Error::invalid("members", "must hold at least one entry"));
    }
    let entries = req
        .members
        .into_iter()
        .enumerate()
        .map(|(i, entry)| {
            Ok(PutMember {
                tenant_id: tenant.clone(),
                user_id: user_id(&format!("members[{i}].user_id"), &entry.user_id)?,
                role: role_name(&format!("members[{i}].role"), &entry.role)?,
                groups: groups(&format!("members[{i}].groups"), &entry.groups)?,
            })
        })
        .collect::<Result<_>>()?;
    Ok((tenant, entries))
}

pub fn member(m: &Member) -> pb::Member {
    pb::Member {
        tenant_id: m.tenant_id.to_string(),
        user_id: m.user_id.to_string(),
        role: m.role.to_string(),
        groups: m.groups.iter().map(ToString::to_string).collect(),
        updated_at: Some(timestamp(m.updated_at)),
    }
}

pub fn user_status(value: i32) -> Result<UserStatus> {
    match pb::UserStatus::try_from(value) {
        Ok(pb::UserStatus::Active) => Ok(UserStatus::Active),
        Ok(pb::UserStatus::Suspended) => Ok(UserStatus::Suspended),
        Ok(pb::UserStatus::Removed) => Ok(UserStatus::Removed),
        _ => Err(Error::invalid(
            "status",
            "must be USER_STATUS_ACTIVE, USER_STATUS_SUSPENDED or USER_STATUS_REMOVED",
        )),
    }
}

pub fn user(u: &User) -> pb::User {
    pb::User {
        id: u.id.to_string(),
        status: match u.status {
            UserStatus::Active => pb::UserStatus::Active,
            UserStatus::Suspended => pb::UserStatus::Suspended,
            UserStatus::Removed => pb::UserStatus::Removed,
        }
        .into(),
        updated_at: Some(timestamp(u.updated_at)),
    }
}

// ---- audit ----

pub fn audit_request(format: &TokenFormat, req: pb::ListAuditEventsRequest) -> Result<ListAudit> {
    Ok(ListAudit {
        tenant_id: tenant_opt(&req.tenant_id)?,
        token_id: optional(&req.token_id, |v| token_id(format, v))?,
        page: Page::parse(req.page_size, req.page_token)?,
    })
}

pub fn audit_event(e: &AuditEvent) -> pb::AuditEvent {
    let r = &e.record;
    pb::AuditEvent {
        id: e.id,
        at: Some(timestamp(r.at)),
        tenant_id: r.tenant_id.to_string(),
        actor: r.actor.clone(),
        caller: r.caller.clone(),
        action: r.action.clone(),
        token_id: r.token_id.clone().unwrap_or_default(),
        detail: r.detail.clone().into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A refusal must name a field the request has (its first segment, before `[` or `.`),
    /// and nothing else may go wrong: no panic, no other kind of error.
    fn names_one_of(
        result: Result<impl Sized>,
        fields: &[&str],
    ) -> std::result::Result<(), TestCaseError> {
        match result {
            Ok(_) => Ok(()),
            Err(Error::InvalidArgument { field, rule }) => {
                let head = field.split(['[', '.']).next().unwrap_or_default();
                prop_assert!(
                    fields.contains(&head),
                    "field {field:?} ({rule}) not in {fields:?}"
                );
                prop_assert!(!rule.is_empty());
                Ok(())
            }
            Err(other) => Err(TestCaseError::fail(format!(
                "not INVALID_ARGUMENT: {other}"
            ))),
        }
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "\\PC{0,40}",
            ".{0,300}",
            "[a-z0-9._:@-]{0,140}",
            Just(String::new()),
            Just("\u{202e}evil".to_owned()),
            Just("a\u{0}b".to_owned()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn token_requests_are_converted_or_refused_naming_a_field(
            tenant in text(), actor in text(), name in text(), role in text(),
            scopes in proptest::collection::vec(text(), 0..4),
            kind in -1i32..4, seconds in any::<i64>(), nanos in any::<i32>(),
            page_size in any::<i32>(), page_token in text(), token_id in text(),
        ) {
            let format = TokenFormat::default();
            let ttl = Some(PbDuration { seconds, nanos });
            names_one_of(issue_request(pb::IssueTokenRequest {
                tenant_id: tenant.clone(), actor_user_id: actor.clone(), kind, name: name.clone(),
                scopes: scopes.clone(), role, expires_at: None, ttl,
            }), &["tenant_id", "actor_user_id", "kind", "name", "scopes", "role", "ttl", "expires_at"])?;
            names_one_of(list_request(pb::ListTokensRequest {
                tenant_id: tenant.clone(), actor_user_id: actor.clone(), kind, name_contains: name,
                include_revoked: false, page_size, page_token, owner_user_id: actor.clone(),
            }), &["tenant_id", "actor_user_id", "kind", "name_contains", "page_size", "page_token", "owner_user_id"])?;
            names_one_of(rotate_request(&format, pb::RotateTokenRequest {
                tenant_id: tenant.clone(), actor_user_id: actor.clone(), token_id: token_id.clone(), grace: ttl,
            }), &["tenant_id", "actor_user_id", "token_id", "grace"])?;
            names_one_of(revoke_request(&format, pb::RevokeTokenRequest {
                tenant_id: tenant, actor_user_id: actor, token_id, reason: scopes.join(""),
            }), &["tenant_id", "actor_user_id", "token_id", "reason"])?;
        }

        #[test]
        fn directory_requests_are_converted_or_refused_naming_a_field(
            tenant in text(), name in text(), user in text(), role in text(),
            permissions in proptest::collection::vec(text(), 0..4),
            groups in proptest::collection::vec(text(), 0..4),
            status in -1i32..4, seconds in any::<i64>(), nanos in any::<i32>(),
        ) {
            names_one_of(tenant_request(pb::PutTenantRequest { tenant: Some(pb::Tenant {
                id: tenant.clone(), name: name.clone(), status,
                policy: Some(pb::TokenPolicy {
                    require_expiry: false,
                    max_lifetime: Some(PbDuration { seconds, nanos }),
                    max_rotation_grace: Some(PbDuration { seconds: seconds / 7, nanos }),
                }),
                ..Default::default()
            }) }), &["tenant"])?;
            names_one_of(put_role_request(pb::PutRoleRequest {
                tenant_id: tenant.clone(), name: role.clone(), permissions,
            }), &["tenant_id", "name", "permissions"])?;
            names_one_of(put_member_request(pb::PutMemberRequest {
                tenant_id: tenant, user_id: user, role, groups,
            }), &["tenant_id", "user_id", "role", "groups"])?;
        }
    }

    #[test]
    fn durations_convert_both_ways() {
        let d = from_duration(
            "ttl",
            &PbDuration {
                seconds: 90,
                nanos: 5,
            },
        )
        .unwrap();
        assert_eq!(
            d,
            chrono::TimeDelta::seconds(90) + chrono::TimeDelta::nanoseconds(5)
        );
        assert_eq!(duration(chrono::TimeDelta::seconds(3600)).seconds, 3600);
        assert!(
            from_duration(
                "ttl",
                &PbDuration {
                    seconds: 1,
                    nanos: -1
                }
            )
            .is_err()
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let err = issue_request(pb::IssueTokenRequest {
            kind: pb::TokenKind::Personal.into(),
            name: "ok".into(),
            scopes: vec!["a:read".into(), "bad scope".into()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().starts_with("scopes[1]: "), "{err}");

        let err = issue_request(pb::IssueTokenRequest {
            name: "ok".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().starts_with("kind: "), "{err}");

        let too_many = pb::IssueTokenRequest {
            kind: pb::TokenKind::Personal.into(),
            name: "ok".into(),
            scopes: vec!["a".into(); MAX_LIST + 1],
            ..Default::default()
        };
        assert!(
            issue_request(too_many)
                .unwrap_err()
                .to_string()
                .starts_with("scopes: at most")
        );
    }
}
