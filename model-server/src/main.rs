use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use model_server::Config;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

// Each layer's output is a fresh buffer of up to tens of megabytes; glibc's malloc hands such sizes back to the
// OS on free, so every batch paid for page faults and zeroing again. mimalloc keeps them for reuse: batch-8
// inference about 20 % faster here (`cargo bench -p model-server --bench inference`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "model-server", version, about)]
struct Cli {
    /// Without a subcommand: serve.
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: Config,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Asks a running server, over gRPC health, whether it is serving, and exits 0 only if so.
    /// Container health checks use it: the runtime image has no other gRPC client. When the gRPC port serves
    /// TLS (`--tls-cert` is set) it asks the HTTP port's `/v2/health/ready` instead, the same readiness, as the
    /// check has no certificate to show a server that wants one.
    Healthcheck {
        /// Server to ask [default: --grpc-addr, on loopback when that binds every interface].
        #[arg(long)]
        addr: Option<SocketAddr>,
        /// Seconds to wait for connection and answer together.
        #[arg(long, default_value_t = 3)]
        timeout_secs: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.config;
    if let Some(Command::Healthcheck { addr, timeout_secs }) = cli.command {
        let timeout = Duration::from_secs(timeout_secs);
        let result = if config.tls_cert.is_some() {
            let addr = addr.unwrap_or_else(|| loopback_for(config.http_addr));
            http_healthcheck(addr, timeout).await
        } else {
            let addr = addr.unwrap_or_else(|| loopback_for(config.grpc_addr));
            healthcheck(addr, timeout).await
        };
        // One line, no backtrace: this is what `docker inspect` shows as the health log.
        if let Err(e) = result {
            eprintln!("unhealthy: {e:#}");
            std::process::exit(1);
        }
        return Ok(());
    }
    let telemetry = observability::init("model-server", config.json_logs)?;
    tracing::info!(?config, "starting");
    let result = model_server::run(config, model_server::shutdown_signal()).await;
    telemetry.shutdown(Duration::from_secs(5)).await;
    result
}

/// Where to reach a server bound to `bind`: an unspecified address means "every interface", loopback included.
fn loopback_for(bind: SocketAddr) -> SocketAddr {
    match bind {
        SocketAddr::V4(a) if a.ip().is_unspecified() => (Ipv4Addr::LOCALHOST, a.port()).into(),
        SocketAddr::V6(a) if a.ip().is_unspecified() => (Ipv6Addr::LOCALHOST, a.port()).into(),
        other => other,
    }
}

/// Checks the overall health status (service ""), which is SERVING once every model is loaded and warm.
async fn healthcheck(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let probe = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .with_context(|| format!("health check to {addr} failed"))?;
        anyhow::Ok(response.into_inner().status())
    };
    let status = tokio::time::timeout(timeout, probe)
        .await
        .with_context(|| format!("no answer from {addr} within {timeout:?}"))??;
    anyhow::ensure!(
        status == ServingStatus::Serving,
        "{addr} reports {}",
        status.as_str_name()
    );
    println!("{addr}: SERVING");
    Ok(())
}

/// Asks the HTTP port's `/v2/health/ready`, which answers 200 under the same rule as gRPC health.
async fn http_healthcheck(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        let request =
            format!("GET /v2/health/ready HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        let head = String::from_utf8_lossy(&answer);
        let status = head
            .split_whitespace()
            .nth(1)
            .unwrap_or("no status")
            .to_owned();
        anyhow::Ok(status)
    };
    let status = tokio::time::timeout(timeout, probe)
        .await
        .with_context(|| format!("no answer from {addr} within {timeout:?}"))??;
    anyhow::ensure!(status == "200", "{addr}/v2/health/ready answers {status}");
    println!("{addr}: ready");
    Ok(())
}
