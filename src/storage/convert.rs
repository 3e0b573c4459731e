//! Rows ⇄ domain records. Rows were validated on the way in, so they are trusted on the way
//! out; a row that does not parse is an internal error, never a silent default.

use std::collections::{BTreeMap, BTreeSet};

use chrono::TimeZone as _;
use sea_orm::{ActiveValue::NotSet, Set};

use super::entities::{audit_events, memberships, roles, tenants, token_uses, tokens, users};
use crate::domain::model::{
    AuditEvent, AuditRecord, Member, PermissionSet, Revocation, Role, SecretHash, Tenant,
    TenantStatus, Timestamp, Token, TokenPolicy, TokenUse, User, UserStatus,
};
use crate::domain::names::{Group, Permission, RoleName, TenantId, TokenName, UserId};
use crate::domain::token_format::TokenKind;
use crate::domain::{Error, Result};

pub(super) fn micros(at: Timestamp) -> i64 {
    at.timestamp_micros()
}

pub(super) fn time(micros: i64) -> Result<Timestamp> {
    chrono::Utc
        .timestamp_micros(micros)
        .single()
        .ok_or_else(|| Error::internal(format!("stored timestamp {micros} is out of range")))
}

fn opt_time(micros: Option<i64>) -> Result<Option<Timestamp>> {
    micros.map(time).transpose()
}

pub(super) fn json_list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let items: Vec<&str> = items.into_iter().collect();
    serde_json::to_string(&items).unwrap_or_else(|_| "[]".to_owned())
}

fn parse_list(column: &str, json: &str) -> Result<Vec<String>> {
    serde_json::from_str(json)
        .map_err(|e| Error::internal(format!("stored {column} is not a JSON list: {e}")))
}

pub(super) fn permissions(column: &str, json: &str) -> Result<PermissionSet> {
    Ok(parse_list(column, json)?
        .into_iter()
        .map(Permission::from_trusted)
        .collect())
}

pub(super) fn groups(json: &str) -> Result<BTreeSet<Group>> {
    Ok(parse_list("groups", json)?
        .into_iter()
        .map(Group::from_trusted)
        .collect())
}

pub(super) fn tenant_status_str(status: TenantStatus) -> &'static str {
    match status {
        TenantStatus::Active => "active",
        TenantStatus::Suspended => "suspended",
    }
}

pub(super) fn tenant_status(s: &str) -> Result<TenantStatus> {
    match s {
        "active" => Ok(TenantStatus::Active),
        "suspended" => Ok(TenantStatus::Suspended),
        other => Err(Error::internal(format!("unknown tenant status {other:?}"))),
    }
}

pub(super) fn user_status_str(status: UserStatus) -> &'static str {
    match status {
        UserStatus::Active => "active",
        UserStatus::Suspended => "suspended",
        UserStatus::Removed => "removed",
    }
}

pub(super) fn user_status(s: &str) -> Result<UserStatus> {
    match s {
        "active" => Ok(UserStatus::Active),
        "suspended" => Ok(UserStatus::Suspended),
        "removed" => Ok(UserStatus::Removed),
        other => Err(Error::internal(format!("unknown user status {other:?}"))),
    }
}

pub(super) fn kind(s: &str) -> Result<TokenKind> {
    TokenKind::from_marker(s).ok_or_else(|| Error::internal(format!("unknown token kind {s:?}")))
}

pub(super) fn tenant_row(t: &Tenant) -> tenants::ActiveModel {
    tenants::ActiveModel {
        id: Set(t.id.to_string()),
        name: Set(t.name.clone()),
        status: Set(tenant_status_str(t.status).to_owned()),
        require_expiry: Set(t.policy.require_expiry),
        max_lifetime_secs: Set(t.policy.max_lifetime.map(|d| d.num_seconds())),
        max_rotation_grace_secs: Set(t.policy.max_rotation_grace.map(|d| d.num_seconds())),
        created_at: Set(micros(t.created_at)),
        updated_at: Set(micros(t.updated_at)),
    }
}

pub(super) fn tenant(m: tenants::Model) -> Result<Tenant> {
    Ok(Tenant {
        id: TenantId::from_trusted(m.id),
        name: m.name,
        status: tenant_status(&m.status)?,
        policy: TokenPolicy {
            require_expiry: m.require_expiry,
            max_lifetime: m.max_lifetime_secs.map(chrono::TimeDelta::seconds),
            max_rotation_grace: m.max_rotation_grace_secs.map(chrono::TimeDelta::seconds),
        },
        created_at: time(m.created_at)?,
        updated_at: time(m.updated_at)?,
    })
}

pub(super) fn user_row(u: &User) -> users::ActiveModel {
    users::ActiveModel {
        id: Set(u.id.to_string()),
        status: Set(user_status_str(u.status).to_owned()),
        updated_at: Set(micros(u.updated_at)),
    }
}

pub(super) fn user(m: users::Model) -> Result<User> {
    Ok(User {
        id: UserId::from_trusted(m.id),
        status: user_status(&m.status)?,
        updated_at: time(m.updated_at)?,
    })
}

pub(super) fn role_row(r: &Role) -> roles::ActiveModel {
    roles::ActiveModel {
        tenant_id: Set(r.tenant_id.to_string()),
        name: Set(r.name.to_string()),
        permissions: Set(json_list(r.permissions.iter().map(|p| p.as_str()))),
        updated_at: Set(micros(r.updated_at)),
    }
}

pub(super) fn role(m: roles::Model) -> Result<Role> {
    Ok(Role {
        tenant_id: TenantId::from_trusted(m.tenant_id),
        name: RoleName::from_trusted(m.name),
        permissions: permissions("permissions", &m.permissions)?,
        updated_at: time(m.updated_at)?,
    })
}

