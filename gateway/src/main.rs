//! The gateway binary: parse the configuration, connect the model tier, serve until SIGTERM or Ctrl-C.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use gateway::Config;
use gateway::model_client::GrpcModelClient;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    gateway::telemetry::init_telemetry(&config.log_format);
    tracing::info!(?config, "starting gateway");
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let client = GrpcModelClient::connect_lazy(&config.model_server, config.inference_timeout())
        .with_context(|| format!("invalid --model-server address {}", config.model_server))?;
    gateway::run(config, listener, Arc::new(client), shutdown_signal()).await
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
    tracing::info!("shutting down: finishing requests in flight");
}
