//! `tokend.v1.AuditService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::proto::v1 as pb;
use crate::proto::v1::audit_service_server::AuditService;
use crate::service::Tokend;

use super::auth::caller;
use super::convert;

/// The gRPC face of the audit log.
#[derive(Debug, Clone)]
pub struct AuditApi {
    core: Arc<Tokend>,
}

impl AuditApi {
    /// Serves `core`.
    pub fn new(core: Arc<Tokend>) -> Self {
        Self { core }
    }
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let caller = caller()?;
        let req = convert::audit_request(self.core.format(), request.into_inner())?;
        let (events, next_page_token) = self.core.list_audit(&caller, req).await?;
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: events.iter().map(convert::audit_event).collect(),
            next_page_token,
        }))
    }
}
