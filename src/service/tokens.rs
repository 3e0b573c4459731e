//! Issue, list, revoke, delete and introspect tokens.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use secrecy::SecretString;

use crate::domain::model::{
    InactiveReason, PermissionSet, Revocation, SecretHash, Tenant, TenantStatus, Token,
    TokenStatus, TokenUse,
};
use crate::domain::names::{Permission, RoleName, TenantId, TokenName, UserId};
use crate::domain::ports::TokenQuery;
use crate::domain::rules::{self, ExpiryRequest, Visibility};
use crate::domain::token_format::TokenKind;
use crate::domain::{Error, Result};
use crate::introspect::last_used::{ANOTHER_TENANT, Service};
use crate::introspect::{Outcome, Presented};

use super::Tokend;
use super::caller::{Actor, Caller, Subject};
use super::paging::{self, Page};

/// A validated IssueToken request.
#[derive(Clone, Debug)]
pub struct IssueToken {
    /// The tenant; `None` = the credential's own.
    pub tenant_id: Option<TenantId>,
    /// The user to act as; `None` = the credential itself.
    pub actor_user_id: Option<UserId>,
    /// Personal token or API key.
    pub kind: TokenKind,
    /// The token's name.
    pub name: TokenName,
    /// Scopes; empty = not narrowed.
    pub scopes: PermissionSet,
    /// The role of an API key.
    pub role: Option<RoleName>,
    /// When it should expire.
    pub expiry: ExpiryRequest,
}

/// A freshly issued token.
#[derive(Debug)]
pub struct Issued {
    /// The full token string, shown once.
    pub secret: SecretString,
    /// Its record.
    pub token: Token,
}

/// A validated ListTokens request.
#[derive(Clone, Debug)]
pub struct ListTokens {
    /// The tenant; `None` = the credential's own.
    pub tenant_id: Option<TenantId>,
    /// The user to act as.
    pub actor_user_id: Option<UserId>,
    /// Only this kind.
    pub kind: Option<TokenKind>,
    /// Only names containing this (any case).
    pub name_contains: Option<String>,
    /// Revoked tokens too.
    pub include_revoked: bool,
    /// Only this owner's tokens.
    pub owner_user_id: Option<UserId>,
    /// Which page.
    pub page: Page,
}

/// A page of ListTokens.
#[derive(Clone, Debug)]
pub struct TokenPage {
    /// Newest first.
    pub tokens: Vec<Token>,
    /// Where they were used from, newest first.
    pub uses: Vec<TokenUse>,
    /// The next page's token; empty on the last page.
    pub next: String,
}

/// A validated bulk revocation (RevokeTokens).
#[derive(Clone, Debug)]
pub struct RevokeMany {
    /// The tenant; `None` = the credential's own.
    pub tenant_id: Option<TenantId>,
    /// The user to act as.
    pub actor_user_id: Option<UserId>,
    /// Only this owner's tokens.
    pub owner_user_id: Option<UserId>,
    /// Only tokens issued before this.
    pub issued_before: Option<crate::domain::model::Timestamp>,
    /// Why.
    pub reason: String,
}

/// A validated reference to one token (RevokeToken, DeleteToken).
#[derive(Clone, Debug)]
pub struct TokenRef {
    /// The tenant; `None` = the credential's own.
    pub tenant_id: Option<TenantId>,
    /// The user to act as.
    pub actor_user_id: Option<UserId>,
    /// The token's public id.
    pub token_id: String,
}

/// A validated RotateToken request.
#[derive(Clone, Debug)]
pub struct RotateToken {
    /// The token to rotate.
    pub target: TokenRef,
    /// How long the old token stays live beside its successor; zero = revoked at once.
    pub grace: chrono::TimeDelta,
}

/// The outcome of a rotation.
#[derive(Debug)]
pub struct Rotated {
    /// The successor, with its secret shown once.
    pub successor: Issued,
    /// The old token's row, its revocation at hand or scheduled.
    pub previous: Token,
}

