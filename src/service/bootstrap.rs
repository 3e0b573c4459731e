//! `tokend bootstrap`: the system tenant, its admin role and the root API key.

use std::collections::BTreeMap;

use secrecy::SecretString;

use crate::domain::Result;
use crate::domain::model::{
    AuditRecord, Role, SecretHash, Tenant, TenantStatus, Token, TokenPolicy,
};
use crate::domain::names::{Permission, RoleName, TenantId, TokenName};
use crate::domain::rules;
use crate::domain::token_format::TokenKind;

use super::Tokend;

/// The admin role bootstrap creates in the system tenant.
pub const ADMIN_ROLE: &str = "admin";

/// Creates the system tenant, an `admin` role with every `tokend.*` permission and a root
/// API key bound to it, in one transaction. Returns the root key's secret, shown once.
/// Refuses with AlreadyExists on a bootstrapped database.
pub async fn bootstrap(core: &Tokend) -> Result<SecretString> {
    let now = core.clock.now();
    let tenant = Tenant {
        id: TenantId::system(),
        name: "tokend system".to_owned(),
        status: TenantStatus::Active,
        policy: TokenPolicy::default(),
        created_at: now,
        updated_at: now,
    };
    let role = Role {
        tenant_id: tenant.id.clone(),
        name: RoleName::parse("role", ADMIN_ROLE)?,
        permissions: rules::ALL_BUILTIN
            .iter()
            .map(|p| Permission::parse("permissions", p.as_str()))
            .collect::<Result<_>>()?,
        updated_at: now,
    };
    let generated = core.format.generate(TokenKind::ApiKey);
    let hash = core
        .hasher
        .hash(SecretString::from(generated.secret()))
        .await?;
    let token = Token {
        display_id: generated.display_id.clone(),
        tenant_id: tenant.id.clone(),
        kind: TokenKind::ApiKey,
        name: TokenName::parse("name", "root")?,
        owner_user_id: None,
        role: Some(role.name.clone()),
        scopes: None,
        secret_hash: SecretHash(hash.into()),
        created_at: now,
        created_by: "bootstrap".to_owned(),
        expires_at: None,
        last_used_at: None,
        revocation: None,
    };
    let audit = AuditRecord {
        at: now,
        tenant_id: tenant.id.clone(),
        actor: "bootstrap".to_owned(),
        caller: "bootstrap".to_owned(),
        action: "tokend.bootstrapped".to_owned(),
        token_id: Some(token.id().to_owned()),
        detail: BTreeMap::from([("root_key".to_owned(), token.display_id.clone())]),
    };
    core.store.bootstrap(&tenant, &role, &token, &audit).await?;
    Ok(SecretString::from(generated.full))
}
