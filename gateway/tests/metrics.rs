//! `/metrics` of both tiers: a few predictions move every counter and histogram by exactly what they did, and
//! both scrapes parse as the Prometheus text format. The model server's KServe v2 health endpoints answer.
//! Every series the Grafana dashboard queries is one that a tier really exports.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::prom::{self, Scrape};
use common::stack::*;
use oip_proto::inference::model_infer_request::InferInputTensor;
use oip_proto::inference::{InferTensorContents, ModelInferRequest};
use serde_json::{Value, json};

const MODEL: &str = "efficientnet-lite0";

/// The one copy of the dashboard: k8s/monitoring generates its ConfigMap from it, the compose profile mounts it.
const DASHBOARD: &str = include_str!("../../k8s/monitoring/dashboards/imageserve.json");

async fn scrape(client: &reqwest::Client, url: &str) -> Scrape {
    let response = client.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = response.text().await.unwrap();
    prom::parse(&text).unwrap_or_else(|e| panic!("{url} is not Prometheus text: {e}\n{text}"))
}

/// `after - before` of one sample; labelled counters that never moved count as 0.
fn delta(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.value_or_zero(name, labels) - before.value_or_zero(name, labels)
}

/// A ModelInfer call straight to the model server with an input of the wrong shape, which it refuses.
async fn send_a_wrong_shape(addr: std::net::SocketAddr) {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let wrong_shape = ModelInferRequest {
        model_name: MODEL.into(),
        inputs: vec![InferInputTensor {
            name: "pixels".into(),
            datatype: "UINT8".into(),
            shape: vec![1, 2, 2, 3],
            contents: Some(InferTensorContents {
                uint_contents: vec![0; 12],
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let status = oip_proto::GrpcInferenceServiceClient::new(channel)
        .model_infer(wrong_shape)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictions_move_both_tiers_metrics_by_exactly_what_they_did() {
    let stack = Stack::start().await;
    let (gateway, photos, client) = (&stack.gateway, &stack.photos, &stack.client);
    let ms_http = format!("http://{}", stack.model_server.http_addr);
    for path in ["/v2/health/live", "/v2/health/ready"] {
        let status = client
            .get(format!("{ms_http}{path}"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{path}");
    }

    let gw_metrics = format!("{}/metrics", gateway.url);
    let ms_metrics = format!("{ms_http}/metrics");
    let gw_before = scrape(client, &gw_metrics).await;
    let ms_before = scrape(client, &ms_metrics).await;

    // Three predictions by URL, one after another, so each runs as a batch of one.
    let names = ["chelsea", "coffee", "rocket"];
    let mut fetched = 0;
    for name in names {
        let response = stack
            .predict(json!({ "url": format!("{photos}/{name}.png") }))
            .await;
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
        fetched += common::golden_png(name).len();
    }
    // One the gateway refuses before fetching, and one the model server refuses (a wrong shape).
    let refused = stack
        .predict(json!({ "url": format!("{photos}/chelsea.png"), "top_k": 0 }))
        .await;
    assert_eq!(refused.status(), 400);
    send_a_wrong_shape(stack.model_server.addr).await;

    let gw = scrape(client, &gw_metrics).await;
    let ms = scrape(client, &ms_metrics).await;
    let d = |name: &str, labels: &[(&str, &str)]| delta(&gw_before, &gw, name, labels);
    let route = ("route", "/predict");
    assert_eq!(
        d("gateway_requests_total", &[route, ("status", "200")]),
        3.0
    );
    assert_eq!(
        d("gateway_requests_total", &[route, ("status", "400")]),
        1.0
    );
    assert_eq!(d("gateway_request_duration_seconds_count", &[route]), 4.0);
    for phase in ["fetch", "decode", "preprocess", "inference", "total"] {
        assert_eq!(
            d("gateway_phase_duration_seconds_count", &[("phase", phase)]),
            3.0,
            "{phase}"
        );
        assert!(
            d("gateway_phase_duration_seconds_sum", &[("phase", phase)]) > 0.0,
            "{phase}"
        );
    }
    assert_eq!(d("gateway_fetch_bytes_total", &[]), fetched as f64);
    assert_eq!(d("gateway_requests_shed_total", &[]), 0.0);
    // The scrape itself is the one request in flight.
    assert_eq!(gw.value("gateway_requests_in_flight", &[]), 1.0);
    assert_eq!(gw.value("gateway_images_in_flight", &[]), 0.0);
    assert_eq!(
        gw.value("gateway_upstream_endpoints", &[("state", "known")]),
        1.0
    );
    assert_eq!(
        gw.value("gateway_upstream_endpoints", &[("state", "ejected")]),
        0.0
    );
    assert_eq!(d("gateway_upstream_retries_total", &[]), 0.0);
    assert!(
        !gw.samples
            .iter()
            .any(|s| s.name == "gateway_upstream_errors_total"),
        "no call failed"
    );

    let d = |name: &str, labels: &[(&str, &str)]| delta(&ms_before, &ms, name, labels);
    let m = [("model", MODEL), ("version", "1")];
    assert_eq!(d("nv_inference_request_success", &m), 3.0);
    assert_eq!(d("nv_inference_count", &m), 3.0);
    assert_eq!(d("nv_inference_exec_count", &m), 3.0);
    let invalid = [m[0], m[1], ("reason", "invalid_argument")];
    assert_eq!(d("nv_inference_request_failure", &invalid), 1.0);
    for reason in ["rejected", "cancelled", "backend"] {
        assert_eq!(
            d(
                "nv_inference_request_failure",
                &[m[0], m[1], ("reason", reason)]
            ),
            0.0
        );
    }
    for histogram in ["queue", "compute", "request"] {
        let name = format!("nv_inference_{histogram}_duration_seconds_count");
        assert_eq!(d(&name, &m), 3.0, "{name}");
    }
    // Three batches of one image: all in the first bucket, and they sum to 3.
    assert_eq!(d("nv_inference_batch_size_count", &m), 3.0);
    assert_eq!(d("nv_inference_batch_size_sum", &m), 3.0);
    assert_eq!(
        d("nv_inference_batch_size_bucket", &[m[0], m[1], ("le", "1")]),
        3.0
    );
    // The cumulative microsecond counters agree with the histograms' sums.
    let request_us = d("nv_inference_request_duration_us", &m);
    let request_s = d("nv_inference_request_duration_seconds_sum", &m);
    assert!(
        (request_us / 1e6 - request_s).abs() < 1e-3,
        "{request_us} us vs {request_s} s"
    );
    assert!(d("nv_inference_compute_infer_duration_us", &m) > 0.0);
    assert_eq!(ms.value("nv_inference_pending_request_count", &m), 0.0);
    assert_eq!(ms.value("nv_model_loaded", &m), 1.0);
    assert!(ms.value("process_resident_memory_bytes", &[]) > 0.0);
    stack.model_server.stop().await;
}
/// The reader above is strict enough to catch what a scraper would refuse.
#[test]
fn the_reader_refuses_malformed_text() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\\\"2\"} 3\n";
    assert_eq!(
        prom::parse(good)
            .unwrap()
            .value("a_total", &[("x", "1\"2")]),
        3.0
    );
    for bad in [
        "a_total 1\n",
        "# TYPE a counter\na{x=1} 1\n",
        "# TYPE a counter\na{x=\"1\"\n",
        "# TYPE a counter\na one\n",
        "# TYPE 1a counter\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 0\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_count 3\nh_sum 0\n",
    ] {
        assert!(prom::parse(bad).is_err(), "accepted {bad:?}");
    }
}

/// Series that Prometheus makes for each target itself: no tier exports them.
const PROMETHEUS_OWN: &[&str] = &[
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
];

/// Modifiers whose parenthesised list holds label names, not series.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// PromQL words that stand alone (case-insensitive for the numbers).
const KEYWORDS: &[&str] = &[
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "atan2",
    "inf",
    "nan",
    "group_left",
    "group_right",
];

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The index just past the group opened at `open` (`{`, `[` or `(`), stepping over quoted strings, which may
/// hold the closing character.
fn past_group(chars: &[char], open: usize) -> usize {
    let close = match chars[open] {
        '{' => '}',
        '[' => ']',
        _ => ')',
    };
    let mut i = open + 1;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => i = past_string(chars, i),
            c if c == close => return i + 1,
            _ => i += 1,
        }
    }
    i
}

fn past_string(chars: &[char], open: usize) -> usize {
    let quote = chars[open];
    let mut i = open + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' if quote != '`' => i += 2,
            c if c == quote => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// The series names a PromQL expression reads: every bare identifier that is not a function or aggregation
/// (followed by `(`, or by `by`/`without`), a keyword, a label name (inside `{}` or a `by (...)`-like list), a duration, a number, a
/// Grafana `$variable`, or a series of Prometheus's own.
fn series_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i = past_string(&chars, i);
        } else if matches!(c, '{' | '[') {
            i = past_group(&chars, i);
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            // A variable, or a number or duration (1e6, 0x1f, 5m): none of it is a name.
            i += 1;
            while i < chars.len() && (is_name_char(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && is_name_char(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let following: String = chars[next..]
                .iter()
                .take_while(|c| is_name_char(**c))
                .collect();
            if chars.get(next) == Some(&'(') {
                if LABEL_LISTS.contains(&word.as_str()) {
                    i = past_group(&chars, next);
                }
            } else if following == "by" || following == "without" {
                // An aggregation with its grouping first: `sum by (le) (...)`.
            } else if !KEYWORDS.contains(&word.to_ascii_lowercase().as_str())
                && !PROMETHEUS_OWN.contains(&word.as_str())
            {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every PromQL query of the dashboard as (where, query): each panel's targets, rows' nested panels included,
/// and the series behind each query variable (`label_values(SERIES, label)`).
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn panels(list: &Value, out: &mut Vec<(String, String)>) {
        for panel in list.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("(untitled)");
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((format!("panel {title:?}"), expr.to_owned()));
                }
            }
            panels(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if variable["type"] != "query" {
            continue;
        }
        let query = match &variable["query"] {
            Value::String(q) => q.as_str(),
            q => q["query"].as_str().unwrap_or_default(),
        };
        // label_values(SERIES, LABEL): the label is not a series.
        if let Some(args) = query
            .strip_prefix("label_values(")
            .and_then(|a| a.strip_suffix(')'))
        {
            let series = args.rsplit_once(',').map_or(args, |(series, _)| series);
            out.push((format!("variable {}", variable["name"]), series.to_owned()));
        }
    }
    out
}

/// Every series name the dashboard reads, with where it is read.
fn dashboard_series() -> BTreeMap<String, Vec<String>> {
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let mut series: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (place, expr) in dashboard_queries(&dashboard) {
        for name in series_names(&expr) {
            series.entry(name).or_default().push(place.clone());
        }
    }
    series
}

#[test]
fn the_query_reader_finds_series_and_nothing_else() {
    let expr = r#"histogram_quantile(0.99, sum by (le, phase) (rate(gateway_phase_duration_seconds_bucket{phase!="total", route=~"/p{1}"}[$__rate_interval])))
        / on (instance) group_left (model) max without (x) (up{job=~"$job"} == bool 1)
        + sum(rate(ns:recorded_total[5m] offset 1h)) * 1e6 or vector(Inf)
        and count by(instance)(process_resident_memory_bytes{a='}'})"#;
    let expected = [
        "gateway_phase_duration_seconds_bucket",
        "ns:recorded_total",
        "process_resident_memory_bytes",
    ];
    assert_eq!(
        series_names(expr),
        expected.iter().map(|s| s.to_string()).collect()
    );
    let dashboard = json!({
        "panels": [{"title": "row", "panels": [{"title": "inner", "targets": [{"expr": "a_total"}]}]},
                   {"title": "outer", "targets": [{"expr": "b_total"}, {"expr": "rate(c_total[1m])"}]}],
        "templating": {"list": [
            {"name": "model", "type": "query", "query": {"query": "label_values(d_info, model)"}},
            {"name": "datasource", "type": "datasource", "query": "prometheus"}]}
    });
    let queries: Vec<_> = dashboard_queries(&dashboard)
        .into_iter()
        .map(|(_, q)| q)
        .collect();
    assert_eq!(
        queries,
        ["a_total", "b_total", "rate(c_total[1m])", "d_info"]
    );
}

/// The dashboard reads from its data-source variable, and the reader finds what it queries: a dashboard that
/// yielded no names would make the check against the scrapes below pass without checking anything.
#[test]
fn the_dashboard_queries_both_tiers_through_its_datasource_variable() {
    let dashboard: Value = serde_json::from_str(DASHBOARD).unwrap();
    let series = dashboard_series();
    assert!(
        series.len() >= 20,
        "only {} series: {series:?}",
        series.len()
    );
    // What the tiers export starts with one of these; anything else is a word the reader took for a series.
    for name in series.keys() {
        assert!(
            ["gateway_", "nv_", "process_"]
                .iter()
                .any(|prefix| name.starts_with(prefix)),
            "{name} is read as a series"
        );
    }
    for name in [
        "gateway_requests_total",
        "gateway_phase_duration_seconds_bucket",
        "gateway_upstream_endpoints",
        "nv_inference_queue_duration_seconds_bucket",
        "nv_inference_compute_duration_seconds_bucket",
        "nv_inference_batch_size_bucket",
        "nv_model_loaded",
    ] {
        assert!(series.contains_key(name), "{name} not on the dashboard");
    }
    let mut panels = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        panels += 1;
        let title = &panel["title"];
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has no query");
        for target in targets.iter().chain([panel]) {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
        }
    }
    assert!(panels >= 10, "{panels} panels");
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables
            .iter()
            .any(|v| v["name"] == "datasource" && v["query"] == "prometheus")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_on_the_dashboard_is_exported_by_a_tier() {
    let stack = Stack::start().await;
    let (gateway, photos, client) = (&stack.gateway, &stack.photos, &stack.client);
    // Traffic that makes every family appear, the ones only an error creates included.
    for name in ["chelsea", "coffee"] {
        let response = stack
            .predict(json!({ "url": format!("{photos}/{name}.png") }))
            .await;
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    }
    let refused = stack
        .predict(json!({ "url": format!("{photos}/chelsea.png"), "top_k": 0 }))
        .await;
    assert_eq!(refused.status(), 400);
    // The model server answers NOT_FOUND: a failed model-tier call, by gRPC code.
    let unknown = stack
        .predict(json!({ "url": format!("{photos}/coffee.png"), "model": "no-such-model" }))
        .await;
    assert_eq!(unknown.status(), 404);
    // A request the model server refuses: its failures by reason.
    send_a_wrong_shape(stack.model_server.addr).await;

    let scrapes = [
        scrape(client, &format!("{}/metrics", gateway.url)).await,
        scrape(
            client,
            &format!("http://{}/metrics", stack.model_server.http_addr),
        )
        .await,
    ];
    let exported: BTreeSet<&str> = scrapes
        .iter()
        .flat_map(|s| s.samples.iter().map(|sample| sample.name.as_str()))
        .collect();
    let missing: Vec<_> = dashboard_series()
        .into_iter()
        .filter(|(name, _)| !exported.contains(name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard reads series neither tier exports: {missing:#?}\nexported: {exported:#?}"
    );
    stack.model_server.stop().await;
}
