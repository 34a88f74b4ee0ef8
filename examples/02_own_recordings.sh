#!/usr/bin/env bash
# 2. Bring your own recordings: further-pretrain -> report -> compare candidates -> tune -> finetune -> predict on YOUR data.
#
# Layout. Either a folder of audio (wav/flac/ogg/mp3, any rate, any channels; searched recursively) for
# pre-training, plus a CSV of labels for fine-tuning, e.g. my_labels.csv:
#
#     path,label,subject,start,end
#     rec/p01_visit1.wav,normal,p01,,
#     rec/p02_visit1.wav,crackle,p02,12.5,15.0        # a segment [start, end) in seconds
#
#   - `subject` (patient id) keeps a patient's recordings on one side of every split; without it each
#     file is its own subject (a warning says so). A `split` column (train/val/test) is optional: without
#     it a subject-disjoint 80/20 train/test split is made with a fixed seed, and validation is carved
#     subject-disjointly from train. A subject in two splits is an error.
#   - `--normal-class NAME` says which label counts for Specificity (default: a label called "normal").
#   - Relative paths are relative to the CSV's folder.
#
# This script runs the journey on a demo CSV generated here (replace DATA and LABELS with yours).
# Tiny recipes keep it to minutes on a CPU; on a GPU drop the --recipe options to get the paper settings.
set -euo pipefail
WORK=${1:-m2dx_own}
M2DX=.venv/bin/m2dx
mkdir -p "$WORK"
[ -d "$WORK/recordings" ] || .venv/bin/python -c "from m2dx_clinic.demo_data import make_demo_icbhi; make_demo_icbhi('$WORK/recordings')"
DATA="$WORK/recordings/ICBHI_final_database"          # folder of recordings
$M2DX data export --task icbhi --data "$WORK/recordings" -o "$WORK/my_labels.csv"   # cycles as a labels CSV
LABELS="$WORK/my_labels.csv"
NOISE=m2dx_clinic/assets/noise                          # or: fsd50k (m2dx data download fsd50k)

$M2DX data inspect --task csv --data "$LABELS" --normal-class normal
# Pre-train on the TRAINING recordings only, so the test patients stay unseen:
$M2DX data export --task csv --data "$LABELS" --split train --recordings -o "$WORK/pretrain_files.csv"
$M2DX further-pretrain --recipe tiny_cpu --data "$WORK/pretrain_files.csv" --noise "$NOISE" --out "$WORK/pretrain" --epochs 4 --save-every 2
$M2DX report "$WORK/pretrain" --task csv --data "$LABELS" --normal-class normal --probe
CKPT=$(ls "$WORK"/pretrain/m2d_*/checkpoint-4.pth)
# First on a new data set: which classifier is best for it? The log-mel baseline, linear evaluation of the
# frozen encoder and the full fine-tune on the same items; the best on validation becomes compare/best.pt
# and compare/MODEL_CARD.md says why in one sentence (any published checkpoint works here too).
$M2DX finetune --mode compare --recipe tiny_compare_finetune --task csv --data "$LABELS" --normal-class normal \
    --checkpoint "$CKPT" --out "$WORK/compare"
$M2DX predict --model "$WORK/compare" "$DATA" --out "$WORK/predictions_recommended"   # --candidate linear|full|baseline
$M2DX tune --task csv --data "$LABELS" --normal-class normal --checkpoint "$CKPT" --recipe tiny_tune --trials 4 --out "$WORK/tune"
$M2DX finetune --task csv --data "$LABELS" --normal-class normal --checkpoint "$CKPT" --recipe tiny_finetune \
    --params "$WORK/tune/best.toml" --repeats 2 --out "$WORK/finetune"
# Use the classifier on recordings (here: the demo's own; the test patients were never trained on):
$M2DX predict --model "$WORK/finetune" "$DATA" --out "$WORK/predictions"
echo "results: $WORK/finetune/metrics.json (model next to baseline and chance), $WORK/finetune/MODEL_CARD.md"
echo "predictions: $WORK/predictions/recordings.csv, report: $WORK/pretrain/report/report.html"
