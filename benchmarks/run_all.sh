#!/usr/bin/env bash
# Every number in the README's "Measured" section, in one run; outputs go to bench-out/.
# Usage: benchmarks/run_all.sh   (takes about 20 minutes on 2 cores; run on a quiet machine)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench-out
E=.venv/bin/embedpool
P=.venv/bin/python
uptime | tee bench-out/uptime.txt
# 1. default (int8, adaptive pool) and fp32 single process, each against fastembed's defaults
$E bench --chunks 2000 --compare fastembed --json > bench-out/int8-auto-vs-fastembed.json
$E bench --chunks 2000 --precision fp32 --workers 0 --threads 2 --compare fastembed --json > bench-out/fp32-single-vs-fastembed.json
# 2. worker/thread splits (int8): 1x1, 1x2, 2x1, in-process 1x2, auto
for cfg in "--workers 1 --threads 1" "--workers 1 --threads 2" "--workers 2" "--workers 0 --threads 2" "--workers auto"; do
  name=$(echo "$cfg" | tr -d ' -')
  $E bench --chunks 1000 $cfg --json > "bench-out/split-$name.json"
done
# 3. cache re-run
$P benchmarks/cache_rerun.py --chunks 5000 | tee bench-out/cache-rerun.txt
# 4. server vs CLI, Ray vs pool, worker RSS
$P benchmarks/serve_bench.py --engine real --chunks 600 --per-request 8 --latency-requests 200 | tee bench-out/serve.txt
$P benchmarks/ray_bench.py --chunks 400 --rounds 1 | tee bench-out/ray.txt
$P benchmarks/worker_rss.py | tee bench-out/worker-rss.txt
# 5. prompt overhead (a prompt vs the same texts prefixed by hand, one process)
$P benchmarks/prompt_overhead.py --chunks 1000 --rounds 3 | tee bench-out/prompt-overhead.txt
# 6. the Ollama and TEI dialects' per-request overhead against the OpenAI route (one server)
$P benchmarks/dialect_overhead.py --engine fake --rounds 12 --per-round 8 | tee bench-out/dialect-overhead-fake.txt
$P benchmarks/dialect_overhead.py --rounds 8 --per-round 4 | tee bench-out/dialect-overhead.txt
uptime | tee -a bench-out/uptime.txt
