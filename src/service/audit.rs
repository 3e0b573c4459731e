//! Reading the audit log.

use crate::domain::model::AuditEvent;
use crate::domain::names::TenantId;
use crate::domain::ports::AuditQuery;
use crate::domain::rules;
use crate::domain::{Error, Result};

use super::Tokend;
use super::caller::Caller;
use super::paging::{self, Page};

/// A validated ListAuditEvents request.
#[derive(Clone, Debug)]
pub struct ListAudit {
    /// The tenant; `None` = the caller's own (system callers: every tenant).
    pub tenant_id: Option<TenantId>,
    /// Only events about this token.
    pub token_id: Option<String>,
    /// Which page.
    pub page: Page,
}

const AUDIT_LIST: &str = "audit";

impl Tokend {
    /// A page of audit events, newest first.
    pub async fn list_audit(
        &self,
        caller: &Caller,
        req: ListAudit,
    ) -> Result<(Vec<AuditEvent>, String)> {
        let tenant_id = match req.tenant_id {
            Some(tenant) if !caller.is_system() && tenant != *caller.tenant_id() => {
                return Err(Error::NotFound(format!("tenant {tenant}")));
            }
            Some(tenant) => Some(tenant),
            None if caller.is_system() => None,
            None => Some(caller.tenant_id().clone()),
        };
        caller.require(rules::AUDIT_READ)?;
        let before_id = req
            .page
            .cursor(AUDIT_LIST)?
            .map(|c| {
                c.parse::<i64>().map_err(|_| {
                    Error::invalid(
                        "page_token",
                        "is not a page token of this list; start again without one",
                    )
                })
            })
            .transpose()?;
        let query = AuditQuery {
            tenant_id,
            token_id: req.token_id,
            before_id,
            limit: req.page.size + 1,
        };
        let (events, more) =
            paging::split_page(self.store.list_audit(&query).await?, req.page.size);
        let next = match (more, events.last()) {
            (true, Some(last)) => paging::next_token(AUDIT_LIST, &last.id.to_string()),
            _ => String::new(),
        };
        Ok((events, next))
    }
}
