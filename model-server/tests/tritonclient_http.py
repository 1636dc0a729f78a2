"""Drives a running model server's REST port with tritonclient.http, a real third-party KServe v2 REST client, with
JSON and with binary tensors. Usage: python tritonclient_http.py HOST:PORT TESTDATA_DIR
Exits non-zero with a message on the first mismatch."""
import json
import os
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

MODEL = "efficientnet-lite0"
PHOTOS = {"chelsea": 282, "coffee": 967, "rocket": 657, "camera": 872}


def check(cond, msg):
    if not cond:
        raise SystemExit(f"FAIL: {msg}")


def text(element):
    return element.decode() if isinstance(element, bytes) else str(element)


def main():
    url, data = sys.argv[1], sys.argv[2]
    client = httpclient.InferenceServerClient(url=url)
    check(client.is_server_live(), "server not live")
    check(client.is_server_ready(), "server not ready")
    check(client.is_model_ready(MODEL), "model not ready")
    check(not client.is_model_ready(MODEL, "7"), "a missing version is ready")

    server = client.get_server_metadata()
    check("classification" in server.get("extensions", []), f"server metadata: {server}")
    meta = client.get_model_metadata(MODEL)
    inputs = [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]]
    check(inputs == [("pixels", "UINT8", [-1, 224, 224, 3])], f"inputs: {inputs}")
    check({t["name"] for t in meta["outputs"]} == {"logits", "probabilities"}, f"outputs: {meta['outputs']}")
    check(client.get_model_metadata(MODEL, "1")["versions"] == ["1"], "metadata of version 1")
    config = client.get_model_config(MODEL)
    check(config["max_batch_size"] >= 1 and config["input"][0]["dims"] == [224, 224, 3], f"config: {config}")
    check(config["input"][0]["data_type"] == "TYPE_UINT8", f"config input: {config['input']}")

    labels = [l.rstrip("\n") for l in open(os.path.join(data, "imagenet_labels.txt"))]
    for binary in (False, True):
        for name, top1 in PHOTOS.items():
            pixels = np.load(os.path.join(data, f"{name}.pixels.npy"))[None]  # (1, 224, 224, 3) uint8
            golden = json.load(open(os.path.join(data, f"{name}.top5.json")))["top5"]
            inp = httpclient.InferInput("pixels", list(pixels.shape), "UINT8")
            inp.set_data_from_numpy(pixels, binary_data=binary)
            outputs = [
                httpclient.InferRequestedOutput("logits", binary_data=binary),
                httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=5),
            ]
            res = client.infer(MODEL, [inp], outputs=outputs, request_id=f"{name}-{binary}")
            check(res.get_response()["id"] == f"{name}-{binary}", f"{name}: id {res.get_response()}")
            logits = res.as_numpy("logits")
            want = np.load(os.path.join(data, f"{name}.logits.npy"))
            check(logits.shape == (1, 1000) and logits.dtype == np.float32, f"{name}: logits {logits.shape} {logits.dtype}")
            diff = float(np.abs(logits - want).max())
            check(diff < 1e-3, f"{name} (binary {binary}): logits differ from golden by {diff}")
            check(int(logits.argmax()) == top1, f"{name}: top-1 {logits.argmax()} != {top1}")
            classes = res.as_numpy("probabilities")
            check(classes.shape == (1, 5), f"{name}: classification shape {classes.shape}")
            got = [text(c).split(":", 2) for c in classes[0]]
            check([int(i) for _, i, _ in got] == [g["index"] for g in golden], f"{name}: top-5 {got} vs {golden}")
            check([l for _, _, l in got] == [labels[g["index"]] for g in golden], f"{name}: labels {got}")
            for (p, _, _), g in zip(got, golden):
                check(abs(float(p) - g["prob"]) < 1e-3, f"{name}: probability {p} vs {g['prob']}")
            print(f"{name} (binary {binary}): top-1 {got[0][2]!r} p={got[0][0]} (max logit diff {diff:.1e})")

        # No outputs named: every output, as binary data (tritonclient then asks for binary_data_output).
        res = client.infer(MODEL, [inp])
        check(res.as_numpy("probabilities").shape == (1, 1000), "all outputs")

    # Four photos and one call for every output, twice over.
    stats = client.get_inference_statistics(MODEL)["model_stats"]
    check(stats and int(stats[0]["inference_stats"]["success"]["count"]) == 10, f"statistics: {stats}")

    try:
        client.infer("no-such-model", [inp])
        check(False, "unknown model accepted")
    except InferenceServerException as e:
        check("no-such-model" in e.message(), f"unknown model gave {e.status()}: {e.message()}")
    try:
        wrong = httpclient.InferInput("pixels", [1, 3, 224, 224], "UINT8")
        wrong.set_data_from_numpy(np.zeros((1, 3, 224, 224), np.uint8))
        client.infer(MODEL, [wrong])
        check(False, "wrong shape accepted")
    except InferenceServerException as e:
        check(str(e.status()) == "400" and "expected [N, 224, 224, 3]" in e.message(), f"wrong shape: {e.status()} {e.message()}")
    print("tritonclient http: ok")


if __name__ == "__main__":
    main()
