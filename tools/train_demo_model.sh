#!/usr/bin/env bash
# Reproduces Resources/demo-liver-ct/: the offline demo model (`meddinov3 demo`), trained on 2 CPU cores.
# Data: LiTS case 117 from liver-ct-segmentation-package (MIT): axial slices [0, 64) train, [64, 128) held out.
# Usage: tools/train_demo_model.sh [WORK_DIR]   (needs the project's .venv; about 30 min on 2 shared CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-/tmp/meddinov3-demo-train}"
PY=.venv/bin/python
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # shared 2-core machine: one thread avoids OpenMP spin contention
mkdir -p "$WORK"
$PY -m meddinov3.cli.main demo --export-dataset "$WORK/dataset"
$PY -m meddinov3.cli.main train --data "$WORK/dataset" --out "$WORK/run" --size tiny \
  --steps 600 --steps-per-epoch 100 --batch-size 4 --val-cases liver117_heldout --seed 0 --device cpu \
  --name demo-liver-ct \
  --set 'model={"patch_size": 8}' patch_size='[128, 128]' lr_decoder=1e-3 lr_backbone=5e-4 \
        checkpoint_every=100 log_every=10 cache_dir="$WORK/cache" export_dtype=float16 \
        'augment={"rotation_deg": 15, "p_mirror": 0.0}' \
        license="code Apache-2.0; weights trained on LiTS case 117 data from liver-ct-segmentation-package (MIT)" \
        description="Demo model: tiny MedDINOv3 (ViT 96x4, patch 8) trained from scratch on half of one LiTS CT (liver, tumour). For trying the software, not for clinical use."
rm -rf Resources/demo-liver-ct
cp -r "$WORK/run/model" Resources/demo-liver-ct
echo "demo model written to Resources/demo-liver-ct"
