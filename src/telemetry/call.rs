//! What ties a log line to the call it was written in (method, request id, the caller's
//! trace id) when the call has no span.
//!
//! A span per call is the natural carrier, and tokend makes one whenever its details are
//! wanted (spans exported, or logs at debug). At info it is not: the log formatter renders
//! a span's fields when the span is made, and making, entering and closing it cost a warm
//! Introspect about a tenth of its CPU, for the rare warning that would print them. Instead
//! the labels ride in a scoped thread-local, set while the call's future is polled, and
//! [`Labelled`] appends them to any line written meanwhile: the same fields, rendered only
//! when a line is.

use std::cell::Cell;
use std::fmt::{self, Write as _};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

// A reference to the labels, which stay in the call's future, rather than tokio's
// task-local, which moves the labels into the thread's slot and back out on every poll:
// about 300 instructions a call, for lines that are rarely written.
scoped_tls::scoped_thread_local!(static CALL: CallLabels);

/// `f` on the running call's labels, if a call is being polled on this thread.
fn with_call<R>(f: impl FnOnce(&CallLabels) -> R) -> Option<R> {
    CALL.is_set().then(|| CALL.with(f))
}

/// A call's request id: the caller's `x-request-id`, or one of ours.
#[derive(Clone, Debug)]
pub enum RequestId {
    /// As the caller sent it (checked short and printable).
    Callers(http::HeaderValue),
    /// Ours: a random per-process prefix and a counter, rendered only when needed.
    Ours(u64),
}

impl RequestId {
    /// A new id of ours: one atomic increment.
    pub fn ours() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        Self::Ours(COUNTER.fetch_add(1, Ordering::Relaxed))
    }

    /// The caller's id if `value` is fit to log and echo, else a new one.
    pub fn from_header(value: Option<&http::HeaderValue>) -> Self {
        value
            .filter(|value| is_sane(value.as_bytes()))
            .map_or_else(Self::ours, |value| Self::Callers(value.clone()))
    }

    /// Whether the caller chose it.
    pub fn is_callers(&self) -> bool {
        matches!(self, Self::Callers(_))
    }

    /// As a response header value. Marked sensitive: it is unique per call, and HPACK
    /// would otherwise index every one in the connection's table, evicting the entries
    /// that keep the other headers cheap.
    pub fn to_header(&self) -> http::HeaderValue {
        let mut value = match self {
            Self::Callers(value) => value.clone(),
            Self::Ours(n) => http::HeaderValue::from_bytes(&ours(*n))
                .unwrap_or_else(|_| http::HeaderValue::from_static("0")),
        };
        value.set_sensitive(true);
        value
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Callers(value) => f.write_str(value.to_str().unwrap_or_default()),
            Self::Ours(n) => f.write_str(std::str::from_utf8(&ours(*n)).unwrap_or_default()),
        }
    }
}

/// 32 hex digits: the process's random prefix, then the counter.
fn ours(n: u64) -> [u8; 32] {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    let prefix = *PREFIX.get_or_init(rand::random::<u64>);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 32];
    for (i, byte) in prefix
        .to_be_bytes()
        .iter()
        .chain(&n.to_be_bytes())
        .enumerate()
    {
        text[2 * i] = HEX[usize::from(byte >> 4)];
        text[2 * i + 1] = HEX[usize::from(byte & 0xf)];
    }
    text
}

/// A caller's request id is logged and echoed, so it must be short and printable.
fn is_sane(id: &[u8]) -> bool {
    (1..=128).contains(&id.len()) && id.iter().all(u8::is_ascii_graphic)
}

/// The labels of a call without a span.
#[derive(Debug)]
pub struct CallLabels {
    method: &'static str,
    request_id: RequestId,
    trace_id: Option<opentelemetry::trace::TraceId>,
    /// Whether a line was written with them: then the request id is worth echoing.
    logged: Cell<bool>,
}

impl CallLabels {
    /// Labels for a call of `method`.
    pub fn new(
        method: &'static str,
        request_id: RequestId,
        trace_id: Option<opentelemetry::trace::TraceId>,
    ) -> Self {
        Self {
            method,
            request_id,
            trace_id,
            logged: Cell::new(false),
        }
    }

