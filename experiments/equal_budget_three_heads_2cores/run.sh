#!/usr/bin/env bash
# The recipe's three-class + distance heads plus HoVer-Net's offset heads (target=three_class_distance_hv) at the
# 25-minute budget of equal_budget_r18_2cores, three seeds, against the same command with the recipe's two heads
# (logs/exp/tta25/train, equal_budget_tta_2cores: results_no_tta.json) and with hv heads alone (equal_budget_hv_2cores).
# Everything but the target is the same command: ResNet-18 UNet, batch 4, 25 min of training on 2 CPU cores, the
# watershed tuned on the 4 validation images, one pass per tile at test (inference=default: no TTA).
# The training run tests with the fused markers (marker_source=interior_distance_hv: sqrt(P(interior) * distance)
# cut by the hv edges, HoVer-Net's 21-px signed rule). Each best checkpoint is then re-scored by histoseg-eval with the
# recipe's own markers (marker_source=interior_distance, thresholds re-tuned on the same 4 validation images), which
# ignores the hv heads: that splits the gain into what training the extra heads adds and what the fused markers add.
# Every seed's own tuning chose the fused markers' lowest marker threshold (0.3, the grid's edge: the hv edges scale the
# score down), so a third eval re-tunes them on the same validation images with the marker threshold grid moved down.
#   bash experiments/equal_budget_three_heads_2cores/run.sh     # env: ROOT=logs/exp/th25 SEEDS="0 1 2"
# (runs and evaluations already done, i.e. with a summary.json, are skipped)
set -euo pipefail
ROOT=${ROOT:-logs/exp/th25}
SEEDS=${SEEDS:-0 1 2}
source "$(dirname "$0")/../equal_budget_25min.sh"   # train_25min, best_ckpt, evaluate
mkdir -p "$ROOT"
for S in $SEEDS; do
  RUN=$ROOT/train/seed_$S
  train_25min "$RUN" "$S" target=three_class_distance_hv
  evaluate "$ROOT/id_markers/seed_$S" "seed $S:" "$(best_ckpt "$RUN")" postprocess.marker_source=interior_distance \
    tune_postprocess.enabled=true tune_postprocess.workers=1
  evaluate "$ROOT/fused_low/seed_$S" "seed $S: fused, low marker thresholds" "$(best_ckpt "$RUN")" \
    tune_postprocess.enabled=true tune_postprocess.workers=1 \
    "tune_postprocess.grid={marker_threshold:[0.05,0.1,0.15,0.2,0.25,0.3],threshold:[0.4,0.5,0.6],min_marker_size:[3,10],min_size:[10,30,60,100]}"
  echo "seed $S: end $(date -u +%FT%TZ)"
done
