#!/usr/bin/env bash
# The demo, no camera needed: draw a synthetic data set of good and defective metal parts,
# train a model on it, evaluate it on the held-out split, then inspect one good and one bad part.
# Everything it writes goes under demo/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

rm -rf demo/data # drawn afresh each time; the same seed gives the same images
python scripts/make_demo_data.py demo/data
edge-inspect train demo/data/train -o demo/model.onnx
edge-inspect evaluate demo/model.onnx demo/data/test --report demo/report
edge-inspect detect demo/model.onnx --overlays demo/detections \
    demo/data/test/normal/good_000.png demo/data/test/anomaly/scratch_000.png
