//! Distributed tracing across both tiers, with the real binaries: spans reach an OTLP/gRPC receiver run by the
//! test, joined to the caller's W3C `traceparent`; with no exporter configured nothing connects anywhere and
//! nothing is logged about it.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::stack::{http_client, model_repository, wait_for_readyz};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use serde_json::Value as Json;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// One span as received, with the service that sent it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    instance: Option<String>,
    name: String,
    trace_id: String,
    span_id: String,
    parent_id: String,
}

/// An OTLP/gRPC trace receiver, as a collector would run it.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Received>>>);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn string_attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    })
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let attributes = resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default();
            let service = string_attribute(&attributes, "service.name").unwrap_or_default();
            let instance = string_attribute(&attributes, "service.instance.id");
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                received.push(Received {
                    service: service.clone(),
                    instance: instance.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_id: hex(&span.parent_span_id),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    async fn start() -> (Receiver, SocketAddr) {
        let receiver = Receiver::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (receiver, addr)
    }

    fn spans(&self) -> Vec<Received> {
        self.0.lock().unwrap().clone()
    }
}

/// A server binary running with JSON logs, its log lines collected.
struct Process {
    child: Child,
    logs: Arc<Mutex<Vec<Json>>>,
}

impl Process {
    /// Starts `binary` with `args` and only the OpenTelemetry variables in `otel` (none inherited), and waits
    /// for the log line `listening`; returns it too.
    async fn start(
        binary: PathBuf,
        args: &[&str],
        otel: &[(&str, String)],
        listening: &str,
    ) -> (Process, Json) {
        let mut command = Command::new(&binary);
        command.args(args).args(["--json-logs"]);
        for (name, _) in std::env::vars() {
            if name.starts_with("OTEL_") {
                command.env_remove(name);
            }
        }
        command
            .envs(otel.iter().map(|(k, v)| (*k, v)))
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "{}: {e}; `cargo test --workspace` builds it",
                binary.display()
            )
        });
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (found, wanted) = tokio::sync::oneshot::channel();
        let collected = logs.clone();
        let message = listening.to_owned();
        tokio::spawn(async move {
            let mut found = Some(found);
            while let Ok(Some(line)) = lines.next_line().await {
                // A line that is not JSON is kept as a string: it has no level, so the checks show it.
                let log = serde_json::from_str(&line).unwrap_or(Json::String(line));
                if log["fields"]["message"] == message.as_str()
                    && let Some(found) = found.take()
                {
                    let _ = found.send(log.clone());
                }
                collected.lock().unwrap().push(log);
            }
        });
        let line = tokio::time::timeout(Duration::from_secs(60), wanted)
            .await
            .unwrap_or_else(|_| panic!("{} did not log {listening:?}", binary.display()))
            .unwrap_or_else(|_| panic!("{} exited before listening", binary.display()));
        (Process { child, logs }, line)
    }

    /// SIGTERM, then the exit status; spans still buffered are sent on the way out.
    async fn stop(mut self) -> Vec<Json> {
        let pid = self.child.id().expect("running");
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("exits after SIGTERM")
            .unwrap();
        assert!(status.success(), "{status}");
        // The reader task may still hold the last lines for a moment.
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.logs.lock().unwrap().clone()
    }
}

/// Both tiers, the gateway in front of the model server, exporting to `otel`. Returns the gateway URL.
async fn start_both(otel: &[(&str, String)]) -> (Process, Process, String) {
    let gateway_bin = PathBuf::from(env!("CARGO_BIN_EXE_gateway"));
    let repository = model_repository();
    let (model_server, line) = Process::start(
        gateway_bin.with_file_name("model-server"),
        &[
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--threads",
            "1",
            "--model-repository",
            repository.to_str().unwrap(),
        ],
        otel,
        "gRPC server listening",
    )
    .await;
    let model_url = format!("http://{}", line["fields"]["addr"].as_str().unwrap());
    let (gateway, line) = Process::start(
        gateway_bin,
        &[
            "--listen",
            "127.0.0.1:0",
            "--model-server",
            &model_url,
            "--inference-timeout-ms",
            "120000",
        ],
        otel,
        "gateway listening",
    )
    .await;
    let url = format!("http://{}", line["fields"]["address"].as_str().unwrap());
    wait_for_readyz(&http_client(), &url, 200, Duration::from_secs(300)).await;
    (model_server, gateway, url)
}

