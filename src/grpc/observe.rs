//! Per-call observation as a tower layer, outermost: counts and times every call by method
//! and status code, gives it a request id (the caller's `x-request-id`, or a new one,
//! echoed in the response), and records the status on the call's span.
//!
//! Method labels come from the served descriptors, so a client sending random paths
//! cannot grow the series without bound: anything else is counted as `other`.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use metrics::{Counter, Histogram};
use prost::Message as _;
use tower::{Layer, Service};

/// The request id header, read and echoed.
const REQUEST_ID: &str = "x-request-id";

/// gRPC status codes 0–16, as Prometheus labels.
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Codes that mean the server failed (OpenTelemetry's gRPC server conventions); the
/// others are the caller's doing and leave the span's status unset.
const SERVER_FAULTS: [usize; 6] = [2, 4, 12, 13, 14, 15];

/// Every served method, each with its series handles made on first use per code.
struct Methods {
    index: HashMap<String, usize>,
    labels: Vec<&'static str>,
    series: Vec<[OnceLock<(Counter, Histogram)>; 17]>,
}

impl Methods {
    fn get() -> &'static Methods {
        static METHODS: OnceLock<Methods> = OnceLock::new();
        METHODS.get_or_init(|| {
            let mut paths: Vec<String> = [
                crate::proto::FILE_DESCRIPTOR_SET,
                crate::proto::ENVOY_FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
            ]
            .into_iter()
            .filter_map(|bytes| prost_types::FileDescriptorSet::decode(bytes).ok())
            .flat_map(|set| set.file)
            .flat_map(|file| {
                let package = file.package().to_owned();
                file.service.into_iter().flat_map(move |service| {
                    let prefix = format!("/{package}.{}/", service.name());
                    service
                        .method
                        .into_iter()
                        .map(move |method| format!("{prefix}{}", method.name()))
                })
            })
            .collect();
            paths.sort();
            paths.dedup();
            // Labels live as long as the process: one small string per served method.
            let mut labels: Vec<&'static str> = paths
                .iter()
                .map(|path| &*Box::leak(path.clone().into_boxed_str()))
                .collect();
            labels.push("other");
            let index = paths.into_iter().enumerate().map(|(i, p)| (p, i)).collect();
            let series = labels
                .iter()
                .map(|_| std::array::from_fn(|_| OnceLock::new()))
                .collect();
            Methods {
                index,
                labels,
                series,
            }
        })
    }

    fn of(&self, path: &str) -> usize {
        self.index
            .get(path)
            .copied()
            .unwrap_or(self.labels.len() - 1)
    }

    fn record(&self, method: usize, code: usize, seconds: f64) {
        let (calls, latency) = self.series[method][code].get_or_init(|| {
            let (method, code) = (self.labels[method], CODES[code]);
            (
                metrics::counter!("tokend_grpc_requests_total", "method" => method, "code" => code),
                metrics::histogram!(
                    "tokend_grpc_request_duration_seconds",
                    "method" => method,
                    "code" => code
                ),
            )
        });
        calls.increment(1);
        latency.record(seconds);
    }
}

/// Adds [`Observe`] around a service.
#[derive(Clone, Copy, Debug, Default)]
pub struct ObserveLayer;

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe { inner }
    }
}

/// The observing service.
#[derive(Clone, Debug)]
pub struct Observe<S> {
    inner: S,
}

impl<S, B, R> Service<http::Request<B>> for Observe<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let methods = Methods::get();
        let method = methods.of(request.uri().path());
        let request_id = request
            .headers()
            .get(REQUEST_ID)
            .and_then(|value| value.to_str().ok())
            .filter(|id| is_sane_request_id(id))
            .map_or_else(new_request_id, str::to_owned);
        let answered = self.inner.call(request);
        Box::pin(async move {
            // The call's span is entered while its future runs, not when it is made.
            let span = tracing::Span::current();
            span.record("request_id", request_id.as_str());
            let mut response = answered.await?;
            // tonic puts a handler's error in the response head (trailers-only); a success
            // has its status in the trailers, and every tokend method is unary, so a head
            // without one is OK.
            let code = response
                .headers()
                .get("grpc-status")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse::<usize>().ok())
                .filter(|code| *code < CODES.len())
                .unwrap_or(0);
            methods.record(method, code, started.elapsed().as_secs_f64());
            span.record("code", CODES[code]);
            if SERVER_FAULTS.contains(&code) {
                span.record("otel.status_code", "ERROR");
            }
            if let Ok(value) = http::HeaderValue::from_str(&request_id) {
                response.headers_mut().insert(REQUEST_ID, value);
            }
            Ok(response)
        })
    }
}

/// A caller's request id is logged and echoed, so it must be short and printable.
fn is_sane_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_served_method_has_its_label_and_anything_else_is_other() {
        let methods = Methods::get();
        let introspect = methods.of("/tokend.v1.TokenService/Introspect");
        assert_eq!(
            methods.labels[introspect],
            "/tokend.v1.TokenService/Introspect"
        );
        let check = methods.of("/envoy.service.auth.v3.Authorization/Check");
        assert_eq!(
            methods.labels[check],
            "/envoy.service.auth.v3.Authorization/Check"
        );
        assert_eq!(
            methods.labels[methods.of("/grpc.health.v1.Health/Check")],
            "/grpc.health.v1.Health/Check"
        );
        assert_eq!(methods.labels[methods.of("/made.up/Path")], "other");
        assert_eq!(
            methods.labels[methods.of("/tokend.v1.TokenService/Nope")],
            "other"
        );
    }

    #[test]
    fn request_ids_from_callers_are_bounded_and_printable() {
        assert!(is_sane_request_id("0f3c-req"));
        assert!(!is_sane_request_id(""));
        assert!(!is_sane_request_id("has space"));
        assert!(!is_sane_request_id("line\nbreak"));
        assert!(!is_sane_request_id(&"x".repeat(129)));
        assert_eq!(new_request_id().len(), 32);
    }
}
