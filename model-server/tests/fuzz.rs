//! Fuzz targets of the model server's request decoding, on the stable toolchain with bolero's random engine:
//! valid requests (the seeds) mutated byte by byte, truncated and spliced, then decoded as a protobuf ModelInfer
//! message or a REST body and checked by the codec against a classifier, a normalised classifier and a
//! detector. Nothing may panic, and what is accepted must be a consistent batch.
//!
//! `cargo test` runs each target for a moment. For a long run (ten minutes each, one after another):
//!
//!     BOLERO_RANDOM_TEST_TIME_MS=600000 cargo test -p model-server --test fuzz -- --nocapture --test-threads 1
//!
//! A failure prints the `BOLERO_RANDOM_SEED` that reproduces it; each crash found becomes a regression test.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bolero::check;
use model_server::backend::Kind;
use model_server::batcher::Images;
use model_server::codec::{self, Parsed};
use model_server::error::InferError;
use model_server::repository::{InputFormat, InputSize, Normalisation, VersionConfig};
use model_server::rest;
use oip_proto::inference::infer_parameter::ParameterChoice;
use oip_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use oip_proto::inference::{InferParameter, InferTensorContents, ModelInferRequest};
use prost::Message;

const MAX_BATCH: usize = 4;
/// Each target's run under plain `cargo test`, unless BOLERO_RANDOM_TEST_TIME_MS says otherwise.
const CI_TIME: Duration = Duration::from_secs(3);

/// A small model of each kind: 2x3 images keep the seeds short, so mutations reach the headers often.
fn models() -> [(Kind, VersionConfig); 3] {
    let config = |format| VersionConfig {
        architecture: "efficientnet-lite0".into(),
        weights: "w".into(),
        network: None,
        labels: "l".into(),
        num_classes: 4,
        input: InputSize {
            height: 2,
            width: 3,
            channels: 3,
        },
        input_format: format,
        normalisation: Normalisation {
            mean: 127.0,
            std: 128.0,
        },
        preprocessing: serde_json::Value::Null,
        instance_group: None,
    };
    [
        (Kind::Classification, config(InputFormat::Pixels)),
        (Kind::Classification, config(InputFormat::Normalised)),
        (Kind::Detection, config(InputFormat::Pixels)),
    ]
}

fn parameter(choice: ParameterChoice) -> InferParameter {
    InferParameter {
        parameter_choice: Some(choice),
    }
}

/// Valid requests of every form the codec takes.
fn seed_requests() -> Vec<ModelInferRequest> {
    let tensor = |name: &str, datatype: &str, shape: Vec<i64>| InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape,
        ..Default::default()
    };
    let classify = |k: i64| InferRequestedOutputTensor {
        name: "probabilities".into(),
        parameters: [(
            "classification".to_owned(),
            parameter(ParameterChoice::Int64Param(k)),
        )]
        .into(),
    };
    let mut typed_pixels = tensor("pixels", "UINT8", vec![1, 2, 3, 3]);
    typed_pixels.contents = Some(InferTensorContents {
        uint_contents: (0..18).collect(),
        ..Default::default()
    });
    let mut typed_fp32 = tensor("input", "FP32", vec![1, 3, 2, 3]);
    typed_fp32.contents = Some(InferTensorContents {
        fp32_contents: vec![0.25; 18],
        ..Default::default()
    });
    vec![
        ModelInferRequest {
            model_name: "m".into(),
            id: "seed".into(),
            inputs: vec![tensor("pixels", "UINT8", vec![2, 2, 3, 3])],
            outputs: vec![classify(2)],
            raw_input_contents: vec![(0..36).collect()],
            ..Default::default()
        },
        ModelInferRequest {
            inputs: vec![typed_pixels],
            ..Default::default()
        },
        ModelInferRequest {
            inputs: vec![typed_fp32],
            outputs: vec![InferRequestedOutputTensor {
                name: "logits".into(),
                ..Default::default()
            }],
            ..Default::default()
        },
        ModelInferRequest {
            inputs: vec![tensor("input", "FP32", vec![1, 3, 2, 3])],
            raw_input_contents: vec![[0.5f32.to_le_bytes(); 18].concat()],
            ..Default::default()
        },
    ]
    .into_iter()
    // One parameter per detector seed: prost encodes a map in HashMap order, which changes from run to run, and
    // a failure must replay from its seed.
    .chain(
        [
            ("score_threshold", ParameterChoice::DoubleParam(0.3)),
            ("iou_threshold", ParameterChoice::DoubleParam(0.5)),
            ("max_detections", ParameterChoice::Int64Param(5)),
        ]
        .into_iter()
        .map(|(name, value)| ModelInferRequest {
            inputs: vec![tensor("images", "UINT8", vec![1, 2, 3, 3])],
            raw_input_contents: vec![vec![128; 18]],
            parameters: [(name.to_owned(), parameter(value))].into(),
            ..Default::default()
        }),
    )
    .collect()
}

