//! URL fetching against local test servers: refused addresses are never connected to, redirects are
//! re-checked, bodies are cut off at the limit, and decompression bombs are refused from the header.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Query;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect};
use axum::routing::get;
use axum::serve::ListenerExt;
use common::*;
use futures::StreamExt;
use gateway::fetch::{AllowList, FetchError, FetchLimits, Fetcher, Policy};
use serde_json::json;
use tower::ServiceExt;

/// A local HTTP server counting the TCP connections it accepts.
struct TestServer {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

impl TestServer {
    async fn start(bind: &str) -> std::io::Result<TestServer> {
        let listener = tokio::net::TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        let listener = listener.tap_io(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        tokio::spawn(async move { axum::serve(listener, image_server()).await });
        Ok(TestServer { addr, connections })
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

#[derive(serde::Deserialize)]
struct To {
    to: String,
}

fn image_server() -> Router {
    Router::new()
        .route("/coffee.png", get(|| async { golden_png("coffee") }))
        .route(
            "/redirect",
            get(|Query(To { to }): Query<To>| async move { Redirect::to(&to) }),
        )
        .route(
            "/chain/{n}",
            get(
                |axum::extract::Path(n): axum::extract::Path<u32>| async move {
                    if n == 0 {
                        Redirect::to("/coffee.png")
                    } else {
                        Redirect::to(&format!("/chain/{}", n - 1))
                    }
                },
            ),
        )
        // 4 MiB in 64 KiB chunks, without a Content-Length: only counting while streaming can stop it.
        .route(
            "/endless",
            get(|| async {
                let chunks = futures::stream::iter(
                    (0..64).map(|_| Ok::<_, std::io::Error>(vec![0u8; 64 * 1024])),
                );
                Body::from_stream(chunks)
            }),
        )
        // Announces 100 MB, sends 16 bytes, then stalls: the announcement alone must be enough to refuse.
        .route(
            "/declared-big",
            get(|| async {
                let start = futures::stream::iter([Ok::<_, std::io::Error>(vec![0u8; 16])]);
                let body = Body::from_stream(start.chain(futures::stream::pending()));
                ([(header::CONTENT_LENGTH, "104857600")], body).into_response()
            }),
        )
        .route("/bomb.png", get(|| async { png_header(20_000, 20_000) }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "too late"
            }),
        )
        .route(
            "/missing",
            get(|| async { (StatusCode::NOT_FOUND, "gone") }),
        )
}

fn fetcher(allow: &[&str], max_bytes: usize) -> Fetcher {
    let limits = FetchLimits {
        max_bytes,
        max_redirects: 3,
        connect_timeout: Duration::from_secs(2),
        total_timeout: Duration::from_millis(1500),
    };
    Fetcher::new(
        Policy::new(AllowList::parse(allow.iter().copied()).unwrap()),
        limits,
    )
    .unwrap()
}

fn assert_refused(result: Result<bytes::Bytes, FetchError>, url: &str) {
    match result {
        Err(FetchError::Refused(refused)) => println!("{url}: {refused}"),
        other => panic!("{url}: expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn non_public_addresses_are_refused_without_connecting() {
    let server = TestServer::start("127.0.0.1:0").await.unwrap();
    let port = server.addr.port();
    let fetcher = fetcher(&[], 1 << 20);
    let urls = [
        format!("http://127.0.0.1:{port}/coffee.png"),
        format!("http://localhost:{port}/coffee.png"),
        // The same loopback address in the decimal form some parsers accept.
        format!("http://2130706433:{port}/coffee.png"),
        "http://10.0.0.1/cat.jpg".to_owned(),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://[fd00::1]/cat.jpg".to_owned(),
        "http://0.0.0.0/cat.jpg".to_owned(),
    ];
    for url in &urls {
        assert_refused(fetcher.fetch(url).await, url);
    }
    assert_eq!(
        server.connections(),
        0,
        "a refused address was connected to"
    );
}

#[tokio::test]
async fn ipv6_loopback_is_refused_without_connecting() {
    let fetcher = fetcher(&[], 1 << 20);
    match TestServer::start("[::1]:0").await {
        Ok(server) => {
            let url = format!("http://[::1]:{}/coffee.png", server.addr.port());
            assert_refused(fetcher.fetch(&url).await, &url);
            assert_eq!(server.connections(), 0);
        }
        // No IPv6 on this host: the refusal is still checked, there is just nothing to count.
        Err(_) => assert_refused(
            fetcher.fetch("http://[::1]:8080/").await,
            "http://[::1]:8080/",
        ),
    }
}

#[tokio::test]
async fn allow_listed_server_is_fetched() {
    let server = TestServer::start("127.0.0.1:0").await.unwrap();
    let fetcher = fetcher(&["127.0.0.1"], 1 << 20);
    let bytes = fetcher
        .fetch(&format!("http://{}/coffee.png", server.addr))
        .await
        .unwrap();
    assert_eq!(bytes.as_ref(), golden_png("coffee").as_slice());
    assert!(server.connections() >= 1);
}

#[tokio::test]
async fn redirect_from_allowed_server_to_loopback_is_refused() {
    let allowed = TestServer::start("127.0.0.1:0").await.unwrap();
    let target = TestServer::start("127.0.0.1:0").await.unwrap();
    // The allowed server is allowed by name only, so the loopback address it redirects to is not.
    let fetcher = fetcher(&["localhost"], 1 << 20);
    let url = format!(
        "http://localhost:{}/redirect?to=http://127.0.0.1:{}/coffee.png",
        allowed.addr.port(),
        target.addr.port()
    );
    assert_refused(fetcher.fetch(&url).await, &url);
    assert!(
        allowed.connections() >= 1,
        "the allowed server should have been asked"
    );
    assert_eq!(
        target.connections(),
        0,
        "the redirect target was connected to"
    );

    // Without the redirect, the allowed name works.
    let direct = format!("http://localhost:{}/coffee.png", allowed.addr.port());
    assert!(fetcher.fetch(&direct).await.is_ok());
}

#[tokio::test]
async fn at_most_three_redirects_are_followed() {
    let server = TestServer::start("127.0.0.1:0").await.unwrap();
    let fetcher = fetcher(&["127.0.0.1"], 1 << 20);
    assert!(
        fetcher
            .fetch(&format!("http://{}/chain/2", server.addr))
            .await
            .is_ok()
    );
    match fetcher
        .fetch(&format!("http://{}/chain/3", server.addr))
        .await
    {
        Err(FetchError::Upstream(message)) => assert!(message.contains("redirects"), "{message}"),
        other => panic!("expected too many redirects, got {other:?}"),
    }
}

#[tokio::test]
async fn body_over_the_limit_is_cut_off() {
    let server = TestServer::start("127.0.0.1:0").await.unwrap();
    let fetcher = fetcher(&["127.0.0.1"], 1 << 20);
    for path in ["/endless", "/declared-big"] {
        match fetcher
            .fetch(&format!("http://{}{path}", server.addr))
            .await
        {
            Err(FetchError::TooLarge { limit }) => assert_eq!(limit, 1 << 20),
            other => panic!("{path}: expected too large, got {other:?}"),
        }
    }
}

async fn predict_url(flags: &[&str], url: &str) -> (u16, serde_json::Value) {
    let fake = Arc::new(FakeModel::new());
    let app = app_with(fake.clone(), flags);
    let response = app
        .oneshot(post_json(json!({ "url": url }).to_string()))
        .await
        .unwrap();
    let (status, _, body) = json_of(response).await;
    if status != 200 {
        assert!(
            fake.seen.lock().unwrap().is_empty(),
            "the model was called for a failed fetch"
        );
    }
    (status, body)
}

#[tokio::test]
async fn predict_by_url_maps_fetch_failures_to_http() {
    let server = TestServer::start("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", server.addr);
    let allow = [
        "--fetch-allow",
        "127.0.0.1",
        "--max-image-bytes",
        "1048576",
        "--fetch-connect-timeout-ms",
        "200",
        "--fetch-timeout-ms",
        "500",
    ];
    let (status, body) = predict_url(&allow, &format!("{base}/coffee.png")).await;
    assert_eq!(status, 200, "{body}");

    let cases = [
        ("/endless", 413, "image_too_large"),
        ("/bomb.png", 413, "image_too_large"),
        ("/slow", 504, "fetch_timeout"),
        ("/missing", 502, "fetch_failed"),
    ];
    for (path, status, code) in cases {
        let (got, body) = predict_url(&allow, &format!("{base}{path}")).await;
        assert_eq!(
            (got, body["error"]["code"].as_str().unwrap()),
            (status, code),
            "{path}: {body}"
        );
    }

    let before = server.connections();
    let (status, body) = predict_url(&[], &format!("{base}/coffee.png")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str().unwrap()),
        (403, "url_refused")
    );
    assert_eq!(server.connections(), before);
}

#[test]
fn bomb_header_is_refused_by_the_decoder_before_decoding() {
    let header = png_header(20_000, 20_000);
    let started = std::time::Instant::now();
    match gateway::decode::decode(&header, 40_000_000) {
        Err(gateway::decode::DecodeError::TooManyPixels { width, height, .. }) => {
            assert_eq!((width, height), (20_000, 20_000))
        }
        other => panic!("expected too many pixels, got {other:?}"),
    }
    // Decoding 400 megapixels would take seconds and 1.2 GB; refusing from the header takes microseconds.
    assert!(started.elapsed() < Duration::from_millis(100));
}
