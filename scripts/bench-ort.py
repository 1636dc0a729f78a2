"""onnxruntime's CPU time for the same model, measured the way `cargo bench --bench inference` measures ours.

For each thread count: batch-1 latency and batch-8 throughput, each the median of per-trial medians of `--runs` timed
runs after a warm-up, with one intra-op pool of that many threads and sequential execution (as our server runs one
batch at a time in its own pool). Writes one JSON file per thread count in the shape our benchmark writes.

    python scripts/bench-ort.py MODEL.onnx --threads 1,2 --runs 20 --trials 5 --out-dir DIR
"""
import argparse
import json
import os
import statistics
import time

import numpy as np
import onnxruntime as ort


def session(path, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def trial(sess, feed, runs):
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for threads in [int(t) for t in args.threads.split(",")]:
        sess = session(args.model, threads)
        name = sess.get_inputs()[0].name
        results = []
        for batch in [int(b) for b in args.batches.split(",")]:
            feed = {name: rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)}
            medians = [trial(sess, feed, args.runs) for _ in range(args.trials)]
            median = statistics.median(medians)
            results.append(dict(batch=batch, median_ms=median, trial_medians_ms=medians,
                                images_per_s=batch * 1e3 / median))
            print(f"onnxruntime {threads} threads, batch {batch}: median {median:.1f} ms "
                  f"({batch * 1e3 / median:.1f} img/s)", flush=True)
        report = dict(runtime=f"onnxruntime {ort.__version__}", threads=threads, runs=args.runs,
                      trials=args.trials, results=results)
        with open(os.path.join(args.out_dir, f"compute-ort-t{threads}.json"), "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
