//! Model lifecycle: versions that appear, change and go while the server runs, in `poll` and `explicit` mode,
//! with the real model and real requests. What the numbers are (load times, latency) is printed. Memory over
//! many cycles is measured in `lifecycle_memory.rs`, a process of its own.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::lifecycle::*;
use common::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_mode_loads_reloads_and_unloads_over_grpc_and_http() {
    let repo = Repo::new("explicit");
    repo.add(MODEL, 1);
    // No --load-model: nothing serves, and that is ready.
    let (server, mut client) = serve(&repo, &["--model-control-mode", "explicit"]).await;
    assert_eq!(
        index(&mut client).await,
        [(
            MODEL.into(),
            String::new(),
            "UNAVAILABLE".into(),
            "not loaded".into()
        )]
    );
    let e = infer(&mut client, MODEL, "").await.expect_err("not loaded");
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());

    let started = Instant::now();
    load(&mut client, MODEL, None).await.expect("load");
    println!("explicit load answered after {:?}", started.elapsed());
    assert_eq!(infer(&mut client, MODEL, "").await.expect("infer"), "1");

    // A new version, loaded on request: served beside nothing else, the policy being the latest one.
    repo.publish(MODEL, 2);
    assert_eq!(
        infer(&mut client, MODEL, "").await.expect("infer"),
        "1",
        "not loaded until asked"
    );
    load(&mut client, MODEL, None).await.expect("load v2");
    assert_eq!(infer(&mut client, MODEL, "").await.expect("infer"), "2");
    let e = infer(&mut client, MODEL, "1")
        .await
        .expect_err("v1 unloaded by the policy");
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());

    // Corrupt weights: the load fails with the reason, the previous files keep serving, the index says why.
    std::fs::write(
        repo.0.join(MODEL).join("2/model.safetensors"),
        b"not a safetensors file",
    )
    .expect("corrupt");
    let e = load(&mut client, MODEL, None)
        .await
        .expect_err("corrupt weights");
    assert_eq!(e.code(), Code::Internal, "{}", e.message());
    assert!(e.message().contains("version 2"), "{}", e.message());
    assert_eq!(
        infer(&mut client, MODEL, "")
            .await
            .expect("old files serve"),
        "2"
    );
    let now = index(&mut client).await;
    assert_eq!(now.len(), 1, "{now:?}");
    assert_eq!((now[0].1.as_str(), now[0].2.as_str()), ("2", "READY"));
    assert!(now[0].3.contains("last reload failed"), "{}", now[0].3);
    let failures = metric(
        server.http_addr,
        "model_load_failures_total{model=\"efficientnet-lite0\",version=\"2\"}",
    )
    .await;
    assert_eq!(failures, Some(1.0));

    // Over HTTP, as Triton's REST paths: a config override serving both versions, after v2 is repaired.
    copy_version(&repo.0.join(MODEL).join("2"));
    let (status, body) = http_post(
        server.http_addr,
        "/v2/repository/models/efficientnet-lite0/load",
        r#"{"parameters": {"config": "{\"version_policy\": {\"all\": {}}}"}}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_post(
        server.http_addr,
        "/v2/repository/index",
        r#"{"ready": true}"#,
    )
    .await;
    assert_eq!(status, 200);
    let listed: serde_json::Value = serde_json::from_str(&body).expect("json");
    let versions: Vec<&str> = listed
        .as_array()
        .expect("array")
        .iter()
        .map(|m| m["version"].as_str().expect("version"))
        .collect();
    assert_eq!(versions, ["1", "2"], "{body}");
    assert!(
        listed[1]["reason"].as_str().unwrap().is_empty(),
        "repaired: {body}"
    );
    assert_eq!(infer(&mut client, MODEL, "1").await.expect("v1"), "1");
    assert_eq!(infer(&mut client, MODEL, "").await.expect("newest"), "2");

    // Bad calls get clear errors, over both transports.
    for (path, body, expected, says) in [
        (
            "/v2/repository/models/nope/load",
            "",
            404,
            "not in the repository",
        ),
        (
            "/v2/repository/models/..%2Fetc/load",
            "",
            400,
            "not a model name",
        ),
        (
            "/v2/repository/models/efficientnet-lite0/load",
            "{",
            400,
            "not valid JSON",
        ),
        (
            "/v2/repository/models/efficientnet-lite0/load",
            r#"{"parameters": {"file:1/model.safetensors": "AAAA"}}"#,
            400,
            "not supported",
        ),
        (
            "/v2/repository/models/efficientnet-lite0/load",
            r#"{"parameters": {"config": "[1]"}}"#,
            400,
            "JSON object",
        ),
    ] {
        let (status, text) = http_post(server.http_addr, path, body).await;
        assert_eq!(status, expected, "{path} {body}: {text}");
        assert!(text.contains(says), "{path}: {text}");
    }
    let e = load(&mut client, "nope", None)
        .await
        .expect_err("unknown model");
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    let e = load(
        &mut client,
        MODEL,
        Some("{\"version_policy\": {\"newest\": {}}}"),
    )
    .await
    .expect_err("bad policy");
    assert!(e.message().contains("version_policy"), "{}", e.message());
    assert_eq!(
        infer(&mut client, MODEL, "").await.expect("still serving"),
        "2"
    );

    let (status, body) = http_post(
        server.http_addr,
        "/v2/repository/models/efficientnet-lite0/unload",
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let e = infer(&mut client, MODEL, "").await.expect_err("unloaded");
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    wait_index(
        &mut client,
        Duration::from_secs(10),
        "unloaded versions drain",
        |i| i.len() == 1 && i[0].2 == "UNAVAILABLE" && i[0].3 == "not loaded",
    )
    .await;
    let e = unload(&mut client, MODEL)
        .await
        .expect_err("nothing to unload");
    assert_eq!(e.code(), Code::NotFound);
    server.stop().await;
}

