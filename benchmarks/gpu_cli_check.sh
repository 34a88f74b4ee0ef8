#!/usr/bin/env bash
# GPU smoke of the user-facing commands on generated data (ViT-B from scratch): further-pretrain with the
# background progress report, report --probe, finetune (bf16), embed. Not a benchmark; a correctness check
# of the CUDA paths that CPU CI cannot reach.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD" M2DX_NO_PROGRESS=1
OUT=${OUT:-/tmp/m2dx_gpu_check}; mkdir -p "$OUT"
M="python3 -m m2dx_clinic"
python3 -c "from m2dx_clinic.demo_data import make_demo_icbhi; make_demo_icbhi('/tmp/d')"
step() { echo "+ $*"; s=$(date +%s); "$@"; rc=$?; echo "  rc=$rc in $(( $(date +%s) - s )) s"; }
step $M further-pretrain --recipe icbhi_m2dx --base "" --data /tmp/d/ICBHI_final_database --noise m2dx_clinic/assets/noise \
  --out /tmp/run --epochs 2 --save-every 1 --set data.min_ds_size=512 --set data.loader_workers=4 \
  --set data.norm_stats_samples=500 --set data.cache_dir=/tmp/c
CK=$(ls /tmp/run/m2d_x_vit_base-*/checkpoint-2.pth)
step $M report /tmp/run --task icbhi --data /tmp/d --probe
step $M finetune --task icbhi --data /tmp/d --checkpoint "$CK" --recipe icbhi_finetune --epochs 3 --out /tmp/ft
step $M embed -c "$CK" -o /tmp/emb /tmp/d/ICBHI_final_database --device cuda
cp /tmp/run/report/report.json "$OUT/report.json"; cp /tmp/ft/metrics.json "$OUT/ft_metrics.json"
cp /tmp/run/environment.json "$OUT/environment.json"; ls /tmp/emb | wc -l
