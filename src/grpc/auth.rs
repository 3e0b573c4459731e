//! Caller authentication as a tower layer: every `tokend.v1.*` call must carry a live
//! tokend token in `authorization: Bearer …`; the resulting [`Caller`] is lent to the
//! handler while the call runs ([`caller`]). Health and reflection pass untouched.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::transport::server::TlsConnectInfo;
use tower::{Layer, Service};

use crate::introspect::CredentialMemo;
use crate::service::{Caller, ClientCertificates, Tokend};

use super::connection::ConnectionInfo;
use super::status::to_status;

/// Paths of the services that need a credential: tokend's own, and Envoy's external
/// authorization (Envoy sends its credential as `initial_metadata`).
const PROTECTED_PREFIXES: [&str; 2] = ["/tokend.v1.", "/envoy.service.auth.v3."];

/// Adds [`Authenticate`] around a service.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    core: Arc<Tokend>,
    tls: bool,
}

impl AuthLayer {
    /// A layer authenticating against `core`, on a server speaking TLS if `tls`.
    pub fn new(core: Arc<Tokend>, tls: bool) -> Self {
        Self { core, tls }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticate {
            inner,
            core: Arc::clone(&self.core),
            tls: self.tls,
        }
    }
}

/// The authenticating service.
#[derive(Clone, Debug)]
pub struct Authenticate<S> {
    inner: S,
    core: Arc<Tokend>,
    /// Whether connections arrive over TLS: then their info (and the client's
    /// certificates) is in `TlsConnectInfo`. One lookup in the request's extensions, not two.
    tls: bool,
}

impl<S, B> Service<http::Request<B>> for Authenticate<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Authenticating<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        if !PROTECTED_PREFIXES.iter().any(|p| path.starts_with(p)) {
            return Authenticating::Open {
                call: self.inner.call(request),
            };
        }
        // A remembered verdict answers at once: the inner service's future is returned as
        // it is, inside observation's, with no allocation of its own.
        let credential = Credential::of(&request, self.tls);
        let at_once = self
            .core
            .authenticate_at_once(credential.header, credential.peer, credential.memo)
            .map(|result| result.map(|caller| credential.caller(caller)));
        match at_once {
            Some(Ok(caller)) => Authenticating::Authenticated {
                call: crate::lent::lend(&CALLER, caller, self.inner.call(request)),
            },
            Some(Err(err)) => Authenticating::Refused {
                response: Some(to_status(err).into_http()),
            },
            None => {
                // The service driven to readiness serves this request (tower's contract):
                // it moves into the future, and a clone takes its place.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let core = Arc::clone(&self.core);
                let tls = self.tls;
                // Deciding may query the database and wait for argon2: boxed, as it is rare
                // and its state large.
                Authenticating::Deciding {
                    call: Box::pin(async move {
                        let credential = Credential::of(&request, tls);
                        match core
                            .authenticate(credential.header, credential.peer, credential.memo)
                            .await
                        {
                            Ok(caller) => {
                                let caller = credential.caller(caller);
                                crate::lent::lend(&CALLER, caller, inner.call(request)).await
                            }
                            Err(err) => Ok(to_status(err).into_http()),
                        }
                    }),
                }
            }
        }
    }
}

/// What a request presents to authentication: its credential and its connection.
struct Credential<'a> {
    header: Option<&'a [u8]>,
    /// The connection's peer: where the credential is being used from.
    peer: Option<std::net::IpAddr>,
    /// The credential the connection last checked.
    memo: Option<&'a CredentialMemo>,
    /// Over mutual TLS, the certificate chain the connection presented.
    certificates: Option<ClientCertificates>,
}

impl<'a> Credential<'a> {
    fn of<B>(request: &'a http::Request<B>, tls: bool) -> Self {
        let header = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(http::HeaderValue::as_bytes);
        // Over TLS the plain connection's info is there too, without the certificates.
        let extensions = request.extensions();
        let (connection, certificates) = if tls {
            extensions
                .get::<TlsConnectInfo<ConnectionInfo>>()
                .map_or((None, None), |tls| (Some(tls.get_ref()), tls.peer_certs()))
        } else {
            (extensions.get::<ConnectionInfo>(), None)
        };
        Self {
            header,
            peer: connection
                .and_then(|connection| connection.tcp.remote_addr())
                .map(|addr| addr.ip()),
            memo: connection.map(|connection| &*connection.memo),
            certificates,
        }
    }

    /// The caller, with what the connection says of it.
    fn caller(&self, mut caller: Caller) -> Caller {
        if let Some(certificates) = &self.certificates {
            caller.set_client_certificates(Arc::clone(certificates));
        }
        if crate::telemetry::call_details_wanted() {
            let span = tracing::Span::current();
            span.record("caller", caller.display_id());
            span.record("tenant", caller.tenant_id().as_str());
        }
        caller
    }
}

pin_project_lite::pin_project! {
    /// An authenticated (or unprotected) call's future, or its refusal.
    #[project = AuthenticatingProj]
    pub enum Authenticating<F, E> {
        /// Health and reflection.
        Open { #[pin] call: F },
        /// Its caller's verdict was remembered.
        Authenticated { #[pin] call: crate::lent::Lent<Caller, F> },
        /// Refused at once.
        Refused { response: Option<http::Response<tonic::body::Body>> },
        /// The caller's verdict is being decided.
        Deciding { call: BoxFuture<'static, Result<http::Response<tonic::body::Body>, E>> },
    }
}

impl<F, E> Future for Authenticating<F, E>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match self.project() {
            AuthenticatingProj::Open { call } => call.poll(cx),
            AuthenticatingProj::Authenticated { call } => call.poll(cx),
            AuthenticatingProj::Refused { response } => {
                Poll::Ready(Ok(response.take().unwrap_or_else(|| {
                    tonic::Status::internal("polled after it answered").into_http()
                })))
            }
            AuthenticatingProj::Deciding { call } => call.as_mut().poll(cx),
        }
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
