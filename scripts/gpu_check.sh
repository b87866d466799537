#!/usr/bin/env bash
# A GPU session's checks, as stages named on the command line (default: all, in this order):
#   train  bf16 batch-256 train-step benchmark against PyTorch AMP + channels_last +
#          torch.compile, with kernel traces (~9 min on an H200: each ca_flax compile 55-90 s)
#   infer  inference in both conv formulations (~4 min per model on an H200)
#   agree  both formulations' agreement on the GPU (over 100 s on an H200; 78 s on 2 CPU cores)
# A 15-minute device lease holds train, or infer + agree, not all three.
# Results go to ${OUT:-gpu_out}. On the device tool's machine (its python3 holds jax, flax,
# optax and torch):  OUT=$OUT scripts/gpu_check.sh agree infer   (MODELS=mobilenext: one model)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
MODELS=${MODELS:-mobilenetv2_ca mobilenext}
STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || STAGES=(train infer agree)
for stage in "${STAGES[@]}"; do
  case $stage in
  train | infer | agree) ;;
  *) echo "unknown stage '$stage' (train, infer, agree)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv
$PY -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
# shellcheck disable=SC2206
BENCH=($PY -m ca_flax.bench --models $MODELS --batch-sizes 256
  --dtype bfloat16 --torch-configs amp --skip-input-pipeline --repeats 5 --iters 10)
for stage in "${STAGES[@]}"; do
  case $stage in
  train)
    "${BENCH[@]}" --modes train --profile /tmp/ca_flax_profile --json "$OUT/bench_train.json" \
      2>&1 | tee "$OUT/bench_train.log"
    (cd /tmp && tar czf - --exclude="*.xplane.pb" ca_flax_profile) > "$OUT/profiles.tgz" ;;
  infer)
    "${BENCH[@]}" --modes infer --formulations lax_conv shifted_windows --json "$OUT/bench_infer.json" 2>&1 \
      | tee "$OUT/bench_infer.log" ;;
  agree)
    $PY scripts/gpu_formulations_agree.py 2>&1 | tee "$OUT/agree.log" ;;
  esac
done
