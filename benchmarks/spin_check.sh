#!/usr/bin/env bash
# Does a live ONNX Runtime session slow the torch contenders timed beside it? (18th session, 16 cores:
# ours and eager ran ~30% slower at batch 8 inside `hrnet-fast bench` than in cpu_parts / ort_parts.)
# Three bench runs at $T threads, batch $B, in one call: without ONNX Runtime; with it as the bench
# now makes it (session.force_spinning_stop=1); with that entry dropped (ONNX Runtime's default).
#     OUT=dir T=16 B=8 bash benchmarks/spin_check.sh
set -u
: "${OUT:?}"; T=${T:-16}; B=${B:-8}; MRT=${MRT:-1.0}
cache=$(mktemp -d)
bench() { python3 -m hrnet_fast.cli bench --device cpu --threads "$T" --batch "$B" --min-run-time "$MRT" --rounds 4 \
              --no-progress --onnx-cache "$cache" "$@" 2>&1 | grep -E "^\| (hrnet|onnx|eager|contender)"; }
echo "== without ONNX Runtime"; bench --contenders hrnet_fast_cpu,eager --out "$OUT/none"
echo "== ONNX Runtime, spinning stopped after each run"; bench --contenders hrnet_fast_cpu,onnxruntime,eager --out "$OUT/stop"
echo "== ONNX Runtime's default (spinning on after a run)"
python3 - "$@" <<PY 2>&1 | grep -E "^\| (hrnet|onnx|eager|contender)"
import onnxruntime as ort
add = ort.SessionOptions.add_session_config_entry
ort.SessionOptions.add_session_config_entry = lambda self, k, v: None if k == "session.force_spinning_stop" else add(self, k, v)
from hrnet_fast.cli import main
main(["bench", "--device", "cpu", "--threads", "$T", "--batch", "$B", "--min-run-time", "$MRT", "--rounds", "4", "--no-progress",
      "--onnx-cache", "$cache", "--contenders", "hrnet_fast_cpu,onnxruntime,eager", "--out", "$OUT/spin"])
PY
