//! For services that consume tokend: a typed Introspect client and a `tower` layer that
//! guards a tonic or axum server with it.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use tokend::client::{IntrospectLayer, TokendClient};
//! let tokend = TokendClient::connect("http://tokend:50051", "tkd_key_…")?;
//! let guard = IntrospectLayer::new(tokend); // `.layer(guard)` on a tonic Server or axum Router
//! # Ok(()) }
//! ```
//!
//! A handler then finds the caller's [`Principal`] in the request extensions and calls
//! [`Principal::require`]. Nothing is cached here: every request is introspected, so a
//! revocation holds on the very next request (tokend answers a warm token from memory).

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tower::{Layer, Service};

use crate::proto::v1 as pb;
use crate::proto::v1::token_service_client::TokenServiceClient;

/// A caller's own credential, sent with every call as `authorization: Bearer …`.
/// Redacted in `Debug`.
#[derive(Clone)]
pub struct Credential(MetadataValue<Ascii>);

impl Credential {
    /// The credential `token`; `None` if it cannot be a header value.
    pub fn new(token: &str) -> Option<Self> {
        format!("Bearer {}", token.trim()).parse().ok().map(Self)
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credential(<redacted>)")
    }
}

impl Interceptor for Credential {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// Why a client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint is not a URI.
    #[error("the tokend endpoint is not a URI like http://host:port")]
    Endpoint,
    /// The credential is not a token string.
    #[error("the credential is not a token string")]
    Credential,
}

/// Asks tokend about bearer tokens, with the calling service's own credential (which needs
/// `tokend.introspect`).
#[derive(Clone, Debug)]
pub struct TokendClient {
    inner: TokenServiceClient<InterceptedService<Channel, Credential>>,
}

impl TokendClient {
    /// A client of tokend at `endpoint` (`http://host:port`). It connects on first use
    /// (and reconnects), so a service can start before tokend is reachable; its requests
    /// are refused as UNAVAILABLE until then.
    pub fn connect(endpoint: &str, credential: &str) -> Result<Self, ClientError> {
        // Bounded waits: a tokend that hangs must cost a guarded request an UNAVAILABLE
        // within seconds, not the operating system's connect timeout.
        let channel = Channel::from_shared(endpoint.to_owned())
            .map_err(|_| ClientError::Endpoint)?
            .connect_timeout(std::time::Duration::from_secs(2))
            .timeout(std::time::Duration::from_secs(5))
            .connect_lazy();
        Self::with_channel(channel, credential)
    }

    /// A client over an existing channel.
    pub fn with_channel(channel: Channel, credential: &str) -> Result<Self, ClientError> {
        let credential = Credential::new(credential).ok_or(ClientError::Credential)?;
        Ok(Self {
            inner: TokenServiceClient::with_interceptor(channel, credential),
        })
    }

    /// The principal behind `token` if it is live right now, `None` if it is not. An `Err`
    /// means tokend could not answer (unreachable, or this service's credential refused):
    /// treat it as "cannot decide", never as "inactive" or "active".
    pub async fn introspect(
        &self,
        token: &str,
        client_ip: Option<IpAddr>,
    ) -> Result<Option<Principal>, tonic::Status> {
        let answer = self
            .inner
            .clone()
            .introspect(pb::IntrospectRequest {
                token: token.to_owned(),
                required_permissions: Vec::new(),
                client_ip: client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            })
            .await?
            .into_inner();
        Ok(answer.active.then(|| Principal {
            tenant_id: answer.tenant_id,
            subject: answer.subject,
            token_id: answer.token_id,
            kind: match pb::TokenKind::try_from(answer.kind) {
                Ok(pb::TokenKind::ApiKey) => PrincipalKind::ApiKey,
                _ => PrincipalKind::User,
            },
            permissions: answer.permissions.into_iter().collect(),
            groups: answer.groups.into_iter().collect(),
        }))
    }
}

/// Who a live token speaks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrincipalKind {
    /// A user, through a personal access token.
    User,
    /// An organisation's API key.
    ApiKey,
}

/// The caller behind a request's bearer token, as tokend saw it when the request arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The tenant the token is bound to: the only tenant this request may touch.
    pub tenant_id: String,
    /// The user id (personal token) or the key's id (API key).
    pub subject: String,
    /// The token's id, safe to log.
    pub token_id: String,
    /// User or API key.
    pub kind: PrincipalKind,
    /// Effective permissions right now.
    pub permissions: BTreeSet<String>,
    /// The user's groups in the tenant.
    pub groups: BTreeSet<String>,
}

impl Principal {
    /// Whether the principal holds `permission`.
    pub fn has(&self, permission: &str) -> bool {
        self.permissions.contains(permission)
    }