/// Introspect's answer, before the transport shapes it.
#[derive(Clone, Debug)]
pub struct IntrospectAnswer {
    /// The verdict.
    pub outcome: Outcome,
    /// Whether every required permission is held (false when inactive).
    pub allowed: bool,
    /// The reason, if inactive and the caller may see it.
    pub reason: Option<InactiveReason>,
}

const TOKENS_LIST: &str = "tokens";

/// The revocation reason of a rotated token.
pub const ROTATED: &str = "rotated";

/// The revocation reason of a token reported as leaked.
pub const LEAKED: &str = "leaked";

/// The most token strings one leak report may carry.
pub const MAX_LEAK_REPORT: usize = 1000;

impl Tokend {
    /// Issues a token (SPEC §2).
    pub async fn issue_token(&self, caller: &Caller, req: IssueToken) -> Result<Issued> {
        let actor = self.actor(caller, req.tenant_id, req.actor_user_id).await?;
        let tenant = self.active_tenant(&actor).await?;
        let scopes = (!req.scopes.is_empty()).then_some(req.scopes);
        let (owner, role) = match req.kind {
            TokenKind::Personal => {
                if req.role.is_some() {
                    return Err(Error::invalid(
                        "role",
                        "must be empty for a personal access token",
                    ));
                }
                let Some(owner) = actor.user().cloned() else {
                    return Err(Error::PermissionDenied(
                        "kind: an API key cannot own a personal access token; name actor_user_id with tokend.act_as".to_owned(),
                    ));
                };
                if actor.itself.is_some() {
                    actor.require(rules::TOKENS_ISSUE)?;
                }
                check_not_broader(&actor, scopes.as_ref(), &actor.permissions)?;
                (Some(owner), None)
            }
            TokenKind::ApiKey => {
                let Some(role_name) = req.role else {
                    return Err(Error::invalid("role", "is required for an API key"));
                };
                actor.require(rules::API_KEYS_MANAGE)?;
                let role = self
                    .store
                    .get_role(&actor.tenant_id, &role_name)
                    .await?
                    .ok_or_else(|| {
                        Error::NotFound(format!("role {role_name} in tenant {}", actor.tenant_id))
                    })?;
                // "Role ≤ creator": a key may carry nothing its creator lacks.
                rules::require_subset(
                    "role",
                    &role.permissions,
                    &actor.permissions,
                    &actor.subject.label(),
                )?;
                if let Some(scopes) = &scopes {
                    rules::require_subset(
                        "scopes",
                        scopes,
                        &role.permissions,
                        &format!("role {role_name}"),
                    )?;
                }
                (None, Some(role_name))
            }
        };
        let now = self.clock.now();
        let expires_at = rules::resolve_expiry(req.expiry, &tenant.policy, &tenant.id, now)?;

        let (secret, token) = self
            .mint(Token {
                display_id: String::new(),
                tenant_id: actor.tenant_id.clone(),
                kind: req.kind,
                name: req.name,
                owner_user_id: owner,
                role,
                scopes,
                secret_hash: SecretHash("".into()),
                created_at: now,
                created_by: actor.subject.label(),
                expires_at,
                last_used_at: None,
                revocation: None,
            })
            .await?;
        let mut audit = self.audit(
            &token.tenant_id,
            actor.subject.label(),
            caller,
            "token.issued",
        );
        audit.token_id = Some(token.id().to_owned());
        audit.detail.extend(token_detail(&token));
        self.store.insert_token(&token, &audit).await?;
        tracing::info!(display_id = %token.display_id, tenant = %token.tenant_id, "issued a token");
        Ok(Issued { secret, token })
    }

