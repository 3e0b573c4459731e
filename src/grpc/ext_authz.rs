//! `envoy.service.auth.v3.Authorization/Check`: tokend as Envoy's external authorizer, so
//! Envoy, Istio or Envoy Gateway put tokend in front of any HTTP service by configuration.
//!
//! Envoy calls with its own credential (`initial_metadata` of its `grpc_service`), which
//! needs `tokend.introspect` like any Introspect caller. The answer for the end user's
//! request: no bearer token → 401; not a live token → 401 with
//! `WWW-Authenticate: Bearer error="invalid_token"`; missing a permission the route
//! requires → 403; live → allowed, with the token's identity in `x-tokend-*` headers for
//! the upstream and its `authorization` header removed. When tokend cannot decide (database
//! unreachable) Check fails with a gRPC error, which Envoy turns into its
//! `status_on_error` (fail closed unless `failure_mode_allow` is set).

use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::{
    Authorization, CheckRequest, CheckResponse, HeaderAppendAction, HttpStatusCode,
};
use envoy_types::ext_authz::v3::{
    CheckRequestExt as _, CheckResponseExt as _, DeniedHttpResponseBuilder, OkHttpResponseBuilder,
};
use tonic::{Request, Response, Status};

use crate::domain::model::PermissionSet;
use crate::domain::names::Permission;
use crate::introspect::Outcome;
use crate::service::Tokend;

use super::auth::caller;

/// The ext_authz context extension naming the permissions a route requires, separated by
/// spaces or commas (set per route in Envoy's `ExtAuthzPerRoute.check_settings`).
pub const REQUIRED_PERMISSIONS: &str = "tokend_required_permissions";

/// Headers tokend sets on an allowed request. Always all of them, overwriting whatever the
/// client sent under these names, so an upstream can trust them.
pub const TENANT_HEADER: &str = "x-tokend-tenant";
/// The subject: the owner's user id (PAT) or the key's id (API key).
pub const SUBJECT_HEADER: &str = "x-tokend-subject";
/// The token's id.
pub const TOKEN_ID_HEADER: &str = "x-tokend-token-id";
/// Effective permissions, space-separated, sorted.
pub const PERMISSIONS_HEADER: &str = "x-tokend-permissions";
/// The owner's groups, space-separated, sorted.
pub const GROUPS_HEADER: &str = "x-tokend-groups";

/// The gRPC face of Envoy's external authorization.
#[derive(Debug, Clone)]
pub struct ExtAuthzApi {
    core: Arc<Tokend>,
}

impl ExtAuthzApi {
    /// Serves `core`.
    pub fn new(core: Arc<Tokend>) -> Self {
        Self { core }
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthzApi {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let caller = caller(&request)?;
        let check = request.into_inner();
        let required = required_permissions(&check)?;
        let Some(token) = check.get_client_headers().and_then(|h| bearer(h)) else {
            return Ok(Response::new(denied(
                Status::unauthenticated("no bearer token"),
                HttpStatusCode::Unauthorized,
                r#"Bearer realm="tokend""#.to_owned(),
            )));
        };
        let client_ip = check
            .get_client_address()
            .and_then(|address| address.parse().ok());
        let answer = self
            .core
            .introspect(&caller, token, &required, client_ip)
            .await?;
        let response = match answer.outcome {
            Outcome::Inactive(_) => denied(
                Status::unauthenticated("the token is not active"),
                HttpStatusCode::Unauthorized,
                r#"Bearer error="invalid_token""#.to_owned(),
            ),
            Outcome::Active(_) if !answer.allowed => denied(
                Status::permission_denied("the token lacks a permission this route requires"),
                HttpStatusCode::Forbidden,
                format!(
                    r#"Bearer error="insufficient_scope", scope="{}""#,
                    joined(&required)
                ),
            ),
            Outcome::Active(active) => {
                let token = &active.token;
                let mut ok = OkHttpResponseBuilder::new();
                let overwrite = Some(HeaderAppendAction::OverwriteIfExistsOrAdd);
                for (name, value) in [
                    (TENANT_HEADER, token.tenant_id.to_string()),
                    (SUBJECT_HEADER, token.subject()),
                    (TOKEN_ID_HEADER, token.id().to_owned()),
                    (PERMISSIONS_HEADER, joined(&active.grant.permissions)),
                    (
                        GROUPS_HEADER,
                        active
                            .grant
                            .groups
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(" "),
                    ),
                ] {
                    ok.add_header(name, value, overwrite, true);
                }
                // The secret stops here: no upstream needs it, and each one that sees it
                // is one more place it can leak from.
                ok.remove_header("authorization");
                let mut response = CheckResponse::with_status(Status::ok(""));
                response.set_http_response(ok);
                response
            }
        };
        Ok(Response::new(response))
    }
}

fn denied(status: Status, http: HttpStatusCode, challenge: String) -> CheckResponse {
    let mut body = DeniedHttpResponseBuilder::new();
    body.set_http_status(http).add_header(
        "www-authenticate",
        challenge,
        Some(HeaderAppendAction::OverwriteIfExistsOrAdd),
        false,
    );
    let mut response = CheckResponse::with_status(status);
    response.set_http_response(body);
    response
}

/// The token of an `authorization: Bearer …` header (Envoy lower-cases header names).
fn bearer(headers: &std::collections::HashMap<String, String>) -> Option<&str> {
    let value = headers.get("authorization")?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The route's required permissions. A malformed list is the operator's mistake: Check
/// fails (INVALID_ARGUMENT naming the extension) and Envoy applies its `status_on_error`.
fn required_permissions(check: &CheckRequest) -> Result<PermissionSet, Status> {
    let Some(list) = check
        .attributes
        .as_ref()
        .and_then(|a| a.context_extensions.get(REQUIRED_PERMISSIONS))
    else {
        return Ok(PermissionSet::new());
    };
    let field = format!("context_extensions.{REQUIRED_PERMISSIONS}");
    list.split([' ', ','])
        .filter(|p| !p.is_empty())
        .map(|p| Permission::parse(&field, p))
        .collect::<crate::domain::Result<PermissionSet>>()
        .map_err(Status::from)
}

fn joined(set: &PermissionSet) -> String {
    set.iter()
        .map(Permission::as_str)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn only_a_bearer_authorization_carries_a_token() {
        let headers = |v: &str| HashMap::from([("authorization".to_owned(), v.to_owned())]);
        assert_eq!(bearer(&headers("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&headers("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&headers("Basic abc")), None);
        assert_eq!(bearer(&headers("Bearer ")), None);
        assert_eq!(bearer(&HashMap::new()), None);
    }
}
