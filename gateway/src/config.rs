//! Command-line and environment configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::fetch::AllowList;
use crate::preprocess::Recipe;

/// Gateway configuration: every flag can also be set through the environment variable named after it.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "gateway",
    version,
    about = "HTTP gateway in front of an Open Inference Protocol model server"
)]
pub struct Config {
    /// Address the HTTP server listens on.
    #[arg(long, env = "LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// gRPC address of the model tier (Open Inference Protocol): `http://host:port`, or several,
    /// comma-separated. Each name is resolved again every discovery interval and every address it
    /// resolves to (one per replica behind a headless Service or a scaled compose service) gets its
    /// own connection.
    #[arg(long, env = "MODEL_SERVER", default_value = "http://localhost:8001")]
    pub model_server: String,

    /// PEM CA certificates that sign the model servers' certificates: with it the gateway speaks TLS to the
    /// model tier, and only to servers whose certificate holds `--model-server-tls-name`.
    #[arg(long, env = "MODEL_SERVER_CA")]
    pub model_server_ca: Option<PathBuf>,

    /// The name the model servers' certificates must hold [default: the host of the first
    /// `--model-server` address]. Connections go to each replica's address, so the name is checked apart.
    #[arg(long, env = "MODEL_SERVER_TLS_NAME", requires = "model_server_ca")]
    pub model_server_tls_name: Option<String>,

    /// PEM client certificate shown to model servers that require one (mutual TLS); with
    /// `--model-server-client-key`.
    #[arg(long, env = "MODEL_SERVER_CLIENT_CERT", requires_all = ["model_server_client_key", "model_server_ca"])]
    pub model_server_client_cert: Option<PathBuf>,

    /// PEM private key of `--model-server-client-cert`.
    #[arg(
        long,
        env = "MODEL_SERVER_CLIENT_KEY",
        requires = "model_server_client_cert"
    )]
    pub model_server_client_key: Option<PathBuf>,

    /// How often the model-server names are resolved again, in milliseconds: new replicas get traffic
    /// within one interval, removed ones are drained.
    #[arg(long, env = "DISCOVERY_INTERVAL_MS", default_value_t = 5_000)]
    pub discovery_interval_ms: u64,

    /// Attempts per model-tier call, the first included. A call that failed with UNAVAILABLE or a lost
    /// connection is tried again on another replica, within the same deadline.
    #[arg(long, env = "MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,

    /// Retries allowed, as a percentage of model-tier calls over the last 10 seconds (plus 5 per second).
    #[arg(long, env = "RETRY_BUDGET_PERCENT", default_value_t = 20.0)]
    pub retry_budget_percent: f32,

    /// Consecutive connection failures or UNAVAILABLE answers after which a replica gets no traffic
    /// for the cool-down.
    #[arg(long, env = "EJECT_AFTER_FAILURES", default_value_t = 3)]
    pub eject_after_failures: u32,

    /// How long an ejected replica gets no traffic, in milliseconds.
    #[arg(long, env = "EJECT_COOL_DOWN_MS", default_value_t = 10_000)]
    pub eject_cool_down_ms: u64,

    /// After SIGTERM, how long requests in flight may take to finish before the gateway exits anyway,
    /// in seconds.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 20)]
    pub shutdown_grace_secs: u64,

    /// Model used when a request names none.
    #[arg(long, env = "DEFAULT_MODEL", default_value = "efficientnet-lite0")]
    pub default_model: String,

    /// Detector used when a detect request names none.
    #[arg(long, env = "DEFAULT_DETECTION_MODEL", default_value = "yolov3-tiny")]
    pub default_detection_model: String,

    /// Model version used when a predict request names none (a positive integer); empty follows the newest
    /// version the model tier serves, taking up a new one within the metadata TTL.
    #[arg(long, env = "MODEL_VERSION", default_value = "")]
    pub model_version: String,

    /// Number of predictions returned when a request does not say.
    #[arg(long, env = "DEFAULT_TOP_K", default_value_t = 5)]
    pub default_top_k: u32,

    /// Deadline for one call to the model tier, in milliseconds.
    #[arg(long, env = "INFERENCE_TIMEOUT_MS", default_value_t = 10_000)]
    pub inference_timeout_ms: u64,

    /// How long model metadata (input name, size, datatype, newest version) is cached, in seconds.
    #[arg(long, env = "METADATA_TTL_SECS", default_value_t = 60)]
    pub metadata_ttl_secs: u64,

    /// Preprocessing recipe for models without their own: `center-crop` (224/256 of the short side, then
    /// bicubic resize), `center-crop:FRACTION`, or `resize` (whole image, aspect ratio not kept).
    #[arg(long, env = "DEFAULT_RECIPE", default_value = "center-crop")]
    pub default_recipe: Recipe,

    /// Per-model recipes as `MODEL=RECIPE`, comma-separated (e.g. `mobilenet=resize`).
    #[arg(long = "model-recipe", env = "MODEL_RECIPES", value_delimiter = ',', value_parser = parse_model_recipe)]
    pub model_recipes: Vec<(String, Recipe)>,

    /// Largest image accepted, in bytes, whether fetched, uploaded or sent as base64.
    #[arg(long, env = "MAX_IMAGE_BYTES", default_value_t = 20 * 1024 * 1024)]
    pub max_image_bytes: usize,

    /// Images one predict or detect request may carry (a JSON `images` list or several multipart `image`
    /// fields); they are fetched and prepared at once and sent to the model tier in as few calls as its
    /// `max_batch_size` allows, side by side.
    #[arg(long, env = "MAX_IMAGES_PER_REQUEST", default_value_t = 16)]
    pub max_images_per_request: usize,

    /// Largest decoded image accepted, in pixels (width x height), checked from the header before decoding.
    #[arg(long, env = "MAX_IMAGE_PIXELS", default_value_t = 40_000_000)]
    pub max_image_pixels: u64,

    /// Images decoded and resized at once; the CPU work is bounded by this. 0 means one per CPU core.
    #[arg(long, env = "MAX_CONCURRENT_IMAGES", default_value_t = 0)]
    pub max_concurrent_images: usize,

    /// Predict requests in flight before new ones are turned away with 429.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = 256)]
    pub max_in_flight: usize,

    /// Timeout for connecting to an image URL, in milliseconds.
    #[arg(long, env = "FETCH_CONNECT_TIMEOUT_MS", default_value_t = 3_000)]
    pub fetch_connect_timeout_ms: u64,

    /// Timeout for a whole image download, redirects included, in milliseconds.
    #[arg(long, env = "FETCH_TIMEOUT_MS", default_value_t = 15_000)]
    pub fetch_timeout_ms: u64,

    /// Redirects followed when fetching an image URL; each target is checked again.
    #[arg(long, env = "FETCH_MAX_REDIRECTS", default_value_t = 3)]
    pub fetch_max_redirects: usize,

    /// Hosts and networks image URLs may point to even though they are private, loopback or link-local:
    /// comma-separated CIDRs (`10.1.0.0/16`), addresses, host names (`images.internal`) or suffixes
    /// (`*.svc.cluster.local`). Empty by default: only public addresses are fetched.
    #[arg(long, env = "FETCH_ALLOW", value_delimiter = ',', default_value = "")]
    pub fetch_allow: Vec<String>,

    /// Origins whose browser apps may call the gateway (CORS): comma-separated `scheme://host[:port]`
    /// (`https://app.example.com`), or `*` for any. Empty by default: browsers then allow only the gateway's
    /// own page.
    #[arg(long, env = "CORS_ALLOW_ORIGIN", value_delimiter = ',', value_parser = parse_origin)]
    pub cors_allow_origin: Vec<String>,

    /// File of API keys, one `NAME KEY RATE BURST` per line; when set, every route but the page, the probes,
    /// `/metrics` and `/openapi.json` needs `Authorization: Bearer KEY`.
    #[arg(long, env = "API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// Seconds between checks of the API key file for changes; 0 reads it again on SIGHUP only.
    #[arg(long, env = "API_KEYS_CHECK_SECS", default_value_t = 2)]
    pub api_keys_check_secs: u64,

    /// Serve `/metrics` on this address instead of the main one, so it need not face the internet.
    #[arg(long, env = "METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Write logs as JSON lines instead of human-readable text.
    #[arg(long, env = "JSON_LOGS")]
    pub json_logs: bool,
}

