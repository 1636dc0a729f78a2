//! Logging and distributed tracing for both tiers: the `tracing` subscriber (`RUST_LOG` filter, text or JSON
//! lines, colour only at a terminal), OpenTelemetry spans exported over OTLP/gRPC when the standard `OTEL_*` variables ask for it, and W3C
//! trace context read from HTTP headers and carried in gRPC metadata.

mod context;

use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::SpanExporter;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub use context::{inject_grpc, set_parent_from_grpc, set_parent_from_http};

/// Why logging or tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OTLP exporter refused its configuration (endpoint, headers, timeout).
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// A global subscriber was installed already.
    #[error("installing the tracing subscriber: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
}

/// Where spans go, from the standard OpenTelemetry environment variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Export {
    /// No endpoint is set (or export is turned off): spans get ids for logs and propagation, and go nowhere.
    Off,
    /// OTLP/gRPC to this endpoint.
    Otlp(String),
}

impl Export {
    /// Reads `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, then `OTEL_EXPORTER_OTLP_ENDPOINT`; an empty value counts as
    /// unset, and `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn export off.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let set = |name: &str| {
            var(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        if set("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || set("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
        {
            return Export::Off;
        }
        set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .map_or(Export::Off, Export::Otlp)
    }
}

/// Owns the span pipeline; [`Telemetry::shutdown`] sends the spans still buffered.
pub struct Telemetry {
    provider: SdkTracerProvider,
    export: Export,
}

/// Installs the global subscriber and propagator for the service `service` (the default `service.name`;
/// `OTEL_SERVICE_NAME` wins). Must run inside a tokio runtime: the span exporter lives on it.
pub fn init(service: &'static str, json: bool) -> Result<Telemetry, Error> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let export = Export::from_env();
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none_or(|v| v.is_empty()) {
        resource = resource.with_service_name(service);
    }
    // Which replica served a request: the pod or container name.
    if let Some(host) = hostname() {
        resource = resource.with_attribute(KeyValue::new("service.instance.id", host));
    }
    let mut provider = SdkTracerProvider::builder().with_resource(resource.build());
    if let Export::Otlp(_) = export {
        // The exporter reads the endpoint, headers, timeout and compression from the OTEL_* variables itself.
        let exporter = SpanExporter::builder().with_tonic().build()?;
        provider = provider.with_span_processor(
            BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build(),
        );
    }
    let provider = provider.build();
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer(service));
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = if json {
        tracing_subscriber::fmt::layer().json().boxed()
    } else {
        // Colour codes help a person at a terminal and garble a file, a pipe or a log collector; NO_COLOR
        // (no-color.org) turns them off at a terminal too.
        let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        tracing_subscriber::fmt::layer().with_ansi(colour).boxed()
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()?;
    match &export {
        Export::Otlp(endpoint) => tracing::info!(%endpoint, "exporting spans over OTLP/gRPC"),
        Export::Off => tracing::debug!("no OTLP endpoint set; spans are not exported"),
    }
    Ok(Telemetry { provider, export })
}

impl Telemetry {
    /// Where spans go.
    pub fn export(&self) -> &Export {
        &self.export
    }

    /// Sends the spans still buffered, waiting at most `timeout`.
    pub async fn shutdown(self, timeout: Duration) {
        if self.export == Export::Off {
            return;
        }
        // The SDK blocks the calling thread until the exporter task has finished: not on an async worker.
        let provider = self.provider;
        let flushed =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(timeout)).await;
        if let Ok(Err(e)) = flushed {
            tracing::warn!(error = %e, "could not send the last spans");
        }
    }
}

fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::Export;

    fn export(vars: &[(&str, &str)]) -> Export {
        Export::from_vars(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn export_follows_the_standard_variables() {
        let on = Export::Otlp("http://collector:4317".into());
        assert_eq!(export(&[]), Export::Off);
        assert_eq!(export(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")]), Export::Off);
        assert_eq!(
            export(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "  ")]),
            Export::Off
        );
        assert_eq!(
            export(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")]),
            on
        );
        assert_eq!(
            export(&[(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://collector:4317"
            )]),
            on
        );
        assert_eq!(
            export(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://other:4317"),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://collector:4317"
                )
            ]),
            on
        );
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            assert_eq!(
                export(&[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
                    off
                ]),
                Export::Off
            );
        }
    }
}
