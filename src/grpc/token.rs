//! `tokend.v1.TokenService`.

use std::sync::Arc;

use secrecy::ExposeSecret as _;
use tonic::{Request, Response, Status};

use crate::domain::ports::Clock;
use crate::introspect::Outcome;
use crate::proto::v1 as pb;
use crate::proto::v1::token_service_server::TokenService;
use crate::service::Tokend;

use super::auth::caller;
use super::convert;

/// The gRPC face of token issuance, listing, revocation and introspection.
#[derive(Debug, Clone)]
pub struct TokenApi {
    core: Arc<Tokend>,
    clock: Arc<dyn Clock>,
}

impl TokenApi {
    /// Serves `core`.
    pub fn new(core: Arc<Tokend>, clock: Arc<dyn Clock>) -> Self {
        Self { core, clock }
    }
}

#[tonic::async_trait]
impl TokenService for TokenApi {
    async fn issue_token(
        &self,
        request: Request<pb::IssueTokenRequest>,
    ) -> Result<Response<pb::IssueTokenResponse>, Status> {
        let caller = caller()?;
        let req = convert::issue_request(request.into_inner())?;
        let issued = self.core.issue_token(&caller, req).await?;
        Ok(Response::new(pb::IssueTokenResponse {
            secret: issued.secret.expose_secret().to_owned(),
            token: Some(convert::token_info(&issued.token, self.clock.now())),
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let caller = caller()?;
        let req = convert::list_request(request.into_inner())?;
        let page = self.core.list_tokens(&caller, req).await?;
        let now = self.clock.now();
        Ok(Response::new(pb::ListTokensResponse {
            tokens: page
                .tokens
                .iter()
                .map(|t| {
                    let mut info = convert::token_info(t, now);
                    info.recent_uses = page
                        .uses
                        .iter()
                        .filter(|u| u.token_id == info.id)
                        .map(convert::token_use)
                        .collect();
                    info
                })
                .collect(),
            next_page_token: page.next,
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let caller = caller()?;
        let (req, reason) = convert::revoke_request(self.core.format(), request.into_inner())?;
        let token = self.core.revoke_token(&caller, req, reason).await?;
        Ok(Response::new(pb::RevokeTokenResponse {
            token: Some(convert::token_info(&token, self.clock.now())),
        }))
    }

    async fn delete_token(
        &self,
        request: Request<pb::DeleteTokenRequest>,
    ) -> Result<Response<pb::DeleteTokenResponse>, Status> {
        let caller = caller()?;
        let req = convert::delete_request(self.core.format(), request.into_inner())?;
        self.core.delete_token(&caller, req).await?;
        Ok(Response::new(pb::DeleteTokenResponse {}))
    }

    async fn introspect(
        &self,
        request: Request<pb::IntrospectRequest>,
    ) -> Result<Response<pb::IntrospectResponse>, Status> {
        let caller = caller()?;
        let req = request.into_inner();
        let (required, client_ip) = convert::introspect_request(&req)?;
        let answer = match self
            .core
            .introspect_at_once(&caller, &req.token, &required, client_ip)
        {
            Some(answer) => answer?,
            // Boxed: deciding may query the database and wait for argon2, and its state
            // would otherwise be part of every call's future, answered at once or not.
            None => {
                Box::pin(
                    self.core
                        .introspect(&caller, &req.token, &required, client_ip),
                )
                .await?
            }
        };
        if let Outcome::Active(active) = &answer.outcome
            && crate::telemetry::call_details_wanted()
        {
            let span = tracing::Span::current();
            span.record("token", active.token.display_id.as_str());
            span.record("token_tenant", active.token.tenant_id.as_str());
        }
        Ok(Response::new(convert::introspect_response(answer)))
    }

    async fn revoke_tokens(
        &self,
        request: Request<pb::RevokeTokensRequest>,
    ) -> Result<Response<pb::RevokeTokensResponse>, Status> {
        let caller = caller()?;
        let req = convert::revoke_many_request(request.into_inner())?;
        let token_ids = self.core.revoke_tokens(&caller, req).await?;
        Ok(Response::new(pb::RevokeTokensResponse { token_ids }))
    }

    async fn rotate_token(
        &self,
        request: Request<pb::RotateTokenRequest>,
    ) -> Result<Response<pb::RotateTokenResponse>, Status> {
        let caller = caller()?;
        let req = convert::rotate_request(self.core.format(), request.into_inner())?;
        let rotated = self.core.rotate_token(&caller, req).await?;
        let now = self.clock.now();
        Ok(Response::new(pb::RotateTokenResponse {
            secret: rotated.successor.secret.expose_secret().to_owned(),
            token: Some(convert::token_info(&rotated.successor.token, now)),
            previous: Some(convert::token_info(&rotated.previous, now)),
        }))
    }

    async fn report_leaked_token(
        &self,
        request: Request<pb::ReportLeakedTokenRequest>,
    ) -> Result<Response<pb::ReportLeakedTokenResponse>, Status> {
        let caller = caller()?;
        let (tokens, source) = convert::leak_report(request.into_inner())?;
        self.core.report_leaked(&caller, &tokens, &source).await?;
        Ok(Response::new(pb::ReportLeakedTokenResponse {}))
    }
}