impl Config {
    /// Checks the rules that span several fields and builds the parsed allow-list.
    pub fn validate(&self) -> anyhow::Result<AllowList> {
        anyhow::ensure!(self.default_top_k > 0, "--default-top-k must be at least 1");
        anyhow::ensure!(self.max_in_flight > 0, "--max-in-flight must be at least 1");
        anyhow::ensure!(self.max_attempts > 0, "--max-attempts must be at least 1");
        anyhow::ensure!(
            self.discovery_interval_ms > 0,
            "--discovery-interval-ms must be at least 1"
        );
        anyhow::ensure!(
            (0.0..=100.0).contains(&self.retry_budget_percent),
            "--retry-budget-percent must be between 0 and 100"
        );
        anyhow::ensure!(
            self.eject_after_failures > 0,
            "--eject-after-failures must be at least 1"
        );
        anyhow::ensure!(
            self.model_version.is_empty()
                || crate::model_client::parse_version(&self.model_version).is_some(),
            "--model-version must be empty or a positive integer such as 2, got `{}`",
            self.model_version
        );
        anyhow::ensure!(
            self.cors_allow_origin.len() <= 1 || !self.cors_allow_origin.iter().any(|o| o == "*"),
            "--cors-allow-origin: `*` allows every origin, so list it alone"
        );
        if let Err(e) = crate::model_client::Target::parse_list(&self.model_server) {
            anyhow::bail!("--model-server: {e}");
        }
        anyhow::ensure!(
            self.max_image_bytes > 0,
            "--max-image-bytes must be at least 1"
        );
        anyhow::ensure!(
            self.max_images_per_request > 0,
            "--max-images-per-request must be at least 1"
        );
        anyhow::ensure!(
            self.fetch_timeout_ms >= self.fetch_connect_timeout_ms,
            "--fetch-timeout-ms must not be shorter than --fetch-connect-timeout-ms"
        );
        AllowList::parse(self.fetch_allow.iter().map(String::as_str))
    }

