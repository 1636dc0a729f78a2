//! A load generator for both tiers: HTTP against the gateway, Open Inference Protocol gRPC against a model server.
//! Closed loop (`--concurrency`, like siege's `-c`) or open loop (`--rate`), with a siege-like report from HDR
//! histograms, or JSON.

pub mod cli;
pub mod error;
pub mod grpc;
pub mod report;
pub mod run;
pub mod serve;
pub mod target;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use oip_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use reqwest::Method;
use reqwest::header::HeaderValue;

use crate::cli::{Command, LoadArgs};
use crate::error::LoadError;
use crate::report::Report;
use crate::serve::Folder;
use crate::target::{HttpRequest, Target};

/// Prepares the target a command names, runs its load and returns the report. `Serve` is not a load: the caller
/// handles it.
pub async fn execute(command: Command) -> Result<(Report, bool), LoadError> {
    match command {
        Command::Test { gateway, load } => {
            let url = join(&gateway.gateway, "test")?;
            let requests = vec![HttpRequest {
                method: Method::GET,
                url: url.clone(),
                content_type: None,
                body: Bytes::new(),
                name: None,
            }];
            http(requests, &load, format!("GET {url}")).await
        }
        Command::PredictUrl {
            gateway,
            route,
            image_urls,
            serve_dir,
            serve_addr,
            load,
        } => {
            let url = join(&gateway.gateway, &route.route)?;
            // Keep the folder server alive for the whole run.
            let mut _server = None;
            let image_urls = match serve_dir {
                Some(dir) => {
                    let folder = Folder::load(&dir)?;
                    let names = folder.names();
                    let (addr, task) = folder.serve(serve_addr).await?;
                    _server = Some(AbortOnDrop(task));
                    names.iter().map(|n| format!("http://{addr}/{n}")).collect()
                }
                None => image_urls,
            };
            let requests = image_urls
                .iter()
                .map(|image| HttpRequest {
                    method: Method::POST,
                    url: url.clone(),
                    content_type: Some(HeaderValue::from_static("application/json")),
                    body: Bytes::from(serde_json::json!({ "url": image }).to_string()),
                    name: None,
                })
                .collect();
            let label = format!("POST {url} by URL, {} image(s)", image_urls.len());
            http(requests, &load, label).await
        }
        Command::PredictUpload {
            gateway,
            route,
            images,
            load,
        } => {
            let url = join(&gateway.gateway, &route.route)?;
            let files = serve::image_files(&images)?;
            let requests = files
                .iter()
                .map(|path| upload(url.clone(), path))
                .collect::<Result<Vec<_>, _>>()?;
            let label = format!("POST {url} upload, {} image(s)", files.len());
            http(requests, &load, label).await
        }
        Command::Grpc {
            server,
            model,
            model_version,
            image,
            batch,
            load,
        } => {
            let endpoint = tonic::transport::Endpoint::from_shared(server.clone())
                .map_err(|e| LoadError::Input(format!("bad --server {server:?}: {e}")))?
                .timeout(load.timeout);
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| LoadError::Target(format!("cannot connect to {server}: {e}")))?;
            let mut client = GrpcInferenceServiceClient::new(channel)
                .max_decoding_message_size(64 * 1024 * 1024)
                .max_encoding_message_size(64 * 1024 * 1024);
            let batch =
                usize::try_from(batch).map_err(|_| LoadError::Input("--batch too large".into()))?;
            let prepared =
                grpc::prepare(&mut client, &model, &model_version, &image, batch).await?;
            let target = Target::Grpc {
                client,
                request: Arc::new(prepared.request),
                expected_output_elements: prepared.expected_output_elements,
            };
            let label = format!("gRPC ModelInfer {server} {model}, batch {batch}");
            Ok((run::run(target, load.plan(), label).await, load.json))
        }
        Command::Mixed {
            gateway,
            images,
            serve_addr,
            load,
        } => {
            let folder = Folder::load(&images)?;
            let names = folder.names();
            let (addr, task) = folder.serve(serve_addr).await?;
            let _server = AbortOnDrop(task);
            let requests = mix(&gateway.gateway, &images, &names, addr)?;
            let label = format!(
                "mixed traffic on {}, {} kinds of request in turn",
                gateway.gateway,
                requests.len()
            );
            http(requests, &load, label).await
        }
        Command::Serve { .. } => Err(LoadError::Input("serve runs no load".into())),
    }
}

