#!/usr/bin/env bash
# Runs every benchmark on a machine with PKU and writes a dated report next to
# docs/benchmarks.md. On such a machine the hardware variants (mpkvirt-hardware,
# libmpk-style-hardware, raw WRPKRU, checked gates, hardware misses) run as well; without
# PKU they print why they skipped and the report says so.
#
#   benches/run-on-pku-hardware.sh            # full run (several minutes)
set -euo pipefail
cd "$(dirname "$0")/.."

host=$(hostname -s 2>/dev/null || echo machine)
out="docs/benchmarks-$host-$(date +%Y%m%d).md"
mkdir -p docs/data

cargo build --release -p mpkvirt-host
{
    echo "# Benchmark run on $host, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo '```'
    lscpu | grep -E 'Model name|^CPU\(s\)|Thread|MHz|L[123]' || true
    uname -srm
    target/release/mpkvirt-host info || true
    echo '```'
    echo
} > "$out"

rm -rf target/criterion
cargo bench -p mpkvirt-benches 2>&1 | tee target/bench-run.log
grep -h 'skipped' target/bench-run.log | sed 's/^/- /' >> "$out" || true
cargo run --release -p mpkvirt-benches --bin policy_report -- --csv docs/data/policy_misses.csv >> "$out"
echo >> "$out"
python3 benches/report.py >> "$out"
# The host runtime: the bimodal load with isolation (one worker per CPU), the warm
# invocation path without the bench harness, and the key cache under time slicing.
{
    echo
    echo "## Host: bimodal load, isolated"
    echo
    cargo run --release -p mpkvirt-host --example bimodal -- --isolated --workers "$(nproc)" --seconds 3 --load 0.5
    echo
    echo "## Host: warm invocations on the calling thread"
    echo
    cargo run --release -p mpkvirt-host --example loop_here -- 100000
    echo
    echo "## Host: the key cache under time slicing, isolated"
    echo
    cargo run --release -p mpkvirt-host --example key_cache -- --isolated
} >> "$out" 2>&1
echo "report written to $out"
