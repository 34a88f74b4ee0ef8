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
timeout 200 python3 - <<'PY' 2>&1 | tail -8
import json, os, time
from pathlib import Path
from m2dx_clinic.config import load_recipe
from m2dx_clinic.demo_data import make_demo_icbhi, demo_noise_dir
from m2dx_clinic.pretrain import PretrainRecipe, start_run
root = Path("/tmp/loop2"); make_demo_icbhi(root / "data", num_patients=20, recordings_per_patient=2)
recipe = load_recipe(PretrainRecipe, "icbhi_m2dx", [
    "base=", f"data.data={root}/data/ICBHI_final_database", f"data.noise={demo_noise_dir()}",
    f"data.cache_dir={root}/cache", "data.min_ds_size=3840", "data.loader_workers=8", "data.norm_stats_samples=2000",
    "optim.epochs=2", "optim.warmup_epochs=0", f"run.out={root}/run", "run.log_every=5", "run.save_every=2",
    "run.compile=true"])
t = time.time(); start_run(recipe, progress=False); print("loop wall", round(time.time() - t, 1))
os.system(f"cp {root}/run/metrics.jsonl $OUT/loop_compile.jsonl")
PY
