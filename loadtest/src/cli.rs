//! The command line: one subcommand per target, the same load options for each.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::run::Plan;

/// Load generator for the gateway (HTTP) and the model server (gRPC): closed or open loop, siege-like report.
#[derive(Debug, Parser)]
#[command(name = "loadtest", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// What to load.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// GET /test on a gateway: its built-in sample image, no fetch.
    Test {
        #[command(flatten)]
        gateway: Gateway,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// POST /predict (or /detect) with {"url": ...} on a gateway, in turn over the URLs given or served.
    PredictUrl {
        #[command(flatten)]
        gateway: Gateway,
        #[command(flatten)]
        route: Route,
        /// Image URLs the gateway fetches (repeat the flag for several).
        #[arg(long = "image-url", required_unless_present = "serve_dir")]
        image_urls: Vec<String>,
        /// Serve this folder's images from loadtest itself and use their URLs.
        #[arg(long, conflicts_with = "image_urls")]
        serve_dir: Option<PathBuf>,
        /// Where to serve `--serve-dir` (a free loopback port by default).
        #[arg(long, default_value = "127.0.0.1:0")]
        serve_addr: SocketAddr,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// POST /predict (or /detect) as a multipart upload, in turn over the images of a file or folder.
    PredictUpload {
        #[command(flatten)]
        gateway: Gateway,
        #[command(flatten)]
        route: Route,
        /// An image file, or a folder of them.
        #[arg(long)]
        images: PathBuf,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// ModelInfer on an Open Inference Protocol server, with an image resized to the model's input.
    Grpc {
        /// The model server.
        #[arg(long, env = "LOADTEST_SERVER", default_value = "http://127.0.0.1:8001")]
        server: String,
        /// Model name.
        #[arg(long, default_value = "efficientnet-lite0")]
        model: String,
        /// Model version; empty for the server's choice.
        #[arg(long, default_value = "")]
        model_version: String,
        /// Image to send (any format the `image` crate reads).
        #[arg(long)]
        image: PathBuf,
        /// Images per request.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
        batch: u64,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// The soak mix on a gateway, one of each in turn: GET /test; uploads to /predict and /detect; predict by URL
    /// from images served by loadtest; and requests to be refused without harm, counted under their own names:
    /// bytes that are no image (`bad_image`, 422), a URL that answers 404 (`url_missing`, 502) and one that never
    /// answers (`url_stall`, 504 after the gateway's fetch timeout).
    Mixed {
        #[command(flatten)]
        gateway: Gateway,
        /// A folder of images, uploaded and served for the URLs.
        #[arg(long)]
        images: PathBuf,
        /// Where to serve them (a free loopback port by default).
        #[arg(long, default_value = "127.0.0.1:0")]
        serve_addr: SocketAddr,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Only serve a folder of images over HTTP until interrupted, for other load tools.
    Serve {
        /// The folder.
        #[arg(long)]
        dir: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        addr: SocketAddr,
    },
}

/// The gateway to load.
#[derive(Debug, Args)]
pub struct Gateway {
    /// Base URL of the gateway.
    #[arg(
        long,
        env = "LOADTEST_GATEWAY",
        default_value = "http://127.0.0.1:8080"
    )]
    pub gateway: String,
}

/// Which of the gateway's image routes to load.
#[derive(Debug, Args)]
pub struct Route {
    /// `predict` (the classifier) or `detect` (the detector).
    #[arg(long, default_value = "predict", value_parser = ["predict", "detect"])]
    pub route: String,
}

/// How much load, for how long, and how to report it.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Closed loop: workers each sending a request when their last one is answered. With --rate: the most
    /// requests outstanding at once.
    #[arg(short = 'c', long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub concurrency: u64,
    /// Open loop: requests per second, on a fixed schedule (`200` or `200/s`); latency counts from each
    /// request's scheduled time.
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Measured time: `30s`, `500ms`, `2m`.
    #[arg(short = 't', long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Stop after this many measured requests, if that comes first.
    #[arg(short = 'r', long)]
    pub requests: Option<u64>,
    /// Load sent before measuring, left out of the report.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Longest wait for one answer; a longer one counts as a `timeout` error.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    pub json: bool,
}

impl LoadArgs {
    /// The run these options describe.
    pub fn plan(&self) -> Plan {
        Plan {
            concurrency: usize::try_from(self.concurrency).unwrap_or(usize::MAX),
            rate: self.rate,
            duration: self.duration,
            requests: self.requests,
            warmup: self.warmup,
            timeout: self.timeout,
        }
    }
}

/// `500ms`, `30s`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 30s, 2m"))?;
    let seconds = match unit {
        "ms" => value / 1e3,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {text:?} (use ms, s, m or h)"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

/// `200` or `200/s`, more than zero.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let number = text.trim().trim_end_matches("/s");
    match number.parse::<f64>() {
        Ok(rate) if rate > 0.0 && rate.is_finite() => Ok(rate),
        _ => Err(format!("{text:?} is not a rate like 200 or 200/s")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_the_usual_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn rates_accept_a_per_second_suffix() {
        assert_eq!(parse_rate("200/s"), Ok(200.0));
        assert_eq!(parse_rate("12.5"), Ok(12.5));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
    }
}
