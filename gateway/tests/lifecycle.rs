//! Versions rolled out under load through the whole stack: the real model server, the gateway in front of it,
//! eight clients posting all the time. In `poll` mode versions are published the safe way, corrupted and removed
//! while the clients run; in `explicit` mode the same goes through load calls from `tritonclient` and over HTTP.
//! Not one request may fail, and every answer names the version that gave it.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::load::{Load, Outcome};
use common::stack::{self, Gateway, ModelServer};

const MODEL: &str = "efficientnet-lite0";
const INTERVAL: Duration = Duration::from_secs(1);
/// How long a change may take to show before the test fails. Not a speed target: on a shared two-core
/// machine loading a version can take several poll intervals. The time it took is printed.
const SETTLE: Duration = Duration::from_secs(30);

/// A repository of its own under the temp directory, removed when dropped.
struct Repo(PathBuf);

impl Repo {
    fn new(name: &str) -> Repo {
        let root =
            std::env::temp_dir().join(format!("gateway-lifecycle-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join(MODEL)).unwrap();
        Repo(root)
    }

    fn version(&self, version: u32) -> PathBuf {
        self.0.join(MODEL).join(version.to_string())
    }

    /// Copies the real model in under a temporary name, then renames it into place: the way to publish.
    fn publish(&self, version: u32) {
        let staging = self.0.join(MODEL).join(format!(".incoming-{version}"));
        copy_dir(&stack::model_repository().join(MODEL).join("1"), &staging);
        std::fs::rename(&staging, self.version(version)).unwrap();
    }
}

impl Drop for Repo {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// The model server's index over its HTTP port, as `(version, state, reason)`.
async fn index(client: &reqwest::Client, server: &ModelServer) -> Vec<(String, String, String)> {
    let text = client
        .post(format!("http://{}/v2/repository/index", server.http_addr))
        .body("{}")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    body.as_array()
        .unwrap()
        .iter()
        .filter(|m| m["name"] == MODEL)
        .map(|m| {
            let field = |f: &str| m[f].as_str().unwrap_or_default().to_owned();
            (field("version"), field("state"), field("reason"))
        })
        .collect()
}

/// Waits until the answers that came after the first `from` all name `version`, several in a row; returns how
/// long that took. Earlier answers may still name the version before: they were already queued.
async fn wait_answered_by(load: &Load, from: usize, version: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let outcomes = load.outcomes().await;
        let recent: Vec<&Outcome> = outcomes.iter().skip(from).rev().take(8).collect();
        if recent.len() == 8 && recent.iter().all(|o| o.version.as_deref() == Some(version)) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "answers did not move to version {version} within {within:?}; the last: {:?}",
            recent
                .iter()
                .map(|o| (o.status, o.version.clone()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Version 1 of the model in `repo`, a model server on it with `flags`, and a gateway in front, ready.
async fn start(repo: &Repo, flags: &[&str]) -> (ModelServer, Gateway, reqwest::Client) {
    copy_dir(
        &stack::model_repository().join(MODEL).join("1"),
        &repo.version(1),
    );
    let server = ModelServer::start_with("127.0.0.1:0".parse().unwrap(), &repo.0, flags).await;
    // A short metadata TTL: a new version that serves beside the old one is picked up within a second.
    let gateway = Gateway::start_with(server.addr, &["--metadata-ttl-secs", "1"]).await;
    let client = stack::http_client();
    stack::wait_for_readyz(&client, &gateway.url, 200, Duration::from_secs(120)).await;
    (server, gateway, client)
}

/// Stops the load, prints what it saw, and fails on any request that was not answered with 200.
async fn stop_with_no_failure(load: Load, mode: &str) -> common::load::Report {
    let report = load.stop().await;
    let failures = report.failures();
    println!(
        "{mode}: {} requests at concurrency 8 while versions changed: {} failed; p50 {:?}, p99 {:?}",
        report.outcomes.len(),
        failures.len(),
        report.quantile(200, 0.5),
        report.quantile(200, 0.99)
    );
    assert!(
        failures.is_empty(),
        "failed requests: {:?}",
        &failures[..failures.len().min(5)]
    );
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_roll_out_and_back_under_load_without_a_failed_request() {
    let repo = Repo::new("poll");
    let (server, gateway, client) = start(
        &repo,
        &[
            "--model-control-mode",
            "poll",
            "--repository-poll-secs",
            "1",
        ],
    )
    .await;

    let load = Load::start(&gateway.url, 8, None);
    load.wait_done(16, Duration::from_secs(120)).await;
    let answered_by_1 = load.outcomes().await;
    assert!(
        answered_by_1
            .iter()
            .all(|o| o.version.as_deref() == Some("1")),
        "{answered_by_1:?}"
    );

    // A new version, copied in under a temporary name and renamed into place: it answers once loaded, and
    // version 1 goes out of service after it, finishing what it had queued.
    let published = load.done.load(std::sync::atomic::Ordering::SeqCst);
    repo.publish(2);
    let took = wait_answered_by(&load, published, "2", SETTLE).await;
    println!("version 2 answered {took:?} after it was renamed into place");
    let now = index(&client, &server).await;
    assert_eq!(
        now,
        [("2".into(), "READY".into(), String::new())],
        "version 1 retired"
    );

    // Corrupt weights where version 2's files are: the reload fails, the version in memory keeps answering,
    // and the index says why.
    std::fs::write(
        repo.version(2).join("model.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let started = Instant::now();
    let reason = loop {
        let now = index(&client, &server).await;
        // While the new files load, the reason says so; once they have failed, it says why.
        if let [(version, state, reason)] = now.as_slice()
            && reason.contains("last reload failed")
        {
            assert_eq!((version.as_str(), state.as_str()), ("2", "READY"));
            break reason.clone();
        }
        assert!(
            started.elapsed() < SETTLE,
            "no failed reload in the index: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("corrupt weights: {reason}");
    assert!(reason.contains("last reload failed"), "{reason}");
    let corrupted = load.done.load(std::sync::atomic::Ordering::SeqCst);
    load.wait_done(corrupted + 16, Duration::from_secs(60))
        .await;
    let after = load.outcomes().await;
    assert!(
        after[corrupted..]
            .iter()
            .all(|o| o.version.as_deref() == Some("2")),
        "version 2 kept answering"
    );

    // Version 2's directory goes, version 1's is back: the server loads 1 before it lets 2 go, the requests
    // 2 had taken finish on it, and the gateway follows to version 1.
    copy_dir(
        &stack::model_repository().join(MODEL).join("1"),
        &repo.version(1),
    );
    tokio::time::sleep(2 * INTERVAL).await;
    let removed = load.done.load(std::sync::atomic::Ordering::SeqCst);
    std::fs::remove_dir_all(repo.version(2)).unwrap();
    let took = wait_answered_by(&load, removed, "1", SETTLE).await;
    println!("version 2 removed: version 1 answered again after {took:?}");
    let finished_on_2 = load.outcomes().await[removed..]
        .iter()
        .filter(|o| o.version.as_deref() == Some("2"))
        .count();
    println!("{finished_on_2} requests answered by version 2 after its directory was removed");

    let report = stop_with_no_failure(load, "poll").await;
    assert!(
        report
            .outcomes
            .iter()
            .all(|o| matches!(o.version.as_deref(), Some("1" | "2"))),
        "every answer names its version"
    );
    drop(gateway);
    server.stop().await;
}

/// Load calls to the model server: `tritonclient.grpc` in Python (the test venv), or Triton's REST paths.
async fn tritonclient(server: &ModelServer, args: &[&str]) -> String {
    let python = std::env::var_os("OIP_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
    assert!(
        python.is_file(),
        "{} not found: run scripts/test.sh (it creates .venv with tritonclient) or set OIP_PYTHON",
        python.display()
    );
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../model-server/tests/tritonclient_control.py");
    let output = tokio::process::Command::new(python)
        .arg(script)
        .arg(server.addr.to_string())
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert!(
        output.status.success() || stdout.starts_with("error: "),
        "tritonclient_control.py {args:?}: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

async fn http_load(
    client: &reqwest::Client,
    server: &ModelServer,
    config: Option<&str>,
) -> (u16, String) {
    let body = config
        .map(|c| serde_json::json!({"parameters": {"config": c}}).to_string())
        .unwrap_or_default();
    let response = client
        .post(format!(
            "http://{}/v2/repository/models/{MODEL}/load",
            server.http_addr
        ))
        .body(body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_loads_from_tritonclient_and_over_http_under_load_without_a_failed_request() {
    let repo = Repo::new("explicit");
    let (server, gateway, client) = start(
        &repo,
        &["--model-control-mode", "explicit", "--load-model", MODEL],
    )
    .await;
    let load = Load::start(&gateway.url, 8, None);
    load.wait_done(16, Duration::from_secs(120)).await;

    // Version 2 published, then loaded by tritonclient: the policy (latest 1) swaps it in for version 1, and
    // the gateway follows at once, as version 1 answers NotFound.
    repo.publish(2);
    let loaded = load.done.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(tritonclient(&server, &["load", MODEL]).await, "ok");
    let took = wait_answered_by(&load, loaded, "2", SETTLE).await;
    println!("explicit: version 2 answered {took:?} after tritonclient's load call returned");

    // Corrupt weights, reloaded over HTTP: 500 with the reason, and version 2 keeps answering.
    std::fs::write(
        repo.version(2).join("model.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let (status, body) = http_load(&client, &server, None).await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("version 2"), "{body}");
    let now = index(&client, &server).await;
    assert_eq!(
        (now[0].0.as_str(), now[0].1.as_str()),
        ("2", "READY"),
        "{now:?}"
    );
    assert!(now[0].2.contains("last reload failed"), "{now:?}");
    let corrupted = load.done.load(std::sync::atomic::Ordering::SeqCst);
    load.wait_done(corrupted + 16, Duration::from_secs(60))
        .await;
    assert!(
        load.outcomes().await[corrupted..]
            .iter()
            .all(|o| o.version.as_deref() == Some("2")),
        "version 2 kept answering"
    );

    // Back to version 1 through a config override from tritonclient: 1 loads, 2 finishes what it had taken.
    let rolled_back = load.done.load(std::sync::atomic::Ordering::SeqCst);
    let only_1 = r#"{"version_policy": {"specific": {"versions": [1]}}}"#;
    assert_eq!(tritonclient(&server, &["load", MODEL, only_1]).await, "ok");
    let took = wait_answered_by(&load, rolled_back, "1", SETTLE).await;
    println!("explicit: version 1 answered again {took:?} after the rollback call returned");

    stop_with_no_failure(load, "explicit").await;

    // Unloaded with the load stopped: the gateway answers 404 and says which model.
    assert_eq!(tritonclient(&server, &["unload", MODEL]).await, "ok");
    let response = client
        .post(format!("{}/predict", gateway.url))
        .header("content-type", "application/json")
        .body(common::load::predict_body())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.text().await.unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(body.contains(MODEL), "{body}");
    drop(gateway);
    server.stop().await;
}
