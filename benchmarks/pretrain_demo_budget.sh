#!/usr/bin/env bash
# Pretraining vs scratch at the demo model's full budget (issue 21's evidence), CPU, ~40 min on 2 cores.
# 1. `meddinov3 pretrain` (stage 1, DINOv3's defaults) of the demo architecture (tiny ViT 96 x 4, patch 8) on the
#    images of the demo training half only (liver117_train: source axis-0 [0, 64) of LiTS case 117, no labels):
#    2500 steps, batch 8, crops 2 x 64 + 2 x 32.
# 2. The demo model's own recipe (tools/train_demo_model.sh, 3000 steps) twice: from that run (BASE=) and from scratch,
#    side by side (one core each; the pretraining runs beside the scratch arm).
# 3. Held-out and training-half Dice of both, raw and with the shipped 2 mm post-processing
#    (tools/choose_demo_postprocessing.py).
# Usage: [SEED=0] benchmarks/pretrain_demo_budget.sh [WORK_DIR]   (SEED: pretraining and both fine-tunings)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-/tmp/meddinov3-pretrain-demo}"
PY=.venv/bin/python
export OMP_NUM_THREADS=1 SEED="${SEED:-0}"
mkdir -p "$WORK"
$PY -m meddinov3.cli demo --export-dataset "$WORK/dataset" --overwrite
ls "$WORK"/dataset/imagesTr/*.nii.gz > "$WORK/unlabelled.txt"
pretrain_then_finetune() {
  $PY -m meddinov3.cli pretrain --data "$WORK/unlabelled.txt" --out "$WORK/pretrain" --size tiny --steps 2500 \
    --batch-size 8 --seed "${SEED:-0}" --device cpu \
    --set 'model={"depth": 4, "patch_size": 8}' 'head={"hidden_dim": 256, "bottleneck_dim": 64, "nlayers": 3}' \
          global_size=64 local_size=32 n_local=2 cache_dir="\"$WORK/pretrain-cache\"" > "$WORK/pretrain.log" 2>&1
  BASE="$WORK/pretrain" INSTALL=0 tools/train_demo_model.sh "$WORK/from-pretrain" > "$WORK/from-pretrain.log" 2>&1
}
start=$(date +%s)
pretrain_then_finetune &
INSTALL=0 tools/train_demo_model.sh "$WORK/from-scratch" > "$WORK/from-scratch.log" 2>&1 &
wait
echo "both arms done in $(( $(date +%s) - start )) s"
$PY - "$WORK/pretrain/metrics.jsonl" <<'PYEOF'
import json, sys
recs = [json.loads(line) for line in open(sys.argv[1])]
probe = [(r["step"], round(r["probe_dice"], 3)) for r in recs if r.get("kind") == "probe"]
steps = [r for r in recs if r.get("kind") == "step"]
print("pretraining: dense probe (step, Dice):", probe)
print("pretraining: first/last logged DINO loss:", round(steps[0]["dino"], 3), round(steps[-1]["dino"], 3))
PYEOF
for arm in from-scratch from-pretrain; do
  echo "== $arm"
  $PY tools/choose_demo_postprocessing.py --model "$WORK/$arm/run/model" --openings 0 2
done
