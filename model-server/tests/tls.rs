//! gRPC over TLS and mutual TLS, with certificates from scripts/make-certs.sh: predictions go through, and a
//! client that trusts another CA, speaks plain text, or has no client certificate when one is required is refused.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use oip_proto::GrpcInferenceServiceClient;
use oip_proto::inference::model_infer_request::InferInputTensor;
use oip_proto::inference::{ModelInferRequest, ServerReadyRequest};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A directory of certificates made by the script, removed when dropped.
struct Certs(PathBuf);

impl Certs {
    fn make(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tls-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let status = std::process::Command::new("bash")
            .arg(workspace().join("scripts/make-certs.sh"))
            .arg(&dir)
            .status()
            .expect("run make-certs.sh");
        assert!(status.success(), "make-certs.sh failed");
        Self(dir)
    }

    fn path(&self, file: &str) -> String {
        self.0.join(file).to_str().expect("utf-8 path").to_owned()
    }

    fn pem(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.0.join(file)).expect("read PEM")
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How a test client connects.
enum Client<'a> {
    Plain,
    Trusting(&'a Certs),
    WithCertificate { trusts: &'a Certs, from: &'a Certs },
}

async fn connect(server: &TestServer, how: Client<'_>) -> Result<Channel, tonic::transport::Error> {
    let port = server.addr.port();
    let endpoint = match how {
        Client::Plain => Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?,
        Client::Trusting(ca) => Endpoint::from_shared(format!("https://localhost:{port}"))?
            .tls_config(
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca.pem("ca.pem"))),
            )?,
        Client::WithCertificate { trusts, from } => {
            Endpoint::from_shared(format!("https://localhost:{port}"))?.tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(trusts.pem("ca.pem")))
                    .identity(Identity::from_pem(
                        from.pem("client.pem"),
                        from.pem("client-key.pem"),
                    )),
            )?
        }
    };
    endpoint
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// Whether a client connected `how` gets a prediction: the golden photo's class, or the error in words.
async fn predict(server: &TestServer, how: Client<'_>) -> Result<usize, String> {
    let channel = connect(server, how)
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut client = GrpcInferenceServiceClient::new(channel);
    let request = ModelInferRequest {
        model_name: "efficientnet-lite0".into(),
        inputs: vec![InferInputTensor {
            name: "pixels".into(),
            datatype: "UINT8".into(),
            shape: vec![1, 224, 224, 3],
            ..Default::default()
        }],
        raw_input_contents: vec![golden_pixels("chelsea")],
        ..Default::default()
    };
    let answer = client
        .model_infer(request)
        .await
        .map_err(|s| format!("{s:?}"))?;
    let logits: Vec<f32> = answer.into_inner().raw_output_contents[0]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(argmax(&logits))
}

/// Starts a server with `flags` and waits until a client connected `how` sees it ready.
async fn start(flags: &[&str], how: Client<'_>) -> TestServer {
    let server = TestServer::start_with(&model_repository(), flags).await;
    for _ in 0..600 {
        if let Ok(channel) = connect(&server, clone(&how)).await {
            let ready = GrpcInferenceServiceClient::new(channel)
                .server_ready(ServerReadyRequest {})
                .await;
            if ready.is_ok_and(|r| r.into_inner().ready) {
                return server;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the TLS server did not become ready within 60 s");
}

fn clone<'a>(how: &Client<'a>) -> Client<'a> {
    match how {
        Client::Plain => Client::Plain,
        Client::Trusting(c) => Client::Trusting(c),
        Client::WithCertificate { trusts, from } => Client::WithCertificate { trusts, from },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_answers_clients_that_trust_its_ca_only() {
    let (certs, other) = (Certs::make("tls"), Certs::make("tls-other"));
    let flags = [
        "--tls-cert",
        &certs.path("server.pem"),
        "--tls-key",
        &certs.path("server-key.pem"),
    ];
    let server = start(&flags, Client::Trusting(&certs)).await;
    assert_eq!(predict(&server, Client::Trusting(&certs)).await, Ok(282));
    let wrong_ca = predict(&server, Client::Trusting(&other)).await;
    assert!(
        wrong_ca
            .as_ref()
            .is_err_and(|e| e.contains("InvalidCertificate")),
        "a client trusting another CA got {wrong_ca:?}"
    );
    // The container health check, which has no client certificate, asks the plain HTTP port when TLS is on.
    let check = tokio::process::Command::new(env!("CARGO_BIN_EXE_model-server"))
        .args(flags)
        .args(["healthcheck", "--addr", &server.http_addr.to_string()])
        .output()
        .await
        .expect("run the health check");
    let said = String::from_utf8_lossy(&check.stdout).into_owned()
        + &String::from_utf8_lossy(&check.stderr);
    assert!(check.status.success() && said.contains("ready"), "{said}");
    let plain = predict(&server, Client::Plain).await;
    assert!(plain.is_err(), "a plain-text client got {plain:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_a_client_certificate_from_the_clients_ca() {
    let (certs, other) = (Certs::make("mtls"), Certs::make("mtls-other"));
    let flags = [
        "--tls-cert",
        &certs.path("server.pem"),
        "--tls-key",
        &certs.path("server-key.pem"),
        "--tls-client-ca",
        &certs.path("ca.pem"),
    ];
    let with_certificate = Client::WithCertificate {
        trusts: &certs,
        from: &certs,
    };
    let server = start(&flags, clone(&with_certificate)).await;
    assert_eq!(predict(&server, with_certificate).await, Ok(282));
    let without = predict(&server, Client::Trusting(&certs)).await;
    assert!(
        without.is_err(),
        "a client without a certificate got {without:?}"
    );
    let foreign = predict(
        &server,
        Client::WithCertificate {
            trusts: &certs,
            from: &other,
        },
    )
    .await;
    assert!(
        foreign.is_err(),
        "a client certificate of another CA got {foreign:?}"
    );
    server.stop().await;
}

#[test]
fn a_key_without_a_certificate_is_refused_at_start() {
    use clap::Parser;
    let config = model_server::Config::try_parse_from(["model-server", "--tls-key", "k.pem"]);
    let message = config.expect_err("--tls-key alone").to_string();
    assert!(message.contains("--tls-cert"), "{message}");
    let config =
        model_server::Config::try_parse_from(["model-server", "--tls-client-ca", "ca.pem"]);
    assert!(config.is_err(), "--tls-client-ca alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_certificate_stops_the_server_with_its_name() {
    let dir = Path::new("/nonexistent-certs");
    let cert = dir.join("server.pem");
    let key = dir.join("server-key.pem");
    let server = TestServer::start_with(
        &model_repository(),
        &[
            "--tls-cert",
            cert.to_str().expect("path"),
            "--tls-key",
            key.to_str().expect("path"),
        ],
    )
    .await;
    let error = server.exit().await.expect_err("the server must not start");
    assert!(
        format!("{error:#}").contains("--tls-cert `/nonexistent-certs/server.pem`"),
        "{error:#}"
    );
}
