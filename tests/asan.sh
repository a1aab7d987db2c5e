#!/usr/bin/env bash
# `make test-asan`: the tests (`make test`'s by default; any pytest arguments instead, or `--python script
# args`) on an AddressSanitizer and UndefinedBehaviorSanitizer build of the extension: a read or write
# past a buffer or through freed memory, a misaligned vector access, an integer overflow, fails the run
# however the threads happened to interleave, and whether or not the bytes read were still right (the
# cpu arena's eviction read a freed list node, which held the right pointer here every time, until the
# twenty-seventh session: every test passed).
#
# The extension is built a second time, CPU only, into build/asan beside a copy of the package's Python;
# the in-place build is left as it is. Needs gcc's libasan (`gcc -print-file-name=libasan.so`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
dir=$PWD/build/asan
asan=$(gcc -print-file-name=libasan.so)
[[ -f "$asan" ]] || { echo "test-asan: gcc has no libasan.so (gcc -print-file-name=libasan.so: $asan)" >&2; exit 1; }

rm -rf "$dir/pkg" "$dir/reports" && mkdir -p "$dir/pkg" "$dir/reports"
cp -r hrnet_fast "$dir/pkg/" && rm -f "$dir/pkg/hrnet_fast/"_C*.so
# -DNDEBUG as in torch's own build: CFLAGS replaces Python's default flags, and without it some of torch's
# headers lay classes out differently from the library (at::RecordFunction: CPU graphs then crash).
# UBSan's vptr check is off: it wants the RTTI of torch's classes across the library boundary.
san="-fsanitize=address,undefined -fno-sanitize=vptr -fno-sanitize-recover=undefined"
echo "test-asan: building the extension with $san into $dir (log: $dir/build.log)"
HRNET_FAST_CUDA=0 CFLAGS="-DNDEBUG -g $san -fno-omit-frame-pointer" LDFLAGS="$san" \
    "$PY" setup.py -q build_ext --build-lib "$dir/pkg" --build-temp "$dir/tmp" > "$dir/build.log" 2>&1 \
    || { tail -40 "$dir/build.log"; echo "test-asan: the build failed" >&2; exit 1; }

# libstdc++ preloaded with the runtime: ASan's __cxa_throw interceptor fails a CHECK otherwise (when
# Triton's module throws while importing). Reports go to files: pytest captures the tests' stderr.
# Leaks are not checked (Python and torch keep much for the process's life).
# By default every test `make test` runs in one process (the Triton ones run no C++ of this build), but
# the one that wants the CUDA kernels built in: this build has none.
(($#)) || set -- -m "not triton" tests \
    --deselect tests/test_extension.py::test_cuda_kernels_are_compiled_where_a_toolchain_exists
# `--python script args...`: that script instead of pytest (benchmarks/gpu_run.sh's balance step)
if [[ "$1" == --python ]]; then shift; run=("$PY"); else run=("$PY" -m pytest -q -p no:cacheprovider); fi
status=0
ASAN_OPTIONS="detect_leaks=0:log_path=$dir/reports/asan" UBSAN_OPTIONS="print_stacktrace=1:log_path=$dir/reports/ubsan" \
    LD_PRELOAD="$asan $(gcc -print-file-name=libstdc++.so)" \
    PYTHONPATH="$dir/pkg" "${run[@]}" "$@" || status=$?
if compgen -G "$dir/reports/*" > /dev/null; then
    cat "$dir"/reports/*
    echo "test-asan: the sanitizers reported the above (exit $status)" >&2
    exit 1
fi
exit $status