/// One `GET /test` with the caller's trace context.
async fn traced_test_request(url: &str) -> String {
    let response = http_client()
        .get(format!("{url}/test"))
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

/// Both binaries start processes: one test at a time keeps two cores from timing anything out.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_holds_the_callers_parent_the_gateway_phases_and_the_model_servers_queue_and_compute()
 {
    let _serial = serial().await;
    let (receiver, addr) = Receiver::start().await;
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}")),
        // Send spans every 100 ms rather than every 5 s, so the test does not wait.
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
    ];
    let (model_server, gateway, url) = start_both(&otel).await;
    let request_id = traced_test_request(&url).await;

    let wanted = [
        ("gateway", "request"),
        ("gateway", "decode"),
        ("gateway", "preprocess"),
        ("gateway", "model_call"),
        ("model-server", "model_infer"),
        ("model-server", "queue"),
        ("model-server", "compute"),
    ];
    let started = Instant::now();
    let spans: HashMap<(String, String), Received> = loop {
        let spans: HashMap<_, _> = receiver
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == TRACE_ID)
            .map(|s| ((s.service.clone(), s.name.clone()), s))
            .collect();
        if wanted
            .iter()
            .all(|(service, name)| spans.contains_key(&(service.to_string(), name.to_string())))
        {
            break spans;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "spans of trace {TRACE_ID} so far: {:#?}\nall: {:#?}",
            spans.keys().collect::<Vec<_>>(),
            receiver.spans()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let span = |service: &str, name: &str| &spans[&(service.to_owned(), name.to_owned())];
    let request = span("gateway", "request");
    assert_eq!(
        request.parent_id, PARENT_ID,
        "the gateway joins the caller's trace"
    );
    for phase in ["decode", "preprocess", "model_call"] {
        assert_eq!(span("gateway", phase).parent_id, request.span_id, "{phase}");
    }
    let infer = span("model-server", "model_infer");
    assert_eq!(
        infer.parent_id,
        span("gateway", "model_call").span_id,
        "the model server's span is a child of the gateway's call to it"
    );
    for name in ["queue", "compute"] {
        assert_eq!(
            span("model-server", name).parent_id,
            infer.span_id,
            "{name}"
        );
    }
    assert!(
        spans.values().all(|s| s.instance.is_some()),
        "every span says which replica sent it"
    );

    let gateway_logs = gateway.stop().await;
    model_server.stop().await;
    // The gateway's log line of that request carries both ids.
    let line = gateway_logs
        .iter()
        .find(|l| {
            l["fields"]["message"] == "request finished"
                && l["span"]["request_id"] == request_id.as_str()
        })
        .unwrap_or_else(|| panic!("no log line of request {request_id}: {gateway_logs:#?}"));
    assert_eq!(line["span"]["trace_id"], TRACE_ID, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_is_exported_attempted_or_logged() {
    let _serial = serial().await;
    // Where an exporter would go by default when no endpoint is given.
    let default_port = tokio::net::TcpListener::bind("127.0.0.1:4317")
        .await
        .expect("port 4317 (the OTLP default) must be free for this test");
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        while default_port.accept().await.is_ok() {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    // Unset, and set but empty (as compose passes an unset variable through): both mean off.
    for otel in [vec![], vec![("OTEL_EXPORTER_OTLP_ENDPOINT", String::new())]] {
        let (model_server, gateway, url) = start_both(&otel).await;
        let request_id = traced_test_request(&url).await;
        // Longer than the exporter's schedule, then a shutdown, which would flush.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut logs = gateway.stop().await;
        logs.extend(model_server.stop().await);
        let noisy: Vec<_> = logs
            .iter()
            .filter(|l| l["level"] != "INFO" && l["level"] != "DEBUG" && l["level"] != "TRACE")
            .collect();
        assert!(noisy.is_empty(), "{otel:?}: {noisy:#?}");
        // Trace ids still reach the logs: the caller's trace is joined even when nothing is exported.
        assert!(
            logs.iter()
                .any(|l| l["span"]["request_id"] == request_id.as_str()
                    && l["span"]["trace_id"] == TRACE_ID)
        );
    }
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 0);
}
