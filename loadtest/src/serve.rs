//! Serves a folder of images over HTTP on loopback, so a gateway has URLs to fetch that cost no network.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;

use crate::error::LoadError;

/// Files a folder server answers with, read into memory once.
#[derive(Debug, Clone)]
pub struct Folder {
    files: Arc<HashMap<String, (Bytes, &'static str)>>,
}

/// Image file extensions served, with their media types.
fn media_type(path: &Path) -> Option<&'static str> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    Some(match ext.as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "bmp" => "image/bmp",
        _ => return None,
    })
}

/// The image files of a folder (or the one file named), sorted by name.
pub fn image_files(path: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let read = |e| LoadError::Input(format!("cannot read {}: {e}", path.display()));
    if path.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(read)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && media_type(p).is_some())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(LoadError::Input(format!(
            "{} has no image files (.jpg, .jpeg, .png, .webp, .gif, .bmp)",
            path.display()
        )));
    }
    Ok(files)
}

impl Folder {
    /// Reads every image file of `dir`.
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        let mut files = HashMap::new();
        for path in image_files(dir)? {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| {
                    LoadError::Input(format!("{} has no UTF-8 file name", path.display()))
                })?
                .to_owned();
            let data = std::fs::read(&path)
                .map_err(|e| LoadError::Input(format!("cannot read {}: {e}", path.display())))?;
            let media = media_type(&path).unwrap_or("application/octet-stream");
            files.insert(name, (Bytes::from(data), media));
        }
        Ok(Self {
            files: Arc::new(files),
        })
    }

    /// The served file names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.files.keys().cloned().collect();
        names.sort();
        names
    }

    /// Binds `addr` and serves until the task is dropped; returns the bound address.
    pub async fn serve(
        self,
        addr: SocketAddr,
    ) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), LoadError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| LoadError::Input(format!("cannot listen on {addr}: {e}")))?;
        let bound = listener
            .local_addr()
            .map_err(|e| LoadError::Input(format!("cannot read the bound address: {e}")))?;
        let app = Router::new()
            .route(&format!("/{STALL}"), get(stall))
            .route("/{name}", get(file))
            .with_state(self);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok((bound, task))
    }
}

/// The path of a URL that is accepted and never answered: the fetcher's timeout must end it.
pub const STALL: &str = "stall";

/// Holds the request far beyond any sane fetch timeout; the client giving up drops it.
async fn stall() -> Response {
    tokio::time::sleep(std::time::Duration::from_secs(120)).await;
    (StatusCode::SERVICE_UNAVAILABLE, "stalled\n").into_response()
}

async fn file(State(folder): State<Folder>, UrlPath(name): UrlPath<String>) -> Response {
    match folder.files.get(&name) {
        Some((data, media)) => ([(header::CONTENT_TYPE, *media)], data.clone()).into_response(),
        None => (StatusCode::NOT_FOUND, "no such file\n").into_response(),
    }
}
