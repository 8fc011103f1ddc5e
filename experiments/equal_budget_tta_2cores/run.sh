#!/usr/bin/env bash
# The 25-minute one-stage recipe (equal_budget_r18_2cores) re-trained per seed, then its best checkpoint re-scored with
# test-time augmentation (d4: 8 dihedral views per tile; flip: 3 views), the watershed re-tuned on the 4 validation
# images from that mode's maps. Training is unchanged: only the test-time effort differs, so the run's own test
# (no TTA) and the TTA evals of the same checkpoint isolate what TTA adds to a 25-minute model.
#   bash experiments/equal_budget_tta_2cores/run.sh     # env: ROOT=logs/exp/tta25 SEEDS="0 1 2" TTA_MODES="d4 flip"
# (runs and evaluations already done, i.e. with a summary.json, are skipped)
set -euo pipefail
ROOT=${ROOT:-logs/exp/tta25}
SEEDS=${SEEDS:-0 1 2}
TTA_MODES=${TTA_MODES:-d4 flip}   # d4: 8 views per tile; flip: 3 (identity, horizontal, vertical)
source "$(dirname "$0")/../equal_budget_25min.sh"   # train_25min, best_ckpt, evaluate
mkdir -p "$ROOT"
for S in $SEEDS; do
  RUN=$ROOT/train/seed_$S
  train_25min "$RUN" "$S"
  CKPT=$(best_ckpt "$RUN")
  for MODE in $TTA_MODES; do
    evaluate "$ROOT/$MODE/seed_$S" "seed $S: $MODE" "$CKPT" inference.tta="$MODE" tune_postprocess.enabled=true \
      tune_postprocess.workers=1
  done
  echo "seed $S: end $(date -u +%FT%TZ)"
done