    /// Recipe for `model`: its own if configured, else the default.
    pub fn recipe_for(&self, model: &str) -> Recipe {
        self.model_recipes
            .iter()
            .rev()
            .find(|(name, _)| name == model)
            .map_or(self.default_recipe, |(_, recipe)| *recipe)
    }

    /// Images processed at once, resolving 0 to the number of CPU cores.
    pub fn concurrent_images(&self) -> usize {
        if self.max_concurrent_images > 0 {
            self.max_concurrent_images
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        }
    }

    /// How long in-flight requests may take to finish after SIGTERM.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// Model-tier call deadline.
    pub fn inference_timeout(&self) -> Duration {
        Duration::from_millis(self.inference_timeout_ms)
    }
}

/// An origin exactly as a browser sends it in `Origin` (no path, no trailing slash), or `*`.
fn parse_origin(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s == "*" {
        return Ok(s.to_owned());
    }
    let url = reqwest::Url::parse(s)
        .map_err(|e| format!("`{s}` is not an origin such as https://app.example.com: {e}"))?;
    let origin = url.origin().ascii_serialization();
    if !matches!(url.scheme(), "http" | "https") || origin == "null" {
        return Err(format!(
            "`{s}` is not an http or https origin such as https://app.example.com"
        ));
    }
    if origin != s {
        return Err(format!(
            "`{s}` is not an origin as browsers send it (scheme://host[:port], no path): did you mean `{origin}`?"
        ));
    }
    Ok(origin)
}

fn parse_model_recipe(s: &str) -> Result<(String, Recipe), String> {
    let (model, recipe) = s
        .split_once('=')
        .ok_or_else(|| format!("expected MODEL=RECIPE, got `{s}`"))?;
    Ok((model.trim().to_owned(), recipe.trim().parse()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cors_origins_are_checked_as_browsers_send_them() {
        let config = Config::try_parse_from([
            "gateway",
            "--cors-allow-origin",
            "https://app.example.com,http://localhost:3000",
        ])
        .unwrap();
        assert_eq!(
            config.cors_allow_origin,
            ["https://app.example.com", "http://localhost:3000"]
        );
        config.validate().unwrap();
        for bad in [
            "https://app.example.com/",
            "https://app.example.com/page",
            "app.example.com",
            "ftp://files.example.com",
        ] {
            let err = Config::try_parse_from(["gateway", "--cors-allow-origin", bad]).unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
        let err =
            Config::try_parse_from(["gateway", "--cors-allow-origin", "https://a.example.com/"])
                .unwrap_err();
        assert!(
            err.to_string()
                .contains("did you mean `https://a.example.com`"),
            "{err}"
        );
        let both =
            Config::try_parse_from(["gateway", "--cors-allow-origin", "*,https://a.example.com"])
                .unwrap();
        assert!(both.validate().is_err());
    }

    #[test]
    fn defaults_work_without_flags() {
        let config = Config::try_parse_from(["gateway"]).unwrap();
        assert_eq!(config.listen.port(), 8080);
        assert_eq!(config.model_server, "http://localhost:8001");
        assert_eq!(config.default_model, "efficientnet-lite0");
        assert_eq!(config.default_detection_model, "yolov3-tiny");
        assert_eq!(config.max_images_per_request, 16);
        assert!(config.validate().unwrap().is_empty());
        assert_eq!(
            config.recipe_for("efficientnet-lite0"),
            Recipe::CenterCrop { fraction: 0.875 }
        );
    }

    #[test]
    fn per_model_recipe_overrides_default() {
        let config = Config::try_parse_from([
            "gateway",
            "--model-recipe",
            "a=resize,b=center-crop:0.5",
            "--fetch-allow",
            "10.0.0.0/8,images.internal",
        ])
        .unwrap();
        assert_eq!(config.recipe_for("a"), Recipe::Resize);
        assert_eq!(config.recipe_for("b"), Recipe::CenterCrop { fraction: 0.5 });
        assert_eq!(
            config.recipe_for("c"),
            Recipe::CenterCrop { fraction: 0.875 }
        );
        assert!(!config.validate().unwrap().is_empty());
    }

    #[test]
    fn model_version_is_empty_or_a_positive_integer() {
        let parsed = |v: &str| {
            Config::try_parse_from(["gateway".to_owned(), format!("--model-version={v}")]).unwrap()
        };
        assert!(parsed("2").validate().is_ok());
        assert!(parsed("").validate().is_ok());
        for bad in ["0", "v2", "-1", "latest"] {
            assert!(parsed(bad).validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_model_recipe_is_rejected() {
        assert!(Config::try_parse_from(["gateway", "--model-recipe", "a=sharpen"]).is_err());
        assert!(Config::try_parse_from(["gateway", "--model-recipe", "resize"]).is_err());
    }
}
