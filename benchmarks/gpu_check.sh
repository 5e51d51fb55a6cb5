#!/usr/bin/env bash
# One prepared check for a lent GPU machine (an H200 with 16 CPU cores), a few minutes long.
#
#   bash benchmarks/gpu_check.sh [--cpu-only] [--quick] [--skip-setup]
#
# Reports, as $OUT/gpu_check.json and $OUT/gpu_check.txt (OUT defaults to bench-out/gpu-check):
#   1. vectors vs the CPU fp32 reference (cos mean and min) for fp32 and fp16 on CUDA
#   2. throughput on 20,000 chunks, embedpool --device cuda vs sentence-transformers on the same
#      GPU (torch CUDA, fp16, batch 256), as a ratio, with the whole tree's peak host RSS
#   3. the CPU pool's parallel efficiency at 1, 2, 4, 8 and 16 workers
#   4. the parent's tokenisation rate against one worker's (benchmarks/tokenize_rate.py)
#   5. Qwen3-Embedding-0.6B's shape (random weights, benchmarks/decoders.py's make step, in the
#      torch venv): embedpool fp16 on CUDA against sentence-transformers fp16 on the same GPU
#      over 256-token chunks (chunks/s, ratio), and both fp16 vector sets against embedpool's
#      CPU fp32 (which equals sentence-transformers fp32: tests/test_decoders.py): cos >= 0.999
# Setup: scripts/setup gpu,dev (this repo's .venv, onnxruntime-gpu in place of onnxruntime);
# torch and sentence-transformers only in a separate venv ($WORK/st-venv), for step 2. It needs
# PyPI; anything else from the internet may be missing. Every step is fail-soft: a failing
# one records its error and the others still run.
#   --cpu-only    skip everything that needs a GPU or torch (what CI's machines can run)
#   --quick       small sizes (seconds, not minutes): a dry run of the script itself
#   --skip-setup  use the .venv (and $WORK/st-venv) as they are
#   --setup-only  only the setup: with --skip-setup next, the two fit two 10-minute calls
#   --skip-qwen3  leave out step 5 (a few minutes: the model's make, two graph builds)
set -uo pipefail
cd "$(dirname "$0")/.."
CPU_ONLY=0 QUICK=0 SETUP=1 SETUP_ONLY=0 QWEN3=1
for arg in "$@"; do
  case "$arg" in
    --cpu-only) CPU_ONLY=1 ;;
    --quick) QUICK=1 ;;
    --skip-setup) SETUP=0 ;;
    --setup-only) SETUP_ONLY=1 ;;
    --skip-qwen3) QWEN3=0 ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-bench-out/gpu-check}"
mkdir -p "$OUT/steps" "$OUT/logs"
rm -f "$OUT"/steps/*.json "$OUT"/logs/*
WORK="${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/embedpool-gpu-check}"
mkdir -p "$WORK"
export OUT WORK
export EMBEDPOOL_CACHE_DIR="$WORK/cache" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ "$QUICK" = 1 ]; then
  CHUNKS=300 VEC=64 WORKERS=1,2 PER_WORKER=150 TOK_CHUNKS=200 QCHUNKS=64 QVEC=4
else
  CHUNKS=20000 VEC=1000 WORKERS=1,2,4,8,16 PER_WORKER=250 TOK_CHUNKS=2000 QCHUNKS=2048 QVEC=32
fi
P=.venv/bin/python
started=$(date +%s)

# step NAME TIMEOUT_S COMMAND...: run one step; on failure, write its error as the step's JSON.
step() {
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  echo "== $name ($(date +%H:%M:%S))"
  local run=("$@")
  if declare -F "$1" >/dev/null; then  # a function of this script: timeout runs programs only
    export -f "$1"
    run=(bash -c '"$@"' _ "$@")
  fi
  if timeout "$limit" "${run[@]}" >"$OUT/logs/$name.log" 2>&1; then
    echo "   ok in $(( $(date +%s) - t0 )) s"
  else
    local rc=$?
    echo "   FAILED (exit $rc) in $(( $(date +%s) - t0 )) s; log: $OUT/logs/$name.log"
    tail -n 5 "$OUT/logs/$name.log" | sed 's/^/   | /'
    if [ ! -s "$OUT/steps/$name.json" ] || ! grep -q . "$OUT/steps/$name.json"; then
      "${P:-python3}" - "$OUT/steps/$name.json" "$OUT/logs/$name.log" "$rc" <<'EOF' 2>/dev/null || \
        echo "{\"error\": \"exit $rc\"}" > "$OUT/steps/$name.json"
import json, sys
log = open(sys.argv[2], errors="replace").read()[-4000:]
json.dump({"error": f"exit {sys.argv[3]}: {log}"}, open(sys.argv[1], "w"))
EOF
    fi
  fi
}

machine() {
  {
    echo "{"
    echo "\"uname\": \"$(uname -srm)\","
    echo "\"cpus\": $(nproc),"
    echo "\"python\": \"$(python3 --version 2>&1)\","
    if command -v nvidia-smi >/dev/null 2>&1; then
      echo "\"gpu\": \"$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)\","
      echo "\"cuda_driver\": \"$(nvidia-smi | sed -n 's/.*CUDA Version: \([0-9.]*\).*/\1/p' | head -1)\","
    fi
    echo "\"uptime\": \"$(uptime)\""
    echo "}"
  } > "$OUT/steps/machine.json"
}