/// The REST bodies of the seeds, with JSON `data` and with binary tensors, and their header lengths.
fn seed_bodies() -> Vec<(Vec<u8>, Option<usize>)> {
    vec![
        (
            br#"{"id":"a","inputs":[{"name":"pixels","shape":[1,2,3,3],"datatype":"UINT8","data":[[1,2,3],[4,5,6],[7,8,9],[1,2,3],[4,5,6],[7,8,9]]}],"outputs":[{"name":"probabilities","parameters":{"classification":2,"binary_data":true}}]}"#.to_vec(),
            None,
        ),
        (
            br#"{"inputs":[{"name":"input","shape":[1,3,2,3],"datatype":"FP32","data":[0.5,1e3,-2.5,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1]}],"parameters":{"binary_data_output":true}}"#.to_vec(),
            None,
        ),
        {
            let header = br#"{"inputs":[{"name":"images","shape":[1,2,3,3],"datatype":"UINT8","parameters":{"binary_data_size":18}}],"parameters":{"score_threshold":0.3,"max_detections":5}}"#;
            ([&header[..], &[128u8; 18]].concat(), Some(header.len()))
        },
    ]
}

/// How a seed is changed: which seed, byte edits, an optional cut, an optional splice of another seed's tail.
type Mutation = (u8, Vec<(u16, u8)>, Option<u16>, Option<(u8, u16)>);

fn mutate(seeds: &[Vec<u8>], (pick, edits, cut, splice): &Mutation) -> Vec<u8> {
    let mut bytes = seeds[usize::from(*pick) % seeds.len()].clone();
    for &(at, value) in edits {
        if !bytes.is_empty() {
            let i = usize::from(at) % bytes.len();
            bytes[i] = value;
        }
    }
    if let Some(cut) = cut {
        bytes.truncate(usize::from(*cut) % (bytes.len() + 1));
    }
    if let Some((other, from)) = splice {
        let other = &seeds[usize::from(*other) % seeds.len()];
        let from = usize::from(*from) % (other.len() + 1);
        bytes.extend_from_slice(&other[from..]);
    }
    bytes
}

/// A value of the kinds a JSON body holds, the edge cases first.
fn palette(which: u8) -> serde_json::Value {
    use serde_json::json;
    match which % 16 {
        0 => json!(null),
        1 => json!(true),
        2 => json!(-1),
        3 => json!(0),
        4 => json!(256),
        5 => json!(1e300),
        6 => json!(-0.5),
        7 => json!(u64::MAX),
        8 => json!(""),
        9 => json!("UINT8"),
        10 => json!("FP32"),
        11 => json!([]),
        12 => json!([[1, 2], [3]]),
        13 => json!({}),
        14 => json!({"binary_data_size": 18}),
        _ => json!(4),
    }
}

/// Replaces the `target`-th node of the tree (depth first) with a palette value, drops it from its parent, or
/// doubles it in its array.
fn edit_json(value: &mut serde_json::Value, target: &mut usize, op: u8) -> bool {
    use serde_json::Value;
    if *target == 0 {
        *value = palette(op);
        return true;
    }
    *target -= 1;
    match value {
        Value::Array(items) => {
            for i in 0..items.len() {
                if *target == 0 && op.is_multiple_of(4) {
                    let copy = items[i].clone();
                    items.insert(i, copy);
                    return true;
                }
                if edit_json(&mut items[i], target, op) {
                    return true;
                }
            }
        }
        Value::Object(fields) => {
            let keys: Vec<String> = fields.keys().cloned().collect();
            for key in keys {
                if *target == 0 && op.is_multiple_of(4) {
                    fields.remove(&key);
                    return true;
                }
                if let Some(v) = fields.get_mut(&key)
                    && edit_json(v, target, op)
                {
                    return true;
                }
            }
        }
        _ => {}
    }
    false
}

/// What an accepted request must be: a batch within the limit whose images fill it exactly.
fn check_accepted(result: Result<Parsed, InferError>, config: &VersionConfig) {
    let Ok(parsed) = result else { return };
    let r = parsed.request;
    assert!((1..=MAX_BATCH).contains(&r.batch), "batch {}", r.batch);
    let per_image = config.input.height * config.input.width * config.input.channels;
    match r.images {
        Images::Pixels(p) => assert_eq!(p.len(), r.batch * per_image),
        Images::Normalised(v) => {
            assert_eq!(v.len(), r.batch * per_image);
            assert!(
                v.iter().all(|x| x.is_finite()),
                "non-finite values accepted"
            );
        }
    }
    assert!(!parsed.outputs.is_empty());
    let s = r.selection;
    assert!(
        (0.0..=1.0).contains(&s.score_threshold) && s.iou_threshold > 0.0 && s.iou_threshold <= 1.0
    );
    assert!((1..=codec::MAX_DETECTIONS_LIMIT).contains(&s.max_detections));
}

