#!/usr/bin/env bash
# The figures of docs/predict-and-inspect.md, of what a run learned (issue 17), from tiny CPU runs: MuGCP, ViT-B-32 with
# random weights (pretrained none), base-to-novel on Fashion-MNIST, 4 shots, 2 epochs, 2 seeds.
# Usage (from the repository root): bash docs/figures/make_figures.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/figures}
for seed in 1 2; do
  $PY -m mugcp.train --config demo model.pretrained=none data.shots=4 data.max_eval_per_class=10 optim.epochs=2 \
      data.compare_zeroshot=true train.seed=$seed train.tensorboard=false train.progress=false \
      --output "$OUT/mugcp_seed$seed" --overwrite
done
$PY -m mugcp.report "$OUT" --out "$OUT/report"
# Two Fashion-MNIST test images as files, for the per-image views of inspect.
$PY -c "
import sys; from pathlib import Path; from PIL import Image
from mugcp.data.fashion_mnist import DEFAULT_ROOT, load_split
images, _ = load_split(DEFAULT_ROOT, 'test'); out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
for i in (0, 1): Image.fromarray(images[i]).resize((224, 224)).save(out / f'test_{i}.png')
" "$OUT/images"
$PY -m mugcp.inspect "$OUT/mugcp_seed1" "$OUT/images" --out "$OUT/inspect"
cp "$OUT/mugcp_seed1/curves.png" docs/figures/curves.png
cp "$OUT/mugcp_seed1/confusion/new.png" docs/figures/confusion_new.png
cp "$OUT/inspect/amg/test_0.png" docs/figures/amg_test_0.png
cp "$OUT/inspect/gates.png" docs/figures/gates.png
cp "$OUT"/report/per_class/*new.png docs/figures/per_class_new.png
head -10 "$OUT/inspect/nearest_words.md" > docs/figures/nearest_words.md  # the first two prompted layers
# The committed copies are stored with a 256-colour palette to keep the repository small.
$PY -c "
import sys; from PIL import Image
for p in sys.argv[1:]: Image.open(p).convert('RGB').quantize(256).save(p, optimize=True)
" docs/figures/*.png
