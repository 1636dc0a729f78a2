"""The stack a user would otherwise run: the classic Flask image-classifier app (one process
per core, the model in-process), with onnxruntime on the same EfficientNet-Lite0 weights.
Fetch, decode, preprocess and inference all happen in the request.

Routes (same shape as the gateway's, so one load generator measures both):
  GET  /test      predict on test.jpg (600x400 JPEG), read from disk on every request
  POST /predict   JSON {"url": "..."} (fetched with requests) or multipart field 'image'
  GET  /health    "ok"

Run: ./run.sh PORT (gunicorn -w <cores> app:app on 127.0.0.1:PORT).
Env: MODEL_PATH (the .onnx file), LABELS_PATH (default: testdata/golden/imagenet_labels.txt),
TEST_IMAGE, ORT_INTRA_OP_THREADS (default 1: one worker per core x one thread = every core
once), TOP_K (default 5).
"""
import io
import os
import time

import numpy as np
import onnxruntime as ort
import requests
from flask import Flask, jsonify, request
from PIL import Image, UnidentifiedImageError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# The ONNX export is not in the repository: MODEL_PATH names it (scripts/bench.sh passes its ORT_MODEL). The
# default is the reference export beside the checkout, where scripts/bench.sh looks too.
MODEL_PATH = os.environ.get(
    "MODEL_PATH", os.path.join(os.path.dirname(ROOT), "shared", "reference", "efficientnet_lite0.onnx"))
LABELS_PATH = os.environ.get("LABELS_PATH", os.path.join(ROOT, "testdata", "golden", "imagenet_labels.txt"))
TEST_IMAGE = os.environ.get("TEST_IMAGE", os.path.join(HERE, "test.jpg"))
INTRA_OP_THREADS = int(os.environ.get("ORT_INTRA_OP_THREADS", "1"))
TOP_K = int(os.environ.get("TOP_K", "5"))
FETCH_TIMEOUT_S = 10
IMAGE_SIZE = 224
CROP_PADDING = 32

# Loaded at import, i.e. once per gunicorn worker (no --preload), as the tutorial does.
_opts = ort.SessionOptions()
_opts.intra_op_num_threads = INTRA_OP_THREADS
_opts.inter_op_num_threads = 1
session = ort.InferenceSession(MODEL_PATH, _opts, providers=["CPUExecutionProvider"])
INPUT_NAME = session.get_inputs()[0].name
OUTPUT_NAME = session.get_outputs()[0].name
with open(LABELS_PATH) as f:
    LABELS = [line.rstrip("\n") for line in f]

app = Flask(__name__)


class BadRequest(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


@app.errorhandler(BadRequest)
def _bad_request(e):
    return jsonify(error={"code": e.status, "message": e.message}), e.status


def preprocess(img):
    """PIL image -> (1,3,224,224) float32: centre crop 224/256 of the short
    side, Pillow bicubic resize, (x-127)/128 (shared/reference/reference.py)."""
    img = img.convert("RGB")
    w, h = img.size
    c = int((IMAGE_SIZE / (IMAGE_SIZE + CROP_PADDING)) * min(h, w))
    top, left = (h - c + 1) // 2, (w - c + 1) // 2
    img = img.crop((left, top, left + c, top + c)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    x = np.asarray(img, dtype=np.float32)
    x = (x - np.float32(127.0)) / np.float32(128.0)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def decode(data):
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise BadRequest(422, f"not a decodable image: {e}")


def classify(data, t_start, fetch_ms=0.0):
    t0 = time.perf_counter()
    img = decode(data)
    t1 = time.perf_counter()
    x = preprocess(img)
    t2 = time.perf_counter()
    logits = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0][0].astype(np.float64)
    t3 = time.perf_counter()
    p = np.exp(logits - logits.max())
    p /= p.sum()
    top = np.argsort(-p)[:TOP_K]
    return jsonify(
        model={"name": "efficientnet-lite0", "version": "onnx"},
        predictions=[{"label": LABELS[i], "index": int(i), "probability": float(p[i])} for i in top],
        timings_ms={
            "fetch": fetch_ms,
            "decode": (t1 - t0) * 1e3,
            "preprocess": (t2 - t1) * 1e3,
            "inference": (t3 - t2) * 1e3,
            "total": (time.perf_counter() - t_start) * 1e3,
        },
    )


@app.get("/health")
def health():
    return "ok"


@app.get("/test")
def test():
    t_start = time.perf_counter()
    with open(TEST_IMAGE, "rb") as f:
        data = f.read()
    return classify(data, t_start, (time.perf_counter() - t_start) * 1e3)


@app.post("/predict")
def predict():
    t_start = time.perf_counter()
    if "image" in request.files:
        data = request.files["image"].read()
        return classify(data, t_start, (time.perf_counter() - t_start) * 1e3)
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("url"), str):
        raise BadRequest(400, 'send JSON {"url": "http://..."} or a multipart field "image"')
    try:
        r = requests.get(body["url"], timeout=FETCH_TIMEOUT_S)
        r.raise_for_status()
    except requests.Timeout:
        raise BadRequest(504, f"timed out fetching {body['url']}")
    except requests.RequestException as e:
        raise BadRequest(502, f"could not fetch {body['url']}: {e}")
    return classify(r.content, t_start, (time.perf_counter() - t_start) * 1e3)
