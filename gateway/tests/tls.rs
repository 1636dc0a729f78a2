//! The gateway in front of a model server that speaks TLS, and mutual TLS: predictions go through with the
//! right CA (and client certificate), and a gateway trusting another CA, or showing no certificate where one
//! is required, is not ready and predicts nothing.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::stack::*;
use serde_json::{Value, json};

/// Certificates made by scripts/make-certs.sh, removed when dropped.
struct Certs(PathBuf);

impl Certs {
    fn make(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("gateway-tls-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-certs.sh");
        let status = std::process::Command::new("bash")
            .arg(script)
            .arg(&dir)
            .status()
            .expect("run make-certs.sh");
        assert!(status.success(), "make-certs.sh failed");
        Self(dir)
    }

    fn path(&self, file: &str) -> String {
        self.0.join(file).to_str().expect("utf-8 path").to_owned()
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A gateway with `flags` before a model server with `server_flags`: whether it got ready, and its answer to
/// one prediction by URL (status and body).
async fn predict_through(server_flags: &[&str], flags: &[&str]) -> (bool, u16, Value) {
    let model_server = ModelServer::start_with(
        "127.0.0.1:0".parse().unwrap(),
        &model_repository(),
        server_flags,
    )
    .await;
    let client = http_client();
    // Readiness of the model server itself, over its plain HTTP port.
    let loaded = format!("http://{}/v2/health/ready", model_server.http_addr);
    wait_for_status(&client, &loaded, 200, Duration::from_secs(300)).await;
    let gateway = Gateway::start_with(model_server.addr, flags).await;
    let mut ready = false;
    for _ in 0..50 {
        let status = client
            .get(format!("{}/readyz", gateway.url))
            .send()
            .await
            .map(|r| r.status().as_u16());
        if status.is_ok_and(|s| s == 200) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let photos = photo_server().await;
    let response = client
        .post(format!("{}/predict", gateway.url))
        .header("content-type", "application/json")
        .body(json!({ "url": format!("{photos}/chelsea.png") }).to_string())
        .send()
        .await
        .expect("predict");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    model_server.stop().await;
    (ready, status, body)
}

fn top_label(body: &Value) -> &str {
    body["predictions"][0]["label"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictions_go_over_tls_to_a_server_of_the_trusted_ca_only() {
    let (certs, other) = (Certs::make("tls"), Certs::make("tls-other"));
    let server = [
        "--tls-cert",
        &certs.path("server.pem"),
        "--tls-key",
        &certs.path("server-key.pem"),
    ];
    let (ready, status, body) =
        predict_through(&server, &["--model-server-ca", &certs.path("ca.pem")]).await;
    assert!(ready && status == 200, "{status} {body}");
    assert_eq!(top_label(&body), "tiger cat", "{body}");

    let (ready, status, body) =
        predict_through(&server, &["--model-server-ca", &other.path("ca.pem")]).await;
    assert!(
        !ready,
        "ready with a CA that did not sign the server's certificate"
    );
    assert!(status >= 500, "{status} {body}");
    let (ready, status, _) = predict_through(&server, &[]).await;
    assert!(!ready && status >= 500, "a plain-text gateway got {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_predicts_with_the_client_certificate_only() {
    let (certs, other) = (Certs::make("mtls"), Certs::make("mtls-other"));
    let server = [
        "--tls-cert",
        &certs.path("server.pem"),
        "--tls-key",
        &certs.path("server-key.pem"),
        "--tls-client-ca",
        &certs.path("ca.pem"),
    ];
    let ca = certs.path("ca.pem");
    let with = |from: &Certs| {
        [
            "--model-server-ca".to_owned(),
            ca.clone(),
            "--model-server-client-cert".to_owned(),
            from.path("client.pem"),
            "--model-server-client-key".to_owned(),
            from.path("client-key.pem"),
        ]
    };
    let flags = with(&certs);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (ready, status, body) = predict_through(&server, &flags).await;
    assert!(ready && status == 200, "{status} {body}");
    assert_eq!(top_label(&body), "tiger cat", "{body}");

    let (ready, status, body) = predict_through(&server, &["--model-server-ca", &ca]).await;
    assert!(
        !ready && status >= 500,
        "without a client certificate: {status} {body}"
    );
    let foreign = with(&other);
    let foreign: Vec<&str> = foreign.iter().map(String::as_str).collect();
    let (ready, status, body) = predict_through(&server, &foreign).await;
    assert!(
        !ready && status >= 500,
        "with another CA's certificate: {status} {body}"
    );
}

#[test]
fn tls_flags_are_checked_at_start() {
    use clap::Parser;
    let refused =
        |flags: &[&str]| gateway::Config::try_parse_from([&["gateway"], flags].concat()).is_err();
    assert!(
        refused(&[
            "--model-server-client-cert",
            "c.pem",
            "--model-server-ca",
            "ca.pem"
        ]),
        "a certificate without its key"
    );
    assert!(
        refused(&[
            "--model-server-client-cert",
            "c.pem",
            "--model-server-client-key",
            "k.pem"
        ]),
        "a client certificate without a CA"
    );
    assert!(
        refused(&["--model-server-tls-name", "x"]),
        "a TLS name without a CA"
    );
    let config =
        gateway::Config::try_parse_from(["gateway", "--model-server-ca", "/nonexistent/ca.pem"])
            .expect("flags");
    let Err(error) = gateway::model_client::ClientOptions::from_config(&config) else {
        panic!("a missing CA file was accepted");
    };
    assert!(
        error.contains("--model-server-ca `/nonexistent/ca.pem`"),
        "{error}"
    );
}
