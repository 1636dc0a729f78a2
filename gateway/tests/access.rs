//! API keys at the gateway, with the real binary: 401 without a valid key, 429 with `Retry-After` over a key's
//! rate, the open routes open, `/metrics` moved to `--metrics-listen`, counts by key name, no key text in the logs
//! or the metrics, and the key file read again when it changes and on SIGHUP.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::stack::{ModelServer, http_client, wait_for_readyz, wait_for_status};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

const ALICE: &str = "alice-key-7c1f0e9a2b44d8";
const BOB: &str = "bob-key-0d3e5a9c71f2b6";
const CAROL: &str = "carol-key-5b8e2d4f6a1c93";
/// Sent as a key but in no file: it must not reach the logs either.
const WRONG: &str = "wrong-key-93a1c4e7d2b05f";

/// A gateway process with its log lines, killed when dropped.
struct Gateway {
    child: Child,
    url: String,
    metrics_url: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Gateway {
    async fn start(model_server: &ModelServer, keys: &Path, check_secs: &str) -> Gateway {
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--model-server",
                &format!("http://{}", model_server.addr),
                "--inference-timeout-ms",
                "120000",
                "--api-keys-file",
                keys.to_str().unwrap(),
                "--api-keys-check-secs",
                check_secs,
                "--metrics-listen",
                &format!("127.0.0.1:{metrics_port}"),
                "--json-logs",
            ])
            .env("RUST_LOG", "debug")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (found, address) = tokio::sync::oneshot::channel();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let kept = log.clone();
        tokio::spawn(async move {
            let mut found = Some(found);
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line)
                    && entry["fields"]["message"] == "gateway listening"
                    && let Some(found) = found.take()
                {
                    let _ = found.send(entry["fields"]["address"].as_str().unwrap().to_owned());
                }
                kept.lock().unwrap().push(line);
            }
        });
        let address = tokio::time::timeout(Duration::from_secs(30), address)
            .await
            .expect("the gateway did not start listening")
            .expect("the gateway exited before listening");
        Gateway {
            child,
            url: format!("http://{address}"),
            metrics_url: format!("http://127.0.0.1:{metrics_port}/metrics"),
            log,
        }
    }

    /// The text of `--metrics-listen`'s `/metrics`.
    async fn metrics(&self) -> String {
        let response = http_client().get(&self.metrics_url).send().await.unwrap();
        response.text().await.unwrap()
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Sends `signal` (`-HUP`, `-TERM`) to the gateway.
    fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("the gateway has not been reaped");
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }
}

/// A key file in a directory of its own.
fn key_file(text: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("api-keys-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keys");
    std::fs::write(&path, text).unwrap();
    path
}

/// `GET {url}{path}` with `key` as a bearer token, if any: the status, `Retry-After` and the error code.
async fn get(url: &str, path: &str, key: Option<&str>) -> (u16, Option<String>, String) {
    let mut request = http_client().get(format!("{url}{path}"));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: serde_json::Value =
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or_default();
    let code = body["error"]["code"].as_str().unwrap_or("").to_owned();
    (status, retry_after, code)
}

