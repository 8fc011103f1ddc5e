# Sourced by the run.sh of the 25-minute follow-ups (equal_budget_tta_2cores, equal_budget_hv_2cores): the
# 25-minute MoNuSeg command of equal_budget_r18_2cores and one histoseg-eval of a checkpoint, each skipped when its
# folder already holds a summary.json, each logging its start with the commit it ran at. Env: PY (the venv's python).
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=2 OPENCV_FOR_THREADS_NUM=1 PYTHONUNBUFFERED=1

# train_25min RUN SEED [override ...]: overrides go right after experiment=monuseg_instance (e.g. target=hv)
train_25min() {
  local run=$1 seed=$2; shift 2
  if [ -f "$run/summary.json" ]; then echo "seed $seed: training done, skipped"; return; fi
  echo "seed $seed: train start $(date -u +%FT%TZ) at $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo '+uncommitted')"
  rm -rf "$run"; mkdir -p "$run"
  $PY train.py experiment=monuseg_instance "$@" budget_min=25 seed="$seed" dataset.num_workers=0 \
    dataset.persistent_workers=false dataset.samples_per_epoch=512 inference=default tune_postprocess.workers=1 \
    dataset.batch_size=4 model.net.encoder_name=resnet18 hydra.run.dir="$run" > "$run/stdout.log" 2>&1
}

# best_ckpt RUN: save_top_k=1 keeps one epoch_*.ckpt, the best-by-validation-Dice checkpoint the run tested
best_ckpt() { ls "$1"/checkpoints/epoch_*.ckpt; }

# evaluate OUT LABEL CKPT [override ...]: histoseg-eval of CKPT on the MoNuSeg test split into OUT
evaluate() {
  local out=$1 label=$2 ckpt=$3; shift 3
  if [ -f "$out/summary.json" ]; then echo "$label eval done, skipped"; return; fi
  echo "$label eval start $(date -u +%FT%TZ) at $(git rev-parse --short HEAD) on $ckpt"
  rm -rf "$out"; mkdir -p "$out"
  $(dirname "$PY")/histoseg-eval ckpt_path="$ckpt" dataset=monuseg "$@" hydra.run.dir="$out" > "$out/stdout.log" 2>&1
}