    /// The actor's tenant, refusing one that is unknown or suspended: no token is issued
    /// there. Acting as a user has just read it, and found it active.
    async fn active_tenant(&self, actor: &Actor) -> Result<Tenant> {
        if let Some(tenant) = &actor.tenant {
            return Ok(tenant.clone());
        }
        let id = &actor.tenant_id;
        let tenant = self
            .store
            .get_tenant(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("tenant {id}")))?;
        if tenant.status != TenantStatus::Active {
            return Err(Error::FailedPrecondition(format!(
                "tenant_id: tenant {id} is suspended"
            )));
        }
        Ok(tenant)
    }

    /// Gives `draft` (of `draft.kind`) a fresh id and secret; returns the full token string
    /// and the record to store, which holds only the secret's hash.
    async fn mint(&self, draft: Token) -> Result<(SecretString, Token)> {
        let generated = self.format.generate(draft.kind);
        let secret_hash = self
            .hasher
            .hash(SecretString::from(generated.secret()))
            .await?;
        let token = Token {
            display_id: generated.display_id.clone(),
            secret_hash: SecretHash(secret_hash.into()),
            ..draft
        };
        Ok((SecretString::from(generated.full), token))
    }

    /// Rotates a token (SPEC §2): a successor with the same name, kind, owner, role, scopes
    /// and lifetime, and the old token revoked at once or when the grace period ends. The
    /// actor's rights are checked as for issuing the successor now, except that a token
    /// rotating itself gains nothing and needs nothing, as long as it dies at once.
    pub async fn rotate_token(&self, caller: &Caller, req: RotateToken) -> Result<Rotated> {
        let target = req.target;
        let actor = self
            .actor(caller, target.tenant_id, target.actor_user_id)
            .await?;
        let tenant = self.active_tenant(&actor).await?;
        // A rotation mints a credential in the owner's name, so tokend.tokens.admin (list and
        // revoke anyone's) does not reach another user's token: like delete, only the owner,
        // the token itself, and key managers for API keys.
        let visibility = Visibility {
            all: false,
            ..actor.visibility()
        };
        let old = self
            .visible_token(&actor, &visibility, &target.token_id)
            .await?;
        let now = self.clock.now();
        match (old.status(now), &old.revocation) {
            (TokenStatus::Active, None) => {}
            (TokenStatus::Active, Some(scheduled)) => {
                return Err(Error::FailedPrecondition(format!(
                    "token_id: token {} was already rotated and stops working at {}; rotate its successor",
                    old.id(),
                    scheduled.at.to_rfc3339()
                )));
            }
            (status, _) => {
                return Err(Error::FailedPrecondition(format!(
                    "token_id: token {} is {}; issue a new token instead",
                    old.id(),
                    if status == TokenStatus::Expired {
                        "expired"
                    } else {
                        "revoked"
                    }
                )));
            }
        }
        rules::check_rotation_grace(req.grace, &tenant.policy, &tenant.id)?;
        let itself = actor.itself.as_deref() == Some(old.id());
        if itself && req.grace > chrono::TimeDelta::zero() {
            // A stolen token replacing itself must not leave its owner's copy working beside
            // the thief's fresh one: that would hide the theft. With a grace the rotation
            // needs the rights to issue such a token outright.
            self.check_rotation_rights(&actor, &old, false).await?;
        } else {
            self.check_rotation_rights(&actor, &old, itself).await?;
        }
        // Checked against the expiry once more below, after the hash (which may queue).
        rules::rotation_expiry(&old, &tenant.policy, &tenant.id, now)?;
        let (secret, minted) = self.mint(old.clone()).await?;
        let now = self.clock.now();
        let successor = Token {
            created_at: now,
            // A self-rotation names the credential: the successor of a token replaced by a
            // thief holding it must not look like its owner's own doing.
            created_by: if itself {
                caller.display_id().to_owned()
            } else {
                actor.subject.label()
            },
            expires_at: rules::rotation_expiry(&old, &tenant.policy, &tenant.id, now)?,
            last_used_at: None,
            revocation: None,
            ..minted
        };
        let revocation = Revocation {
            at: now + req.grace,
            by: actor.subject.label(),
            reason: ROTATED.to_owned(),
            scheduled: req.grace > chrono::TimeDelta::zero(),
        };
        // The two events name each other, so either end of the chain leads to the other.
        let mut rotated = self.audit(
            &old.tenant_id,
            actor.subject.label(),
            caller,
            "token.rotated",
        );
        rotated.token_id = Some(old.id().to_owned());
        rotated.detail.extend(BTreeMap::from([
            ("name".to_owned(), old.name.to_string()),
            ("successor".to_owned(), successor.id().to_owned()),
            ("grace_secs".to_owned(), req.grace.num_seconds().to_string()),
            ("revoked_at".to_owned(), revocation.at.to_rfc3339()),
        ]));
        let mut issued = self.audit(
            &successor.tenant_id,
            actor.subject.label(),
            caller,
            "token.issued",
        );
        issued.token_id = Some(successor.id().to_owned());
        issued.detail.extend(token_detail(&successor));
        issued
            .detail
            .insert("predecessor".to_owned(), old.id().to_owned());
        let previous = self
            .store
            .rotate_token(
                &old.tenant_id,
                old.id(),
                &revocation,
                &successor,
                &[rotated, issued],
            )
            .await?;
        tracing::info!(
            display_id = %old.display_id,
            successor = %successor.display_id,
            tenant = %old.tenant_id,
            grace_secs = req.grace.num_seconds(),
            "rotated a token"
        );
        Ok(Rotated {
            successor: Issued {
                secret,
                token: successor,
            },
            previous,
        })
    }

    /// Whether the actor may issue `old`'s successor now. Rights are checked afresh, not
    /// inherited from whoever issued `old`: a role may have shrunk since.
    async fn check_rotation_rights(&self, actor: &Actor, old: &Token, itself: bool) -> Result<()> {
        // The successor of the credential itself carries exactly the credential's rights.
        if itself {
            return Ok(());
        }
        match old.kind {
            TokenKind::Personal => {
                if actor.itself.is_some() {
                    actor.require(rules::TOKENS_ISSUE)?;
                }
                check_not_broader(actor, old.scopes.as_ref(), &actor.permissions)
            }
            TokenKind::ApiKey => {
                actor.require(rules::API_KEYS_MANAGE)?;
                let Some(role_name) = &old.role else {
                    return Err(Error::internal(format!("API key {} has no role", old.id())));
                };
                let role = self
                    .store
                    .get_role(&actor.tenant_id, role_name)
                    .await?
                    .ok_or_else(|| {
                        Error::FailedPrecondition(format!(
                            "role: the key's role {role_name} no longer exists; issue a new key"
                        ))
                    })?;
                rules::require_subset(
                    "role",
                    &role.permissions,
                    &actor.permissions,
                    &actor.subject.label(),
                )
            }
        }
    }

    /// Lists the tokens the actor may see, newest first.
    pub async fn list_tokens(&self, caller: &Caller, req: ListTokens) -> Result<TokenPage> {
        let actor = self.actor(caller, req.tenant_id, req.actor_user_id).await?;
        let after = match req.page.cursor(TOKENS_LIST)? {
            Some(cursor) => Some(parse_token_cursor(&cursor)?),
            None => None,
        };
        let query = TokenQuery {
            tenant_id: actor.tenant_id.clone(),
            visibility: actor.visibility(),
            kind: req.kind,
            name_contains: req.name_contains.map(|n| n.to_lowercase()),
            owner: req.owner_user_id,
            revoked_by_then: (!req.include_revoked).then(|| self.clock.now()),
            after,
            limit: req.page.size + 1,
        };
        let (tokens, more) =
            paging::split_page(self.store.list_tokens(&query).await?, req.page.size);
        let next = match (more, tokens.last()) {
            (true, Some(last)) => paging::next_token(
                TOKENS_LIST,
                &format!("{}:{}", last.created_at.timestamp_micros(), last.id()),
            ),
            _ => String::new(),
        };
        let ids: Vec<String> = tokens.iter().map(|t| t.id().to_owned()).collect();
        let uses = self.store.token_uses(&ids).await?;
        Ok(TokenPage { tokens, uses, next })
    }

    /// Finds a token `visibility` lets the actor touch; anything else is NOT_FOUND, exactly as
    /// if it did not exist.
    async fn visible_token(
        &self,
        actor: &Actor,
        visibility: &Visibility,
        token_id: &str,
    ) -> Result<Token> {
        let token = self.store.get_token(&actor.tenant_id, token_id).await?;
        match token {
            Some(token) if visibility.sees(&token) => Ok(token),
            _ => Err(Error::NotFound(format!("token {token_id}"))),
        }
    }

    /// Revokes `token` as `by` for `reason`, appending its `token.revoked` audit event (with
    /// `detail` beside its name and reason) in the same transaction. Returns the revocation
    /// written and the row afterwards (`None` if it is gone); the row keeps an earlier
    /// revocation if one got there first.
    async fn write_revocation(
        &self,
        caller: &Caller,
        token: &Token,
        by: String,
        reason: String,
        detail: &[(&str, &str)],
    ) -> Result<(Revocation, Option<Token>)> {
        let mut audit = self.audit(&token.tenant_id, by.clone(), caller, "token.revoked");
        audit.token_id = Some(token.id().to_owned());
        audit.detail.extend(BTreeMap::from([
            ("name".to_owned(), token.name.to_string()),
            ("reason".to_owned(), reason.clone()),
        ]));
        audit.detail.extend(
            detail
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let revocation = Revocation {
            at: self.clock.now(),
            by,
            reason,
            scheduled: false,
        };
        let after = self
            .store
            .revoke_token(&token.tenant_id, token.id(), &revocation, &audit)
            .await?;
        Ok((revocation, after))
    }

    /// `found`, after a fence if it is NotFound: the token may have been deleted by a call
    /// still waiting on its own fence (or cancelled before it), and a retried delete or
    /// revoke answered "not found" must mean it is gone everywhere.
    async fn fenced(&self, found: Result<Token>) -> Result<Token> {
        if matches!(found, Err(Error::NotFound(_))) {
            self.store.fence().await;
        }
        found
    }

    /// Revokes a token. Idempotent: a revoked token keeps its first revocation.
    pub async fn revoke_token(
        &self,
        caller: &Caller,
        req: TokenRef,
        reason: String,
    ) -> Result<Token> {
        let actor = self.actor(caller, req.tenant_id, req.actor_user_id).await?;
        let token = self
            .fenced(
                self.visible_token(&actor, &actor.visibility(), &req.token_id)
                    .await,
            )
            .await?;
        // A rotated token in its grace period is not revoked yet: this brings it forward.
        if token.revoked(self.clock.now()) {
            // The revocation that got here first may still be waiting for the other
            // replicas (or its caller gave up on it): this answer must not come sooner.
            self.store.fence().await;
            return Ok(token);
        }
        let (_, after) = self
            .write_revocation(caller, &token, actor.subject.label(), reason, &[])
            .await?;
        let revoked = after.ok_or_else(|| Error::NotFound(format!("token {}", req.token_id)))?;
        tracing::info!(display_id = %revoked.display_id, tenant = %revoked.tenant_id, "revoked a token");
        Ok(revoked)
    }

    /// Deletes a token's record, revoking it first if it is live.
    pub async fn delete_token(&self, caller: &Caller, req: TokenRef) -> Result<()> {
        let actor = self.actor(caller, req.tenant_id, req.actor_user_id).await?;
        // Deleting erases the record an investigation needs, so tokend.tokens.admin (list and
        // revoke) does not extend to it: only the owner, the token itself, and key managers
        // for API keys.
        let visibility = Visibility {
            all: false,
            ..actor.visibility()
        };
        let token = self
            .fenced(self.visible_token(&actor, &visibility, &req.token_id).await)
            .await?;
        let mut records = Vec::new();
        let detail = BTreeMap::from([("name".to_owned(), token.name.to_string())]);
        if !token.revoked(self.clock.now()) {
            let mut revoked = self.audit(
                &token.tenant_id,
                actor.subject.label(),
                caller,
                "token.revoked",
            );
            revoked.token_id = Some(token.id().to_owned());
            revoked.detail.extend(detail.clone());
            revoked
                .detail
                .insert("reason".to_owned(), "deleted".to_owned());
            records.push(revoked);
        }
        let mut deleted = self.audit(
            &token.tenant_id,
            actor.subject.label(),
            caller,
            "token.deleted",
        );
        deleted.token_id = Some(token.id().to_owned());
        deleted.detail.extend(detail);
        records.push(deleted);
        if !self
            .store
            .delete_token(&token.tenant_id, token.id(), &records)
            .await?
        {
            return Err(Error::NotFound(format!("token {}", req.token_id)));
        }
        tracing::info!(display_id = %token.display_id, tenant = %token.tenant_id, "deleted a token");
        Ok(())
    }

    /// Revokes every string of `strings` that is a real token, with reason `leaked`, and
    /// records the report in the token's tenant. Any authenticated caller may report: only
    /// someone holding a token's full string can name it here. The result does not depend on
    /// whether any string was a token. (How long the call takes can: a real token costs a
    /// revocation. That tells the reporter only that a token it holds is now dead.)
    ///
    /// One string per public id is considered: a token has one secret, so a second string
    /// for the same id is either a duplicate or a guess, and guesses would each cost an
    /// argon2 verification. A failure (database unreachable) does not stop the rest of the
    /// batch; the first one is returned at the end, and reporting again is safe.
    pub async fn report_leaked(
        &self,
        caller: &Caller,
        strings: &[String],
        source: &str,
    ) -> Result<()> {
        // The credential's display id names the reporter in the token's tenant: unlike a
        // user id it cannot be mistaken for a member of that tenant.
        let reporter = caller.display_id().to_owned();
        let mut tried = std::collections::HashSet::new();
        let mut failure = None;
        for candidate in strings {
            let Some(parsed) = self.format().parse(candidate) else {
                continue;
            };
            if !tried.insert(parsed.public_id) {
                continue;
            }
            if let Err(err) = self
                .revoke_leaked(caller, &reporter, candidate, source)
                .await
            {
                tracing::warn!(error = %err, "could not act on a leak report; the reporter may retry");
                failure.get_or_insert(err);
            }
        }
        failure.map_or(Ok(()), Err)
    }

    async fn revoke_leaked(
        &self,
        caller: &Caller,
        reporter: &str,
        candidate: &str,
        source: &str,
    ) -> Result<()> {
        let Some(token) = self.introspector.held_token(candidate).await? else {
            return Ok(());
        };
        if token.revoked(self.clock.now()) {
            // As for RevokeToken: the earlier revocation may not be enforced everywhere yet.
            self.store.fence().await;
            return Ok(());
        }
        let reporter_tenant = caller.tenant_id().to_string();
        let (revocation, after) = self
            .write_revocation(
                caller,
                &token,
                reporter.to_owned(),
                LEAKED.to_owned(),
                &[("source", source), ("reporter_tenant", &reporter_tenant)],
            )
            .await?;
        // Someone else's revocation in between keeps its own record.
        if after.is_none_or(|t| t.revocation.as_deref() != Some(&revocation)) {
            return Ok(());
        }
        metrics::counter!("tokend_leaked_tokens_revoked_total").increment(1);
        tracing::warn!(display_id = %token.display_id, tenant = %token.tenant_id, reporter, "revoked a token reported as leaked");
        Ok(())
    }

    /// Revokes every live token of a tenant that `req` selects; returns the ids revoked.
    /// Each token gets its own revocation and audit event, through the same store call as
    /// RevokeToken; one fence after the last makes them all enforced on every replica before
    /// the call returns. Tokens issued while this runs are not included (the scan pages by
    /// issue time).
    pub async fn revoke_tokens(&self, caller: &Caller, req: RevokeMany) -> Result<Vec<String>> {
        let actor = self
            .actor(caller, req.tenant_id.clone(), req.actor_user_id.clone())
            .await?;
        actor.require(rules::TOKENS_ADMIN)?;
        let mut revoked = Vec::new();
        let outcome = crate::domain::ports::one_fence_for(
            self.store.as_ref(),
            self.revoke_selected(caller, &actor, &req, &mut revoked),
        )
        .await;
        metrics::counter!("tokend_bulk_revoked_total").increment(revoked.len() as u64);
        match outcome {
            Ok(()) => {
                tracing::warn!(tenant = %actor.tenant_id, count = revoked.len(), "bulk revocation");
                Ok(revoked)
            }
            Err(err) => {
                // What was revoked stays revoked; a retry picks up the rest.
                tracing::warn!(tenant = %actor.tenant_id, count = revoked.len(), error = %err, "bulk revocation stopped partway");
                Err(err)
            }
        }
    }

    async fn revoke_selected(
        &self,
        caller: &Caller,
        actor: &Actor,
        req: &RevokeMany,
        revoked: &mut Vec<String>,
    ) -> Result<()> {
        const PAGE: u64 = 500;
        // The scan is newest first from a (created_at, id) cursor: starting it at the cutoff
        // skips every token issued at or after it without reading them.
        let mut after = req.issued_before.map(|before| (before, String::new()));
        loop {
            let page = self
                .store
                .list_tokens(&TokenQuery {
                    tenant_id: actor.tenant_id.clone(),
                    visibility: actor.visibility(),
                    kind: None,
                    name_contains: None,
                    owner: req.owner_user_id.clone(),
                    revoked_by_then: Some(self.clock.now()),
                    after: after.clone(),
                    limit: PAGE,
                })
                .await?;
            let full = page.len() as u64 == PAGE;
            after = page.last().map(|t| (t.created_at, t.id().to_owned()));
            for token in page {
                if req
                    .issued_before
                    .is_some_and(|before| token.created_at >= before)
                {
                    continue;
                }
                let (revocation, after_write) = self
                    .write_revocation(
                        caller,
                        &token,
                        actor.subject.label(),
                        req.reason.clone(),
                        &[("bulk", "true")],
                    )
                    .await?;
                // Someone else's revocation in between keeps its own record.
                if after_write.is_some_and(|t| t.revocation.as_deref() == Some(&revocation)) {
                    revoked.push(token.id().to_owned());
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// Introspects a token string for a caller holding `tokend.introspect`.
    pub async fn introspect(
        &self,
        caller: &Caller,
        token: &str,
        required: &PermissionSet,
        client_ip: Option<std::net::IpAddr>,
    ) -> Result<IntrospectAnswer> {
        caller.require(rules::INTROSPECT)?;
        // Read here, not when the caller was authenticated: the request's body (the token)
        // may arrive long after its headers, and expiry is judged at the time of the answer.
        let now = self.introspector.now();
        let outcome = self.introspector.introspect(token, now).await?;
        Ok(self.introspect_answer(caller, outcome, required, client_ip, || now))
    }

    /// [`introspect`](Self::introspect) if its answer needs no wait: the string is
    /// malformed, or its verdict is remembered. `None` if it has to be decided.
    pub fn introspect_at_once(
        &self,
        caller: &Caller,
        token: &str,
        required: &PermissionSet,
        client_ip: Option<std::net::IpAddr>,
    ) -> Option<Result<IntrospectAnswer>> {
        if let Err(err) = caller.require(rules::INTROSPECT) {
            return Some(Err(err));
        }
        // As in `introspect`, the time of the answer; not read at all for a malformed string.
        let mut now = self.introspector.call_time();
        let outcome = self
            .introspector
            .recall_at_once(Presented::Text(token), None, &mut now)?;
        Some(Ok(self.introspect_answer(
            caller,
            outcome,
            required,
            client_ip,
            || now.get(),
        )))
    }

    /// The answer to `caller` on a verdict reached at `now`, noting a live token's use.
    fn introspect_answer(
        &self,
        caller: &Caller,
        outcome: Outcome,
        required: &PermissionSet,
        client_ip: Option<std::net::IpAddr>,
        now: impl FnOnce() -> crate::domain::model::Timestamp,
    ) -> IntrospectAnswer {
        let (allowed, reason) = match &outcome {
            Outcome::Active(active) => {
                // The token's tenant sees its own and tokend's services by name; a caller
                // from any other tenant stays anonymous to it.
                let known = caller.is_system() || caller.tenant_id() == &active.token.tenant_id;
                count_verdict(None);
                self.introspector.note_use(
                    active,
                    client_ip,
                    Some(Service {
                        id: caller.token_id(),
                        display_id: if known {
                            caller.display_id()
                        } else {
                            ANOTHER_TENANT
                        },
                        name: if known { caller.name() } else { "" },
                    }),
                    now(),
                );
                (
                    rules::missing(required, &active.grant.permissions).is_empty(),
                    None,
                )
            }
            Outcome::Inactive(reason) => {
                // The reason is for tokend's operators; the caller sees it only if trusted.
                // A counter, not an info line: garbage at gateway rates would flood the log.
                count_verdict(Some(*reason));
                tracing::debug!(reason = reason.as_str(), "introspected an inactive token");
                (
                    false,
                    caller.has(rules::INTROSPECT_REASONS).then_some(*reason),
                )
            }
        };
        IntrospectAnswer {
            outcome,
            allowed,
            reason,
        }
    }
}

/// Counts a verdict (`None`: active) in `tokend_introspect_total`. Each series' handle is
/// looked up once: a labelled `counter!` builds and hashes its key on every call, and
/// Introspect runs at gateway rates, garbage included.
fn count_verdict(reason: Option<InactiveReason>) {
    // One slot for active, one per reason; a reason added later without a slot is counted
    // uncached rather than in another's series.
    static SERIES: [OnceLock<metrics::Counter>; 10] = [const { OnceLock::new() }; 10];
    let (result, label, slot) = match reason {
        None => ("active", "", 0),
        Some(reason) => ("inactive", reason.as_str(), reason as usize + 1),
    };
    let series =
        || metrics::counter!("tokend_introspect_total", "result" => result, "reason" => label);
    match SERIES.get(slot) {
        Some(cell) => cell.get_or_init(series).increment(1),
        None => series().increment(1),
    }
}

/// A credential cannot mint a token broader than itself: explicit scopes must lie within
/// the actor's rights, and a narrowed credential cannot mint an un-narrowed token (which
/// would inherit everything the owner has).
fn check_not_broader(
    actor: &Actor,
    scopes: Option<&PermissionSet>,
    held: &PermissionSet,
) -> Result<()> {
    match scopes {
        Some(scopes) => rules::require_subset("scopes", scopes, held, &whose(actor)),
        None if actor.scoped => Err(Error::PermissionDenied(
            "scopes: a narrowed credential must name scopes within its own".to_owned(),
        )),
        None => Ok(()),
    }
}

fn whose(actor: &Actor) -> String {
    match (&actor.itself, &actor.subject) {
        (Some(_), _) => "the credential".to_owned(),
        (None, Subject::User(user)) => format!("user {user}"),
        (None, Subject::ApiKey(key)) => key.clone(),
    }
}

fn parse_token_cursor(cursor: &str) -> Result<(crate::domain::model::Timestamp, String)> {
    let bad = || {
        Error::invalid(
            "page_token",
            "is not a page token of this list; start again without one",
        )
    };
    let (micros, id) = cursor.split_once(':').ok_or_else(bad)?;
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    let at = chrono::DateTime::from_timestamp_micros(micros).ok_or_else(bad)?;
    Ok((at, id.to_owned()))
}

fn token_detail(token: &Token) -> BTreeMap<String, String> {
    let mut detail = BTreeMap::from([
        ("name".to_owned(), token.name.to_string()),
        ("kind".to_owned(), token.kind.marker().to_owned()),
    ]);
    if let Some(scopes) = &token.scopes {
        let list: Vec<&str> = scopes.iter().map(Permission::as_str).collect();
        detail.insert("scopes".to_owned(), list.join(" "));
    }
    if let Some(role) = &token.role {
        detail.insert("role".to_owned(), role.to_string());
    }
    if let Some(owner) = &token.owner_user_id {
        detail.insert("owner".to_owned(), owner.to_string());
    }
    if let Some(at) = token.expires_at {
        detail.insert("expires_at".to_owned(), at.to_rfc3339());
    }
    detail
}