/// Asks `path` with `key` until it answers `status`, or panics after `within`.
async fn wait_for(url: &str, path: &str, key: &str, status: u16, within: Duration) {
    let started = Instant::now();
    loop {
        let (got, ..) = get(url, path, Some(key)).await;
        if got == status {
            return;
        }
        assert!(
            started.elapsed() < within,
            "{path} answered {got}, not {status}, for {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_gate_the_api_rates_apply_and_no_key_text_is_logged_or_counted() {
    let model_server = ModelServer::start("127.0.0.1:0".parse().unwrap()).await;
    let keys = key_file(&format!(
        "# name key rate burst\nalice {ALICE} 50 20\n\nbob {BOB} 0.2 2\n"
    ));
    let gateway = Gateway::start(&model_server, &keys, "1").await;
    let client = http_client();
    let url = gateway.url.as_str();
    // Probes need no key.
    wait_for_readyz(&client, url, 200, Duration::from_secs(300)).await;

    for open in ["/", "/static/app.js", "/healthz", "/openapi.json"] {
        assert_eq!(get(url, open, None).await.0, 200, "{open}");
    }
    for closed in ["/test", "/v1/models", "/no-such-route"] {
        assert_eq!(
            get(url, closed, None).await,
            (401, None, "unauthorized".into()),
            "{closed}"
        );
        assert_eq!(get(url, closed, Some(WRONG)).await.0, 401, "{closed}");
    }
    let response = client.get(format!("{url}/test")).send().await.unwrap();
    assert_eq!(
        response.headers()["www-authenticate"],
        "Bearer realm=\"gateway\""
    );
    let basic = client
        .get(format!("{url}/test"))
        .basic_auth("alice", Some(ALICE))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 401);
    let predict = client
        .post(format!("{url}/predict"))
        .header("content-type", "application/json")
        .body(r#"{"image": ""}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(predict.status(), 401, "a body is not read before the key");

    let answer = client
        .get(format!("{url}/test"))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["predictions"][0]["label"], "espresso", "{answer}");
    assert_eq!(get(url, "/v1/models", Some(ALICE)).await.0, 200);

    // bob: a burst of 2, then one request every 5 s.
    assert_eq!(get(url, "/v1/models", Some(BOB)).await.0, 200);
    assert_eq!(get(url, "/v1/models", Some(BOB)).await.0, 200);
    let (status, retry_after, code) = get(url, "/v1/models", Some(BOB)).await;
    assert_eq!((status, code.as_str()), (429, "rate_limited"));
    let retry_after: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!((4..=5).contains(&retry_after), "Retry-After: {retry_after}");
    // alice's bucket is her own.
    assert_eq!(get(url, "/v1/models", Some(ALICE)).await.0, 200);

    // /metrics moved to its own listener, where it counts by key name.
    assert_eq!(get(url, "/metrics", None).await.0, 404);
    let metrics = gateway.metrics().await;
    for line in [
        "gateway_api_key_requests_total{key=\"alice\",status=\"200\"} 3",
        "gateway_api_key_requests_total{key=\"bob\",status=\"200\"} 2",
        "gateway_api_key_requests_total{key=\"bob\",status=\"429\"} 1",
        "gateway_api_keys 2",
        "gateway_requests_total{route=\"/test\",status=\"401\"} 4",
    ] {
        assert!(metrics.contains(line), "no `{line}` in\n{metrics}");
    }

    // The file changes: carol comes in, bob goes.
    std::fs::write(&keys, format!("alice {ALICE} 50 20\ncarol {CAROL} 10 5\n")).unwrap();
    wait_for(url, "/v1/models", CAROL, 200, Duration::from_secs(10)).await;
    assert_eq!(get(url, "/v1/models", Some(BOB)).await.0, 401);
    // A broken file leaves the keys in use as they were.
    std::fs::write(&keys, format!("alice {ALICE} 50\n")).unwrap();
    let started = Instant::now();
    while !gateway.log().contains("the API key file cannot be used") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the broken file was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(url, "/v1/models", Some(CAROL)).await.0, 200);
    assert_eq!(get(url, "/v1/models", Some(ALICE)).await.0, 200);
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains("gateway_api_key_reload_failures_total 1"),
        "{metrics}"
    );

    let log = gateway.log();
    assert!(
        log.contains(r#""api_key":"alice""#) && log.contains(r#""api_key":"bob""#),
        "requests are not logged with their key's name:\n{log}"
    );
    for secret in [ALICE, BOB, CAROL, WRONG] {
        assert!(!log.contains(secret), "a key's text is in the log");
        assert!(!metrics.contains(secret), "a key's text is in the metrics");
    }
    model_server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reads_the_key_file_again() {
    let model_server = ModelServer::start("127.0.0.1:0".parse().unwrap()).await;
    let keys = key_file(&format!("alice {ALICE} 50 20\n"));
    // No polling: only the signal reads the file again.
    let gateway = Gateway::start(&model_server, &keys, "0").await;
    let url = gateway.url.as_str();
    wait_for_status(
        &http_client(),
        &format!("{url}/healthz"),
        200,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(get(url, "/v1/models", Some(CAROL)).await.0, 401);

    std::fs::write(&keys, format!("alice {ALICE} 50 20\ncarol {CAROL} 10 5\n")).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        get(url, "/v1/models", Some(CAROL)).await.0,
        401,
        "read again without a signal"
    );
    gateway.signal("-HUP");
    wait_for(url, "/v1/models", CAROL, 200, Duration::from_secs(10)).await;
    assert_eq!(get(url, "/v1/models", Some(ALICE)).await.0, 200);
    model_server.stop().await;
}
