//! The Prometheus endpoint: one process-wide recorder behind the `metrics` facade, and a
//! small HTTP/1 server answering `GET /metrics` in the text format.
//!
//! Without an endpoint no recorder is installed and every `metrics::` call is a no-op, so
//! the hot path pays nothing for metrics nobody reads.

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

/// Histogram buckets of call latencies, seconds: a warm Introspect is tens of
/// microseconds, an argon2 verification tens of milliseconds, a slow database seconds.
const LATENCY_BUCKETS: [f64; 16] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 5.0,
];

/// Histograms are drained into their buckets this often even when nobody scrapes, so their
/// memory stays bounded.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Scrape connections served at once; more are closed on arrival.
const MAX_CONNECTIONS: usize = 8;

/// The longest a scrape connection may stay open.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Whether tokend's recorder was installed: without it nothing reads a call's duration.
pub fn installed() -> bool {
    HANDLE.get().is_some()
}

/// The process-wide recorder, installed on first use. If the embedding program installed
/// its own recorder first, tokend's series go there and this endpoint serves none.
pub fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
                // Only an empty bucket list is refused; the constant is not empty.
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed; /metrics serves none");
            }
            describe();
            handle
        })
        .clone()
}

/// Gauges read when scraped rather than kept up to date on every change.
pub type Sampler = Arc<dyn Fn() + Send + Sync>;

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, sample: Sampler, shutdown: impl Future<Output = ()>) {
    let handle = handle();
    let upkeep = {
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(UPKEEP_EVERY);
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        })
    };
    tokio::pin!(shutdown);
    // A scraper or two, not a crowd: the port is for Prometheus, and a client that never
    // reads its answer must not pin tasks and rendered bodies forever.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors, say: spinning on it would not help.
                    tracing::debug!(error = %err, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let (handle, sample) = (handle.clone(), Arc::clone(&sample));
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |request: Request<Incoming>| {
                let answer = answer(&request, &handle, &sample);
                async move { Ok::<_, Infallible>(answer) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::debug!(error = %err, "metrics: connection failed"),
                Err(_) => tracing::debug!("metrics: connection timed out"),
            }
        });
    }
    upkeep.abort();
}

fn answer(
    request: &Request<Incoming>,
    handle: &PrometheusHandle,
    sample: &Sampler,
) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => {
            sample();
            (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                handle.render(),
            )
        }
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "metrics are at /metrics\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = http::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    response
}

/// HELP lines: what each series means, for whoever builds the dashboard.
fn describe() {
    describe_counter!(
        "tokend_grpc_requests_total",
        "gRPC calls answered, by method and status code"
    );
    describe_histogram!(
        "tokend_grpc_request_duration_seconds",
        Unit::Seconds,
        "time from a call's arrival to its response, by method and status code"
    );
    describe_counter!(
        "tokend_introspect_total",
        "Introspect verdicts: result active, or inactive with its reason"
    );
    describe_counter!(
        "tokend_introspect_redecisions_total",
        "Introspect decisions made again before answering active, by cause (touched, untrusted, outlived)"
    );
    describe_counter!(
        "tokend_cache_lookups_total",
        "live-state cache lookups by result (hit, miss, stale)"
    );
    describe_counter!(
        "tokend_verified_cache_total",
        "verified-secret cache lookups by result (hit, miss, rejected)"
    );
    describe_gauge!(
        "tokend_cache_entries",
        "entries held by the Introspect caches, by cache"
    );
    describe_counter!(
        "tokend_cache_invalidations_total",
        "cache invalidations applied (local writes and the change feed)"
    );
    describe_gauge!(
        "tokend_cache_trusted",
        "1 while the caches are trusted (the change feed is up), else 0"
    );
    describe_counter!(
        "tokend_argon2_verifications_total",
        "argon2 verifications run"
    );
    describe_histogram!(
        "tokend_argon2_verify_duration_seconds",
        Unit::Seconds,
        "time of one argon2 verification, queueing included"
    );
    describe_gauge!(
        "tokend_change_feed_listening",
        "1 while this replica's LISTEN connection is up (PostgreSQL), else 0"
    );
    describe_histogram!(
        "tokend_invalidation_lag_seconds",
        Unit::Seconds,
        "round trip of this replica's heartbeat NOTIFY back to its own listener: how late \
         a change notification arrives"
    );
    describe_counter!(
        "tokend_change_feed_forged_total",
        "messages on the control channel whose signature did not verify (another database \
         role NOTIFYing, or a replica with another key), ignored"
    );
    describe_counter!(
        "tokend_change_feed_ack_timeouts_total",
        "writes that waited out the lease because not every replica acknowledged their \
         fence (a replica stopped or slow, or this replica's feed down)"
    );
    describe_counter!(
        "tokend_change_feed_losses_total",
        "times the change feed was lost (connection or heartbeat)"
    );
    describe_counter!(
        "tokend_change_feed_backstop_total",
        "changes found by the polling backstop that no notification delivered"
    );
    describe_gauge!(
        "tokend_db_pool_connections",
        "database pool connections, by state (idle, in_use) and the configured max"
    );
    describe_gauge!(
        "tokend_last_used_pending",
        "tokens whose last use waits for the next flush"
    );
    describe_counter!(
        "tokend_last_used_flushed_total",
        "last_used_at values written"
    );
    describe_histogram!(
        "tokend_last_used_flush_duration_seconds",
        Unit::Seconds,
        "time of one last-used flush"
    );
    describe_counter!(
        "tokend_last_used_flush_failures_total",
        "last-used flushes that failed (retried on the next round)"
    );
}
