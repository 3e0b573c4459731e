//! Caller authentication as a tower layer: every `tokend.v1.*` call must carry a live
//! tokend token in `authorization: Bearer …`; the resulting [`Caller`] is lent to the
//! handler while the call runs ([`caller`]). Health and reflection pass untouched.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::transport::server::TlsConnectInfo;
use tower::{Layer, Service};

use crate::service::{Caller, Tokend};

use super::connection::ConnectionInfo;
use super::status::to_status;

/// Paths of the services that need a credential: tokend's own, and Envoy's external
/// authorization (Envoy sends its credential as `initial_metadata`).
const PROTECTED_PREFIXES: [&str; 2] = ["/tokend.v1.", "/envoy.service.auth.v3."];

/// Adds [`Authenticate`] around a service.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    core: Arc<Tokend>,
}

impl AuthLayer {
    /// A layer authenticating against `core`.
    pub fn new(core: Arc<Tokend>) -> Self {
        Self { core }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticate {
            inner,
            core: Arc::clone(&self.core),
        }
    }
}

/// The authenticating service.
#[derive(Clone, Debug)]
pub struct Authenticate<S> {
    inner: S,
    core: Arc<Tokend>,
}

impl<S, B> Service<http::Request<B>> for Authenticate<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The clone that was driven to readiness serves this request (tower's contract).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = request.uri().path();
        if !PROTECTED_PREFIXES.iter().any(|p| path.starts_with(p)) {
            return Box::pin(inner.call(request));
        }
        let core = Arc::clone(&self.core);
        Box::pin(async move {
            let header = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(http::HeaderValue::as_bytes);
            // The connection's peer: where the credential is being used from; over mutual
            // TLS, the certificate it presented; and the credential it last checked. Plain
            // TCP first: it is the common case, and then one lookup instead of two.
            let extensions = request.extensions();
            let (connection, certificates) = match extensions.get::<ConnectionInfo>() {
                Some(plain) => (Some(plain), None),
                None => match extensions.get::<TlsConnectInfo<ConnectionInfo>>() {
                    Some(tls) => (Some(tls.get_ref()), tls.peer_certs()),
                    None => (None, None),
                },
            };
            let peer = connection
                .and_then(|connection| connection.tcp.remote_addr())
                .map(|addr| addr.ip());
            let memo = connection.map(|connection| &*connection.memo);
            match core.authenticate(header, peer, memo).await {
                Ok(mut caller) => {
                    if let Some(certificates) = certificates {
                        caller.set_client_certificates(certificates);
                    }
                    if crate::telemetry::call_details_wanted() {
                        let span = tracing::Span::current();
                        span.record("caller", caller.display_id());
                        span.record("tenant", caller.tenant_id().as_str());
                    }
                    crate::lent::lend(&CALLER, caller, inner.call(request)).await
                }
                Err(err) => Ok(to_status(err).into_http()),
            }
        })
    }
}

// The caller of the call being polled on this thread. Lent rather than put into the
// request's extensions, which cost every call an allocation, a map insertion and a lookup:
// about 400 instructions, a tenth of what tokend adds to a garbage Introspect.
scoped_tls::scoped_thread_local!(static CALLER: Caller);

/// The authenticated caller of the call being handled; UNAUTHENTICATED if the layer did
/// not authenticate one. Handlers read it before their first wait: the caller is lent
/// only while the call is polled on its own task.
pub fn caller() -> Result<Caller, tonic::Status> {
    if CALLER.is_set() {
        Ok(CALLER.with(Caller::clone))
    } else {
        Err(tonic::Status::unauthenticated("missing credential"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_an_authenticated_call_there_is_no_caller() {
        let refused = caller().expect_err("no call is being polled");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert_eq!(refused.message(), "missing credential");
    }
}
