#!/usr/bin/env bash
# One prepared GPU session: step throughput / MFU / memory of the ICBHI M2D-X setting (ViT-B, 80x200,
# 16x4, batch 64), then the real training loop for one short epoch. Results: $OUT/bench.jsonl, $OUT/loop.jsonl.
# Usage on a GPU machine from the repo root:  OUT=/tmp/out bash benchmarks/gpu_suite.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD" M2DX_NO_PROGRESS=1
OUT=${OUT:-/tmp/m2dx_bench}; export OUT; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
run() { echo "+ $*"; timeout "$1" python3 benchmarks/pretrain_step.py "${@:2}" | tee -a "$OUT/bench.jsonl"; }
run 120 --batch 64 --amp bf16 --steps 30 --warmup 10                  # ICBHI M2D-X, eager
run 120 --batch 64 --amp bf16 --steps 30 --warmup 10 --offline none   # plain M2D
run 120 --batch 128 --amp bf16 --steps 20 --warmup 5                  # larger batch
run 120 --batch 64 --amp fp16 --steps 20 --warmup 5                   # fp16 + GradScaler path
run 240 --batch 64 --amp bf16 --steps 30 --warmup 5 --compile         # torch.compile
# The real loop (data loader, noise cycling, EMA, checkpoint save) for one epoch of ViT-B from scratch.
timeout 240 python3 benchmarks/pretrain_loop.py --items 2560 --epochs 1 --workers 8 --metrics-out "$OUT/loop.jsonl"
