#!/usr/bin/env bash
# Calls of the GPU machine for issue 13's 16-core questions and the GPU tests, each step chosen by STEPS
# (default "parts table": one call of ~9 minutes; then "tests ort" in a second, ~4 minutes, while the
# machine is still warm):
#   build  (always, ~25 s);
#   probe  `cpu_probe`: 1-16 single-threaded processes at once, a GEMM's and an add's summed rates (the
#          machine's own ceiling; run 9: each core at 70% of one alone when all 16 run) (~25 s);
#   parts  `cpu_parts --profile` at 4, 8 and 16 threads, batch 1 and 8, the Winograd plans fitted to
#          teams of 3 and more or not (`--fit-team on off`, the twenty-ninth session's) times the branches'
#          threads shared by their plans' modelled cost or by their direct convs' multiply-adds
#          (`--model-split on off`, the twenty-eighth's), the four in turns; PARTS_ARGS replaces those,
#          e.g. `--balance on off` once the measured split runs clean: per part, and per op the scaling
#          and page faults (~140 s; ~70 with one switch; run 10 also compared stage 1's chunk budget,
#          `--chunk-mib 8 64`);
#   table  `cpu_threads` at 16, 1, 8 and 4 threads without torch.compile (the README's "Threads" table,
#          the efficiency's rows first): ~80 s of ONNX export, then ~200 s;
#   ort    `ort_parts` at 16 threads, batch 1 and 8: ONNX Runtime's time per part beside ours (~60 s);
#   layouts `bench_conv3x3_winograd --quick` on 2 threads: the Winograd convs reading their dense weight
#          OIHW (as optimize() keeps it), IHWO and panel-major, side by side (~40 s; GPU-NOTES, the
#          twenty-sixth session: whether the OIHW transposes cost more on this Xeon);
#   balance `balance_check.py`: W32 at 16 threads with the branches' measured split on (run 11's fault),
#          batch 1 and 8, cpu_graph off and on, a process each; under gdb where the machine has it; then
#          an AddressSanitizer and UBSan build (tests/asan.sh, ~60 s on 16 cores) running it again (~4 min in all);
#   tests  the GPU tests with what is left (90-107 s in runs 5-9).
#
#     OUT=dir bash benchmarks/gpu_run.sh                 # on the GPU machine, from the repository root
#     OUT=dir STEPS="tests ort layouts" bash benchmarks/gpu_run.sh
#
# Few files come back from that machine (8), so everything lands in $OUT/gpu_run.tgz, and the tables and
# the logs' ends are printed last. RUN_S (default 560) is the call's budget in seconds. PROBE_PROCS,
# PARTS_THREADS, ORT_THREADS and TABLE_THREADS override the counts, PARTS_ARGS cpu_parts' switches,
# BALANCE_ARGS balance_check.py's arguments (a dry run on a small machine).
set -u
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
steps=" ${STEPS:-parts table} "
has() { [[ "$steps" == *" $1 "* ]]; }
work=/tmp/gpu_run
repo=$(pwd)
rm -rf "$work" && mkdir -p "$work"
end=$(( $(date +%s) + ${RUN_S:-560} ))
left() { echo $(( end - $(date +%s) )); }

{ lscpu; nproc; nvidia-smi -L; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } \
    > "$work/machine.txt" 2>&1

python3 -m hrnet_fast.bench.gpu_check --out "$work/cpu" --only build --budget-s 120
if has probe; then
    timeout 60 python3 -m hrnet_fast.bench.cpu_probe --procs ${PROBE_PROCS:-1 4 8 12 16} > "$work/probe.log" 2>&1
    echo "cpu_probe: exit $? ($(left) s left)"
fi
if has parts; then
    timeout 280 python3 -m hrnet_fast.bench.cpu_parts --threads ${PARTS_THREADS:-4 8 16} --batch 1 8 --isa avx512 \
        --rounds 3 --runs 2 ${PARTS_ARGS:---fit-team on off --model-split on off} --profile --out "$work/parts" > "$work/parts.log" 2>&1
    echo "cpu_parts: exit $? ($(left) s left)"
