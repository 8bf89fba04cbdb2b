#!/usr/bin/env bash
# Runs every check mpkvirt has, on a fresh machine (installs what it needs itself).
# This is the README's test command; .ci/run calls it.
#
#   ci/test.sh            all steps
#   ci/test.sh STEP...    only the named steps (fmt clippy test nohw loom vm vm612 doc bench capi)
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=never
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(fmt clippy test nohw loom capi vm vm612 doc bench)

section() { printf '\n=== %s ===\n' "$*"; }
elapsed() { printf '=== %s: %ss\n' "$1" "$(( $(date +%s) - $2 ))"; }

run_step() {
    local t0; t0=$(date +%s)
    case "$1" in
    fmt)
        section "cargo fmt --check"
        cargo fmt --all -- --check ;;
    clippy)
        section "cargo clippy (all targets, all features, warnings denied)"
        cargo clippy --workspace --all-targets --all-features -- -D warnings ;;
    test)
        section "cargo test --workspace (hardware tests skip here unless PKU exists)"
        local log; log=$(mktemp)
        cargo test --workspace 2>&1 | tee "$log"
        local skipped; skipped=$(grep -o 'mpkvirt-test: [^ ]*: skipped: no PKU' "$log" | wc -l)
        echo "hardware tests skipped natively (no PKU here; they run in the PKU guest): $skipped"
        rm -f "$log" ;;
    nohw)
        section "mpkvirt-sys built as the unsupported twin (--cfg mpkvirt_no_hw)"
        RUSTFLAGS="--cfg mpkvirt_no_hw" CARGO_TARGET_DIR=target/nohw \
            cargo test -p mpkvirt-sys --lib the_twin ;;
    loom)
        section "loom models: the key cache (pin/evict, destroy/bind), the allocator's free path, record claims"
        # The pin/evict and allocator models explore every interleaving (no preemption bound);
        # the destroy/evict model bounds preemptions at 4 unless LOOM_MAX_PREEMPTIONS is set.
        RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
            cargo test -p mpkvirt --lib --release loom ;;
    capi)
        section "C API"
        # A lost run bit must not turn the step into a silent pass.
        if [ ! -x ci/capi.sh ]; then
            echo "ci/test.sh: ci/capi.sh is missing or not executable: the C API step cannot run" >&2
            exit 1
        fi
        ci/capi.sh ;;
    vm)
        section "hardware tests inside the PKU guest (QEMU TCG, -cpu max)"
        scripts/pku-vm test ;;
    vm612)
        section "hardware tests inside the PKU guest on Linux 6.12 (bookworm-backports)"
        # From 6.12 the kernel writes signal frames with every key open: sandboxes seal key 0
        # there (and only there), so every hardware test runs on both kernels.
        MPKVIRT_VM_KERNEL=backports scripts/pku-vm test ;;
    doc)
        section "cargo doc (warnings denied)"
        RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps ;;
    bench)
        section "benchmarks build"
        cargo bench --workspace --no-run ;;
    *)
        echo "unknown step: $1" >&2; exit 2 ;;
    esac
    elapsed "$1" "$t0"
}

for s in "${steps[@]}"; do run_step "$s"; done
echo
echo "ci/test.sh: all steps passed (${steps[*]})"