    /// PERMISSION_DENIED naming `permission` unless the principal holds it.
    pub fn require(&self, permission: &str) -> Result<(), tonic::Status> {
        if self.has(permission) {
            Ok(())
        } else {
            Err(tonic::Status::permission_denied(format!(
                "this call needs the permission {permission}"
            )))
        }
    }
}

/// Guards every request of the wrapped service: its `authorization: Bearer …` token must be
/// live, and the [`Principal`] goes into the request's extensions. Otherwise the request is
/// answered without reaching the service: UNAUTHENTICATED (gRPC) or 401 (HTTP), and
/// UNAVAILABLE / 503 when tokend cannot answer.
#[derive(Clone, Debug)]
pub struct IntrospectLayer {
    client: TokendClient,
    open: Arc<[String]>,
}

impl IntrospectLayer {
    /// A layer asking `client`, guarding every path.
    pub fn new(client: TokendClient) -> Self {
        Self {
            client,
            open: Arc::from([]),
        }
    }

    /// Lets requests whose path starts with one of `prefixes` through unchecked, e.g.
    /// `/grpc.health.v1.Health/` for Kubernetes probes. They carry no [`Principal`].
    pub fn open_paths<I, P>(mut self, prefixes: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<String>,
    {
        self.open = prefixes.into_iter().map(Into::into).collect();
        self
    }
}

impl<S> Layer<S> for IntrospectLayer {
    type Service = Introspected<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Introspected {
            inner,
            client: self.client.clone(),
            open: Arc::clone(&self.open),
        }
    }
}

/// The guarded service; see [`IntrospectLayer`].
#[derive(Clone, Debug)]
pub struct Introspected<S> {
    inner: S,
    client: TokendClient,
    open: Arc<[String]>,
}

/// Why a request is turned away.
#[derive(Clone, Copy)]
enum Refusal {
    NoToken,
    Inactive,
    Undecided,
}

impl<S, B, R> Service<http::Request<B>> for Introspected<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone that was driven to readiness serves this request (tower's contract).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = request.uri().path();
        if self.open.iter().any(|open| path.starts_with(open.as_str())) {
            return Box::pin(inner.call(request));
        }
        let client = self.client.clone();
        Box::pin(async move {
            // gRPC and gRPC-Web are refused in their own framing, with the caller's own
            // content type; anything else is plain HTTP.
            let grpc = request
                .headers()
                .get(http::header::CONTENT_TYPE)
                .filter(|v| v.as_bytes().starts_with(b"application/grpc"))
                .cloned();
            let token = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split_once(' '))
                .filter(|(scheme, token)| {
                    scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()
                })
                .map(|(_, token)| token.trim().to_owned());
            let Some(token) = token else {
                return Ok(refuse(Refusal::NoToken, grpc));
            };
            let peer = request
                .extensions()
                .get::<tonic::transport::server::TcpConnectInfo>()
                .and_then(|info| info.remote_addr())
                .map(|addr| addr.ip());
            match client.introspect(&token, peer).await {
                Ok(Some(principal)) => {
                    // The secret stops here: the service needs the principal, not the token.
                    request.headers_mut().remove(http::header::AUTHORIZATION);
                    request.extensions_mut().insert(principal);
                    inner.call(request).await
                }
                Ok(None) => Ok(refuse(Refusal::Inactive, grpc)),
                Err(status) => {
                    tracing::warn!(code = ?status.code(), "tokend could not introspect a request's token");
                    Ok(refuse(Refusal::Undecided, grpc))
                }
            }
        })
    }
}

/// The answer to a refused request: a gRPC trailers-only response, or a plain HTTP one.
fn refuse<R: Default>(why: Refusal, grpc: Option<http::HeaderValue>) -> http::Response<R> {
    let (code, http_status, message, challenge) = match why {
        Refusal::NoToken => (
            tonic::Code::Unauthenticated,
            http::StatusCode::UNAUTHORIZED,
            "missing credential: send `authorization: Bearer <token>`",
            Some(r#"Bearer realm="tokend""#),
        ),
        Refusal::Inactive => (
            tonic::Code::Unauthenticated,
            http::StatusCode::UNAUTHORIZED,
            "the credential is not an active token",
            Some(r#"Bearer error="invalid_token""#),
        ),
        Refusal::Undecided => (
            tonic::Code::Unavailable,
            http::StatusCode::SERVICE_UNAVAILABLE,
            "cannot check the credential right now; retry",
            None,
        ),
    };
    let mut response = http::Response::new(R::default());
    if grpc.is_none() {
        *response.status_mut() = http_status;
    }
    let headers = response.headers_mut();
    if let Some(content_type) = grpc {
        headers.insert(http::header::CONTENT_TYPE, content_type);
        headers.insert("grpc-status", http::HeaderValue::from(code as i32));
        headers.insert("grpc-message", http::HeaderValue::from_static(message));
    } else {
        if let Some(challenge) = challenge {
            headers.insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static(challenge),
            );
        }
    }
    response
}
