#!/usr/bin/env bash
# The main job, offline: set up .venv, print the model table, convert a PyTorch checkpoint that
# it makes itself, and train the quickstart CA model on scikit-learn digits (~2-3 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_venv.sh
export TF_CPP_MIN_LOG_LEVEL=3
PY=.venv/bin/python
WORK=${WORKDIR:-workdir}
mkdir -p "$WORK"
$PY -m ca_flax.summary
rm -rf "$WORK/demo_mbv2_ca.pth" "$WORK/demo_mbv2_ca_flax"
$PY scripts/make_demo_checkpoint.py "$WORK/demo_mbv2_ca.pth"
$PY -m ca_flax.convert "$WORK/demo_mbv2_ca.pth" --model mobilenetv2_ca --out "$WORK/demo_mbv2_ca_flax"
exec $PY train.py --config configs/quickstart.py --workdir "$WORK/quickstart" "$@"