    /// Runs `call` with these labels on every line it logs while it is polled.
    pub fn scope<F: Future>(self, call: F) -> crate::lent::Lent<Self, F> {
        crate::lent::lend(&CALL, self, call)
    }

    /// `f`, with these labels on the lines it logs: the work a call does before its
    /// future is first polled (a layer's `call`).
    pub fn during<R>(&self, f: impl FnOnce() -> R) -> R {
        CALL.set(self, f)
    }
}

/// The running call's request id (inside [`CallLabels::scope`]) if it is worth echoing:
/// the caller's always; ours when the call `failed` or logged a line with it, the cases in
/// which there is something to look it up by.
pub fn worth_echoing(failed: bool) -> Option<RequestId> {
    with_call(|call| {
        (call.request_id.is_callers() || failed || call.logged.get())
            .then(|| call.request_id.clone())
    })
    .flatten()
}

/// An event formatter that appends the running call's labels to each line: in text as
/// `method=… request_id=… trace_id=…` at the end, in JSON as the `span` object a call's
/// span would have given it (or `call`, should a span be current anyway).
#[derive(Debug)]
pub struct Labelled<F> {
    inner: F,
    json: bool,
}

impl<F> Labelled<F> {
    /// Around `inner`, which writes JSON objects if `json`, else text lines.
    pub fn new(inner: F, json: bool) -> Self {
        Self { inner, json }
    }
}

impl<S, N, F> FormatEvent<S, N> for Labelled<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let labels = with_call(|call| (call.method, call.request_id.to_string(), call.trace_id));
        let Some((method, request_id, trace_id)) = labels else {
            return self.inner.format_event(ctx, writer, event);
        };
        // The inner formatter ends the line; the labels go before its end.
        let mut line = String::with_capacity(256);
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let end = if self.json { "}\n" } else { "\n" };
        if !line.ends_with(end) {
            return writer.write_str(&line);
        }
        line.truncate(line.len() - end.len());
        if self.json {
            // The span the JSON formatter prints, if any (an explicit parent or the current
            // one): a second `span` key would make the object ambiguous.
            let key = if ctx.parent_span().is_some() {
                "call"
            } else {
                "span"
            };
            // The request id is the caller's: printable ASCII, but it may hold a quote.
            let quoted = |text: &str| serde_json::to_string(text).unwrap_or_default();
            write!(
                line,
                r#","{key}":{{"name":"grpc","method":{},"request_id":{}"#,
                quoted(method),
                quoted(&request_id),
            )?;
            if let Some(trace_id) = trace_id {
                write!(line, r#","trace_id":"{trace_id}""#)?;
            }
            line.push_str("}}\n");
        } else {
            // A caller's id that a logfmt reader could take for the end of a quoted value
            // or for another field is quoted and escaped.
            if request_id.contains(['"', '\\', '=']) {
                write!(line, " method={method} request_id={request_id:?}")?;
            } else {
                write!(line, " method={method} request_id={request_id}")?;
            }
            if let Some(trace_id) = trace_id {
                write!(line, " trace_id={trace_id}")?;
            }
            line.push('\n');
        }
        // Only a line that carries the id makes it worth echoing.
        with_call(|call| call.logged.set(true));
        writer.write_str(&line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_from_callers_are_bounded_and_printable() {
        assert!(is_sane(b"0f3c-req"));
        assert!(!is_sane(b""));
        assert!(!is_sane(b"has space"));
        assert!(!is_sane(b"line\nbreak"));
        assert!(!is_sane("x".repeat(129).as_bytes()));
        let (a, b) = (RequestId::ours().to_string(), RequestId::ours().to_string());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(RequestId::ours().to_header().len(), 32);
        let callers = http::HeaderValue::from_static("checkout-7f3a");
        let id = RequestId::from_header(Some(&callers));
        assert!(id.is_callers());
        assert_eq!(id.to_string(), "checkout-7f3a");
        let id = RequestId::from_header(Some(&http::HeaderValue::from_static("a b")));
        assert!(!id.is_callers());
    }
}
