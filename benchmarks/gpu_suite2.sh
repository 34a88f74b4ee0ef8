#!/usr/bin/env bash
# Second GPU session: compiled step at larger batch / CUDA graphs, and the real loop with compile
# over two epochs (the second epoch's per-window throughput is the steady state).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD" M2DX_NO_PROGRESS=1
OUT=${OUT:-/tmp/m2dx_bench}; export OUT; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
run() { echo "+ $*"; timeout "$1" python3 benchmarks/pretrain_step.py "${@:2}" | tee -a "$OUT/bench.jsonl"; }
run 150 --batch 128 --amp bf16 --steps 20 --warmup 5 --compile
run 150 --batch 64 --amp bf16 --steps 30 --warmup 8 --compile --compile-mode reduce-overhead
timeout 200 python3 benchmarks/pretrain_loop.py --items 3840 --epochs 2 --workers 8 --compile --metrics-out "$OUT/loop_compile.jsonl"
