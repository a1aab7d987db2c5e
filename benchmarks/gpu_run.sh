#!/usr/bin/env bash
# One call of the GPU machine (~9.5 minutes at most) for issue 13's 16-core questions, then the GPU tests:
#   1. build (~25 s); `cpu_probe`: 1-16 single-threaded processes at once, a GEMM's and an add's
#      summed rates (are the 16 CPUs 16 cores, and where does memory bandwidth stop) (~25 s);
#   2. `cpu_parts --profile` at 8 and 16 threads, batch 1 and 8: per part and per op, where the
#      scaling from 8 to 16 threads is lost, with the eighteenth session's changes on and off in turns:
#      a thread's own panels (`--own-panels on off`: since run 9 only W32's 128-channel convs at batch 8
#      on more than 2 threads) and four weight panels a Winograd GEMM call (`--four-panels on off`);
#      branches side by side and the filling of idle threads stay on (run 9: side by side 1.35x on 16
#      threads, fill level) (~60 s; the 1-thread times are in step 3);
#   2b. `ort_parts` at 16 threads, batch 1 and 8: ONNX Runtime's time per part beside ours (~60 s);
#   3. `cpu_threads` at 16, 1, 8 and 4 threads without torch.compile (the rows for the efficiency first) (its compiles took 2.5-4 minutes
#      each there in run 8; its 1- and 16-thread rows are in benchmarks/results/gpu/cpu_16core_run8/):
#      ~80 s of ONNX export, then ~190 s;
#   4. the GPU tests with what is left (they took 90-107 s in runs 5-6).
#
#     OUT=dir bash benchmarks/gpu_run.sh      # on the GPU machine, from the repository root
#
# Few files come back from that machine (8), so everything lands in $OUT/gpu_run.tgz, and the tables and
# the logs' ends are printed last. RUN_S (default 570) is the whole run's budget in seconds. The
# sixteenth session ran an earlier form of this script (run 8 in benchmarks/GPU-NOTES.md). PROBE_PROCS,
# PARTS_THREADS, ORT_THREADS and TABLE_THREADS override the counts (a dry run on a small machine).
set -u
: "${OUT:?set OUT to the folder the results go to}"
export PYTHONUNBUFFERED=1 CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
work=/tmp/gpu_run
rm -rf "$work" && mkdir -p "$work"
end=$(( $(date +%s) + ${RUN_S:-570} ))
left() { echo $(( end - $(date +%s) )); }

{ lscpu; nproc; nvidia-smi -L; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } \
    > "$work/machine.txt" 2>&1

python3 -m hrnet_fast.bench.gpu_check --out "$work/cpu" --only build --budget-s 120
timeout 60 python3 -m hrnet_fast.bench.cpu_probe --procs ${PROBE_PROCS:-1 4 8 12 16} > "$work/probe.log" 2>&1
echo "cpu_probe: exit $? ($(left) s left)"
timeout 150 python3 -m hrnet_fast.bench.cpu_parts --threads ${PARTS_THREADS:-8 16} --batch 1 8 --isa avx512 --rounds 3 --runs 2 \
    --own-panels on off --four-panels on off --profile --out "$work/parts" > "$work/parts.log" 2>&1
echo "cpu_parts: exit $? ($(left) s left)"
timeout 90 python3 -m hrnet_fast.bench.ort_parts --threads ${ORT_THREADS:-16} --batch 1 8 --rounds 3 > "$work/ort_parts.log" 2>&1
echo "ort_parts: exit $? ($(left) s left)"
# the tests keep ~130 s of the budget
timeout $(( $(left) - 130 )) python3 -m hrnet_fast.bench.cpu_threads --out "$work/cpu/cpu_threads" \
    --threads ${TABLE_THREADS:-16 1 8 4} --compile-threads --min-run-time 0.5 > "$work/cpu_threads.log" 2>&1
echo "cpu_threads: exit $? ($(left) s left)"
python3 -m hrnet_fast.bench.gpu_check --out "$work/gpu" --only tests --workers 16 --budget-s $(( $(left) - 15 ))

tar czf "$OUT/gpu_run.tgz" -C /tmp gpu_run
cp "$work/machine.txt" "$OUT/" 2>/dev/null
echo "===== machine"; grep -E "Model name|^Model:|^L2|^L3|^CPU\(s\)" "$work/machine.txt"; tail -2 "$work/machine.txt"
echo "===== tests"; grep -E "FAILED|ERROR|passed|failed" "$work/gpu/gpu_check.log" | tail -15
echo "===== probe"; grep -E "^\|" "$work/probe.log"
echo "===== parts"; grep -E "^\| (batch|1 |8 |hrnet|aten|all|forward)" "$work/parts.log" | cut -c1-170 | head -110
echo "===== ort_parts"; grep -E "^(\||W32)" "$work/ort_parts.log" | head -30
echo "===== cpu_threads"; cat "$work/cpu/cpu_threads/cpu_threads.md" 2>/dev/null || tail -20 "$work/cpu_threads.log"
