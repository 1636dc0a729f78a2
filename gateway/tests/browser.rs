//! Headless Chromium opens the upload page, uploads a photo, and the page shows the expected label; in its
//! "Detect objects" mode it draws the detector's boxes over the photo.
//! Needs Debian's `chromium` and `chromium-driver` packages; a screenshot is saved under
//! `target/test-artifacts/`.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::stack::*;
use common::*;
use fantoccini::{ClientBuilder, Locator};
use serde_json::json;

/// chromedriver on a free port, killed when dropped.
struct ChromeDriver {
    child: Child,
    url: String,
}

impl ChromeDriver {
    fn start() -> ChromeDriver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start chromedriver ({e}): install Debian's chromium and chromium-driver"
                )
            });
        ChromeDriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn artifacts_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Chooses `photo` in the page's file input, which sends it.
async fn choose_file(browser: &fantoccini::Client, photo: &std::path::Path) {
    browser
        .find(Locator::Id("file"))
        .await
        .unwrap()
        .send_keys(photo.to_str().unwrap())
        .await
        .unwrap();
}

/// Saves what the browser shows as `name` among the test artifacts; returns where.
async fn save_screenshot(browser: &fantoccini::Client, name: &str) -> PathBuf {
    let path = artifacts_dir().join(name);
    std::fs::write(&path, browser.screenshot().await.unwrap()).unwrap();
    path
}

