#!/usr/bin/env bash
# The main job, offline: set up .venv, print the model table, convert a PyTorch checkpoint that
# it makes itself, train the quickstart CA model on scikit-learn digits (~2-3 min on 2 cores),
# and draw the trained model's CA attention maps on a few validation digits.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_venv.sh
# TensorFlow (data and TensorBoard writers only) logs its oneDNN notice even at level 3.
export TF_CPP_MIN_LOG_LEVEL=3 TF_ENABLE_ONEDNN_OPTS=0
PY=.venv/bin/python
WORK=${WORKDIR:-workdir}
mkdir -p "$WORK"
$PY -m ca_flax.summary
rm -rf "$WORK/demo_mbv2_ca.pth" "$WORK/demo_mbv2_ca_flax"
$PY scripts/make_demo_checkpoint.py "$WORK/demo_mbv2_ca.pth"
$PY -m ca_flax.convert "$WORK/demo_mbv2_ca.pth" --model mobilenetv2_ca --out "$WORK/demo_mbv2_ca_flax"
$PY train.py --config configs/quickstart.py --workdir "$WORK/quickstart" "$@"
# The converted demo checkpoint has random weights, whose gates show nothing: draw the trained ones.
echo "CA attention maps (a_h, a_w, a_h x a_w) of the trained model on 3 validation digits:"
$PY -m ca_flax.visualize --workdir "$WORK/quickstart" --digits 3 \
  --out "$WORK/quickstart/attention_maps.png"
