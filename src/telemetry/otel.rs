//! OpenTelemetry traces: tokend's request spans exported over OTLP/gRPC, joined to the
//! caller's trace through W3C trace context in the request metadata.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::{SpanContext, TraceContextExt as _, TraceState};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::config::OtelSettings;

/// Whether spans are exported: without an exporter, joining the caller's trace would be
/// work for nothing, so only its id is logged.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// The W3C trace context header, as a constant: a lookup by `&str` parses the name.
const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// How long one export may take before the batch is given up.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The tracer provider for `settings`, or `None` when no endpoint is configured.
pub fn provider(settings: &OtelSettings) -> anyhow::Result<Option<SdkTracerProvider>> {
    let Some(endpoint) = settings.endpoint.as_deref() else {
        return Ok(None);
    };
    let exporter = OnOwnRuntime::new(|| {
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .context("otel.endpoint: cannot build the OTLP exporter")
    })?;
    // A caller that sampled its trace gets our spans in it, one that did not gets none;
    // the ratio decides only for traces that start here.
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(settings.sample_ratio)));
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(settings.service_name.clone())
                .build(),
        )
        .build();
    EXPORTING.store(true, Ordering::Relaxed);
    Ok(Some(provider))
}

/// Whether spans are exported.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Makes `span` part of the caller's trace (W3C `traceparent` in `headers`) and records
/// the trace id on it, so every log line of the call can be matched to the trace.
///
/// The caller is not yet authenticated here: its `tracestate` (up to 32 entries of its own
/// choosing) is dropped rather than carried on every span tokend exports. Which callers
/// may reach the port at all is the network's decision (the chart's NetworkPolicy).
pub fn join_callers_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    let exporting = exporting();
    if !exporting && !headers.contains_key(&TRACEPARENT) {
        return;
    }
    let parent = callers_context(headers);
    if exporting {
        // Without a valid parent this starts a new trace; its id is ours to log.
        let _ = span.set_parent(parent);
        let context = span.context();
        let ours = context.span().span_context().clone();
        if ours.is_valid() {
            span.record("trace_id", tracing::field::display(ours.trace_id()));
        }
    } else {
        let theirs = parent.span().span_context().clone();
        if theirs.is_valid() {
            span.record("trace_id", tracing::field::display(theirs.trace_id()));
        }
    }
}

/// The caller's trace id (W3C `traceparent`), for the log lines of a call without a span.
pub fn callers_trace_id(headers: &http::HeaderMap) -> Option<opentelemetry::trace::TraceId> {
    if !headers.contains_key(&TRACEPARENT) {
        return None;
    }
    let context = callers_context(headers);
    let theirs = context.span().span_context().clone();
    theirs.is_valid().then(|| theirs.trace_id())
}

/// The caller's span as a remote parent, without its `tracestate`; an empty context if
/// it sent none or an invalid one.
fn callers_context(headers: &http::HeaderMap) -> opentelemetry::Context {
    let extracted = TraceContextPropagator::new().extract(&Headers(headers));
    let remote = extracted.span().span_context().clone();
    if remote.is_valid() {
        opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
            remote.trace_id(),
            remote.span_id(),
            remote.trace_flags(),
            true,
            TraceState::default(),
        ))
    } else {
        opentelemetry::Context::new()
    }
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// An exporter driven on a small runtime of its own. The SDK's batch processor exports
/// from a plain thread, where tonic finds no reactor; and the export must not wait on the
/// serving runtime, which is gone by the time the last batch is flushed at shutdown.
#[derive(Debug)]
struct OnOwnRuntime<E> {
    runtime: tokio::runtime::Runtime,
    inner: Arc<E>,
}

impl<E: SpanExporter + 'static> OnOwnRuntime<E> {
    fn new(build: impl FnOnce() -> anyhow::Result<E>) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tokend-otlp")
            .enable_all()
            .build()
            .context("cannot start the OTLP exporter's runtime")?;
        // tonic's lazy channel binds to the runtime it is made in.
        let built = {
            let _entered = runtime.enter();
            build()
        };
        let inner = match built {
            Ok(inner) => inner,
            Err(err) => {
                // Dropping a runtime inside async code panics; this one may be.
                runtime.shutdown_background();
                return Err(err);
            }
        };
        Ok(Self {
            runtime,
            inner: Arc::new(inner),
        })
    }
}

impl<E: SpanExporter + 'static> SpanExporter for OnOwnRuntime<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let inner = Arc::clone(&self.inner);
        let task = self.runtime.spawn(async move { inner.export(batch).await });
        async move {
            match task.await {
                Ok(result) => result,
                Err(err) => Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                    format!("OTLP export task failed: {err}"),
                )),
            }
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}