/// A way to call the repository control: tritonclient's gRPC client in Python, or the HTTP paths.
#[derive(Debug, Clone, Copy)]
enum Control {
    Tritonclient,
    Http,
}

impl Control {
    /// Loads (with an optional `config`) or unloads `model`; the server's error message on failure.
    async fn call(
        self,
        server: &TestServer,
        action: &str,
        config: Option<&str>,
    ) -> Result<(), String> {
        match self {
            Control::Tritonclient => {
                let mut args = vec![server.addr.to_string(), action.to_owned(), MODEL.to_owned()];
                args.extend(config.map(str::to_owned));
                let out = self.python(&args).await;
                match out.strip_prefix("ok") {
                    Some(_) => Ok(()),
                    None => Err(out),
                }
            }
            Control::Http => {
                let body = config
                    .map(|c| serde_json::json!({"parameters": {"config": c}}).to_string())
                    .unwrap_or_default();
                let path = format!("/v2/repository/models/{MODEL}/{action}");
                match http_post(server.http_addr, &path, &body).await {
                    (200, _) => Ok(()),
                    (status, body) => Err(format!("{status}: {body}")),
                }
            }
        }
    }

    /// The index as `(version, state, reason)`.
    async fn index(self, server: &TestServer) -> Vec<(String, String, String)> {
        let listed: serde_json::Value = match self {
            Control::Tritonclient => {
                let out = self
                    .python(&[server.addr.to_string(), "index".into()])
                    .await;
                let json = out
                    .strip_prefix("ok\n")
                    .unwrap_or_else(|| panic!("index: {out}"));
                serde_json::from_str(json).expect("index json")
            }
            Control::Http => {
                let (status, body) = http_post(server.http_addr, "/v2/repository/index", "").await;
                assert_eq!(status, 200, "{body}");
                serde_json::from_str(&body).expect("index json")
            }
        };
        let field = |m: &serde_json::Value, f: &str| m[f].as_str().unwrap_or_default().to_owned();
        listed
            .as_array()
            .expect("index array")
            .iter()
            .map(|m| (field(m, "version"), field(m, "state"), field(m, "reason")))
            .collect()
    }