pub(super) fn member_row(m: &Member) -> memberships::ActiveModel {
    memberships::ActiveModel {
        tenant_id: Set(m.tenant_id.to_string()),
        user_id: Set(m.user_id.to_string()),
        role_name: Set(m.role.to_string()),
        groups: Set(json_list(m.groups.iter().map(|g| g.as_str()))),
        updated_at: Set(micros(m.updated_at)),
    }
}

pub(super) fn member(m: memberships::Model) -> Result<Member> {
    Ok(Member {
        tenant_id: TenantId::from_trusted(m.tenant_id),
        user_id: UserId::from_trusted(m.user_id),
        role: RoleName::from_trusted(m.role_name),
        groups: groups(&m.groups)?,
        updated_at: time(m.updated_at)?,
    })
}

pub(super) fn token_row(t: &Token) -> tokens::ActiveModel {
    tokens::ActiveModel {
        id: Set(t.id().to_owned()),
        tenant_id: Set(t.tenant_id.to_string()),
        kind: Set(t.kind.marker().to_owned()),
        name: Set(t.name.to_string()),
        name_key: Set(t.name.key()),
        owner_user_id: Set(t.owner_user_id.as_ref().map(ToString::to_string)),
        role_name: Set(t.role.as_ref().map(ToString::to_string)),
        scopes: Set(t
            .scopes
            .as_ref()
            .map(|s| json_list(s.iter().map(|p| p.as_str())))),
        secret_hash: Set(t.secret_hash.0.to_string()),
        created_at: Set(micros(t.created_at)),
        created_by: Set(t.created_by.clone()),
        expires_at: Set(t.expires_at.map(micros)),
        last_used_at: Set(t.last_used_at.map(micros)),
        revoked_at: Set(t.revocation.as_ref().map(|r| micros(r.at))),
        revoked_by: Set(t.revocation.as_ref().map(|r| r.by.clone())),
        revoke_reason: Set(t.revocation.as_ref().map(|r| r.reason.clone())),
        revocation_scheduled: Set(t.revocation.as_ref().is_some_and(|r| r.scheduled)),
    }
}

/// `display` turns a kind and public id into the display id: the prefix is configuration,
/// not data, so it is not stored.
pub(super) fn token(
    m: tokens::Model,
    display: &dyn Fn(TokenKind, &str) -> String,
) -> Result<Token> {
    let kind = kind(&m.kind)?;
    let revocation = match m.revoked_at {
        Some(at) => Some(Box::new(Revocation {
            at: time(at)?,
            by: m.revoked_by.unwrap_or_default(),
            reason: m.revoke_reason.unwrap_or_default(),
            scheduled: m.revocation_scheduled,
        })),
        None => None,
    };
    Ok(Token {
        display_id: display(kind, &m.id),
        tenant_id: TenantId::from_trusted(m.tenant_id),
        kind,
        name: TokenName::from_trusted(m.name),
        owner_user_id: m.owner_user_id.map(UserId::from_trusted),
        role: m.role_name.map(RoleName::from_trusted),
        scopes: m
            .scopes
            .as_deref()
            .map(|s| permissions("scopes", s))
            .transpose()?,
        secret_hash: SecretHash(m.secret_hash.into()),
        created_at: time(m.created_at)?,
        created_by: m.created_by,
        expires_at: opt_time(m.expires_at)?,
        last_used_at: opt_time(m.last_used_at)?,
        revocation,
    })
}

pub(super) fn audit_row(r: &AuditRecord) -> audit_events::ActiveModel {
    audit_events::ActiveModel {
        id: NotSet,
        at: Set(micros(r.at)),
        tenant_id: Set(r.tenant_id.to_string()),
        actor: Set(r.actor.clone()),
        caller: Set(r.caller.clone()),
        action: Set(r.action.clone()),
        token_id: Set(r.token_id.clone()),
        detail: Set(serde_json::to_string(&r.detail).unwrap_or_else(|_| "{}".to_owned())),
    }
}

pub(super) fn audit_event(m: audit_events::Model) -> Result<AuditEvent> {
    let detail: BTreeMap<String, String> = serde_json::from_str(&m.detail)
        .map_err(|e| Error::internal(format!("stored audit detail is not a JSON object: {e}")))?;
    Ok(AuditEvent {
        id: m.id,
        record: AuditRecord {
            at: time(m.at)?,
            tenant_id: TenantId::from_trusted(m.tenant_id),
            actor: m.actor,
            caller: m.caller,
            action: m.action,
            token_id: m.token_id,
            detail,
        },
    })
}

pub(super) fn token_use_row(u: &TokenUse) -> token_uses::ActiveModel {
    token_uses::ActiveModel {
        token_id: Set(u.token_id.clone()),
        client_ip: Set(u.client_ip.map_or_else(String::new, |ip| ip.to_string())),
        service: Set(u.service.clone()),
        service_name: Set(u.service_name.clone()),
        last_at: Set(micros(u.at)),
    }
}

pub(super) fn token_use(m: token_uses::Model) -> Result<TokenUse> {
    let client_ip = match m.client_ip.as_str() {
        "" => None,
        ip => Some(
            ip.parse()
                .map_err(|_| Error::internal(format!("token_uses: bad client_ip {ip:?}")))?,
        ),
    };
    Ok(TokenUse {
        token_id: m.token_id,
        client_ip,
        service: m.service,
        service_name: m.service_name,
        at: time(m.last_at)?,
    })
}
