//! Who is calling (the credential) and on whose behalf (the actor).

use std::sync::Arc;

use crate::domain::model::{PermissionSet, Tenant, TenantStatus, UserStatus};
use crate::domain::names::{BuiltinPermission, TenantId, UserId};
use crate::domain::rules::{self, Visibility};
use crate::domain::token_format::TokenKind;
use crate::domain::{Error, Result};
use crate::introspect::{ActiveToken, CredentialMemo, Outcome, Presented};

use super::Tokend;

/// Whom a credential speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// A user, through one of their personal tokens.
    User(UserId),
    /// An API key, speaking for itself; holds its display id.
    ApiKey(String),
}

impl Subject {
    /// How the audit log names it.
    pub fn label(&self) -> String {
        match self {
            Subject::User(user) => user.to_string(),
            Subject::ApiKey(display_id) => display_id.clone(),
        }
    }
}

/// PERMISSION_DENIED naming who lacks what, unless `held` has `permission`.
fn require(
    held: &PermissionSet,
    permission: BuiltinPermission,
    who: impl FnOnce() -> String,
) -> Result<()> {
    if rules::holds(held, permission) {
        Ok(())
    } else {
        Err(Error::PermissionDenied(format!(
            "{} lacks {permission}",
            who()
        )))
    }
}

/// The authenticated credential of a request, with its rights right now.
///
/// A handle on the verdict the credential's own introspection produced (usually the
/// remembered one), so authenticating a warm credential copies nothing.
#[derive(Clone, Debug)]
pub struct Caller {
    active: Arc<ActiveToken>,
    /// The chain the connection presented over mutual TLS, leaf first. Read only when an
    /// audit record is written, so an authenticated call parses no certificate.
    client_certificates: Option<ClientCertificates>,
}

/// What a client certificate says about its holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The subject, attributes in certificate order, special characters escaped as RFC 4514
    /// does (`CN=a\, O=b` cannot pass for two attributes).
    pub subject: String,
    /// The first URI subject alternative name.
    pub uri: Option<String>,
}

/// The longest identity string kept; a certificate is the caller's to fill.
const MAX_IDENTITY_CHARS: usize = 256;

