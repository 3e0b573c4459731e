//! Per-call observation as a tower layer, outermost: counts and times every call by method
//! and status code, gives it a request id (the caller's `x-request-id`, or a new one) and
//! either a span (when spans are exported or logs are at debug) or labels for the lines it
//! logs (`telemetry::call`), and echoes the id when it can be looked up.
//!
//! Method labels come from the served descriptors, so a client sending random paths
//! cannot grow the series without bound: anything else is counted as `other`.

use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use metrics::{Counter, Histogram};
use tower::{Layer, Service};
use tracing::Instrument as _;

use crate::telemetry::call::{self, CallLabels, RequestId};

/// The request id header, read and echoed. Header names as constants: using one by `&str`
/// parses and hashes the name on every call.
const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");
const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

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
    /// Sorted, then `other`.
    labels: Vec<&'static str>,
    /// Each served path's place in `labels`. Keyed aHash: hashing a path costs less than
    /// the five string comparisons of a binary search over the labels, and its random
    /// keys leave a client no paths to pick for collisions.
    index: std::collections::HashMap<&'static str, usize, ahash::RandomState>,
    /// The places of [`HOT`], looked at before the map.
    hot: [usize; 2],
    series: Vec<[OnceLock<(Counter, Histogram)>; 17]>,
}

/// The methods called at gateway rates, once per request of every service: comparing a
/// path with these costs a fifth of hashing it.
const HOT: [&str; 2] = [super::hot::INTROSPECT, super::hot::CHECK];

impl Methods {
    fn get() -> &'static Methods {
        static METHODS: OnceLock<Methods> = OnceLock::new();
        METHODS.get_or_init(|| {
            let mut paths = crate::proto::served_paths();
            paths.sort();
            paths.dedup();
            // Labels live as long as the process: one small string per served method.
            let mut labels: Vec<&'static str> = paths
                .iter()
                .map(|path| &*Box::leak(path.clone().into_boxed_str()))
                .collect();
            let index: std::collections::HashMap<_, _, _> =
                labels.iter().enumerate().map(|(i, l)| (*l, i)).collect();
            labels.push("other");
            let other = labels.len() - 1;
            let hot = HOT.map(|path| index.get(path).copied().unwrap_or(other));
            let series = labels
                .iter()
                .map(|_| std::array::from_fn(|_| OnceLock::new()))
                .collect();
            Methods {
                labels,
                index,
                hot,
                series,
            }
        })
    }

    fn of(&self, path: &str) -> usize {
        if let Some((_, &place)) = HOT.iter().zip(&self.hot).find(|(hot, _)| **hot == path) {
            return place;
        }
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

/// The request headers observation reads.
#[derive(Default)]
struct Heard<'a> {
    request_id: Option<&'a http::HeaderValue>,
    timeout: Option<&'a http::HeaderValue>,
    traceparent: bool,
}

impl<'a> Heard<'a> {
    /// One pass over the handful of headers a gRPC call carries: looking each of these up
    /// by name would hash the name (none is a standard header), three times a call. Names
    /// are compared as `HeaderName`s, not as text: most of a call's headers are standard
    /// ones (`content-type`, `te`, `authorization`, `user-agent`), which differ from these
    /// custom names in their kind alone. The first value of a repeated header counts, as
    /// `HeaderMap::get` would have it.
    fn read(headers: &'a http::HeaderMap) -> Self {
        let mut heard = Self::default();
        for (name, value) in headers {
            if *name == REQUEST_ID {
                heard.request_id.get_or_insert(value);
            } else if *name == GRPC_TIMEOUT {
                heard.timeout.get_or_insert(value);
            } else if *name == TRACEPARENT {
                heard.traceparent = true;
            }
        }
        heard
    }
}