/// The soak mix, one request of each kind in turn: what a service sees all day, with the requests it must refuse
/// without harm. Named, so the report counts `bad_image:http_422` apart from a real failure.
fn mix(
    gateway: &str,
    images: &Path,
    names: &[String],
    served: std::net::SocketAddr,
) -> Result<Vec<HttpRequest>, LoadError> {
    let (predict, detect) = (join(gateway, "predict")?, join(gateway, "detect")?);
    let by_url = |name: &'static str, url: String| HttpRequest {
        method: Method::POST,
        url: predict.clone(),
        content_type: Some(HeaderValue::from_static("application/json")),
        body: Bytes::from(serde_json::json!({ "url": url }).to_string()),
        name: Some(name),
    };
    let named = |name: &'static str, request: HttpRequest| HttpRequest {
        name: Some(name),
        ..request
    };
    let files = serve::image_files(images)?;
    let (first, last) = (&files[0], &files[files.len() - 1]);
    let (not_an_image_type, not_an_image) =
        target::multipart_body("image", "broken.jpg", b"these bytes are not an image");
    Ok(vec![
        HttpRequest {
            method: Method::GET,
            url: join(gateway, "test")?,
            content_type: None,
            body: Bytes::new(),
            name: Some("test"),
        },
        named("upload", upload(predict.clone(), first)?),
        by_url("url", format!("http://{served}/{}", names[0])),
        named("detect", upload(detect, last)?),
        named("upload", upload(predict.clone(), last)?),
        by_url("url", format!("http://{served}/{}", names[names.len() - 1])),
        named(
            "bad_image",
            HttpRequest {
                method: Method::POST,
                url: predict.clone(),
                content_type: Some(not_an_image_type),
                body: not_an_image,
                name: None,
            },
        ),
        by_url("url_missing", format!("http://{served}/no-such-image.jpg")),
        by_url("url_stall", format!("http://{served}/{}", serve::STALL)),
    ])
}

/// Aborts a background task when the run that needed it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn join(base: &str, path: &str) -> Result<reqwest::Url, LoadError> {
    let base = if base.ends_with('/') {
        base.to_owned()
    } else {
        format!("{base}/")
    };
    reqwest::Url::parse(&base)
        .and_then(|b| b.join(path))
        .map_err(|e| LoadError::Input(format!("bad gateway URL {base:?}: {e}")))
}

fn upload(url: reqwest::Url, path: &Path) -> Result<HttpRequest, LoadError> {
    let data = std::fs::read(path)
        .map_err(|e| LoadError::Input(format!("cannot read {}: {e}", path.display())))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("image");
    let (content_type, body) = target::multipart_body("image", name, &data);
    Ok(HttpRequest {
        method: Method::POST,
        url,
        content_type: Some(content_type),
        body,
        name: None,
    })
}

async fn http(
    requests: Vec<HttpRequest>,
    load: &LoadArgs,
    label: String,
) -> Result<(Report, bool), LoadError> {
    let plan = load.plan();
    // https URLs need a TLS provider; a second install (tests) is refused harmlessly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(plan.concurrency)
        .timeout(load.timeout)
        .build()
        .map_err(|e| LoadError::Input(format!("cannot build the HTTP client: {e}")))?;
    let target = Target::Http {
        client,
        requests: requests.into(),
    };
    Ok((run::run(target, plan, label).await, load.json))
}
