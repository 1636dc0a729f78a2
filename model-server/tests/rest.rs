//! The KServe v2 REST API on the HTTP port: the same answers and the same error classes as gRPC for the same
//! requests, `tritonclient.http` with JSON and binary tensors, and the README's `curl` example as written.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

use common::*;
use oip_proto::inference::infer_parameter::ParameterChoice;
use oip_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use oip_proto::inference::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

const MODEL: &str = "efficientnet-lite0";
const DETECTOR: &str = "yolov3-tiny";

/// A response of the HTTP port: status, lower-case headers, body.
struct HttpResponse {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

/// One HTTP/1.1 request on its own connection, read to the end (binary bodies included).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> HttpResponse {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.expect("write");
    stream.write_all(body).await.expect("write body");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "this reader takes whole bodies"
    );
    HttpResponse {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

fn parameter_json(p: &InferParameter) -> Value {
    match &p.parameter_choice {
        Some(ParameterChoice::BoolParam(b)) => json!(b),
        Some(ParameterChoice::Int64Param(i)) => json!(i),
        Some(ParameterChoice::Uint64Param(u)) => json!(u),
        Some(ParameterChoice::DoubleParam(d)) => json!(d),
        Some(ParameterChoice::StringParam(s)) => json!(s),
        other => panic!("no JSON form for {other:?}"),
    }
}

fn parameters_json(ps: &HashMap<String, InferParameter>) -> serde_json::Map<String, Value> {
    ps.iter()
        .map(|(k, v)| (k.clone(), parameter_json(v)))
        .collect()
}

/// The REST form of a gRPC request, as tritonclient.http would send it: raw contents become binary data after
/// the JSON, typed contents become JSON `data`, and every output comes back as binary data so the bytes compare.
fn rest_request(r: &ModelInferRequest) -> (String, Vec<u8>, Vec<(&'static str, String)>) {
    let inputs: Vec<Value> = r
        .inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut input = json!({"name": t.name, "shape": t.shape, "datatype": t.datatype});
            match (&t.contents, r.raw_input_contents.get(i)) {
                (_, Some(raw)) => input["parameters"] = json!({"binary_data_size": raw.len()}),
                (Some(c), None) if !c.uint_contents.is_empty() => {
                    input["data"] = json!(c.uint_contents)
                }
                (Some(c), None) => input["data"] = json!(c.fp32_contents),
                (None, None) => input["data"] = json!([]),
            }
            input
        })
        .collect();
    let outputs: Vec<Value> = r
        .outputs
        .iter()
        .map(|o| json!({"name": o.name, "parameters": parameters_json(&o.parameters)}))
        .collect();
    let mut parameters = parameters_json(&r.parameters);
    parameters.insert("binary_data_output".into(), json!(true));
    let mut body = json!({"id": r.id, "inputs": inputs, "parameters": parameters});
    if !outputs.is_empty() {
        body["outputs"] = json!(outputs);
    }
    let mut bytes = body.to_string().into_bytes();
    let header = bytes.len();
    for raw in &r.raw_input_contents {
        bytes.extend_from_slice(raw);
    }
    let path = if r.model_version.is_empty() {
        format!("/v2/models/{}/infer", r.model_name)
    } else {
        format!(
            "/v2/models/{}/versions/{}/infer",
            r.model_name, r.model_version
        )
    };
    (
        path,
        bytes,
        vec![("Inference-Header-Content-Length", header.to_string())],
    )
}

fn pixels_request(
    model: &str,
    pixels: Vec<u8>,
    batch: i64,
    outputs: Vec<InferRequestedOutputTensor>,
) -> ModelInferRequest {
    let side = if model == DETECTOR { 416 } else { 224 };
    ModelInferRequest {
        model_name: model.into(),
        id: "same-1".into(),
        inputs: vec![InferInputTensor {
            name: if model == DETECTOR {
                "images"
            } else {
                "pixels"
            }
            .into(),
            datatype: "UINT8".into(),
            shape: vec![batch, side, side, 3],
            ..Default::default()
        }],
        outputs,
        raw_input_contents: vec![pixels],
        ..Default::default()
    }
}

fn output(name: &str, params: &[(&str, InferParameter)]) -> InferRequestedOutputTensor {
    InferRequestedOutputTensor {
        name: name.into(),
        parameters: params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
    }
}

fn int(v: i64) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::Int64Param(v)),
    }
}

fn double(v: f64) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::DoubleParam(v)),
    }
}

