#!/usr/bin/env bash
# The recipe at the 25-minute budget of equal_budget_r18_2cores with a slimmer UNet decoder:
# model.net.decoder_channels=[128,64,32,16,8] instead of smp's default [256,128,64,32,16]. On this 2-core CPU the
# default decoder costs more than the ResNet-18 encoder (its full- and half-resolution blocks are memory-bound), so
# a training step of batch 4 at 256 px takes about half the time, and 25 minutes buy about twice the steps.
# Everything else is the command of the recipe's runs in logs/exp/tta25/train (equal_budget_tta_2cores:
# results_no_tta.json), the baseline, same seeds: ResNet-18 UNet, three-class + distance heads, batch 4, 25 min of
# training on 2 CPU cores, the watershed tuned on the 4 validation images, one pass per tile at test (no TTA).
#   bash experiments/equal_budget_slim_decoder_2cores/run.sh     # env: ROOT=logs/exp/slim25 SEEDS="0 1 2"
# (runs already done, i.e. with a summary.json, are skipped)
set -euo pipefail
ROOT=${ROOT:-logs/exp/slim25}
SEEDS=${SEEDS:-0 1 2}
source "$(dirname "$0")/../equal_budget_25min.sh"   # train_25min
mkdir -p "$ROOT"
for S in $SEEDS; do
  train_25min "$ROOT/train/seed_$S" "$S" 'model.net.decoder_channels=[128,64,32,16,8]'
  echo "seed $S: end $(date -u +%FT%TZ)"
done
