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
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=2 OPENCV_FOR_THREADS_NUM=1 PYTHONUNBUFFERED=1
mkdir -p "$ROOT"
for S in $SEEDS; do
  RUN=$ROOT/train/seed_$S
  if [ ! -f "$RUN/summary.json" ]; then
    echo "seed $S: train start $(date -u +%FT%TZ) at $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo '+uncommitted')"
    rm -rf "$RUN"; mkdir -p "$RUN"
    $PY train.py experiment=monuseg_instance budget_min=25 seed="$S" dataset.num_workers=0 \
      dataset.persistent_workers=false dataset.samples_per_epoch=512 inference=default tune_postprocess.workers=1 \
      dataset.batch_size=4 model.net.encoder_name=resnet18 hydra.run.dir="$RUN" > "$RUN/stdout.log" 2>&1
  fi
  CKPT=$(ls "$RUN"/checkpoints/epoch_*.ckpt)   # save_top_k=1: the best-by-validation-Dice checkpoint, as the run tested
  for MODE in $TTA_MODES; do
    EVAL=$ROOT/$MODE/seed_$S
    if [ -f "$EVAL/summary.json" ]; then echo "seed $S: $MODE eval done, skipped"; continue; fi
    echo "seed $S: $MODE eval start $(date -u +%FT%TZ) at $(git rev-parse --short HEAD) on $CKPT"
    rm -rf "$EVAL"; mkdir -p "$EVAL"
    $(dirname $PY)/histoseg-eval ckpt_path="$CKPT" dataset=monuseg inference.tta="$MODE" tune_postprocess.enabled=true \
      tune_postprocess.workers=1 hydra.run.dir="$EVAL" > "$EVAL/stdout.log" 2>&1
  done
  echo "seed $S: end $(date -u +%FT%TZ)"
done