/// A headless Chromium session through a chromedriver of its own (kept alive by the first value).
async fn open_browser() -> (ChromeDriver, fantoccini::Client) {
    let driver = ChromeDriver::start();
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({ "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,900"] }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let started = Instant::now();
    let browser = loop {
        match ClientBuilder::new(connector.clone())
            .capabilities(capabilities.clone())
            .connect(&driver.url)
            .await
        {
            Ok(browser) => break browser,
            // chromedriver takes a moment to listen.
            Err(_) if started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no WebDriver session from chromedriver: {e}"),
        }
    };

    (driver, browser)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_upload_shows_the_label() {
    let model_server = ModelServer::start("127.0.0.1:0".parse().unwrap()).await;
    let gateway = Gateway::start(model_server.addr).await;
    wait_for_readyz(&http_client(), &gateway.url, 200, Duration::from_secs(300)).await;

    let (_driver, browser) = open_browser().await;

    browser.goto(&format!("{}/", gateway.url)).await.unwrap();
    assert_eq!(browser.title().await.unwrap(), "Image models");
    let photo = golden_path("chelsea.png").canonicalize().unwrap();
    choose_file(&browser, &photo).await;

    let first_label = browser
        .wait()
        .at_most(Duration::from_secs(120))
        .for_element(Locator::Css("#predictions li:first-child .label"))
        .await
        .unwrap();
    let label = first_label.text().await.unwrap();
    let predictions = browser
        .find_all(Locator::Css("#predictions li"))
        .await
        .unwrap()
        .len();
    let timings = browser
        .find(Locator::Id("timings"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let path = save_screenshot(&browser, "gateway-browser-upload.png").await;
    println!("screenshot: {}", path.display());

    assert_eq!(label, "tiger cat");
    assert_eq!(predictions, 5);
    assert!(timings.contains("inference"), "{timings}");

    // An error is shown in words: a URL the gateway refuses to fetch.
    browser
        .find(Locator::Id("url"))
        .await
        .unwrap()
        .send_keys("http://169.254.169.254/latest/")
        .await
        .unwrap();
    browser
        .find(Locator::Id("url-button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let error = browser
        .wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css("#error:not([hidden])"))
        .await
        .unwrap();
    let message = error.text().await.unwrap();
    save_screenshot(&browser, "gateway-browser-error.png").await;
    assert!(message.contains("cannot be fetched"), "{message}");
    let stale = browser
        .find(Locator::Id("result"))
        .await
        .unwrap()
        .is_displayed()
        .await
        .unwrap();
    assert!(
        !stale,
        "the previous image's results are still shown next to the error"
    );

    browser.close().await.unwrap();
    model_server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_detect_mode_draws_the_boxes_over_the_photo() {
    let model_server = ModelServer::start("127.0.0.1:0".parse().unwrap()).await;
    let gateway = Gateway::start(model_server.addr).await;
    let every_model = format!("http://{}/v2/health/ready", model_server.http_addr);
    wait_for_status(&http_client(), &every_model, 200, Duration::from_secs(300)).await;
    let (_driver, browser) = open_browser().await;

    browser.goto(&format!("{}/", gateway.url)).await.unwrap();
    browser
        .find(Locator::Id("mode-detect"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let photo = yolo_testdata()
        .join("images/camera.png")
        .canonicalize()
        .unwrap();
    choose_file(&browser, &photo).await;
    browser
        .wait()
        .at_most(Duration::from_secs(120))
        .for_element(Locator::Css("#boxes .box"))
        .await
        .unwrap();
    let image = browser.find(Locator::Id("preview")).await.unwrap();
    let (ix, iy, iw, ih) = image.rectangle().await.unwrap();
    let mut drawn = Vec::new();
    for element in browser.find_all(Locator::Css("#boxes .box")).await.unwrap() {
        let tag = element.text().await.unwrap();
        let (x, y, w, h) = element.rectangle().await.unwrap();
        drawn.push((tag, x, y, w, h));
    }
    let listed = browser
        .find_all(Locator::Css("#detections li .label"))
        .await
        .unwrap()
        .len();
    let path = save_screenshot(&browser, "gateway-browser-detect.png").await;
    println!(
        "screenshot: {}; boxes {drawn:?} over the photo at {ix},{iy} {iw}x{ih}",
        path.display()
    );

    // camera.png: two people, as the reference finds them.
    assert_eq!(drawn.len(), 2, "{drawn:?}");
    assert_eq!(listed, 2);
    for (tag, x, y, w, h) in &drawn {
        assert!(tag.starts_with("person "), "{tag}");
        assert!(*w > 10.0 && *h > 10.0, "a box drawn too small: {drawn:?}");
        // Inside the photo as displayed (the border may stick out by its width).
        assert!(
            *x >= ix - 3.0 && *y >= iy - 3.0 && x + w <= ix + iw + 3.0 && y + h <= iy + ih + 3.0,
            "a box outside the photo: {drawn:?}"
        );
    }
    browser.close().await.unwrap();
    model_server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_asks_for_an_api_key_once_and_keeps_it_for_the_session() {
    const KEY: &str = "page-key-4f1e8a2c9d7b3605";
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser-api-keys");
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys");
    std::fs::write(&keys, format!("page {KEY} 100 20\n")).unwrap();
    let model_server = ModelServer::start("127.0.0.1:0".parse().unwrap()).await;
    let gateway = Gateway::start_with(
        model_server.addr,
        &["--api-keys-file", keys.to_str().unwrap()],
    )
    .await;
    wait_for_readyz(&http_client(), &gateway.url, 200, Duration::from_secs(300)).await;
    let (_driver, browser) = open_browser().await;
    browser.goto(&format!("{}/", gateway.url)).await.unwrap();

    // Without a key the gateway answers 401 and the page asks for one.
    let coffee = golden_path("coffee.png").canonicalize().unwrap();
    choose_file(&browser, &coffee).await;
    let error = browser
        .wait()
        .at_most(Duration::from_secs(60))
        .for_element(Locator::Css("#error:not([hidden])"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(error.contains("needs an API key"), "{error}");
    let panel_open = browser
        .find(Locator::Id("key-panel"))
        .await
        .unwrap()
        .attr("open")
        .await
        .unwrap();
    assert!(
        panel_open.is_some(),
        "the key field is not shown after a 401"
    );

    browser
        .find(Locator::Id("api-key"))
        .await
        .unwrap()
        .send_keys(KEY)
        .await
        .unwrap();
    browser
        .find(Locator::Id("api-key-save"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let chelsea = golden_path("chelsea.png").canonicalize().unwrap();
    choose_file(&browser, &chelsea).await;
    let label = first_label(&browser).await;
    assert_eq!(label, "tiger cat");

    // Reloaded, the tab still has the key: no second prompt.
    browser.goto(&format!("{}/", gateway.url)).await.unwrap();
    let state = browser
        .find(Locator::Id("key-state"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(state, "(in use)");
    choose_file(&browser, &coffee).await;
    assert_eq!(first_label(&browser).await, "espresso");
    save_screenshot(&browser, "gateway-browser-api-key.png").await;
    browser.close().await.unwrap();
    model_server.stop().await;
}

/// Waits for the page's first predicted label and returns it.
async fn first_label(browser: &fantoccini::Client) -> String {
    browser
        .wait()
        .at_most(Duration::from_secs(120))
        .for_element(Locator::Css("#predictions li:first-child .label"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
