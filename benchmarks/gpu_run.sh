#!/usr/bin/env bash
# One call of the GPU machine (~10 minutes at most), as the sixteenth session ran it: the build, the CPU
# thread-scaling table of issue 13 (1, 16, 8 and 4 threads; torch.compile at 1 and 16 only, each count
# being a cold compile), the GPU tests, then the cpu backend part by part at batch 8 with what is left.
#
#     OUT=dir bash benchmarks/gpu_run.sh      # on the GPU machine, from the repository root
#
# Few files come back from that machine (8), so everything lands in $OUT/gpu_run.tgz, and the table and
# the logs' ends are printed last. RUN_S (default 580) is the whole run's budget in seconds.
set -u
: "${OUT:?set OUT to the folder the results go to}"
export PYTHONUNBUFFERED=1 CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
work=/tmp/gpu_run
rm -rf "$work" && mkdir -p "$work"
end=$(( $(date +%s) + ${RUN_S:-580} ))
left() { echo $(( end - $(date +%s) )); }

{ lscpu; nproc; nvidia-smi -L; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } \
    > "$work/machine.txt" 2>&1

# the table first: it is what this call is for; the tests keep ~150 s of the budget
python3 -m hrnet_fast.bench.gpu_check --out "$work/cpu" --only build,cpu_threads --workers 16 \
    --cpu-threads 1,16,8,4 --cpu-compile-threads 1,16 --budget-s $(( $(left) - 150 ))
python3 -m hrnet_fast.bench.gpu_check --out "$work/gpu" --only tests --workers 16 --budget-s $(( $(left) - 40 ))
if [ "$(left)" -gt 50 ]; then
    timeout $(( $(left) - 15 )) python3 -m hrnet_fast.bench.cpu_parts --threads 1 8 16 --batch 8 --isa avx512 \
        --rounds 2 --runs 2 --profile --out "$work/parts" > "$work/parts.log" 2>&1
    echo "cpu_parts: exit $? ($(left) s left)"
fi

tar czf "$OUT/gpu_run.tgz" -C /tmp gpu_run
cp "$work/machine.txt" "$OUT/" 2>/dev/null
echo "===== machine"; grep -E "Model name|^L2|^L3|^CPU\(s\)" "$work/machine.txt"; tail -2 "$work/machine.txt"
echo "===== parts"; grep "^|" "$work/parts.log" 2>/dev/null | tail -24
echo "===== tests"; grep -E "FAILED|ERROR|passed|failed" "$work/gpu/gpu_check.log" | tail -15
echo "===== cpu_threads"; cat "$work/cpu/cpu_threads/cpu_threads.md" 2>/dev/null \
    || grep -E "cpu_threads|===== " "$work/cpu/gpu_check.log" | tail -20
