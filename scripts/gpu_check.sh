#!/usr/bin/env bash
# One GPU session's checks, in order of value: the bf16 batch-256 train-step benchmark against
# PyTorch AMP + channels_last + torch.compile (the default `xla` formulation, with kernel
# traces), inference in both formulations, then the formulations' agreement on the GPU.
# Results go to ${OUT:-gpu_out}. Each ca_flax train compile takes ~75 s on an H200 (autotuning).
# On the device tool's machine (its python3 holds jax, flax, optax and torch; ~8 min on H200):
#   OUT=$OUT scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv
$PY -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
BENCH=($PY -m ca_flax.bench --models mobilenetv2_ca mobilenext --batch-sizes 256
  --dtype bfloat16 --torch-configs amp --skip-input-pipeline --repeats 5 --iters 10)
"${BENCH[@]}" --modes train --profile /tmp/ca_flax_profile --json "$OUT/bench_train.json" \
  2>&1 | tee "$OUT/bench_train.log"
(cd /tmp && tar czf - --exclude="*.xplane.pb" ca_flax_profile) > "$OUT/profiles.tgz"
"${BENCH[@]}" --modes infer --formulations xla windows --json "$OUT/bench_infer.json" 2>&1 \
  | tee "$OUT/bench_infer.log"
$PY scripts/gpu_formulations_agree.py 2>&1 | tee "$OUT/agree.log"
