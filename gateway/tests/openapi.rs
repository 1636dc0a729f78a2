//! `GET /openapi.json` against the router that serves it and the answers it describes: every route is in it, it
//! validates as OpenAPI 3.1, and real answers validate against its schemas (a third-party validator, in Python).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use base64::Engine;
use common::*;
use serde_json::{Value, json};
use tower::ServiceExt;

/// Every route the gateway serves, as (method, path).
const ROUTES: [(&str, &str); 11] = [
    ("post", "/predict"),
    ("post", "/detect"),
    ("get", "/test"),
    ("get", "/v1/models"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/"),
    ("get", "/static/app.js"),
    ("get", "/static/style.css"),
];

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

async fn send(app: &axum::Router, request: Request<Body>) -> (u16, Value) {
    let (status, _, body) = json_of(app.clone().oneshot(request).await.unwrap()).await;
    (status, body)
}

async fn document(app: &axum::Router) -> Value {
    let request = Request::get("/openapi.json").body(Body::empty()).unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let (status, _, body) = json_of(response).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn documented(document: &Value) -> BTreeSet<(String, String)> {
    let paths = document["paths"].as_object().expect("paths");
    paths
        .iter()
        .flat_map(|(path, item)| {
            METHODS
                .iter()
                .filter(|m| item.get(**m).is_some())
                .map(move |m| ((*m).to_owned(), path.clone()))
        })
        .collect()
}

#[tokio::test]
async fn the_document_is_openapi_3_1_and_lists_exactly_the_routes_served() {
    let app = app_with(Arc::new(FakeModel::new()), &[]);
    let document = document(&app).await;
    let version = document["openapi"].as_str().unwrap();
    assert!(version.starts_with("3.1."), "openapi {version}");
    assert_eq!(document["info"]["title"], "gateway");

    let expected: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(documented(&document), expected);

    // Each documented route is served: anything but the fallback's 404 (a POST without a body gets a 400).
    for (method, path) in documented(&document) {
        let request = Request::builder()
            .method(method.to_uppercase().as_str())
            .uri(&path)
            .body(Body::empty())
            .unwrap();
        let (status, body) = send(&app, request).await;
        assert!(
            status != 404 && status != 405,
            "{method} {path} is documented but answered {status}: {body}"
        );
    }
    let (status, body) = send(&app, Request::get("/nope").body(Body::empty()).unwrap()).await;
    assert_eq!((status, &body["error"]["code"]), (404, &json!("not_found")));
}

/// Routes registered with a bare `.route` would be served without being documented: every route goes through
/// `routes!`, which documents it.
#[test]
fn every_route_is_registered_through_the_documenting_router() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![src.clone()];
    let mut bare = Vec::new();
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            for needle in [
                ".route(\"",
                ".route_service(\"",
                ".nest(\"",
                ".nest_service(\"",
            ] {
                if text.contains(needle) {
                    bare.push(format!("{} uses {needle}", path.display()));
                }
            }
        }
    }
    assert!(bare.is_empty(), "{bare:?}");
}

/// The properties `schema` requires, following a `$ref` into the document's components.
fn required<'a>(document: &'a Value, schema: &'a Value) -> Vec<&'a str> {
    let schema = match schema["$ref"].as_str() {
        Some(reference) => {
            let name = reference.rsplit('/').next().unwrap();
            &document["components"]["schemas"][name]
        }
        None => schema,
    };
    schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test]
async fn real_answers_have_what_the_schemas_require() {
    let app = app_with(Arc::new(FakeModel::new()), &[]);
    let document = document(&app).await;
    let (status, single) = send(
        &app,
        post_json(json!({ "image": b64(&small_png()) }).to_string()),
    )
    .await;
    assert_eq!(status, 200, "{single}");
    let schema = &document["components"]["schemas"]["PredictResponse"];
    let wanted = required(&document, schema);
    for field in ["model", "predictions", "timings_ms", "request_id"] {
        assert!(wanted.contains(&field), "{field} not required: {schema}");
    }
    for field in &wanted {
        assert!(
            single.get(field).is_some(),
            "answer lacks {field}: {single}"
        );
    }
    let prediction = &single["predictions"][0];
    for field in required(&document, &document["components"]["schemas"]["Prediction"]) {
        assert!(prediction.get(field).is_some(), "{field}: {prediction}");
    }
}

/// Python with openapi-spec-validator: `OIP_PYTHON`, else the workspace's `.venv` (scripts/test.sh makes it).
fn python() -> std::path::PathBuf {
    let python = std::env::var_os("OIP_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
    assert!(
        python.is_file(),
        "{} not found: run scripts/test.sh (it creates .venv with openapi-spec-validator) or set OIP_PYTHON",
        python.display()
    );
    python
}

#[tokio::test]
async fn a_third_party_validator_accepts_the_document_and_real_answers() {
    let fake = Arc::new(FakeModel::new());
    let app = app_with(fake.clone(), &["--max-images-per-request", "4"]);
    let document = document(&app).await;
    let png = small_png();
    let mut answers = Vec::new();
    let mut answer = |method: &str, path: &str, status: u16, body: Value| {
        answers.push(json!({ "method": method, "path": path, "status": status, "body": body }));
    };
    let (status, body) = send(&app, post_json(json!({ "image": b64(&png) }).to_string())).await;
    answer("post", "/predict", status, body);
    let batch = json!({ "images": [{ "image": b64(&png) }, { "image": b64(b"not an image") }] });
    let (status, body) = send(&app, post_json(batch.to_string())).await;
    assert_eq!(body["results"][1]["status"], 422, "{body}");
    answer("post", "/predict", status, body);
    let (status, body) = send(&app, post_json("{")).await;
    answer("post", "/predict", status, body);
    let five = json!({ "images": vec![json!({ "image": b64(&png) }); 5] });
    let (status, body) = send(&app, post_json(five.to_string())).await;
    answer("post", "/predict", status, body);
    for path in ["/test", "/v1/models", "/healthz", "/readyz"] {
        let (status, body) = send(&app, Request::get(path).body(Body::empty()).unwrap()).await;
        answer("get", path, status, body);
    }
    *fake.ready.lock().unwrap() = Ok(false);
    let (status, body) = send(&app, Request::get("/readyz").body(Body::empty()).unwrap()).await;
    answer("get", "/readyz", status, body);
    let statuses: Vec<u64> = answers
        .iter()
        .map(|a| a["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [200, 200, 400, 413, 200, 200, 200, 200, 503]);

    let input = json!({ "document": document, "answers": answers }).to_string();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openapi_check.py");
    let mut child = tokio::process::Command::new(python())
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, input.as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let output = child.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.trim() == "ok",
        "openapi_check.py: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