fn cap(mut text: String) -> String {
    if let Some((cut, _)) = text.char_indices().nth(MAX_IDENTITY_CHARS) {
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// An attribute value escaped as RFC 4514 asks, control characters as `\XX`.
fn escape_dn_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            c if c.is_control() => out.push_str(&format!("\\{:02X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

fn escape_controls(value: &str) -> String {
    value
        .chars()
        .map(|c| {
            if c.is_control() {
                format!("\\{:02X}", u32::from(c))
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A client's certificate chain (DER), as the TLS layer hands it over.
pub type ClientCertificates = Arc<Vec<rustls_pki_types::CertificateDer<'static>>>;

impl Caller {
    /// Attaches the certificate chain the caller's connection presented.
    pub fn set_client_certificates(&mut self, certificates: ClientCertificates) {
        self.client_certificates = Some(certificates);
    }

    /// Who the caller's client certificate names, for the audit log: its subject and its
    /// first URI name (a SPIFFE id, say). Read from the chain the TLS layer verified.
    pub fn client_certificate_identity(&self) -> Option<ClientIdentity> {
        let leaf = self.client_certificates.as_ref()?.first()?;
        let (_, certificate) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
        let registry = x509_parser::objects::oid_registry();
        let subject = certificate
            .subject()
            .iter()
            .flat_map(|rdn| rdn.iter())
            .map(|attribute| {
                let key = x509_parser::objects::oid2abbrev(attribute.attr_type(), registry)
                    .map_or_else(|_| attribute.attr_type().to_id_string(), str::to_owned);
                let value = attribute
                    .as_str()
                    .map_or_else(|_| "#<not a string>".to_owned(), escape_dn_value);
                format!("{key}={value}")
            })
            .collect::<Vec<_>>()
            .join(", ");
        let uri = certificate
            .subject_alternative_name()
            .ok()
            .flatten()
            .and_then(|names| {
                names
                    .value
                    .general_names
                    .iter()
                    .find_map(|name| match name {
                        x509_parser::extensions::GeneralName::URI(uri) => {
                            Some(escape_controls(uri))
                        }
                        _ => None,
                    })
            });
        Some(ClientIdentity {
            subject: cap(subject),
            uri: uri.map(cap),
        })
    }

    /// The credential's token id.
    pub fn token_id(&self) -> &str {
        self.active.token.id()
    }

    /// The credential's display id, for logs and audit.
    pub fn display_id(&self) -> &str {
        &self.active.token.display_id
    }

    /// The tenant the credential is bound to.
    pub fn tenant_id(&self) -> &TenantId {
        &self.active.token.tenant_id
    }

    /// Whom it speaks for.
    pub fn subject(&self) -> Subject {
        let token = &self.active.token;
        match (&token.kind, &token.owner_user_id) {
            (TokenKind::Personal, Some(owner)) => Subject::User(owner.clone()),
            _ => Subject::ApiKey(token.display_id.clone()),
        }
    }

    /// Its effective permissions.
    pub fn permissions(&self) -> &PermissionSet {
        &self.active.grant.permissions
    }

    /// Its name.
    pub fn name(&self) -> &str {
        self.active.token.name.as_str()
    }

    /// Whether the credential is narrowed by scopes.
    pub fn scoped(&self) -> bool {
        self.active.token.scopes.is_some()
    }

    /// Whether the credential holds `permission`.
    pub fn has(&self, permission: BuiltinPermission) -> bool {
        self.active.grant.builtins.has(permission)
    }

    /// Refuses unless the credential holds `permission`.
    pub fn require(&self, permission: BuiltinPermission) -> Result<()> {
        if self.has(permission) {
            return Ok(());
        }
        Err(Error::PermissionDenied(format!(
            "the credential {} lacks {permission}",
            self.display_id()
        )))
    }

    /// Whether the credential belongs to tokend's own tenant.
    pub fn is_system(&self) -> bool {
        self.tenant_id().is_system()
    }
}

/// On whose behalf a token request acts, in which tenant, with which rights.
#[derive(Clone, Debug)]
pub struct Actor {
    /// The tenant acted in.
    pub tenant_id: TenantId,
    /// Whom the request acts for.
    pub subject: Subject,
    /// What the actor may do there. For a credential acting as itself: its effective
    /// permissions; under `act_as`: the user's role there.
    pub permissions: PermissionSet,
    /// The rights are bounded by a narrowed credential.
    pub scoped: bool,
    /// The credential acts as itself (not through `act_as`): its token id.
    pub itself: Option<String>,
    /// The tenant as read while resolving `act_as` (active then); `None` when the
    /// credential acts as itself and nothing was read.
    pub tenant: Option<Tenant>,
}

impl Actor {
    /// Whether the actor holds `permission`.
    pub fn has(&self, permission: BuiltinPermission) -> bool {
        rules::holds(&self.permissions, permission)
    }

    /// Refuses unless the actor holds `permission`.
    pub fn require(&self, permission: BuiltinPermission) -> Result<()> {
        require(&self.permissions, permission, || {
            format!("{} in tenant {}", self.subject.label(), self.tenant_id)
        })
    }

    /// The user acted for, if any.
    pub fn user(&self) -> Option<&UserId> {
        match &self.subject {
            Subject::User(user) => Some(user),
            Subject::ApiKey(_) => None,
        }
    }

    /// Which tokens of the tenant the actor may see and touch.
    pub fn visibility(&self) -> Visibility {
        Visibility {
            all: self.has(rules::TOKENS_ADMIN),
            api_keys: self.has(rules::API_KEYS_MANAGE),
            owner: self.user().cloned(),
            itself: self.itself.clone(),
        }
    }
}

/// The token of an `authorization` value, as bytes: checked as text only if the
/// connection's memo does not hold it already (see `introspect::Presented`).
fn bearer(authorization: Option<&[u8]>) -> Result<&[u8]> {
    let Some(header) = authorization else {
        return Err(Error::Unauthenticated(
            "missing credential: send metadata `authorization: Bearer <token>`".to_owned(),
        ));
    };
    Ok(header
        .strip_prefix(b"Bearer ")
        .or_else(|| header.strip_prefix(b"bearer "))
        .ok_or_else(|| {
            Error::Unauthenticated("authorization metadata must be `Bearer <token>`".to_owned())
        })?
        .trim_ascii())
}

impl Tokend {
    /// Checks the `authorization` metadata value and returns the live caller, noting that
    /// the credential was used from `peer`. `memo` is the credential last checked on the
    /// same connection, if the transport keeps one.
    pub async fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        peer: Option<std::net::IpAddr>,
        memo: Option<&CredentialMemo>,
    ) -> Result<Caller> {
        let token = bearer(authorization)?;
        let now = self.introspector.now();
        let outcome = self
            .introspector
            .introspect_remembering(Presented::Header(token), memo, now)
            .await?;
        self.caller_of(outcome, peer, memo, now)
    }

    /// [`authenticate`](Self::authenticate) if it needs no wait: the header is refused, or
    /// the credential's verdict is remembered. `None` if it has to be decided.
    pub fn authenticate_at_once(
        &self,
        authorization: Option<&[u8]>,
        peer: Option<std::net::IpAddr>,
        memo: Option<&CredentialMemo>,
    ) -> Option<Result<Caller>> {
        let token = match bearer(authorization) {
            Ok(token) => token,
            Err(err) => return Some(Err(err)),
        };
        let mut now = self.introspector.call_time();
        let outcome = self
            .introspector
            .recall_at_once(Presented::Header(token), memo, &mut now)?;
        Some(self.caller_of(outcome, peer, memo, now.get()))
    }

    fn caller_of(
        &self,
        outcome: Outcome,
        peer: Option<std::net::IpAddr>,
        memo: Option<&CredentialMemo>,
        now: crate::domain::model::Timestamp,
    ) -> Result<Caller> {
        match outcome {
            Outcome::Active(active) => {
                self.introspector
                    .note_credential_use(&active, peer, memo, now);
                Ok(Caller {
                    active,
                    client_certificates: None,
                })
            }
            Outcome::Inactive(reason) => {
                tracing::info!(reason = reason.as_str(), "refused an inactive credential");
                Err(Error::Unauthenticated(
                    "the credential is not an active token".to_owned(),
                ))
            }
        }
    }

    /// Resolves on whose behalf a token request acts.
    ///
    /// Without `actor_user_id` (or naming the caller's own user) the credential acts as itself
    /// in its own tenant. Naming anyone else needs `tokend.act_as` in the system tenant, and
    /// then the named user's own role in the named tenant is what counts.
    pub async fn actor(
        &self,
        caller: &Caller,
        tenant_id: Option<TenantId>,
        actor_user_id: Option<UserId>,
    ) -> Result<Actor> {
        let subject = caller.subject();
        let names_itself = match (&actor_user_id, &subject) {
            (None, _) => true,
            (Some(named), Subject::User(own)) => named == own,
            (Some(_), Subject::ApiKey(_)) => false,
        };
        let same_tenant = tenant_id.as_ref().is_none_or(|t| t == caller.tenant_id());
        let may_act_as = caller.is_system() && caller.has(rules::ACT_AS);
        let acting_as_self = names_itself && (same_tenant || !may_act_as);
        if acting_as_self {
            if let Some(tenant) = &tenant_id
                && tenant != caller.tenant_id()
            {
                return Err(Error::PermissionDenied(format!(
                    "tenant_id: the credential is bound to tenant {}; it cannot act in {tenant}",
                    caller.tenant_id()
                )));
            }
            return Ok(Actor {
                tenant_id: caller.tenant_id().clone(),
                subject,
                permissions: caller.permissions().clone(),
                scoped: caller.scoped(),
                itself: Some(caller.token_id().to_owned()),
                tenant: None,
            });
        }

        let Some(user) = actor_user_id else {
            return Err(Error::invalid(
                "actor_user_id",
                "is required to act in another tenant than the credential's",
            ));
        };
        if !may_act_as {
            return Err(Error::PermissionDenied(format!(
                "actor_user_id: acting as another user needs {} in the system tenant",
                rules::ACT_AS
            )));
        }
        let Some(tenant_id) = tenant_id else {
            return Err(Error::invalid(
                "tenant_id",
                "is required when acting as a user",
            ));
        };
        // Acting as a system-tenant user would hand an act_as-only credential that user's
        // administration of tokend itself: broader than the credential.
        if tenant_id.is_system() {
            return Err(Error::PermissionDenied(
                "tenant_id: act_as cannot act in the system tenant".to_owned(),
            ));
        }
        let Some(standing) = self.store.user_in_tenant(&tenant_id, &user).await? else {
            return Err(Error::NotFound(format!("tenant {tenant_id}")));
        };
        if standing.tenant.status != TenantStatus::Active {
            return Err(Error::FailedPrecondition(format!(
                "tenant_id: tenant {tenant_id} is suspended"
            )));
        }
        if standing.user_status != Some(UserStatus::Active) {
            return Err(Error::FailedPrecondition(format!(
                "actor_user_id: user {user} is not active"
            )));
        }
        if standing.role.is_none() {
            return Err(Error::FailedPrecondition(format!(
                "actor_user_id: user {user} is not a member of tenant {tenant_id}"
            )));
        }
        let permissions = standing.role_permissions.unwrap_or_default();
        Ok(Actor {
            tenant_id,
            subject: Subject::User(user),
            permissions,
            scoped: false,
            itself: None,
            tenant: Some(standing.tenant),
        })
    }
}

#[cfg(test)]
mod identity_tests {
    use super::*;

    #[test]
    fn a_subject_value_cannot_pass_for_more_attributes_or_lines() {
        assert_eq!(escape_dn_value("svc-a, O=Acme"), "svc-a\\, O\\=Acme");
        assert_eq!(escape_dn_value("a+b\"c;d<e>"), "a\\+b\\\"c\\;d\\<e\\>");
        assert_eq!(escape_dn_value("#x"), "\\#x");
        assert_eq!(escape_dn_value(" pad "), "\\ pad\\ ");
        assert_eq!(escape_dn_value("line\nbreak"), "line\\0Abreak");
        assert_eq!(
            escape_controls("spiffe://x/\u{1b}[31m"),
            "spiffe://x/\\1B[31m"
        );
        let long = cap("x".repeat(1000));
        assert_eq!(long.chars().count(), MAX_IDENTITY_CHARS + 1);
        assert!(long.ends_with('…'));
    }
}
