//! Logs, traces and metrics. Request spans carry method, status, tenant, token display id,
//! request id and trace id; never a secret.

pub mod call;
pub mod metrics;
pub mod otel;

use std::io::IsTerminal as _;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::{LogFormat, LogSettings, OtelSettings};

/// Whether a call's span should be given its details (caller, tenant, the introspected
/// token): when spans are exported, or when tokend logs at debug. At info, the lines inside
/// a call are its rare warnings and errors, which carry the method and request id; the
/// details would cost every call a re-render of its span's fields for lines that mostly
/// never come.
pub fn call_details_wanted() -> bool {
    otel::exporting() || tracing::enabled!(target: "tokend::grpc", tracing::Level::DEBUG)
}

/// What must be flushed before the process exits.
#[derive(Debug, Default)]
#[must_use = "dropping it loses the last spans: call shutdown"]
pub struct Telemetry {
    traces: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still queued and stops the exporter. Blocks up to the exporter's
    /// timeout; call it outside the async runtime.
    pub fn shutdown(self) {
        if let Some(traces) = self.traces
            && let Err(err) = traces.shutdown()
        {
            tracing::warn!(error = %err, "could not flush the last spans");
        }
    }
}

/// Installs the global subscriber: log lines on stderr and, with `otel.endpoint`, request
/// spans exported over OTLP. `RUST_LOG` wins over the configured filter. The HTTP/2 and
/// transport internals stay quiet unless asked for by name.
pub fn init(log: &LogSettings, otel: &OtelSettings) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{},h2=warn,hyper=warn,tower=warn,sqlx=warn",
            log.filter
        ))
    });
    // Colour only for people: a file or a pipe gets plain text.
    let ansi = std::io::stderr().is_terminal();
    let lines = match log.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            // The call's span (method, request id, trace id; the caller at debug) on every
            // line; a call without one gets the same `span` object from `call::Labelled`.
            .with_current_span(true)
            .with_span_list(false)
            .with_span_events(FmtSpan::NONE)
            .map_event_format(|format| call::Labelled::new(format, true))
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_span_events(FmtSpan::NONE)
            // The labels are written into a buffer first, which has no colour of its own.
            .map_event_format(|format| call::Labelled::new(format.with_ansi(ansi), false))
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let traces = otel::provider(otel)?;
    // Only tokend's own spans are exported: the exporter's gRPC client is tonic too, and
    // tracing it would feed its own queue.
    let spans = traces.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("tokend"))
            .with_filter(Targets::new().with_target("tokend", tracing::Level::INFO))
    });
    // A second init (tests, embedding) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(lines)
        .with(spans)
        .try_init();
    Ok(Telemetry { traces })
}
