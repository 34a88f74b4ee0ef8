#!/usr/bin/env bash
# 1. The first ten minutes: the whole journey on generated example data, CPU only, no internet.
#    further-pretrain (tiny M2D-X + bundled noise) -> finetune (Se/Sp/Score) -> checkpoint report -> predict.
#    Under 5 minutes on 2 CPU cores. Run from the repository root after the README's set-up.
set -euo pipefail
OUT=${1:-m2dx_quickstart}
.venv/bin/m2dx quickstart --out "$OUT"
# What it leaves:
#   $OUT/demo_icbhi/                         example recordings + ICBHI-style annotations and split
#   $OUT/further_pretrain/                   run: recipe.toml, metrics.jsonl, checkpoints, report/report.html
#   $OUT/finetune/                           metrics.json (with baseline and chance), predictions.csv, MODEL_CARD.md,
#                                            best.pt (the classifier), roc_pr.png, confusion_matrix.png
#   $OUT/predictions/                        one of its recordings classified by m2dx predict
echo "open $OUT/further_pretrain/report/report.html"