/// The span every log line of a call is nested in, with what is known before the call
/// runs; the rest is filled in as it runs: caller and tenant (auth), the introspected token
/// (Introspect), the status (here, at the end). The method is the bounded label, never the
/// raw path a caller sent.
fn call_span(
    method: &'static str,
    request_id: &RequestId,
    headers: &http::HeaderMap,
) -> tracing::Span {
    // The fields as Display: the log formatter renders a `&str` through `Debug`, escaping
    // it character by character, which cost more than the rest of making the span.
    // `otel.name` stays a `&str`: it names the exported span, not a log field.
    let (name, method, request_id) = (
        method,
        tracing::field::display(method),
        tracing::field::display(request_id),
    );
    let span = if crate::telemetry::otel::exporting() {
        tracing::info_span!(
            "grpc",
            method,
            request_id,
            code = tracing::field::Empty,
            caller = tracing::field::Empty,
            tenant = tracing::field::Empty,
            token = tracing::field::Empty,
            token_tenant = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            otel.name = name,
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
        )
    } else {
        // Without an exporter the OpenTelemetry fields would only lengthen every log line.
        tracing::info_span!(
            "grpc",
            method,
            request_id,
            code = tracing::field::Empty,
            caller = tracing::field::Empty,
            tenant = tracing::field::Empty,
            token = tracing::field::Empty,
            token_tenant = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        )
    };
    crate::telemetry::otel::join_callers_trace(&span, headers);
    span
}

/// Adds [`Observe`] around a service.
#[derive(Clone, Debug)]
pub struct ObserveLayer {
    cut: tokio::sync::watch::Receiver<bool>,
}

impl ObserveLayer {
    /// Calls still running when `cut` turns true are answered UNAVAILABLE.
    pub fn new(cut: tokio::sync::watch::Receiver<bool>) -> Self {
        Self { cut }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            cut: self.cut.clone(),
        }
    }
}

/// The observing service.
#[derive(Clone, Debug)]
pub struct Observe<S> {
    inner: S,
    cut: tokio::sync::watch::Receiver<bool>,
}

impl<S, B> Service<http::Request<B>> for Observe<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let details = crate::telemetry::call_details_wanted();
        // Timed only where a histogram or a span reads the time: two clock reads a call.
        let started = (details || crate::telemetry::metrics::installed()).then(Instant::now);
        let methods = Methods::get();
        let method = methods.of(request.uri().path());
        let heard = Heard::read(request.headers());
        let request_id = RequestId::from_header(heard.request_id);
        let deadline = heard
            .timeout
            .and_then(|value| parse_grpc_timeout(value.as_bytes()));
        let traceparent = heard.traceparent;
        let mut outcome = Outcome {
            methods,
            method,
            started,
            deadline,
            span: None,
            code: None,
        };
        let cut = self.cut.clone();
        if !details {
            // No span: the labels ride along for the rare line the call logs.
            let trace_id = traceparent
                .then(|| crate::telemetry::otel::callers_trace_id(request.headers()))
                .flatten();
            let labels = CallLabels::new(methods.labels[method], request_id, trace_id);
            // Making the inner future may log: authentication answers a remembered
            // verdict, or refuses, at once.
            let answered = labels.during(|| self.inner.call(request));
            return Box::pin(labels.scope(Answer::new(answered, cut, outcome, None)));
        }
        let span = call_span(methods.labels[method], &request_id, request.headers());
        let answered = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        outcome.span = Some(span.clone());
        Box::pin(Answer::new(answered, cut, outcome, Some(request_id)).instrument(span))
    }
}

pin_project_lite::pin_project! {
    /// Waits for the inner service's answer (or the drain's cut), records its code, and
    /// echoes the request id: `always_echo` (a call with a span, whose id is in every line
    /// and trace), else the caller's always and ours when the call failed or logged a line
    /// with it: when there is something to look it up by.
    ///
    /// Until the call is answered, `outcome` counts a call that goes away (the caller
    /// cancelled, its deadline passed) as such when it is dropped.
    ///
    /// A future of its own rather than an `async fn` around `select!`: the wait for the cut
    /// is made (boxed) only by a call that has to wait at all, so the future of a call
    /// answered at once, every warm or garbage Introspect, is a third the size to build and
    /// move.
    struct Answer<F> {
        #[pin]
        answered: F,
        cut: Option<tokio::sync::watch::Receiver<bool>>,
        waiting: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
        outcome: Option<Outcome>,
        always_echo: Option<RequestId>,
    }
}

