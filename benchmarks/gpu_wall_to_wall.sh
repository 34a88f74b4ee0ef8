#!/usr/bin/env bash
# Issue 26 on one H100/H200 (prepared 2026-12-04; ~6 minutes, at most ~8 with every timeout hit).
#
# 1. The real further-pretraining loop before (main at fc18b5f) and after the loop that never waits:
#    ViT-B M2D-X, 10,240 items x 3 epochs, compiled, 14 loader workers, the recipe's default log_every (10).
#    Wall to wall = each epoch's samples over the time from the previous epoch's end (saves and loader
#    start included), epochs 2-3. The old code has no such field: it is computed from its metrics'
#    timestamps (its epoch-end rows are logged before its synchronous save, so the save falls in the
#    next epoch's interval, as it should). Issue 26 measured 1,097 samples/s before, at log_every=40.
# 2. The isolated step, batch 64, compiled (1,721 samples/s = 28.2% MFU on 2026-12-04): the ceiling the
#    loop is compared with (target: loop >= 90% of it).
# 3. `m2dx predict` throughput, ViT-B bf16, 100 recordings of 32 s (982x real time on 2026-12-04).
#
# BEFORE is a folder holding the old code's `m2dx_clinic/` and `benchmarks/`, e.g. made on the host with
#   mkdir -p .before && git archive fc18b5f m2dx_clinic benchmarks | tar -x -C .before
# and carried to the device with the wheels (the device has no soundfile):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
#   PYTHONPATH=/tmp/site bash benchmarks/gpu_wall_to_wall.sh .before
# Results: $OUT/wall_to_wall.jsonl (one JSON line per piece), the loops' metrics, and a summary at the end.
set -u
BEFORE=${1:-${M2DX_BEFORE:-.before}}
SITE=${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 M2DX_NO_PROGRESS=1
OUT=${OUT:-/tmp/m2dx_bench}; export OUT; mkdir -p "$OUT"
RESULTS="$OUT/wall_to_wall.jsonl"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
LOOP=(--items 10240 --epochs 3 --workers 14 --compile)

if [ -d "$BEFORE/m2dx_clinic" ]; then
  echo "+ loop before ($BEFORE)"
  # the old benchmark forced log_every=5; the override restores the recipe default that users run
  PYTHONPATH="$SITE:$(cd "$BEFORE" && pwd)" timeout 170 python3 "$BEFORE/benchmarks/pretrain_loop.py" "${LOOP[@]}" \
    --set run.log_every=10 --metrics-out "$OUT/loop_before_metrics.jsonl" | sed 's/^{/{"piece": "loop_before", /' | tee -a "$RESULTS"
else
  echo "no old code at $BEFORE/m2dx_clinic: the 'before' loop is skipped" | tee -a "$OUT/skipped.txt"
fi
echo "+ loop after"
PYTHONPATH="$SITE:$PWD" timeout 170 python3 benchmarks/pretrain_loop.py "${LOOP[@]}" \
  --metrics-out "$OUT/loop_after_metrics.jsonl" | sed 's/^{/{"piece": "loop_after", /' | tee -a "$RESULTS"
echo "+ step"
PYTHONPATH="$SITE:$PWD" timeout 100 python3 benchmarks/pretrain_step.py --batch 64 --steps 30 --warmup 8 --compile \
  | sed 's/^{/{"piece": "step", /' | tee -a "$RESULTS"
echo "+ predict"
PYTHONPATH="$SITE:$PWD" timeout 90 python3 benchmarks/predict_throughput.py --size base --device cuda --amp bf16 \
  --files 100 --seconds 32 --runs 3 | sed 's/^{/{"piece": "predict", /' | tee -a "$RESULTS"

echo "== summary"
python3 - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
pieces = {}
for line in (out / "wall_to_wall.jsonl").read_text().splitlines():
    if line.startswith("{"):
        d = json.loads(line)
        pieces[d["piece"]] = d
metrics = out / "loop_before_metrics.jsonl"
if metrics.is_file():  # the old code: wall to wall from the epoch-end rows' timestamps
    ends = [json.loads(l) for l in metrics.read_text().splitlines() if '"epoch_end": true' in l]
    rates = [10240 / (b["time"] - a["time"]) for a, b in zip(ends, ends[1:])]
    if rates and "loop_before" in pieces:
        pieces["loop_before"]["wall_samples_per_s"] = round(statistics.median(rates), 1)
        pieces["loop_before"]["projected_hours"] = round(600 * 10000 / statistics.median(rates) / 3600, 2)
step = pieces.get("step", {}).get("samples_per_s")
for name in ("loop_before", "loop_after"):
    d = pieces.get(name)
    if d:
        share = f"{d['wall_samples_per_s'] / step:.0%} of the step" if step and d.get("wall_samples_per_s") else ""
        print(f"{name}: wall {d.get('wall_samples_per_s')} samples/s, steady {d.get('steady_samples_per_s')}, "
              f"600 x 10,000 items in {d.get('projected_hours')} h {share}")
if "step" in pieces:
    print(f"step: {step} samples/s, MFU {pieces['step'].get('mfu')}, {pieces['step'].get('peak_mem_gb')} GB")
if "predict" in pieces:
    print("predict:", {k: v for k, v in pieces["predict"].items() if k != "piece"})
PY
