//! W3C trace context (`traceparent`, `tracestate`) between `tracing` spans and HTTP headers or gRPC metadata.

use opentelemetry::global;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt as _;
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)?.to_str().ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct Metadata<'a>(&'a MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)?.to_str().ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                KeyRef::Ascii(k) => Some(k.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct MetadataMut<'a>(&'a mut MetadataMap);

impl Injector for MetadataMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Makes `span` a child of the trace in `headers`, if they carry a valid `traceparent`; a missing or malformed
/// one leaves `span` the root of a new trace. Either way the trace id goes into the span's `trace_id` field
/// (declare it `tracing::field::Empty`), so every log line inside the span carries it.
pub fn set_parent_from_http(span: &tracing::Span, headers: &http::HeaderMap) {
    let parent = global::get_text_map_propagator(|p| p.extract(&Headers(headers)));
    set_parent(span, parent);
}

/// Makes `span` a child of the trace in gRPC `metadata`, as [`set_parent_from_http`] does.
pub fn set_parent_from_grpc(span: &tracing::Span, metadata: &MetadataMap) {
    let parent = global::get_text_map_propagator(|p| p.extract(&Metadata(metadata)));
    set_parent(span, parent);
}

fn set_parent(span: &tracing::Span, parent: opentelemetry::Context) {
    if parent.span().span_context().is_valid() {
        // Fails only when no OpenTelemetry layer is installed (tests that set no subscriber): nothing to join.
        let _ = span.set_parent(parent);
    }
    if let Some(id) = trace_id(span) {
        span.record("trace_id", id);
    }
}

/// Writes `span`'s trace context into outgoing gRPC `metadata`, so the callee's spans join the trace.
pub fn inject_grpc(span: &tracing::Span, metadata: &mut MetadataMap) {
    let cx = span.context();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut MetadataMut(metadata)));
}

/// The trace id of `span` in hex, when it belongs to a trace.
fn trace_id(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let span_context = cx.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}
