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

use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use crate::domain::model::PermissionSet;
use crate::domain::names::Permission;
use crate::domain::rules;
use crate::introspect::Outcome;
use crate::service::Tokend;

use super::auth::caller;

/// The ext_authz context extension naming the permissions a route requires, separated by
/// whitespace or commas (set per route in Envoy's `ExtAuthzPerRoute.check_settings`).
pub const REQUIRED_PERMISSIONS: &str = "tokend_required_permissions";

/// The ext_authz context extension naming the tenants whose tokens a route admits
/// (whitespace or commas). Without it a live token of any tenant passes, and the upstream
/// must scope what it serves by `x-tokend-tenant`.
pub const TENANTS: &str = "tokend_tenants";

/// The largest Check accepted.
pub const MAX_CHECK_BYTES: usize = 1024 * 1024;

/// What is percent-encoded in an `x-tokend-*` value: controls, non-ASCII, and the list
/// separator, so a group named `eng,admins` cannot read as two groups.
const HEADER_ITEM: &AsciiSet = &CONTROLS.add(b' ').add(b',').add(b'%').add(b'"');

/// Headers tokend sets on an allowed request. Always all of them, overwriting whatever the
/// client sent under these names, so an upstream can trust them.
pub const TENANT_HEADER: &str = "x-tokend-tenant";
/// The subject: the owner's user id (PAT) or the key's id (API key). Values are
/// percent-encoded (RFC 3986) where they hold anything but printable ASCII, and lists are
/// comma-separated.
pub const SUBJECT_HEADER: &str = "x-tokend-subject";
/// The token's id.
pub const TOKEN_ID_HEADER: &str = "x-tokend-token-id";
/// Effective permissions, comma-separated, sorted.
pub const PERMISSIONS_HEADER: &str = "x-tokend-permissions";
/// The owner's groups, comma-separated, sorted.
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
        let caller = caller()?;
        // First: a credential that may not introspect learns nothing, not even "no token".
        caller.require(rules::INTROSPECT)?;
        let check = request.into_inner();
        let required: PermissionSet = listed(&check, REQUIRED_PERMISSIONS)?
            .map(|p| Permission::parse(&extension(REQUIRED_PERMISSIONS), p))
            .collect::<crate::domain::Result<_>>()?;
        let tenants: Vec<&str> = listed(&check, TENANTS)?.collect();
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
            Outcome::Active(active)
                if !tenants.is_empty() && !tenants.contains(&active.token.tenant_id.as_str()) =>
            {
                denied(
                    Status::permission_denied("this route does not admit the token's tenant"),
                    HttpStatusCode::Forbidden,
                    r#"Bearer error="insufficient_scope""#.to_owned(),
                )
            }
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
                let subject = token.subject();
                for (name, value) in [
                    (TENANT_HEADER, encoded([token.tenant_id.as_str()])),
                    (SUBJECT_HEADER, encoded([subject.as_str()])),
                    (TOKEN_ID_HEADER, encoded([token.id()])),
                    (
                        PERMISSIONS_HEADER,
                        encoded(active.grant.permissions.iter().map(Permission::as_str)),
                    ),
                    (
                        GROUPS_HEADER,
                        encoded(active.grant.groups.iter().map(|g| g.as_str())),
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

fn extension(name: &str) -> String {
    format!("context_extensions.{name}")
}

/// The items of a list-valued context extension (none if absent). An unknown `tokend_*`
/// extension is refused: a misspelt requirement must not silently admit everyone. A
/// refusal fails the check (INVALID_ARGUMENT naming it), and Envoy applies its
/// `status_on_error`.
fn listed<'a>(
    check: &'a CheckRequest,
    name: &str,
) -> Result<impl Iterator<Item = &'a str>, Status> {
    let extensions = check.attributes.as_ref().map(|a| &a.context_extensions);
    if let Some(unknown) = extensions
        .into_iter()
        .flat_map(|e| e.keys())
        .find(|k| k.starts_with("tokend_") && *k != REQUIRED_PERMISSIONS && *k != TENANTS)
    {
        return Err(Status::invalid_argument(format!(
            "{}: unknown; tokend reads {REQUIRED_PERMISSIONS} and {TENANTS}",
            extension(unknown)
        )));
    }
    let list = extensions
        .and_then(|e| e.get(name))
        .map_or("", String::as_str);
    Ok(list
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|item| !item.is_empty()))
}

/// A header value: the items, each percent-encoded, comma-separated.
fn encoded<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    items
        .into_iter()
        .map(|item| utf8_percent_encode(item, HEADER_ITEM).to_string())
        .collect::<Vec<_>>()
        .join(",")
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
    fn header_values_cannot_smuggle_a_separator() {
        assert_eq!(
            encoded(["eng", "on call", "a,b", "50%", "zoë"]),
            "eng,on%20call,a%2Cb,50%25,zo%C3%AB"
        );
        assert_eq!(encoded(["alice"]), "alice");
        assert_eq!(encoded(std::iter::empty()), "");
    }

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