fi
if has table; then
    # in a call with the tests, they keep ~130 s of it; the layouts ~50
    keep=$(( $(has tests && echo 130 || echo 10) + $(has layouts && echo 50 || echo 0) ))
    timeout $(( $(left) - keep )) python3 -m hrnet_fast.bench.cpu_threads --out "$work/cpu/cpu_threads" \
        --threads ${TABLE_THREADS:-16 1 8 4} --compile-threads --min-run-time 0.5 > "$work/cpu_threads.log" 2>&1
    echo "cpu_threads: exit $? ($(left) s left)"
fi
if has ort; then
    timeout 90 python3 -m hrnet_fast.bench.ort_parts --threads ${ORT_THREADS:-16} --batch 1 8 --rounds 3 \
        > "$work/ort_parts.log" 2>&1
    echo "ort_parts: exit $? ($(left) s left)"
fi
if has layouts; then
    # the bench writes its JSON under ./benchmarks/results: here, into $work
    (cd "$work" && PYTHONPATH="$repo" timeout 120 python3 "$repo/benchmarks/bench_conv3x3_winograd.py" --quick \
        --threads 2 > "$work/layouts.log" 2>&1)
    echo "layouts: exit $? ($(left) s left)"
fi
if has balance; then
    bargs=(${BALANCE_ARGS:---threads 16 --batch 1 8 --forwards 10})
    for g in off on; do
        timeout 100 python3 benchmarks/balance_check.py "${bargs[@]}" --cpu-graph $g > "$work/balance_$g.log" 2>&1
        echo "balance_check, cpu_graph $g: exit $? ($(left) s left)"
    done
    if command -v gdb > /dev/null; then
        timeout 120 gdb -q -batch -ex run -ex bt -ex "info threads" --args python3 benchmarks/balance_check.py \
            "${bargs[@]}" --cpu-graph off > "$work/balance_gdb.log" 2>&1
        echo "balance_check under gdb: exit $? ($(left) s left)"
    fi
    PY=python3 timeout $(( $(left) > 260 ? 240 : $(left) - 20 )) bash tests/asan.sh --python benchmarks/balance_check.py \
        "${bargs[@]}" --cpu-graph off > "$work/balance_asan.log" 2>&1
    echo "balance_check under ASan: exit $? ($(left) s left)"
fi
if has tests; then
    python3 -m hrnet_fast.bench.gpu_check --out "$work/gpu" --only tests --workers 16 --budget-s $(( $(left) - 15 ))
fi

tar czf "$OUT/gpu_run.tgz" -C /tmp gpu_run
cp "$work/machine.txt" "$OUT/" 2>/dev/null
echo "===== machine"; grep -E "Model name|^Model:|^L2|^L3|^CPU\(s\)" "$work/machine.txt"; tail -2 "$work/machine.txt"
has tests && { echo "===== tests"; grep -E "FAILED|ERROR|passed|failed" "$work/gpu/gpu_check.log" | tail -15; }
has probe && { echo "===== probe"; grep -E "^\|" "$work/probe.log"; }
has parts && { echo "===== parts"; grep -E "^\| (batch|1 |8 |hrnet|aten|all|forward)|^[0-9]+,|splits|page faults" "$work/parts.log" \
    | cut -c1-170 | head -120; }
has ort && { echo "===== ort_parts"; grep -E "^(\||W32)" "$work/ort_parts.log" | head -30; }
has layouts && { echo "===== layouts"; grep -E "^b1 |^\|" "$work/layouts.log" | head -40; }
has balance && { echo "===== balance"; grep -hE "forward 0:|forward 9:|BEYOND|Fatal|Segmentation|ERROR: Addr|SUMMARY|^    #[0-9] |settled|searching|done|^#[0-9]+ " \
    "$work"/balance_*.log | cut -c1-200 | head -80; }
has table && { echo "===== cpu_threads"; cat "$work/cpu/cpu_threads/cpu_threads.md" 2>/dev/null || tail -20 "$work/cpu_threads.log"; }
exit 0
