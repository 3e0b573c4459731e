//! The use cases: issue, list, revoke, delete and introspect tokens; read and write the
//! directory; read the audit log; bootstrap. Written against the domain's ports only, so they
//! run the same on every store, and free of transport types: `grpc` converts at the edge.

mod audit;
mod bootstrap;
mod caller;
mod directory;
mod paging;
mod tokens;

use std::sync::Arc;

pub use audit::ListAudit;
pub use bootstrap::bootstrap;
pub use caller::{Actor, Caller, ClientCertificates, ClientIdentity, Subject};
pub use directory::{PutMember, PutRole};
pub use paging::Page;
pub use tokens::{
    IntrospectAnswer, IssueToken, Issued, LEAKED, ListTokens, MAX_LEAK_REPORT, ROTATED, RevokeMany,
    RotateToken, Rotated, TokenPage, TokenRef,
};

use crate::domain::model::AuditRecord;
use crate::domain::names::TenantId;
use crate::domain::ports::{Clock, SecretHasher, Store};
use crate::domain::token_format::TokenFormat;
use crate::introspect::Introspector;
use crate::introspect::cache::LiveCache;
use crate::introspect::last_used::LastUsed;

/// The service core every gRPC service delegates to.
#[derive(Debug)]
pub struct Tokend {
    store: Arc<dyn Store>,
    hasher: Arc<dyn SecretHasher>,
    clock: Arc<dyn Clock>,
    format: TokenFormat,
    introspector: Introspector,
}

impl Tokend {
    /// A core over these ports; `last_used` notes token uses for batched writes; `live` is
    /// the live-state cache behind `store`, if any, whose generation voids remembered
    /// verdicts.
    pub fn new(
        store: Arc<dyn Store>,
        hasher: Arc<dyn SecretHasher>,
        clock: Arc<dyn Clock>,
        format: TokenFormat,
        last_used: Arc<LastUsed>,
        live: Option<Arc<LiveCache>>,
    ) -> Self {
        let introspector = Introspector::new(
            Arc::clone(&store),
            Arc::clone(&hasher),
            Arc::clone(&clock),
            format.clone(),
            last_used,
            live,
        );
        Self {
            store,
            hasher,
            clock,
            format,
            introspector,
        }
    }

    /// Entries held by the Introspect caches keyed by token string, for the metrics
    /// endpoint.
    pub fn cache_entries(&self) -> [(&'static str, u64); 3] {
        self.introspector.cache_entries()
    }

    /// How many Introspect decisions this replica made again for `cause`.
    pub fn redecisions(&self, cause: crate::introspect::Redecision) -> u64 {
        self.introspector.redecisions(cause)
    }

    /// The token format in use.
    pub fn format(&self) -> &TokenFormat {
        &self.format
    }

    /// An audit record of `action` by `caller` acting as `actor`, in `tenant`, now.
    fn audit(
        &self,
        tenant: &TenantId,
        actor: String,
        caller: &Caller,
        action: &str,
    ) -> AuditRecord {
        let mut detail = std::collections::BTreeMap::new();
        if let Some(identity) = caller.client_certificate_identity() {
            detail.insert("client_certificate".to_owned(), identity.subject);
            if let Some(uri) = identity.uri {
                detail.insert("client_certificate_uri".to_owned(), uri);
            }
        }
        AuditRecord {
            at: self.clock.now(),
            tenant_id: tenant.clone(),
            actor,
            caller: caller.display_id().to_owned(),
            action: action.to_owned(),
            token_id: None,
            detail,
        }
    }
}