    async fn python(self, args: &[String]) -> String {
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tritonclient_control.py");
        let output = tokio::process::Command::new(python())
            .arg(script)
            .args(args)
            .output()
            .await
            .expect("run python");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success() || stdout.starts_with("error: "),
            "tritonclient_control.py {args:?} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout.trim().to_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_mode_under_load_through_tritonclient_and_over_http() {
    for control in [Control::Tritonclient, Control::Http] {
        let repo = Repo::new(&format!("explicit-load-{control:?}"));
        repo.add(MODEL, 1);
        // One instance with batches of one: at most one request runs, every other is queued or answered.
        let flags = [
            "--model-control-mode",
            "explicit",
            "--load-model",
            MODEL,
            "--max-batch-size",
            "1",
            "--instances",
            "1",
        ];
        let (server, mut client) = serve(&repo, &flags).await;
        let stop = Arc::new(AtomicBool::new(false));
        let (tally, tasks) = background_load(&server, MODEL, 8, stop.clone());
        tokio::time::sleep(Duration::from_millis(500)).await;

        // A new version, loaded on request: it has replaced version 1 when the call answers.
        repo.publish(MODEL, 2);
        let started = Instant::now();
        control
            .call(&server, "load", None)
            .await
            .expect("load version 2");
        let took = started.elapsed();
        assert_eq!(infer(&mut client, MODEL, "").await.expect("infer"), "2");
        // Version 1 is UNLOADING until the requests it had taken are answered.
        let settled = Instant::now();
        loop {
            let now = control.index(&server).await;
            if now == [("2".into(), "READY".into(), String::new())] {
                break;
            }
            assert!(
                settled.elapsed() < Duration::from_secs(10),
                "version 1 never went: {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Corrupt weights: the call fails and says why, version 2 keeps serving, the index says why too.
        std::fs::write(repo.0.join(MODEL).join("2/model.safetensors"), b"corrupt")
            .expect("corrupt");
        let refused = control
            .call(&server, "load", None)
            .await
            .expect_err("corrupt weights");
        assert!(refused.contains("version 2"), "{refused}");
        assert_eq!(
            infer(&mut client, MODEL, "")
                .await
                .expect("old files serve"),
            "2"
        );
        let now = control.index(&server).await;
        assert_eq!(
            (now[0].0.as_str(), now[0].1.as_str()),
            ("2", "READY"),
            "{now:?}"
        );
        assert!(now[0].2.contains("last reload failed"), "{now:?}");

        // Repaired, and served beside version 1 through a config override; then version 1, the old one, is
        // dropped from the policy while requests for it are queued: they finish on it.
        copy_version(&repo.0.join(MODEL).join("2"));
        control
            .call(&server, "load", Some(r#"{"version_policy": {"all": {}}}"#))
            .await
            .expect("load both");
        // Enough that some are still queued when the call lands, whichever transport carries it.
        let pinned: Vec<_> = (0..32)
            .map(|_| {
                let mut c = client.clone();
                tokio::spawn(async move { infer(&mut c, MODEL, "1").await })
            })
            .collect();
        let queued = Instant::now();
        let pending =
            format!("nv_inference_pending_request_count{{model=\"{MODEL}\",version=\"1\"}}");
        // Batches of one: every pinned request is either queued, the one running, or answered.
        loop {
            let waiting = metric(server.http_addr, &pending).await.unwrap_or(0.0) as usize;
            let answered = pinned.iter().filter(|p| p.is_finished()).count();
            if waiting >= 1 && waiting + answered + 1 >= pinned.len() {
                break;
            }
            assert!(
                queued.elapsed() < Duration::from_secs(10),
                "version 1 never held the pinned requests: {waiting} queued, {answered} answered"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        control
            .call(
                &server,
                "load",
                Some(r#"{"version_policy": {"specific": {"versions": [2]}}}"#),
            )
            .await
            .expect("drop version 1");
        for call in pinned {
            assert_eq!(
                call.await
                    .expect("task")
                    .expect("taken by version 1, finished on it"),
                "1"
            );
        }
        finish(&stop, tasks).await;
        println!(
            "explicit ({control:?}): the load call for version 2 answered after {took:?} (Python start-up included for tritonclient); {} requests under load, {} failed",
            tally.ok.load(Ordering::SeqCst),
            tally.failed.load(Ordering::SeqCst)
        );
        assert_no_failures(&tally);

        control.call(&server, "unload", None).await.expect("unload");
        let e = infer(&mut client, MODEL, "").await.expect_err("unloaded");
        assert_eq!(e.code(), Code::NotFound, "{}", e.message());
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_and_unload_are_refused_outside_explicit_mode() {
    let repo = Repo::new("refused");
    repo.add(MODEL, 1);
    for mode in ["none", "poll"] {
        let (server, mut client) = serve(&repo, &["--model-control-mode", mode]).await;
        for e in [
            load(&mut client, MODEL, None)
                .await
                .expect_err("load refused"),
            unload(&mut client, MODEL)
                .await
                .expect_err("unload refused"),
        ] {
            assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
            assert!(
                e.message().contains("--model-control-mode explicit"),
                "{}",
                e.message()
            );
        }
        let (status, body) = http_post(
            server.http_addr,
            "/v2/repository/models/efficientnet-lite0/unload",
            "",
        )
        .await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(
            infer(&mut client, MODEL, "").await.expect("still serving"),
            "1"
        );
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_mode_follows_the_repository_under_load_without_a_failed_request() {
    let repo = Repo::new("poll");
    repo.add(MODEL, 1);
    let interval = Duration::from_millis(1000);
    // Not a speed target: on a shared two-core machine a load can take several intervals. The time is printed.
    let settle = Duration::from_secs(30);
    let (server, mut client) = serve(
        &repo,
        &[
            "--model-control-mode",
            "poll",
            "--repository-poll-secs",
            "1",
        ],
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, tasks) = background_load(&server, MODEL, 8, stop.clone());
    tokio::time::sleep(interval).await;

    // A new version, published by a rename: it serves once loaded and the old one goes.
    repo.publish(MODEL, 2);
    let took = wait_index(&mut client, settle, "version 2 serves", |i| {
        versions_in(i, MODEL, "READY") == ["2"]
    })
    .await;
    println!("poll: version 2 served {took:?} after it was published");
    assert_eq!(infer(&mut client, MODEL, "").await.expect("infer"), "2");

    // Corrupt weights on the served version: the files in memory keep serving, the index says why.
    let weights = repo.0.join(MODEL).join("2/model.safetensors");
    std::fs::write(&weights, b"corrupt").expect("corrupt");
    wait_index(&mut client, settle, "the failed reload is reported", |i| {
        i.iter()
            .any(|(_, v, s, r)| v == "2" && s == "READY" && r.contains("last reload failed"))
    })
    .await;
    assert_eq!(
        infer(&mut client, MODEL, "")
            .await
            .expect("old files serve"),
        "2"
    );

    // The old version's directory goes: it was already out of service, and nothing changes.
    std::fs::remove_dir_all(repo.0.join(MODEL).join("1")).expect("remove v1");
    tokio::time::sleep(2 * interval).await;
    assert_eq!(
        versions_in(&index(&mut client).await, MODEL, "READY"),
        ["2"]
    );
    finish(&stop, tasks).await;
    println!(
        "poll: {} requests under load while versions changed, {} failed",
        tally.ok.load(Ordering::SeqCst),
        tally.failed.load(Ordering::SeqCst)
    );
    assert_no_failures(&tally);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_written_version_is_never_loaded() {
    let repo = Repo::new("half-written");
    repo.add(MODEL, 1);
    let (server, mut client) = serve(
        &repo,
        &[
            "--model-control-mode",
            "poll",
            "--repository-poll-secs",
            "0.5",
        ],
    )
    .await;

    // Written in place, slowly: a chunk every 0.2 s, so the files change between any two scans.
    let target = repo.0.join(MODEL).join("2");
    std::fs::create_dir_all(&target).expect("mkdir");
    for name in ["config.json", "labels.txt"] {
        std::fs::copy(source_version().join(name), target.join(name)).expect("copy");
    }
    let weights = std::fs::read(source_version().join("model.safetensors")).expect("weights");
    let chunks = 20;
    let chunk = weights.len().div_ceil(chunks);
    let writer = {
        let path = target.join("model.safetensors");
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut file = std::fs::File::create(&path).expect("create");
            for part in weights.chunks(chunk) {
                file.write_all(part).expect("write");
                file.flush().expect("flush");
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let mut scans = 0;
    while !writer.is_finished() {
        let now = index(&mut client).await;
        assert!(
            !now.iter().any(|(_, v, _, _)| v == "2"),
            "a version still being written was taken: {now:?}"
        );
        scans += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    writer.await.expect("writer");
    assert!(scans > 20, "the writer ran for {scans} checks");
    assert_eq!(
        metric(server.http_addr, "model_load_failures_total").await,
        None,
        "no load was even tried"
    );
    // Once the files stop changing, it is taken.
    wait_index(
        &mut client,
        Duration::from_secs(5),
        "version 2 serves",
        |i| versions_in(i, MODEL, "READY") == ["2"],
    )
    .await;
    assert_eq!(infer(&mut client, MODEL, "").await.expect("infer"), "2");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unload_lets_the_queued_requests_finish() {
    let repo = Repo::new("drain");
    repo.add(MODEL, 1);
    let (server, mut client) = serve(
        &repo,
        // One instance with batches of one, as below: at most one request runs.
        &[
            "--model-control-mode",
            "explicit",
            "--load-model",
            MODEL,
            "--max-batch-size",
            "1",
            "--instances",
            "1",
        ],
    )
    .await;
    let sent = 16;
    let calls: Vec<_> = (0..sent)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move { infer(&mut c, MODEL, "1").await })
        })
        .collect();
    // One runs, the others wait in the queue. Every call must have reached the server before the unload: one
    // still on its way would rightly find nothing (the NOT_FOUND below), not a queue to finish in.
    let start = Instant::now();
    loop {
        let pending = metric(server.http_addr, "nv_inference_pending_request_count")
            .await
            .unwrap_or(0.0);
        let done = metric(server.http_addr, "nv_inference_request_success")
            .await
            .unwrap_or(0.0);
        // At most one runs, counted in neither.
        if pending >= 4.0 && pending + done + 1.0 >= sent as f64 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the calls never all reached the queue"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    unload(&mut client, MODEL).await.expect("unload");
    let e = infer(&mut client, MODEL, "1")
        .await
        .expect_err("new requests find nothing");
    assert_eq!(e.code(), Code::NotFound);
    let now = index(&mut client).await;
    assert!(
        now.iter().any(|(_, v, s, _)| v == "1" && s == "UNLOADING"),
        "queued requests are still finishing: {now:?}"
    );
    for call in calls {
        assert_eq!(
            call.await.expect("task").expect("queued request finishes"),
            "1"
        );
    }
    wait_index(
        &mut client,
        Duration::from_secs(5),
        "the version is gone",
        |i| !i.iter().any(|(_, _, s, _)| s == "UNLOADING"),
    )
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_one_model_never_fails_a_request_of_another() {
    let repo = Repo::new("two-models");
    repo.add("steady", 1);
    repo.add("churn", 1);
    let (server, mut client) = serve(
        &repo,
        &["--model-control-mode", "explicit", "--load-model", "*"],
    )
    .await;
    assert_eq!(infer(&mut client, "churn", "").await.expect("churn"), "1");
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, tasks) = background_load(&server, "steady", 4, stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before_end = tally.count();
    let reloads = 10;
    let started = Instant::now();
    for i in 0..reloads {
        // A different config each time, so each load is a real reload of new weights.
        let config = format!(r#"{{"preprocessing": {{"reload": {i}}}}}"#);
        load(&mut client, "churn", Some(&config))
            .await
            .expect("reload churn");
        assert_eq!(
            infer(&mut client, "churn", "").await.expect("churn serves"),
            "1"
        );
    }
    let reload_time = started.elapsed();
    let during_end = tally.count();
    finish(&stop, tasks).await;
    let before = tally.p99(0..before_end);
    let during = tally.p99(before_end..during_end);
    println!(
        "two models: `steady` under 4 concurrent clients while `churn` was reloaded {reloads} times in {reload_time:.1?}: \
         p99 {:.1?} over {} requests before, {:.1?} over {} requests during",
        before.1, before.0, during.1, during.0
    );
    assert_no_failures(&tally);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_repository_is_refused_only_when_nothing_could_ever_load() {
    let repo = Repo::new("empty");
    let start = |mode: &str| {
        let args = [
            "model-server",
            "--model-repository",
            repo.0.to_str().expect("utf-8 path"),
            "--model-control-mode",
            mode,
        ];
        let config = <model_server::Config as clap::Parser>::try_parse_from(args).expect("config");
        async move {
            let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let http = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            // A server that starts runs until the short shutdown below; one that is refused returns at once.
            model_server::serve_with(
                config,
                grpc,
                http,
                tokio::time::sleep(Duration::from_millis(200)),
            )
            .await
        }
    };
    let refused = start("none")
        .await
        .expect_err("nothing to serve, and nothing can change that");
    assert!(
        format!("{refused:#}").contains("holds no model versions"),
        "{refused:#}"
    );
    // Poll and explicit mode can load what is published later.
    start("poll").await.expect("poll mode starts empty");
    start("explicit").await.expect("explicit mode starts empty");
}
