#!/usr/bin/env bash
# Third GPU check (prepared on 2026-11-26 for the next session that is lent a GPU; two parts, ~11 minutes).
#
# 1. The real further-pretraining loop, compiled, with the loader that crops audio AND noise in
#    persistent workers (previous design: noise cropped on the training thread per batch, workers
#    restarted every epoch, and the frozen teacher ran eager; it ran 1,550-1,670 samples/s per window
#    against 1,870 for the isolated step). Prediction: within ~5% of the isolated step (~1,780).
# 2. The isolated step with torch.compile mode "max-autotune-no-cudagraphs": Triton GEMM templates
#    can fuse the GELU into the fc1 epilogue (unfused GELU kernels were 6-9% of GPU time). Prediction: +5%.
# 3. The attention kernel: PyTorch picked cuDNN flash (10.7% of GPU time at ~135 TFLOP/s on these
#    short sequences); FlashAttention-2 and the memory-efficient kernel are tried at the same step.
# 4. The baseline isolated step on the same card, so every figure compares within one machine.
#
# Two parts, each under the 10-minute call limit: `bash benchmarks/gpu_suite3.sh 1` (baseline, loop,
# attention kernels; ~7 min) and `bash benchmarks/gpu_suite3.sh 2` (max-autotune; its compile is long).
#
# Usage on the device (wheels carried in .whl/ because the machine has no soundfile):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
#   PYTHONPATH=/tmp/site:$PWD bash benchmarks/gpu_suite3.sh 1     (then the same with 2)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD" M2DX_NO_PROGRESS=1
OUT=${OUT:-/tmp/m2dx_bench}; export OUT; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
step() { echo "+ $*"; timeout "$1" python3 benchmarks/pretrain_step.py "${@:2}" | tee -a "$OUT/bench.jsonl"; }
PART=${1:-1}
if [ "$PART" = 1 ]; then
  step 120 --batch 64 --steps 30 --warmup 8 --compile
  timeout 240 python3 benchmarks/pretrain_loop.py --items 3840 --epochs 3 --workers 8 --compile --metrics-out "$OUT/loop_persistent.jsonl" | tee -a "$OUT/loop.jsonl"
  step 100 --batch 64 --steps 30 --warmup 8 --compile --sdpa flash
  step 100 --batch 64 --steps 30 --warmup 8 --compile --sdpa efficient
else
  step 120 --batch 64 --steps 30 --warmup 8 --compile
  step 420 --batch 64 --steps 30 --warmup 8 --compile --compile-mode max-autotune-no-cudagraphs
fi
echo "== summary"; cat "$OUT/bench.jsonl" | python3 -c "
import json, sys
for line in sys.stdin:
    d = json.loads(line); print(d['compile'], d.get('sdpa'), d['batch'], d['samples_per_s'], d.get('mfu'), d.get('peak_mem_gb'))"