setup_st() {  # torch + sentence-transformers in their own venv (never in embedpool's)
  python3 -m venv "$WORK/st-venv" && "$WORK/st-venv/bin/python" -m pip install -q --upgrade pip &&
    "$WORK/st-venv/bin/python" -m pip install -q torch sentence-transformers psutil
}

step machine 30 machine
if [ "$SETUP" = 1 ]; then
  extras=serve
  [ "$CPU_ONLY" = 1 ] || extras=gpu
  # the torch venv downloads in the background meanwhile (it is the larger of the two)
  if [ "$CPU_ONLY" = 0 ]; then
    ( step setup_st 900 setup_st ) > "$OUT/logs/setup_st.outer" 2>&1 &
    ST_PID=$!
  fi
  step setup 900 scripts/setup "$extras"
fi
if [ "$SETUP_ONLY" = 1 ]; then
  if [ -n "${ST_PID:-}" ]; then wait "$ST_PID"; cat "$OUT/logs/setup_st.outer"; fi
  echo "setup took $(( $(date +%s) - started )) s"
  exit 0
fi
step doctor 120 .venv/bin/embedpool doctor --device "$([ "$CPU_ONLY" = 1 ] && echo cpu || echo auto)"
cp "$OUT/logs/doctor.log" "$OUT/doctor.txt" 2>/dev/null
step corpus 300 $P benchmarks/gpu_check.py corpus "$CHUNKS" "$WORK/corpus.json"
# the graphs, once, before anything is timed (the int8 build calibrates for ~20 s)
step graphs 600 $P -c "
from embedpool.graph import prepare_onnx
from embedpool.models import resolve_model
from embedpool.placement import graph_precisions
m = resolve_model()
for p in graph_precisions():
    print(p, prepare_onnx(m, p))
"
if [ "$CPU_ONLY" = 0 ]; then
  step vectors 600 $P benchmarks/gpu_check.py vectors "$OUT/steps/vectors.json" "$VEC"
  step embedpool_gpu 900 $P benchmarks/gpu_check.py embedpool "$OUT/steps/embedpool_gpu.json" \
    "$WORK/corpus.json" cuda --workers auto
  if [ -n "${ST_PID:-}" ]; then wait "$ST_PID"; cat "$OUT/logs/setup_st.outer"; fi
  [ -x "$WORK/st-venv/bin/python" ] || step setup_st 900 setup_st
  step st_gpu 900 "$WORK/st-venv/bin/python" benchmarks/gpu_check.py st "$OUT/steps/st_gpu.json" \
    "$WORK/corpus.json"
  if [ "$QWEN3" = 1 ]; then  # step 5: made with torch, so only where the torch venv is
    Q="$WORK/qwen3-0.6b"
    step qwen3_make 900 "$WORK/st-venv/bin/python" benchmarks/gpu_check.py qwen3_make "$Q"
    step qwen3_corpus 300 $P benchmarks/gpu_check.py qwen3_corpus "$Q/model" "$QCHUNKS" \
      "$WORK/qwen3_corpus.json"
    step qwen3_graphs 900 $P benchmarks/gpu_check.py qwen3_graphs "$Q/model"
    step qwen3_embedpool_gpu 900 $P benchmarks/gpu_check.py embedpool \
      "$OUT/steps/qwen3_embedpool_gpu.json" "$WORK/qwen3_corpus.json" cuda --model "$Q/model" \
      --precision fp16 --workers auto
    rm -f "$WORK/qwen3_st_fp16.npy"
    step qwen3_st_gpu 900 "$WORK/st-venv/bin/python" benchmarks/gpu_check.py st \
      "$OUT/steps/qwen3_st_gpu.json" "$WORK/qwen3_corpus.json" --max-length model \
      --save-vectors "$QVEC" "$WORK/qwen3_st_fp16.npy"
    step qwen3_vectors 900 $P benchmarks/gpu_check.py qwen3_vectors "$OUT/steps/qwen3_vectors.json" \
      "$WORK/qwen3_corpus.json" "$QVEC" cuda:0 "$WORK/qwen3_st_fp16.npy"
  fi
else
  # the same throughput step on the CPU: checks the step itself where there is no GPU
  step embedpool_cpu 900 $P benchmarks/gpu_check.py embedpool "$OUT/steps/embedpool_cpu.json" \
    "$WORK/corpus.json" cpu --workers auto
fi
step efficiency 1200 $P benchmarks/gpu_check.py efficiency "$OUT/steps/efficiency.json" \
  "$WORKERS" "$PER_WORKER"
step tokenize 600 $P benchmarks/tokenize_rate.py --chunks "$TOK_CHUNKS" --out "$OUT/steps/tokenize.json"
step report 120 $P benchmarks/gpu_check.py report "$OUT"
cat "$OUT/logs/report.log"
echo "gpu_check took $(( $(date +%s) - started )) s; results in $OUT"
