"""OpenCV dnn's CPU time for YOLOv3-tiny on the official darknet files, measured the way `cargo bench --bench
inference -- --model yolov3-tiny` measures ours.

For each thread count: batch-1 latency and batch-8 throughput on random [0, 1] input, each the median of per-trial
medians of `--runs` timed forward passes (to both heads' outputs) after a warm-up. Writes one JSON file per thread
count in the shape our benchmark writes. OpenCV 5 dropped the darknet importer: use opencv-python-headless<5.

    python scripts/bench-opencv.py DARKNET_DIR --threads 2 --runs 20 --trials 5 --out-dir DIR
"""
import argparse
import json
import os
import statistics
import time

import cv2
import numpy as np


def trial(net, outputs, x, runs):
    for _ in range(3):
        net.setInput(x)
        net.forward(outputs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        net.setInput(x)
        net.forward(outputs)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("darknet", help="directory with yolov3-tiny.cfg and yolov3-tiny.weights")
    parser.add_argument("--threads", default="2")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args()
    # The mask does not change the compute, only how the heads are read: the published cfg serves as it is.
    net = cv2.dnn.readNetFromDarknet(os.path.join(args.darknet, "yolov3-tiny.cfg"),
                                     os.path.join(args.darknet, "yolov3-tiny.weights"))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    outputs = net.getUnconnectedOutLayersNames()
    rng = np.random.default_rng(0)
    for threads in (int(t) for t in args.threads.split(",")):
        cv2.setNumThreads(threads)
        results = []
        for batch in (int(b) for b in args.batches.split(",")):
            x = rng.random((batch, 3, 416, 416), dtype=np.float32)
            medians = [trial(net, outputs, x, args.runs) for _ in range(args.trials)]
            median = statistics.median(medians)
            results.append(dict(batch=batch, median_ms=median, trial_medians_ms=medians,
                                images_per_s=batch * 1e3 / median))
            print(f"opencv {cv2.__version__}, {threads} threads, batch {batch}: median {median:.1f} ms")
        report = dict(runtime=f"OpenCV dnn {cv2.__version__}", model="yolov3-tiny", threads=threads,
                      runs=args.runs, trials=args.trials, results=results)
        with open(os.path.join(args.out_dir, f"compute-opencv-t{threads}.json"), "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
