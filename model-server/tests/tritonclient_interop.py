"""Drives a running model server with tritonclient.grpc, a real third-party
Open Inference Protocol client. Usage: python tritonclient_interop.py HOST:PORT TESTDATA_DIR
Exits non-zero with a message on the first mismatch."""
import json
import os
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

MODEL = "efficientnet-lite0"
PHOTOS = {"chelsea": 282, "coffee": 967, "rocket": 657, "camera": 872}


def check(cond, msg):
    if not cond:
        raise SystemExit(f"FAIL: {msg}")


def main():
    url, data = sys.argv[1], sys.argv[2]
    client = grpcclient.InferenceServerClient(url=url)
    check(client.is_server_live(), "server not live")
    check(client.is_server_ready(), "server not ready")
    check(client.is_model_ready(MODEL), "model not ready")

    meta = client.get_model_metadata(MODEL, as_json=True)
    inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]}
    check(inputs == {"pixels": ("UINT8", [-1, 224, 224, 3])}, f"input metadata: {inputs}")
    outputs = {t["name"] for t in meta["outputs"]}
    check(outputs == {"logits", "probabilities"}, f"outputs: {outputs}")
    config = client.get_model_config(MODEL, as_json=True)["config"]
    check(int(config["max_batch_size"]) >= 1, f"config: {config}")
    server = client.get_server_metadata(as_json=True)
    check("classification" in server.get("extensions", []), f"server metadata: {server}")

    labels = [l.rstrip("\n") for l in open(os.path.join(data, "imagenet_labels.txt"))]
    for name, top1 in PHOTOS.items():
        pixels = np.load(os.path.join(data, f"{name}.pixels.npy"))[None]  # (1, 224, 224, 3) uint8
        golden = json.load(open(os.path.join(data, f"{name}.top5.json")))["top5"]
        inp = grpcclient.InferInput("pixels", list(pixels.shape), "UINT8")
        inp.set_data_from_numpy(pixels)

        res = client.infer(MODEL, [inp], outputs=[grpcclient.InferRequestedOutput("logits")])
        logits = res.as_numpy("logits")
        want = np.load(os.path.join(data, f"{name}.logits.npy"))
        check(logits.shape == (1, 1000) and logits.dtype == np.float32, f"{name}: logits {logits.shape} {logits.dtype}")
        diff = float(np.abs(logits - want).max())
        check(diff < 1e-3, f"{name}: logits differ from golden by {diff}")
        check(int(logits.argmax()) == top1, f"{name}: top-1 {logits.argmax()} != {top1}")

        res = client.infer(MODEL, [inp], outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=5)])
        classes = res.as_numpy("probabilities")
        check(classes.shape == (1, 5), f"{name}: classification shape {classes.shape}")
        got = [c.decode().split(":", 2) for c in classes[0]]
        check([int(i) for _, i, _ in got] == [g["index"] for g in golden], f"{name}: top-5 {got} vs {golden}")
        check([l for _, _, l in got] == [labels[g["index"]] for g in golden], f"{name}: labels {got}")
        for (p, _, _), g in zip(got, golden):
            check(abs(float(p) - g["prob"]) < 1e-3, f"{name}: probability {p} vs {g['prob']}")
        print(f"{name}: top-1 {got[0][2]!r} p={got[0][0]} (max logit diff {diff:.1e})")

    try:
        client.infer("no-such-model", [inp])
        check(False, "unknown model accepted")
    except InferenceServerException as e:
        check(e.status() == "StatusCode.NOT_FOUND", f"unknown model gave {e.status()}: {e.message()}")
    print("tritonclient interop: ok")


if __name__ == "__main__":
    main()
