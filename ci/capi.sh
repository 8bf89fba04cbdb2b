#!/usr/bin/env bash
# The C API: the header matches the exported symbols; the C tests and examples build with
# warnings as errors against libmpkvirt.a (and libmpkvirt.so), and pass natively (emulated
# backend here) and inside the PKU guest (hardware backend, MPKVIRT_MODE=hardware).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build -p mpkvirt
# Cargo's output directory: CARGO_TARGET_DIR when set (relative to the workspace root, as cargo
# reads it), target/ otherwise.
target=${CARGO_TARGET_DIR:-target}
lib=$target/debug
out=$target/capi
mkdir -p "$out"

echo "--- header vs exported symbols"
exported=$(nm -D --defined-only "$lib/libmpkvirt.so" | awk '$2 == "T" && $3 ~ /^(mpk|mpkvirt)_/ {print $3}' | sort)
declared=$(grep -oE '\b(mpk|mpkvirt)_[a-z_]+\(' include/mpkvirt.h | tr -d '(' | sort -u)
if [ "$exported" != "$declared" ]; then
    echo "include/mpkvirt.h is out of date with libmpkvirt.so:" >&2
    diff <(echo "$declared") <(echo "$exported") | sed 's/^</  only in the header: /; s/^>/  only in the library: /' >&2
    exit 1
fi
echo "$(echo "$exported" | wc -l) functions declared and exported: $(echo $exported)"

cflags=(-std=gnu11 -Wall -Wextra -Werror -O1 -Iinclude -Impkvirt/capi/tests)
libs=(-lpthread -ldl -lm)
bins=()
for src in mpkvirt/capi/tests/test_*.c mpkvirt/capi/examples/*.c; do
    name=$(basename "$src" .c)
    cc "${cflags[@]}" "$src" "$lib/libmpkvirt.a" "${libs[@]}" -o "$out/$name"
    bins+=("$out/$name")
done
# The README's way: cc app.c -lmpkvirt against the shared library.
for ex in hello paper_api; do
    cc "${cflags[@]}" "mpkvirt/capi/examples/$ex.c" -L"$lib" -lmpkvirt -o "$out/$ex-shared"
done

echo "--- natively"
# Every binary runs, so one failure does not hide the others; the step fails at the end.
failed=()
for b in "${bins[@]}"; do "$b" || failed+=("$(basename "$b")"); done
LD_LIBRARY_PATH="$lib" "$out/hello-shared" | grep -q "denied: vkey 7"
LD_LIBRARY_PATH="$lib" "$out/paper_api-shared"
echo "hello-shared, paper_api-shared (-lmpkvirt, libmpkvirt.so): ok"
if [ ${#failed[@]} -gt 0 ]; then
    echo "capi.sh: ${#failed[@]} of ${#bins[@]} C programs failed natively: ${failed[*]}" >&2
fi

echo "--- inside the PKU guest, hardware backend"
guest=0
MPKVIRT_MODE=hardware scripts/pku-vm batch "${bins[@]}" || guest=$?
[ ${#failed[@]} -eq 0 ] && [ "$guest" -eq 0 ]
