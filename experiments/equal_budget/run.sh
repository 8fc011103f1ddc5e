#!/usr/bin/env bash
# Equal wall-clock budget on MoNuSeg: the plain single-file UNet-r34 script (plain_unet.py) against histoseg's
# one-stage instance recipe (experiment=monuseg_instance with budget_min), for each seed side by side on a 2-core
# machine, each process pinned to its own core with one torch and one OpenCV thread, for the same minutes.
#   bash experiments/equal_budget/run.sh        # env: ROOT=logs/exp/equal_budget MINUTES=25 SEEDS="0 1 2"
set -euo pipefail
ROOT=${ROOT:-logs/exp/equal_budget}
MINUTES=${MINUTES:-25}
SEEDS=${SEEDS:-0 1 2}
PY=${PY:-.venv/bin/python}
# OpenCV's own thread pool (albumentations' transforms) ignores OMP_NUM_THREADS; taskset keeps each job on one core
export OMP_NUM_THREADS=1 OPENCV_FOR_THREADS_NUM=1 PYTHONUNBUFFERED=1
mkdir -p "$ROOT"
for S in $SEEDS; do
  if [ -f "$ROOT/plain/seed_$S/summary.json" ] && [ -f "$ROOT/recipe/seed_$S/summary.json" ]; then
    echo "seed $S done, skipped"; continue
  fi
  rm -rf "$ROOT/plain/seed_$S" "$ROOT/recipe/seed_$S"
  mkdir -p "$ROOT/plain/seed_$S" "$ROOT/recipe/seed_$S"
  echo "seed $S: start $(date -u +%FT%TZ) at $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo '+uncommitted')"
  taskset -c 0 $PY experiments/equal_budget/plain_unet.py --minutes "$MINUTES" --seed "$S" --out "$ROOT/plain/seed_$S" \
    > "$ROOT/plain/seed_$S/stdout.log" 2>&1 &
  P1=$!
  # dataset.num_workers=0: the recipe's augmentation runs on its own core, as the plain script's does;
  # inference=default (no TTA, overlap 0.25): test-time cost alike (the plain script makes one pass per image)
  taskset -c 1 $PY train.py experiment=monuseg_instance budget_min="$MINUTES" seed="$S" dataset.num_workers=0 \
    dataset.persistent_workers=false dataset.samples_per_epoch=512 inference=default tune_postprocess.workers=1 \
    hydra.run.dir="$ROOT/recipe/seed_$S" > "$ROOT/recipe/seed_$S/stdout.log" 2>&1 &
  P2=$!
  wait $P1 || echo "seed $S: plain failed"
  wait $P2 || echo "seed $S: recipe failed"
  echo "seed $S: end $(date -u +%FT%TZ)"
done
