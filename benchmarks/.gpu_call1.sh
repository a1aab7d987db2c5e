export PYTHONUNBUFFERED=1 CUDA_HOME=/usr/local/cuda; PY=${PY:-python3}
date +%T; nproc; lscpu | grep -E "Model name|Thread|Core|Socket|NUMA node\(s\)|L2|L3"
t0=$(date +%s); HRNET_FAST_CUDA=0 $PY setup.py -q build_ext --inplace > $OUT/build.log 2>&1; echo "build rc=$? $(( $(date +%s)-t0 )) s"; tail -3 $OUT/build.log
timeout 60 $PY -m pytest -q -x tests/test_cpu_isa.py -p no:cacheprovider 2>&1 | tail -2
t0=$(date +%s); timeout 420 $PY -m hrnet_fast.bench.cpu_threads --out $OUT/cpu_threads --threads 1 16 8 4 --min-run-time 0.6 > $OUT/cpu_threads.log 2>&1; echo "cpu_threads rc=$? $(( $(date +%s)-t0 )) s"
grep -E "prewarm|prepared|rc=" $OUT/cpu_threads.log | tail -30; cat $OUT/cpu_threads/cpu_threads.md
timeout 75 $PY benchmarks/bench_cpu_parts.py --out $OUT/parts --rounds 2 > $OUT/parts.log 2>&1; echo "parts rc=$?"; tail -20 $OUT/parts.log