impl<F> Answer<F> {
    fn new(
        answered: F,
        cut: tokio::sync::watch::Receiver<bool>,
        outcome: Outcome,
        always_echo: Option<RequestId>,
    ) -> Self {
        Self {
            answered,
            cut: Some(cut),
            waiting: None,
            outcome: Some(outcome),
            always_echo,
        }
    }
}

impl<F, E> Future for Answer<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let mut response = match this.answered.poll(cx) {
            Poll::Ready(Ok(response)) => response,
            Poll::Ready(Err(err)) => {
                // Recorded now, as cancelled or past its deadline.
                drop(this.outcome.take());
                return Poll::Ready(Err(err));
            }
            Poll::Pending => {
                let waiting = this.waiting.get_or_insert_with(|| {
                    let cut = this.cut.take();
                    Box::pin(async move {
                        if let Some(mut cut) = cut {
                            // A closed channel cuts too: its server is gone.
                            let _ = cut.wait_for(|cut| *cut).await;
                        }
                    })
                });
                if waiting.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                tonic::Status::unavailable("tokend is shutting down; retry elsewhere").into_http()
            }
        };
        // tonic puts a handler's error in the response head (trailers-only); a success has
        // its status in the trailers, and every tokend method is unary, so a head without
        // one is OK (the streaming health Watch and reflection count as OK). Found by a scan
        // of the head (one or two headers) rather than `get`, which hashes the name.
        let status = response
            .headers()
            .iter()
            .find_map(|(name, value)| (name == GRPC_STATUS).then_some(value));
        let code = match status {
            None => 0,
            Some(value) => std::str::from_utf8(value.as_bytes())
                .ok()
                .and_then(|value| value.parse::<usize>().ok())
                .filter(|code| *code < CODES.len())
                .unwrap_or(UNKNOWN),
        };
        if let Some(mut outcome) = this.outcome.take() {
            outcome.code = Some(code);
        }
        let echo = this
            .always_echo
            .take()
            .or_else(|| call::worth_echoing(code != 0));
        if let Some(request_id) = echo {
            response
                .headers_mut()
                .insert(REQUEST_ID, request_id.to_header());
        }
        Poll::Ready(Ok(response))
    }
}

const UNKNOWN: usize = 2;
const CANCELLED: usize = 1;
const DEADLINE_EXCEEDED: usize = 4;

/// Records a call when its future ends, answered or not.
struct Outcome {
    methods: &'static Methods,
    method: usize,
    /// When the call began, if anything reads its duration: the metrics recorder, the span.
    started: Option<Instant>,
    deadline: Option<std::time::Duration>,
    /// The call's span, if it has one.
    span: Option<tracing::Span>,
    code: Option<usize>,
}

impl Drop for Outcome {
    fn drop(&mut self) {
        let Some(started) = self.started else {
            return;
        };
        let elapsed = started.elapsed();
        let code = self.code.unwrap_or_else(|| {
            if self.deadline.is_some_and(|deadline| elapsed >= deadline) {
                DEADLINE_EXCEEDED
            } else {
                CANCELLED
            }
        });
        self.methods
            .record(self.method, code, elapsed.as_secs_f64());
        let Some(span) = &self.span else {
            return;
        };
        // In the logs OK needs no mark (a record costs the formatter a re-render of the
        // span's fields); an exported span always carries its code.
        if code != 0 || crate::telemetry::otel::exporting() {
            span.record("code", CODES[code]);
        }
        if SERVER_FAULTS.contains(&code) {
            span.record("otel.status_code", "ERROR");
        }
    }
}

/// `grpc-timeout`: up to eight digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(value: &[u8]) -> Option<std::time::Duration> {
    let (unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    use std::time::Duration;
    Some(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
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
    fn grpc_timeouts_parse_and_nonsense_does_not() {
        use std::time::Duration;
        assert_eq!(
            parse_grpc_timeout(b"250m"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_grpc_timeout(b"3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout(b"m"), None);
        assert_eq!(parse_grpc_timeout(b"123456789m"), None);
        assert_eq!(parse_grpc_timeout(b"12x"), None);
    }
}
