#!/usr/bin/env bash
# Issue 26, prediction at GPU speed, on one H100/H200 (prepared 2026-12-05; ~3 minutes, at most ~5).
#
# `m2dx predict`, ViT-B bf16, 100 generated recordings of 32 s, median of 3 runs, in one call:
# - before: the per-recording loop (each recording's 4 segments alone through the model, read in the
#   main thread), from BEFORE (a folder with the old `m2dx_clinic/` and `benchmarks/`, e.g.
#   `mkdir -p .before && git archive 082f2a0 m2dx_clinic benchmarks | tar -x -C .before`);
# - after: segments of several recordings batched into one forward pass (`--batch-size`), with 0, 4, 8
#   threads reading the next recordings meanwhile and predict's own default (`--read-workers`), the
#   values alternated run by run inside one process (`benchmarks/predict_throughput.py`).
# Goal (issue 26): >= 5,000x real time on one H200 with its 16 host cores (982x on 2026-12-04, 518x on
# the next lease's card).
# Carried like gpu_wall_to_wall.sh (the device has no soundfile):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
#   PYTHONPATH=/tmp/site bash benchmarks/gpu_predict.sh .before
# Results: $OUT/predict.jsonl (one JSON line per variant) and a summary.
set -u
BEFORE=${1:-${M2DX_BEFORE:-.before}}
SITE=${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 M2DX_NO_PROGRESS=1
OUT=${OUT:-/tmp/m2dx_bench}; export OUT; mkdir -p "$OUT"
RESULTS="$OUT/predict.jsonl"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
ARGS=(--size base --device cuda --amp bf16 --files 100 --seconds 32 --runs 3 --batch-size 64)

if [ -d "$BEFORE/m2dx_clinic" ]; then
  echo "+ predict before ($BEFORE)"
  PYTHONPATH="$SITE:$(cd "$BEFORE" && pwd)" timeout 120 python3 "$BEFORE/benchmarks/predict_throughput.py" "${ARGS[@]}" \
    | sed 's/^{/{"piece": "before", /' | tee -a "$RESULTS"
else
  echo "no old code at $BEFORE/m2dx_clinic: 'before' is skipped" | tee -a "$OUT/skipped.txt"
fi
echo "+ predict after"
PYTHONPATH="$SITE:$PWD" timeout 240 python3 benchmarks/predict_throughput.py "${ARGS[@]}" --read-workers 0,4,8,default \
  | sed 's/^{/{"piece": "after", /' | tee -a "$RESULTS"

echo "== summary"
python3 - "$RESULTS" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("{"):
        d = json.loads(line)
        print(f"{d['piece']:>6} read_workers={d.get('read_workers')}: {d['real_time_factor']}x real time, "
              f"{d['recordings_per_s']} recordings/s (runs {d['all_s']} s)")
PY
