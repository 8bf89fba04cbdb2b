#!/usr/bin/env python3
"""Turns a benchmark run into the tables and plots of docs/benchmarks.md.

    cargo bench -p mpkvirt-benches                       # criterion results in target/criterion
    cargo run --release -p mpkvirt-benches --bin policy_report -- --csv docs/data/policy_misses.csv
    python3 benches/report.py                            # prints tables, writes docs/img/*.svg

Reads the median of every criterion benchmark (target/criterion/**/new/estimates.json) and
the policy miss table, prints markdown tables with the ratios docs/benchmarks.md quotes, and
plots them with matplotlib (pip install matplotlib).
"""

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CRITERION = ROOT / "target" / "criterion"
IMG = ROOT / "docs" / "img"
POLICY_CSV = ROOT / "docs" / "data" / "policy_misses.csv"


def medians():
    """full benchmark id -> median time in ns."""
    out = {}
    for bench in CRITERION.glob("**/new/benchmark.json"):
        est = bench.with_name("estimates.json")
        if not est.exists():
            continue
        full_id = json.loads(bench.read_text())["full_id"]
        out[full_id] = json.loads(est.read_text())["median"]["point_estimate"]
    return out


def fmt_ns(ns):
    return f"{ns / 1000:.2f} µs" if ns >= 1000 else f"{ns:.1f} ns"


def hit_table(m):
    rows = [
        ("mpkvirt, simulated backend", "hit/mpkvirt-simulated"),
        ("libmpk-style (global mutex, hash map, LRU list), simulated PKRU", "hit/libmpk-style-simulated"),
        ("mpkvirt, emulated backend (mprotect)", "hit/mpkvirt-emulated"),
        ("mprotect per switch", "hit/mprotect-per-switch"),
        ("mpkvirt, hardware backend", "hit/mpkvirt-hardware"),
        ("libmpk-style, hardware PKRU", "hit/libmpk-style-hardware"),
    ]
    print("| path | 1 thread: ns per enter+leave pair | 2 threads: wall ns per pair per thread | 2-thread throughput vs 1 thread |")
    print("|---|---:|---:|---:|")
    for label, key in rows:
        one, two = m.get(f"{key}/1-thread"), m.get(f"{key}/2-threads")
        if one is None:
            continue
        scaling = f"{2 * one / two:.2f}x" if two else "-"
        print(f"| {label} | {fmt_ns(one)} | {fmt_ns(two) if two else '-'} | {scaling} |")
    if "hit/raw-wrpkru-pair/1-thread" in m:
        print(f"| raw WRPKRU pair (floor) | {fmt_ns(m['hit/raw-wrpkru-pair/1-thread'])} | - | - |")
    print()
    sim1, lm1 = m.get("hit/mpkvirt-simulated/1-thread"), m.get("hit/libmpk-style-simulated/1-thread")
    sim2, lm2 = m.get("hit/mpkvirt-simulated/2-threads"), m.get("hit/libmpk-style-simulated/2-threads")
    emu1, mp1 = m.get("hit/mpkvirt-emulated/1-thread"), m.get("hit/mprotect-per-switch/1-thread")
    if sim1:
        print(f"- bookkeeping per switch (half a pair), simulated: **{sim1 / 2:.1f} ns**")
    if sim1 and lm1:
        print(f"- mpkvirt vs libmpk-style, 1 thread: **{lm1 / sim1:.1f}x** faster")
    if sim2 and lm2:
        print(f"- mpkvirt vs libmpk-style, 2 threads: **{lm2 / sim2:.1f}x** faster")
    if sim1 and sim2:
        print(f"- mpkvirt 2-thread hit throughput: **{2 * sim1 / sim2:.2f}x** one thread")
    if emu1 and mp1:
        print(f"- emulated backend vs bare mprotect per switch: {emu1 / mp1:.2f}x")
    print()


def miss_table(m):
    groups = defaultdict(dict)
    for k, v in m.items():
        if k.startswith("miss/"):
            _, backend, case = k.split("/", 2)
            groups[backend][case] = v
    for backend, cases in sorted(groups.items()):
        print(f"| {backend}: reserved / touched | ns per miss (median of 2-miss iterations / 2) |")
        print("|---|---:|")
        for case, v in sorted(cases.items(), key=lambda kv: (int(kv[0].split("KiB")[0]), kv[0])):
            print(f"| {case} | {fmt_ns(v / 2)} |")
        print()
    return groups


def policy_rows():
    if not POLICY_CSV.exists():
        return []
    with POLICY_CSV.open() as f:
        return list(csv.DictReader(f))


def plots(m, miss_groups, policy):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return
    IMG.mkdir(parents=True, exist_ok=True)

    # Policies: miss ratio against domain count, per trace.
    if policy:
        traces = ["uniform", "zipf-0.99", "serverless"]
        fig, axes = plt.subplots(1, len(traces), figsize=(13, 3.8), sharey=True)
        for ax, t in zip(axes, traces):
            rows = [r for r in policy if r["trace"] == t]
            xs = [int(r["domains"]) for r in rows]
            for col, label, style in [("lru_misses", "LRU", "o-"), ("hinted_misses", "hinted (next 64)", "s-"), ("opt_misses", "OPT (Belady)", "^--")]:
                ax.plot(xs, [100 * int(r[col]) / int(r["accesses"]) for r in rows], style, label=label)
            ax.set_xscale("log")
            ax.set_title(t)
            ax.set_xlabel("virtual domains (15 keys)")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("misses per access (%)")
        axes[0].legend()
        fig.suptitle("Eviction policies on 200,000-access traces")
        fig.tight_layout()
        fig.savefig(IMG / "policy_misses.svg")
        plt.close(fig)

    # Hit path: ns per enter+leave pair.
    bars = [(k.removeprefix("hit/"), v) for k, v in sorted(m.items()) if k.startswith("hit/") and not k.startswith("hit/mpkvirt-emulated") and "mprotect" not in k]
    if bars:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.barh([b[0] for b in bars], [b[1] for b in bars])
        for i, (_, v) in enumerate(bars):
            ax.text(v, i, f" {v:.1f}", va="center")
        ax.set_xlabel("ns per enter+leave pair (median; 2-thread rows: wall time per pair per thread)")
        ax.set_title("View switch on the hit path (no PKU: simulated PKRU)")
        fig.tight_layout()
        fig.savefig(IMG / "hit_path.svg")
        plt.close(fig)

    # Miss cost against touched memory.
    for backend, cases in miss_groups.items():
        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = sorted(cases, key=lambda c: (int(c.split("KiB")[0]), c))
        ax.bar(range(len(labels)), [cases[c] / 2000 for c in labels])
        ax.set_xticks(range(len(labels)), [c.replace("-reserved/", "\n").replace("-pages-touched", " pages") for c in labels], fontsize=7)
        ax.set_ylabel("µs per miss")
        ax.set_title(f"Miss (park + tag) against domain size, {backend} backend")
        fig.tight_layout()
        fig.savefig(IMG / f"miss_cost_{backend}.svg")
        plt.close(fig)
    print(f"plots written to {IMG.relative_to(ROOT)}/", file=sys.stderr)


def main():
    m = medians()
    if not m:
        sys.exit("no criterion results in target/criterion: run `cargo bench -p mpkvirt-benches` first")
    hit_table(m)
    groups = miss_table(m)
    plots(m, groups, policy_rows())


if __name__ == "__main__":
    main()
