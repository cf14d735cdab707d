#!/usr/bin/env bash
# Measure every table the README publishes, on this machine, from a committed tree, then
# regenerate the README's tables from the data (python -m mesh publish).
#
#   benchmarks/run-all.sh              every benchmark (about an hour on 2 cores)
#   benchmarks/run-all.sh kernel       one of: bench-matrix kv-replica backends kernel transports
#                                      placement placement-measured faults formats batching
#                                      batching-lengths batching-scenarios tensor-parallel gym grammar
#
# Each command appends JSON lines to benchmarks/NAME.jsonl, failed and partial runs included;
# `python -m mesh publish` shows the records of the newest commit measured on a clean tree.
# Run it on an otherwise idle machine: the figures are only as quiet as the machine was.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
if [ -n "$(git status --porcelain --untracked-files=no -- . ':!benchmarks' ':!docs' ':!README.md')" ]; then
  echo "uncommitted code changes: commit them first (figures from a dirty tree are never published)" >&2
  exit 1
fi
only=${1:-all}
want() { [ "$only" = all ] || [ "$only" = "$1" ]; }
step() { echo "== $* ($(date -u +%H:%M:%S))"; "$@" || echo "   (exit $?: recorded; see the data)"; }
repeat5() { for _ in 1 2 3 4 5; do step "$@"; done; }

want kernel && repeat5 "$py" -m mesh bench-kernel --json benchmarks/kernel.jsonl
want transports && repeat5 "$py" -m mesh bench-transport --json benchmarks/transports.jsonl
want placement && repeat5 "$py" -m mesh bench-placement --json benchmarks/placement.jsonl
want bench-matrix && step "$py" -m mesh bench --quiet --out benchmarks/bench-matrix.jsonl
want kv-replica && step "$py" -m mesh bench --quiet --nodes 3 --prefill-nodes 0,1 --kv-replica-mb 0,512 \
  --prompt-tokens 1500 --new-tokens 32 --concurrency 1 --no-baselines --out benchmarks/kv-replica.jsonl
want backends && step "$py" -m mesh bench-backends --json benchmarks/backends.jsonl
want placement-measured && step "$py" -m mesh bench-placement --measured --json benchmarks/placement-measured.jsonl
want faults && step "$py" -m mesh faults --out benchmarks/faults.jsonl
want formats && step "$py" -m mesh bench --quiet --nodes 1 --backend torch,mlx --dtype default,f32 \
  --quantize default,none,int8,int4 --prompt-tokens 64 --new-tokens 32 --concurrency 1 --repeats 3 \
  --out benchmarks/formats.jsonl
want batching && step "$py" -m mesh bench --quiet --nodes 1,2,3 --prompt-tokens 64 --new-tokens 32 \
  --concurrency 1,2,4,8,16 --repeats 3 --out benchmarks/batching.jsonl
want batching-lengths && step "$py" -m mesh bench --quiet --nodes 1 --dtype bf16 --quantize default,none \
  --prompt-tokens 64 --new-tokens 32,128,256 --concurrency 1,8 --repeats 3 --no-baselines \
  --out benchmarks/batching-lengths.jsonl
want batching-scenarios && step "$py" -m mesh bench-batching --prefill-chunk 8,16,32,128,65536 \
  --json benchmarks/batching-scenarios.jsonl
want tensor-parallel && step "$py" -m mesh bench-tp --sizes 1,2,3 --repeats 3 --json benchmarks/tensor-parallel.jsonl
want tensor-parallel && step "$py" -m mesh bench-tp --backend mlx --sizes 1,2,3 --repeats 3 \
  --json benchmarks/tensor-parallel.jsonl
gym() { step "$py" -m mesh gym --topology mac-studios-10gbe,home-mixed --steps 1000 --eval-every 100 --threads 2 \
  --quiet --json benchmarks/gym.jsonl "$@"; }
want gym && gym --algorithm ddp
want gym && gym --algorithm diloco --option h=50
want gym && gym --algorithm diloco --option h=100
want gym && gym --algorithm diloco --option h=50 --option momentum=0.5
want gym && gym --algorithm diloco --option h=100 --option momentum=0.5
want gym && gym --algorithm sparta
want gym && gym --algorithm demo
want gym && gym --algorithm fedavg --option h=50
want grammar && step "$py" -m mesh bench-grammar --requests 50 --json benchmarks/grammar.jsonl
"$py" -m mesh publish
