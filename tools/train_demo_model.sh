#!/usr/bin/env bash
# Reproduces Resources/demo-liver-ct/: the offline demo model (`meddinov3 demo`), trained on 2 CPU cores.
# Data: LiTS case 117 from liver-ct-segmentation-package (MIT), split along the SOURCE .mrc array's axis 0 (which is
# the patient's right->left axis): training labels only from mrc[0:64] (right half of the body), held out
# mrc[64:128]. No validation case: the shipped model is the final checkpoint, so held-out labels are never read.
# Training slices are 128 x 64 while inference sees 128 x 128 slices: the model trains on fixed 64 x 64 patches and
# its package patch_size is the same, so the engine runs a 64 x 64 sliding window at inference.
# Post-processing (in model.json): liver + tumour keep their largest region after cutting bridges thinner than ~4 mm;
# the 2 mm opening was chosen among 0-4 mm by the Dice on the TRAINING half only (tools/choose_demo_postprocessing.py).
# Usage: tools/train_demo_model.sh [WORK_DIR]   (needs the project's .venv; STEPS=... overrides the step count;
#        BASE=PRETRAIN_RUN fine-tunes from that backbone instead of from scratch; INSTALL=0 leaves Resources/ as it is;
#        SEED=... the seed, 0 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-/tmp/meddinov3-demo-train}"
STEPS="${STEPS:-3000}"
PY=.venv/bin/python
if [ -n "${BASE:-}" ]; then FROM=(--base "$BASE"); else FROM=(--size tiny --set 'model={"patch_size": 8}'); fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # shared 2-core machine: one thread avoids OpenMP spin contention
mkdir -p "$WORK"
$PY -m meddinov3.cli demo --export-dataset "$WORK/dataset" --overwrite  # the script's own files
$PY -m meddinov3.cli train --data "$WORK/dataset" --out "$WORK/run" "${FROM[@]}" \
  --steps "$STEPS" --steps-per-epoch 100 --batch-size 8 --seed "${SEED:-0}" --device cpu \
  --name demo-liver-ct \
  --set patch_size='[64, 64]' lr_decoder=1e-3 lr_backbone=5e-4 \
        checkpoint_every=100 log_every=10 cache_dir="$WORK/cache" export_dtype=float16 \
        'postprocessing=[{"step": "largest_component", "labels": [1, 2], "opening_mm": 2.0}]' \
        'augment={"p_rotation": 0.5, "rotation_deg": 30, "p_scale": 0.5, "scale": [0.7, 1.4], "p_mirror": 0.0}' \
        license="code Apache-2.0; weights trained on LiTS case 117 data from liver-ct-segmentation-package (MIT)" \
        description="Demo model: tiny MedDINOv3 (ViT 96x4, patch 8, 64x64 tiles) trained from scratch on the right half (source .mrc axis-0 [0, 64)) of one LiTS CT (liver, tumour). For trying the software, not for clinical use."
if [ "${INSTALL:-1}" = 1 ]; then
  rm -rf Resources/demo-liver-ct
  cp -r "$WORK/run/model" Resources/demo-liver-ct
  echo "demo model written to Resources/demo-liver-ct"
fi