/// Inputs run, decoded by the transport, and accepted by the codec for some model: the last two show how deep
/// the mutations reach.
#[derive(Default)]
struct Counts([AtomicU64; 3]);

impl Counts {
    fn add(&self, which: usize) {
        self.0[which].fetch_add(1, Ordering::Relaxed);
    }

    fn report(&self, name: &str) {
        let [runs, decoded, accepted] = self.0.each_ref().map(|c| c.load(Ordering::Relaxed));
        println!(
            "fuzz target {name}: {runs} inputs, {decoded} decoded, {accepted} accepted by the codec"
        );
        assert!(
            accepted > 0,
            "no mutated input got through: the seeds or the mutations are broken"
        );
    }
}

/// The codec's verdict on a copy of `request` for one model.
fn parse_as(
    request: &ModelInferRequest,
    kind: Kind,
    config: &VersionConfig,
) -> Result<Parsed, InferError> {
    let mut r = request.clone();
    let raw = std::mem::take(&mut r.raw_input_contents);
    codec::parse(
        &mut r.inputs,
        raw,
        &r.outputs,
        &r.parameters,
        kind,
        config,
        MAX_BATCH,
    )
}

/// Runs the codec on a decoded request against every model.
fn parse_everywhere(request: &ModelInferRequest, counts: &Counts) {
    counts.add(1);
    let mut any = false;
    for (kind, config) in models() {
        let result = parse_as(request, kind, &config);
        any |= result.is_ok();
        check_accepted(result, &config);
    }
    if any {
        counts.add(2);
    }
}

#[test]
fn fuzz_protobuf_infer_requests() {
    let seeds: Vec<Vec<u8>> = seed_requests().iter().map(Message::encode_to_vec).collect();
    let counts = Counts::default();
    check!()
        .with_type::<Mutation>()
        .with_test_time(CI_TIME)
        .for_each(|mutation| {
            counts.add(0);
            if let Ok(request) = ModelInferRequest::decode(mutate(&seeds, mutation).as_slice()) {
                parse_everywhere(&request, &counts);
            }
        });
    counts.report("protobuf");
}

#[test]
fn fuzz_rest_infer_bodies() {
    let seeds = seed_bodies();
    let bodies: Vec<Vec<u8>> = seeds.iter().map(|(b, _)| b.clone()).collect();
    let counts = Counts::default();
    check!()
        .with_type::<(Mutation, Option<u16>)>()
        .with_test_time(CI_TIME)
        .for_each(|(mutation, header)| {
            counts.add(0);
            let body = mutate(&bodies, mutation);
            // The seed's own header length, or another, to cut the JSON anywhere.
            let header = header
                .map(usize::from)
                .or(seeds[usize::from(mutation.0) % seeds.len()].1);
            if let Ok(request) = rest::parse_request(&body, header, "m", "") {
                parse_everywhere(&request.message, &counts);
            }
        });
    counts.report("rest");
}

#[test]
fn fuzz_rest_json_structure() {
    let seeds = seed_bodies();
    let counts = Counts::default();
    check!()
        .with_type::<(u8, Vec<(u16, u8)>)>()
        .with_test_time(CI_TIME)
        .for_each(|(pick, edits)| {
            counts.add(0);
            let (body, header) = &seeds[usize::from(*pick) % seeds.len()];
            let json_end = header.unwrap_or(body.len());
            let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(&body[..json_end])
            else {
                return;
            };
            for &(at, op) in edits {
                edit_json(&mut value, &mut usize::from(at % 64), op);
            }
            let mut edited = value.to_string().into_bytes();
            let header = header.map(|_| edited.len());
            edited.extend_from_slice(&body[json_end..]);
            if let Ok(request) = rest::parse_request(&edited, header, "m", "") {
                parse_everywhere(&request.message, &counts);
            }
        });
    counts.report("rest-json");
}

#[test]
fn the_seeds_are_accepted_so_mutations_start_from_valid_requests() {
    let accepted = |request: &ModelInferRequest| {
        models()
            .into_iter()
            .any(|(kind, config)| parse_as(request, kind, &config).is_ok())
    };
    for seed in seed_requests() {
        assert!(accepted(&seed), "seed refused: {seed:?}");
    }
    for (body, header) in seed_bodies() {
        let request = rest::parse_request(&body, header, "m", "").expect("REST seed");
        assert!(
            accepted(&request.message),
            "REST seed refused: {}",
            String::from_utf8_lossy(&body)
        );
    }
}
