#!/usr/bin/env bash
# Re-measures the committed CPU results and rewrites the README blocks built from them, one step at a time,
# in this order (about how long each takes on the project's 2-core machine, idle):
#   goals     run.py --preset goals                     ~4 min    benchmarks/results/cpu/goals/
#   floor     run.py --preset floor                     ~1 min    benchmarks/results/cpu/floor/
#   bank      run.py --preset bank                      ~2 min    benchmarks/results/cpu/bank/
#   supcon, ntxent, circle: run.py --preset <loss>      ~8 min each  benchmarks/results/cpu/<loss>/
#   ntxent_views  run.py --preset ntxent_views           ~3 min    benchmarks/results/cpu/ntxent_views/
#   quick     run.py --quick                            < 1 min   benchmarks/results/cpu/quick/
#   full      run.py (the full sweep)                   ~15 min   benchmarks/results/cpu/
#   kernels   kernel_stats.py (Triton work, no GPU)     ~3 min    benchmarks/results/kernel_stats.md
#   retrieval bench_retrieval.py                        ~40 min   benchmarks/results/cpu/retrieval.*
#   cached    bench_cached.py, search and chunk sweep   ~30 min   benchmarks/results/cpu/cached*.*
#
#   bash benchmarks/regenerate_cpu.sh               # every step
#   bash benchmarks/regenerate_cpu.sh goals floor   # some of them
#
# Timings from a busy machine are worthless: run it on an idle one, nothing else at the same time. Before
# each step it waits (up to 3 min) for the 1-minute load to fall below a third of the cores, so that a step
# does not start on the previous one's load (report.py warns above half the cores; importing torch adds some).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
steps=("$@")
(( ${#steps[@]} )) || steps=(goals floor bank supcon ntxent circle ntxent_views quick full kernels retrieval cached)
wait_for_idle() {
    local cores waited=0
    cores=$(nproc)
    while awk -v c="$cores" '{ exit !($1 >= c / 3) }' /proc/loadavg && (( waited < 180 )); do
        sleep 5
        waited=$((waited + 5))
    done
}
for step in "${steps[@]}"; do
    wait_for_idle
    echo "== $step ($(date -u +%H:%M:%S) UTC, 1-minute load $(cut -d' ' -f1 /proc/loadavg))"
    case $step in
        goals|floor|bank|supcon|ntxent|circle|ntxent_views)
            $PY benchmarks/run.py --preset "$step" --no-progress
            $PY benchmarks/report.py "benchmarks/results/cpu/$step/results.json" --readme README.md ;;
        quick)
            $PY benchmarks/run.py --quick --no-progress ;;
        full)
            $PY benchmarks/run.py --no-progress
            $PY benchmarks/report.py benchmarks/results/cpu/results.json --readme README.md ;;
        kernels)  # counted and compiled for sm_90 under the GPU image's Triton 3.6 too (.ci/triton36.sh makes its venv)
            test -x .venv-triton36/bin/python || bash .ci/triton36.sh --collect-only -q >/dev/null
            $PY benchmarks/kernel_stats.py --readme README.md --compile-with .venv-triton36/bin/python:sm_90,sm_100 \
                --count-with .venv-triton36/bin/python ;;
        retrieval)
            $PY benchmarks/bench_retrieval.py --readme README.md ;;
        cached)
            $PY benchmarks/bench_cached.py --batches 16384,32768,262144 --guard-gib 20 --max-batch 262144 \
                --readme README.md
            $PY benchmarks/bench_cached.py --batches 4096 --chunk-sweep 64,256,1024,4096 --guard-gib 4 \
                --readme README.md ;;
        *)
            echo "unknown step $step" >&2
            exit 2 ;;
    esac
done
echo "== done ($(date -u +%H:%M:%S) UTC)"
