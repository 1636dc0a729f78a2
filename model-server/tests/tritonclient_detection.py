"""Drives a running model server's detector with tritonclient.grpc, a real third-party Open Inference Protocol
client. Usage: python tritonclient_detection.py HOST:PORT YOLO_TESTDATA_DIR
The golden letterboxed inputs go in as UINT8 `images`; the EfficientNMS-layout outputs must match the reference's
detections (OpenCV dnn): same labels, IoU >= 0.99, scores within 1e-3. Exits non-zero on the first mismatch."""
import json
import os
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

MODEL = "yolov3-tiny"
PHOTOS = ["camera", "coffee", "motorcycle_left", "clock_motion"]
OUTPUTS = ["num_detections", "detection_boxes", "detection_scores", "detection_classes"]
SIZE = 416


def check(cond, msg):
    if not cond:
        raise SystemExit(f"FAIL: {msg}")


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def unletterbox(box, width, height):
    """Maps a box in letterboxed input pixels back to the photo's, as the reference letterboxed it."""
    scale = min(SIZE / width, SIZE / height)
    dx = (SIZE - max(round(width * scale), 1)) // 2
    dy = (SIZE - max(round(height * scale), 1)) // 2
    x1, y1, x2, y2 = box
    return [
        min(max((x1 - dx) / scale, 0), width),
        min(max((y1 - dy) / scale, 0), height),
        min(max((x2 - dx) / scale, 0), width),
        min(max((y2 - dy) / scale, 0), height),
    ]


def infer(client, images, parameters=None):
    inp = grpcclient.InferInput("images", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images)
    res = client.infer(MODEL, [inp], outputs=[grpcclient.InferRequestedOutput(o) for o in OUTPUTS],
                       parameters=parameters)
    return {o: res.as_numpy(o) for o in OUTPUTS}


def main():
    url, data = sys.argv[1], sys.argv[2]
    client = grpcclient.InferenceServerClient(url=url)
    check(client.is_model_ready(MODEL), "detector not ready")

    meta = client.get_model_metadata(MODEL, as_json=True)
    inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]}
    check(inputs == {"images": ("UINT8", [-1, SIZE, SIZE, 3])}, f"input metadata: {inputs}")
    outputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]}
    check(outputs == {
        "num_detections": ("INT32", [-1, 1]),
        "detection_boxes": ("FP32", [-1, -1, 4]),
        "detection_scores": ("FP32", [-1, -1]),
        "detection_classes": ("INT32", [-1, -1]),
    }, f"output metadata: {outputs}")
    config = client.get_model_config(MODEL, as_json=True)["config"]
    labels = config["parameters"]["labels"]["string_value"].split("\n")
    check(len(labels) == 80 and labels[0] == "person" and labels[79] == "toothbrush", f"labels: {labels[:3]}...")
    check(json.loads(config["parameters"]["preprocessing"]["string_value"])["resize"] == "letterbox",
          f"preprocessing: {config['parameters']}")

    reference = json.load(open(os.path.join(data, "detections.json")))
    batch = np.stack([np.load(os.path.join(data, f"{p}.letterbox.npy")) for p in PHOTOS])
    singles = []
    for i, photo in enumerate(PHOTOS):
        out = infer(client, batch[i:i + 1])
        singles.append(out)
        n = int(out["num_detections"][0, 0])
        check(out["detection_boxes"].shape == (1, 100, 4), f"{photo}: boxes {out['detection_boxes'].shape}")
        check(out["detection_boxes"].dtype == np.float32 and out["detection_classes"].dtype == np.int32,
              f"{photo}: dtypes")
        check(not out["detection_scores"][0, n:].any(), f"{photo}: rows past num_detections are not zero")
        expected = reference[f"{photo}.png"]
        want = expected["detections"]
        check(n == len(want), f"{photo}: {n} detections, reference has {len(want)}")
        for k, w in enumerate(want):
            cls = int(out["detection_classes"][0, k])
            score = float(out["detection_scores"][0, k])
            box = unletterbox(out["detection_boxes"][0, k].tolist(), expected["width"], expected["height"])
            check(labels[cls] == w["label"], f"{photo}: #{k} is {labels[cls]}, reference {w['label']}")
            check(abs(score - w["score"]) <= 1e-3, f"{photo}: #{k} score {score} vs {w['score']}")
            overlap = iou(box, w["box"])
            check(overlap >= 0.99, f"{photo}: #{k} IoU {overlap:.4f} of {box} and {w['box']}")
        print(f"{photo}: {n} detections match ({', '.join(labels[int(c)] for c in out['detection_classes'][0, :n])})")

    # One request of four images answers as four requests of one.
    together = infer(client, batch)
    for i, photo in enumerate(PHOTOS):
        for o in OUTPUTS:
            diff = np.abs(together[o][i].astype(np.float64) - singles[i][o][0].astype(np.float64)).max()
            check(diff <= 1e-4, f"{photo}: {o} in a batch differs by {diff}")

    # The selection parameters, as a Triton user sets them.
    strict = infer(client, batch, parameters={"score_threshold": 0.45, "max_detections": 1})
    check(strict["detection_boxes"].shape == (4, 1, 4), f"max_detections 1: {strict['detection_boxes'].shape}")
    for i, photo in enumerate(PHOTOS):
        kept = [d for d in reference[f"{photo}.png"]["detections"] if d["score"] >= 0.45][:1]
        check(int(strict["num_detections"][i, 0]) == len(kept), f"{photo}: score_threshold 0.45 kept {strict['num_detections'][i, 0]}")
    try:
        infer(client, batch[:1], parameters={"iou_threshold": 1.5})
        check(False, "iou_threshold 1.5 accepted")
    except InferenceServerException as e:
        check(e.status() == "StatusCode.INVALID_ARGUMENT" and "iou_threshold" in e.message(),
              f"iou_threshold 1.5 gave {e.status()}: {e.message()}")
    try:
        inp = grpcclient.InferInput("pixels", [1, SIZE, SIZE, 3], "UINT8")
        inp.set_data_from_numpy(batch[:1])
        client.infer(MODEL, [inp])
        check(False, "a classifier's input accepted")
    except InferenceServerException as e:
        check(e.status() == "StatusCode.INVALID_ARGUMENT" and "images" in e.message(),
              f"pixels input gave {e.status()}: {e.message()}")

    stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    check(int(stats["inference_count"]) >= 4 + 4 + 4, f"statistics: {stats}")
    print("tritonclient detection: ok")


if __name__ == "__main__":
    main()
