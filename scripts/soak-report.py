"""Writes SOAK.md from the interval files scripts/soak.sh left: one row per interval, then the verdicts.

    python scripts/soak-report.py INTERVALS_DIR --out SOAK.md --cpu NAME --cores N --commit C \
        --duration 30m --interval 60s --rate 40 [--smoke]

Exits 1 when a criterion fails (in smoke mode only the errors are judged: the run is too short for the rest).
"""

import argparse
import datetime
import json
import os
import sys

# The refusals the mix asks for: a URL that answers 404 is a 502, one that never answers is a 504, bytes that are
# no image are a 422. Any other failure counts against the run.
EXPECTED = {"url_missing:http_502", "url_stall:http_504", "bad_image:http_422"}
RSS_TOLERANCE = 0.10
FD_SLACK = 8
STEADY_S = 600


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("intervals")
    parser.add_argument("--out", required=True)
    for name in ("cpu", "cores", "commit", "duration", "interval", "rate"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()

    rows = []
    i = 1
    while os.path.exists(os.path.join(args.intervals, f"{i}.servers.json")):
        with open(os.path.join(args.intervals, f"{i}.load.json")) as f:
            load = json.load(f)
        with open(os.path.join(args.intervals, f"{i}.servers.json")) as f:
            servers = json.load(f)
        rows.append((load, servers))
        i += 1
    if not rows:
        sys.exit("soak-report: no intervals")

    lines = []
    add = lines.append
    add("# Soak run")
    add("")
    add("Written by `scripts/soak.sh` from what it measured; nothing here is typed in by hand.")
    add("")
    if args.smoke:
        add("**Smoke run: seconds-long intervals of unoptimised binaries to prove the script works. "
            "Only its error count means anything.**")
        add("")
    add(f"- Machine: {args.cpu}, {args.cores} cores; commit `{args.commit}`; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    add(f"- {args.duration} of `loadtest mixed` at {args.rate} requests/s (open loop, at most 64 outstanding), "
        f"sampled every {args.interval}: GET /test, uploads to /predict and /detect, predict by URL, and requests "
        "to be refused (`bad_image`: bytes that are no image, 422; `url_missing`: a URL answering 404, 502; "
        "`url_stall`: a URL that never answers, 504 after the gateway's 2 s fetch timeout)")
    add("- p99 (all) counts every request, the stalled URLs' 2 s included; p99 (gateway) is the gateway's own "
        "`total` time of the answers that succeeded")
    add("")
    add("| interval | elapsed s | requests | req/s | p99 all ms | p99 gateway ms | expected refusals | "
        "unexpected errors | gateway RSS MiB | model server RSS MiB | gateway fds | model server fds |")
    add("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    unexpected_total = {}
    for load, servers in rows:
        expected = sum(n for kind, n in load["errors"].items() if kind in EXPECTED)
        unexpected = {kind: n for kind, n in load["errors"].items() if kind not in EXPECTED}
        for kind, n in unexpected.items():
            unexpected_total[kind] = unexpected_total.get(kind, 0) + n
        gateway_p99 = load.get("server_timings_ms", {}).get("total", {}).get("p99")
        add(f"| {servers['interval']} | {servers['elapsed_s']} | {load['transactions']} | "
            f"{load['throughput_rps']:.1f} | {load['latency_ms']['p99']:.1f} | "
            f"{'n/a' if gateway_p99 is None else f'{gateway_p99:.1f}'} | {expected} | "
            f"{sum(unexpected.values())} | {servers['gateway']['rss_kib'] / 1024:.1f} | "
            f"{servers['model_server']['rss_kib'] / 1024:.1f} | {servers['gateway']['fds']} | "
            f"{servers['model_server']['fds']} |")
    add("")

    verdicts = []
    ok = True

    def verdict(passed, text):
        nonlocal ok
        ok &= passed
        verdicts.append(f"- {'PASS' if passed else 'FAIL'}: {text}")

    total = sum(load["transactions"] for load, _ in rows)
    verdict(not unexpected_total,
            f"{total} requests, unexpected errors: "
            f"{', '.join(f'{k} x{n}' for k, n in sorted(unexpected_total.items())) or 'none'}")
    if not args.smoke:
        mark = next((s for _, s in rows if s["elapsed_s"] >= STEADY_S), None)
        end = rows[-1][1]["elapsed_s"]
        if mark is None or end - STEADY_S < STEADY_S:
            verdict(False, "the run is too short to judge memory: it needs 10 minutes past the 10-minute mark")
        else:
            for tier in ("gateway", "model_server"):
                base = mark[tier]["rss_kib"]
                last = [s[tier]["rss_kib"] for _, s in rows if s["elapsed_s"] >= end - STEADY_S]
                worst = max(last, key=lambda r: abs(r - base))
                drift = (worst - base) / base
                verdict(abs(drift) <= RSS_TOLERANCE,
                        f"{tier.replace('_', ' ')} RSS over the last 10 minutes within {drift:+.1%} of "
                        f"{base / 1024:.1f} MiB at {mark['elapsed_s']} s (limit ±{RSS_TOLERANCE:.0%})")
        for tier in ("gateway", "model_server"):
            first, last = rows[0][1][tier]["fds"], rows[-1][1][tier]["fds"]
            verdict(last <= first + FD_SLACK,
                    f"{tier.replace('_', ' ')} open file descriptors {first} at the first sample, {last} at the "
                    f"last (limit +{FD_SLACK})")
    add("## Verdict")
    add("")
    lines.extend(verdicts)
    add("")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print("\n".join(verdicts))
    print(f"soak-report: wrote {args.out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
