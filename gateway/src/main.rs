//! The gateway binary: parse the configuration, connect the model tier, serve until SIGTERM or Ctrl-C.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use gateway::Config;
use gateway::model_client::{ClientOptions, GrpcModelClient, SystemResolver};
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(
    name = "gateway",
    version,
    about = "HTTP gateway in front of an Open Inference Protocol model server"
)]
struct Cli {
    #[command(flatten)]
    config: Config,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Asks a running gateway whether it is ready (GET /readyz) and exits 0 only if so.
    /// Container health checks use it: the runtime image has no HTTP client of its own.
    Healthcheck(Probe),
}

#[derive(Debug, Args)]
struct Probe {
    /// URL to ask [default: /readyz on --listen, on loopback when that binds every interface].
    #[arg(long)]
    url: Option<String>,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 3)]
    timeout_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.config;
    if let Some(Command::Healthcheck(probe)) = cli.command {
        let url = probe
            .url
            .unwrap_or_else(|| format!("http://{}/readyz", loopback_for(config.listen)));
        // One line, no backtrace: this is what `docker inspect` shows as the health log.
        if let Err(e) = healthcheck(&url, Duration::from_secs(probe.timeout_secs)).await {
            eprintln!("unhealthy: {e:#}");
            std::process::exit(1);
        }
        return Ok(());
    }
    let telemetry = observability::init("gateway", config.json_logs)?;
    tracing::info!(?config, "starting gateway");
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let options = ClientOptions::from_config(&config)
        .map_err(|e| anyhow::anyhow!("the model tier's address or TLS files: {e}"))?;
    let client = GrpcModelClient::start(options, Arc::new(SystemResolver));
    let result = gateway::run(config, listener, Arc::new(client), shutdown_signal()).await;
    telemetry.shutdown(Duration::from_secs(5)).await;
    result
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

/// Where to reach a server bound to `bind`: an unspecified address means "every interface", loopback included.
fn loopback_for(mut bind: SocketAddr) -> SocketAddr {
    if bind.ip().is_unspecified() {
        bind.set_ip(if bind.is_ipv4() {
            Ipv4Addr::LOCALHOST.into()
        } else {
            Ipv6Addr::LOCALHOST.into()
        });
    }
    bind
}

async fn healthcheck(url: &str, timeout: Duration) -> anyhow::Result<()> {
    // reqwest is built without a default crypto provider; an error means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()?;
    let response = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("no answer from {url}"))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    anyhow::ensure!(status.is_success(), "{url} answered {status}: {body}");
    println!("{url}: {status}");
    Ok(())
}