/// The status the README's table gives a gRPC code.
fn http_status(code: Code) -> u16 {
    match code {
        Code::NotFound => 404,
        Code::InvalidArgument => 400,
        Code::ResourceExhausted => 429,
        Code::Unavailable => 503,
        other => panic!("no case here gives {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_and_grpc_give_the_same_answers_and_the_same_errors_for_the_same_requests() {
    let server = TestServer::start_with(&detector_repository(), &["--max-batch-size", "4"]).await;
    server.wait_ready().await;
    let mut client = server.client().await;
    let chelsea = golden_pixels("chelsea");
    let one = vec![0u8; 224 * 224 * 3];
    let letterboxed = vec![128u8; 416 * 416 * 3];
    let typed = |values: Vec<u32>, batch: i64| {
        let mut r = pixels_request(MODEL, vec![], batch, vec![]);
        r.raw_input_contents.clear();
        r.inputs[0].contents = Some(InferTensorContents {
            uint_contents: values,
            ..Default::default()
        });
        r
    };
    let with = |f: &dyn Fn(&mut ModelInferRequest)| {
        let mut r = pixels_request(MODEL, one.clone(), 1, vec![]);
        f(&mut r);
        r
    };
    // What each case is, the request, and the gRPC code expected (OK for an answer).
    let cases: Vec<(&str, ModelInferRequest, Code)> = vec![
        (
            "logits and top-3 of a photo",
            pixels_request(
                MODEL,
                chelsea.clone(),
                1,
                vec![
                    output("logits", &[]),
                    output("probabilities", &[("classification", int(3))]),
                ],
            ),
            Code::Ok,
        ),
        (
            "a batch of two, typed contents",
            typed(
                chelsea.iter().chain(&one).map(|&v| u32::from(v)).collect(),
                2,
            ),
            Code::Ok,
        ),
        (
            "a detector's boxes",
            pixels_request(DETECTOR, letterboxed.clone(), 1, vec![]),
            Code::Ok,
        ),
        (
            "unknown model",
            with(&|r| r.model_name = "resnet-9000".into()),
            Code::NotFound,
        ),
        (
            "unknown version",
            with(&|r| r.model_version = "7".into()),
            Code::NotFound,
        ),
        (
            "wrong shape",
            with(&|r| r.inputs[0].shape = vec![1, 3, 224, 224]),
            Code::InvalidArgument,
        ),
        (
            "wrong datatype",
            with(&|r| r.inputs[0].datatype = "FP16".into()),
            Code::InvalidArgument,
        ),
        (
            "unknown input",
            with(&|r| r.inputs[0].name = "input".into()),
            Code::InvalidArgument,
        ),
        (
            "truncated raw bytes",
            pixels_request(MODEL, one[..1000].to_vec(), 1, vec![]),
            Code::InvalidArgument,
        ),
        (
            "batch above max_batch_size",
            pixels_request(MODEL, [&one[..]; 5].concat(), 5, vec![]),
            Code::InvalidArgument,
        ),
        (
            "two inputs",
            with(&|r| {
                r.inputs.push(r.inputs[0].clone());
                r.raw_input_contents.push(r.raw_input_contents[0].clone());
            }),
            Code::InvalidArgument,
        ),
        (
            "typed value above 255",
            typed([vec![256], vec![0; 224 * 224 * 3 - 1]].concat(), 1),
            Code::InvalidArgument,
        ),
        (
            "typed values too few",
            typed(vec![1, 2, 3], 1),
            Code::InvalidArgument,
        ),
        (
            "unknown output",
            pixels_request(MODEL, one.clone(), 1, vec![output("embeddings", &[])]),
            Code::InvalidArgument,
        ),
        (
            "classification out of range",
            pixels_request(
                MODEL,
                one.clone(),
                1,
                vec![output("probabilities", &[("classification", int(0))])],
            ),
            Code::InvalidArgument,
        ),
        (
            "detector score_threshold above 1",
            {
                let mut r = pixels_request(DETECTOR, letterboxed.clone(), 1, vec![]);
                r.parameters.insert("score_threshold".into(), double(2.0));
                r
            },
            Code::InvalidArgument,
        ),
    ];
    for (what, request, expected) in cases {
        let (path, body, headers) = rest_request(&request);
        let grpc = client.model_infer(request).await;
        let rest = http(server.http_addr, "POST", &path, &headers, &body).await;
        match grpc {
            Ok(answer) => {
                assert_eq!(expected, Code::Ok, "{what}: gRPC answered");
                assert_eq!(
                    rest.status,
                    200,
                    "{what}: {}",
                    String::from_utf8_lossy(&rest.body)
                );
                let answer = answer.into_inner();
                let header: usize = rest.headers["inference-header-content-length"]
                    .parse()
                    .expect("length");
                let json: Value =
                    serde_json::from_slice(&rest.body[..header]).expect("JSON header");
                assert_eq!(json["id"], answer.id, "{what}");
                assert_eq!(json["model_version"], answer.model_version, "{what}");
                let names: Vec<&str> = json["outputs"]
                    .as_array()
                    .expect("outputs")
                    .iter()
                    .map(|o| o["name"].as_str().unwrap_or(""))
                    .collect();
                let grpc_names: Vec<&str> =
                    answer.outputs.iter().map(|o| o.name.as_str()).collect();
                assert_eq!(names, grpc_names, "{what}");
                for (o, t) in json["outputs"]
                    .as_array()
                    .expect("outputs")
                    .iter()
                    .zip(&answer.outputs)
                {
                    assert_eq!(o["shape"], json!(t.shape), "{what}: {}", t.name);
                    assert_eq!(o["datatype"], t.datatype, "{what}: {}", t.name);
                }
                // Inference is deterministic, so the same request gives the same bytes over either transport.
                assert_eq!(
                    rest.body[header..],
                    answer.raw_output_contents.concat(),
                    "{what}: outputs differ"
                );
            }
            Err(status) => {
                assert_eq!(status.code(), expected, "{what}: {}", status.message());
                assert_eq!(
                    rest.status,
                    http_status(expected),
                    "{what}: {}",
                    String::from_utf8_lossy(&rest.body)
                );
                let json: Value = serde_json::from_slice(&rest.body).expect("JSON error");
                assert_eq!(
                    json["error"],
                    status.message(),
                    "{what}: the messages differ"
                );
            }
        }
    }
    // The REST transport's own faults, with the same class.
    type Bad<'a> = (&'a str, &'a [u8], Vec<(&'a str, String)>);
    let bad: [Bad; 3] = [
        ("not JSON", b"{", vec![]),
        (
            "header length past the body",
            br#"{"inputs":[]}"#,
            vec![("Inference-Header-Content-Length", "99".into())],
        ),
        (
            "header length not a number",
            br#"{"inputs":[]}"#,
            vec![("Inference-Header-Content-Length", "x".into())],
        ),
    ];
    for (what, body, headers) in bad {
        let r = http(
            server.http_addr,
            "POST",
            "/v2/models/efficientnet-lite0/infer",
            &headers,
            body,
        )
        .await;
        assert_eq!(r.status, 400, "{what}");
        let json: Value = serde_json::from_slice(&r.body).expect("JSON error");
        assert!(
            json["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: {json}"
        );
    }
    // Every request above was counted once per transport, failures included.
    let stats: Value = serde_json::from_slice(
        &http(
            server.http_addr,
            "GET",
            "/v2/models/efficientnet-lite0/stats",
            &[],
            b"",
        )
        .await
        .body,
    )
    .expect("stats");
    let grpc_stats = client
        .model_statistics(ModelStatisticsRequest {
            name: MODEL.into(),
            version: String::new(),
        })
        .await
        .expect("statistics")
        .into_inner();
    let success = grpc_stats.model_stats[0]
        .inference_stats
        .as_ref()
        .and_then(|s| s.success.as_ref())
        .map_or(0, |d| d.count);
    assert_eq!(
        stats["model_stats"][0]["inference_stats"]["success"]["count"],
        json!(success)
    );
    assert_eq!(
        success,
        2 * 2,
        "two classifier requests that succeed, over both transports"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metadata_paths_answer_as_grpc_does() {
    let server = TestServer::start(&[]).await;
    let addr = server.http_addr;
    let get = |path: &'static str| async move {
        let r = http(addr, "GET", path, &[], b"").await;
        (
            r.status,
            serde_json::from_slice::<Value>(&r.body).unwrap_or(Value::Null),
        )
    };
    let (status, server_meta) = get("/v2").await;
    assert_eq!(status, 200);
    assert_eq!(server_meta["name"], "model-server");
    assert!(
        server_meta["extensions"]
            .as_array()
            .is_some_and(|e| e.contains(&json!("classification")))
    );
    for path in [
        "/v2/models/efficientnet-lite0",
        "/v2/models/efficientnet-lite0/versions/1",
    ] {
        let (status, meta) = get(path).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(
            meta["inputs"],
            json!([{"name": "pixels", "datatype": "UINT8", "shape": [-1, 224, 224, 3]}]),
            "{path}"
        );
        assert_eq!(meta["versions"], json!(["1"]));
    }
    assert_eq!(get("/v2/models/efficientnet-lite0/ready").await.0, 200);
    assert_eq!(
        get("/v2/models/efficientnet-lite0/versions/1/ready")
            .await
            .0,
        200
    );
    let (status, missing) = get("/v2/models/efficientnet-lite0/versions/9/ready").await;
    assert_eq!(status, 404);
    assert!(
        missing["error"]
            .as_str()
            .is_some_and(|e| e.contains("available: 1")),
        "{missing}"
    );
    let (status, config) = get("/v2/models/efficientnet-lite0/config").await;
    assert_eq!(status, 200);
    assert_eq!(config["input"][0]["dims"], json!([224, 224, 3]));
    assert_eq!(config["input"][0]["data_type"], "TYPE_UINT8");
    assert_eq!(config["max_batch_size"], 8);
    assert!(
        config["parameters"]["labels"]["string_value"]
            .as_str()
            .is_some_and(|l| l.lines().count() == 1000)
    );
    let (status, stats) = get("/v2/models/stats").await;
    assert_eq!(status, 200);
    assert!(
        stats["model_stats"]
            .as_array()
            .is_some_and(|m| !m.is_empty()),
        "{stats}"
    );
    let (status, unknown) = get("/v2/models/resnet-9000").await;
    assert_eq!(status, 404);
    assert!(
        unknown["error"]
            .as_str()
            .is_some_and(|e| e.contains("resnet-9000"))
    );
    server.stop().await;
}

/// Runs a command in the workspace and returns its stdout; panics with its output when it fails.
async fn run(command: &mut tokio::process::Command, what: &str) -> String {
    let output = command.current_dir(workspace()).output().await.expect(what);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}{stderr}");
    assert!(
        output.status.success(),
        "{what} failed:\n{stdout}\n{stderr}"
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_http_gets_golden_logits_and_labels_with_json_and_binary_tensors() {
    let server = TestServer::start(&[]).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tritonclient_http.py");
    let stdout = run(
        tokio::process::Command::new(python())
            .arg(script)
            .arg(server.http_addr.to_string())
            .arg(golden("")),
        "tritonclient_http.py",
    )
    .await;
    assert!(stdout.contains("tritonclient http: ok"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_curl_example_works_as_written() {
    let readme = std::fs::read_to_string(workspace().join("README.md")).expect("README");
    let section = readme
        .split("### The REST API")
        .nth(1)
        .expect("the REST API section");
    let example = section
        .split("```sh\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("the curl example");
    assert!(
        example.contains("curl") && example.contains("/infer"),
        "{example}"
    );
    let server = TestServer::start(&[]).await;
    let script = example.replace("localhost:8002", &server.http_addr.to_string());
    // `python3` is the test environment's, which has numpy, as a reader's would after `pip install numpy`.
    let venv_bin = python().parent().expect("venv bin").to_path_buf();
    let path = format!(
        "{}:{}",
        venv_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let stdout = run(
        tokio::process::Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .env("PATH", path),
        "the README example",
    )
    .await;
    let answer: Value =
        serde_json::from_str(stdout.lines().last().expect("the answer")).expect("JSON answer");
    let top: Vec<&str> = answer["outputs"][0]["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(top.len(), 3, "{answer}");
    assert!(top[0].ends_with(":282:tiger cat"), "{answer}");
    let comment = section
        .split("# {")
        .nth(1)
        .expect("the answer in the README");
    let shown = comment
        .split("\"data\":[\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("the README's first answer");
    // The same class, and the same probability to within one unit of the last of the six printed digits: a
    // change in the order of the kernels' sums may move that digit, which a reader would not call a difference.
    let (shown_p, shown_class) = shown.split_once(':').expect("probability:index:label");
    let (served_p, served_class) = top[0].split_once(':').expect("probability:index:label");
    let (shown_p, served_p): (f64, f64) = (
        shown_p.parse().expect("the README's probability"),
        served_p.parse().expect("the served probability"),
    );
    assert!(
        shown_class == served_class && (shown_p - served_p).abs() <= 1.5e-6,
        "the README shows `{shown}`, the server answers `{}`",
        top[0]
    );
    server.stop().await;
}
