//! The hot methods' own route. Introspect and Envoy's Check are called once per request of
//! every service, so they go straight to their servers. Every other path goes through
//! tonic's router.
//!
//! The router is axum's. For each call it matches the path against a wildcard route,
//! percent-decodes the captured rest into the request's extensions, and boxes the request
//! body twice (into axum's body, then back into tonic's), the route's future and the
//! response body. Taking Introspect past it saved about 4 700 instructions a call (7% of
//! a garbage Introspect, `benches/callgrind.sh`): twice what tokend's own work adds to
//! such a call. Comparing the path with two constants costs a few dozen.
//!
//! The servers called here are clones of the ones in the router, with the same limits
//! (`max_decoding_message_size`), so a call answers the same whichever way it went. This
//! layer sits inside authentication and observation, so those still see every call.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use tonic::body::Body;
use tonic::codegen::BoxFuture;
use tower::{Layer, Service};

use crate::proto::v1::token_service_server::TokenServiceServer;

use super::ext_authz::ExtAuthzApi;
use super::token::TokenApi;

/// Introspect's path.
pub const INTROSPECT: &str = "/tokend.v1.TokenService/Introspect";

/// Envoy's external authorization check.
pub const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";

/// The servers of the hot paths, as configured for the router.
#[derive(Clone, Debug)]
pub struct HotLayer {
    tokens: TokenServiceServer<TokenApi>,
    check: AuthorizationServer<ExtAuthzApi>,
}

impl HotLayer {
    /// Sends [`INTROSPECT`] to `tokens` and [`CHECK`] to `check`.
    pub fn new(
        tokens: TokenServiceServer<TokenApi>,
        check: AuthorizationServer<ExtAuthzApi>,
    ) -> Self {
        Self { tokens, check }
    }
}

impl<S> Layer<S> for HotLayer {
    type Service = HotRoutes<S>;

    fn layer(&self, routes: S) -> Self::Service {
        HotRoutes {
            routes,
            tokens: self.tokens.clone(),
            check: self.check.clone(),
        }
    }
}

/// The router, with the hot paths taken out before it.
#[derive(Clone, Debug)]
pub struct HotRoutes<S> {
    routes: S,
    tokens: TokenServiceServer<TokenApi>,
    check: AuthorizationServer<ExtAuthzApi>,
}

impl<S, B> Service<http::Request<B>> for HotRoutes<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>,
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Routed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The generated servers are always ready (their `poll_ready` returns `Ready` at
        // once), so the router's readiness is the whole of it.
        self.routes.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        if path == INTROSPECT {
            Routed::Hot {
                call: self.tokens.call(request),
            }
        } else if path == CHECK {
            Routed::Hot {
                call: self.check.call(request),
            }
        } else {
            Routed::Router {
                call: self.routes.call(request),
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A call sent straight to its server, or through the router.
    #[project = RoutedProj]
    pub enum Routed<F> {
        /// Introspect or Check.
        Hot { call: BoxFuture<http::Response<Body>, Infallible> },
        /// Every other path.
        Router { #[pin] call: F },
    }
}

impl<F> Future for Routed<F>
where
    F: Future<Output = Result<http::Response<Body>, Infallible>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            RoutedProj::Hot { call } => call.as_mut().poll(cx),
            RoutedProj::Router { call } => call.poll(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A renamed method would leave its calls on the router: still answered, but slower,
    // and nothing else would notice.
    #[test]
    fn the_hot_paths_are_served_methods() {
        let served = crate::proto::served_paths();
        for path in [INTROSPECT, CHECK] {
            assert!(served.iter().any(|p| p == path), "{path} is not served");
        }
    }
}
