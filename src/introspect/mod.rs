//! The Introspect path: parse → checksum → lookup → argon2 → live rules → answer.
//!
//! Caller authentication runs through here too, so every credential is checked exactly as
//! an Introspect of it would be. The order is a security decision: the secret is verified
//! *before* the token's state is evaluated, so nobody learns that a token is revoked,
//! expired or suspended without holding its secret.

use std::sync::Arc;

use secrecy::SecretString;

use crate::domain::Result;
use crate::domain::model::{InactiveReason, LiveGrant, Token};
use crate::domain::ports::{Clock, SecretHasher, Store, Verification};
use crate::domain::rules;
use crate::domain::token_format::TokenFormat;

/// `last_used_at` is kept to the minute: a write at most once a minute per token.
const LAST_USED_RESOLUTION: chrono::TimeDelta = chrono::TimeDelta::minutes(1);

/// A live token and what it may do now.
#[derive(Clone, Debug)]
pub struct ActiveToken {
    /// The token's record.
    pub token: Token,
    /// Its effective permissions and groups.
    pub grant: LiveGrant,
}

/// The verdict on a token string.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Live.
    Active(Box<ActiveToken>),
    /// Not live, and why (for logs, metrics and trusted callers only).
    Inactive(InactiveReason),
}

/// Answers "is this token string live, and with which rights?".
#[derive(Debug, Clone)]
pub struct Introspector {
    store: Arc<dyn Store>,
    hasher: Arc<dyn SecretHasher>,
    clock: Arc<dyn Clock>,
    format: TokenFormat,
}

impl Introspector {
    /// An introspector over these ports.
    pub fn new(
        store: Arc<dyn Store>,
        hasher: Arc<dyn SecretHasher>,
        clock: Arc<dyn Clock>,
        format: TokenFormat,
    ) -> Self {
        Self {
            store,
            hasher,
            clock,
            format,
        }
    }

    /// The verdict on `candidate`. An `Err` means tokend cannot know (database
    /// unreachable): it is never turned into "inactive".
    pub async fn introspect(&self, candidate: &str) -> Result<Outcome> {
        // Malformed strings stop here: no cache, no query, no hash.
        let Some(parsed) = self.format.parse(candidate) else {
            return Ok(Outcome::Inactive(InactiveReason::Malformed));
        };
        // Public ids are not secret, so answering an unknown one without running argon2
        // reveals nothing, and spends no CPU on the attacker's behalf.
        let Some(state) = self.store.token_state(parsed.public_id).await? else {
            return Ok(Outcome::Inactive(InactiveReason::Unknown));
        };
        if state.token.kind != parsed.kind {
            return Ok(Outcome::Inactive(InactiveReason::Unknown));
        }
        let verification = self
            .hasher
            .verify(
                SecretString::from(parsed.secret),
                state.token.secret_hash.0.clone(),
            )
            .await?;
        let Verification::Match { needs_rehash } = verification else {
            return Ok(Outcome::Inactive(InactiveReason::Unknown));
        };
        if needs_rehash {
            self.upgrade_hash(&state.token.id, &state.token.secret_hash.0, parsed.secret);
        }
        let now = self.clock.now();
        match rules::evaluate(&state, now) {
            Ok(grant) => {
                self.record_use(&state.token, now);
                Ok(Outcome::Active(Box::new(ActiveToken {
                    token: state.token,
                    grant,
                })))
            }
            Err(reason) => Ok(Outcome::Inactive(reason)),
        }
    }

    /// Moves `last_used_at` when it is at least a minute behind, off the request's path.
    fn record_use(&self, token: &Token, now: crate::domain::model::Timestamp) {
        if token
            .last_used_at
            .is_some_and(|last| now - last < LAST_USED_RESOLUTION)
        {
            return;
        }
        let store = Arc::clone(&self.store);
        let id = token.id.clone();
        tokio::spawn(async move {
            if let Err(err) = store.touch_last_used(&id, now).await {
                tracing::warn!(token_id = %id, error = %err, "could not record last use");
            }
        });
    }

    /// Rehashes a secret whose stored hash uses old parameters, off the request's path.
    fn upgrade_hash(&self, id: &str, old: &str, secret: &str) {
        let store = Arc::clone(&self.store);
        let hasher = Arc::clone(&self.hasher);
        let id = id.to_owned();
        let old = old.to_owned();
        let secret = SecretString::from(secret);
        tokio::spawn(async move {
            let result = async {
                let new = hasher.hash(secret).await?;
                store.replace_hash(&id, &old, &new).await
            }
            .await;
            match result {
                Ok(true) => tracing::info!(token_id = %id, "upgraded the token's hash parameters"),
                Ok(false) => {}
                Err(err) => tracing::warn!(token_id = %id, error = %err, "hash upgrade failed"),
            }
        });
    }
}
