#!/usr/bin/env bash
# Create .venv with the pinned versions and install ca_flax (editable).
#   scripts/setup_venv.sh [cpu|tpu|cuda|cuda13]     (or CA_FLAX_ACCELERATOR=...; default cpu)
# cpu:  runtime and test requirements (requirements-dev.txt); what ./run.sh, ./test.sh and CI use.
# tpu:  runtime requirements + the '.[tpu]' extra: jax[tpu] at the pinned jax (libtpu), for TPU VMs.
# cuda: runtime requirements + the '.[cuda]' extra: jax[cuda12] at the pinned jax (CUDA plugin
#       and its CUDA wheels), for NVIDIA GPU hosts; cuda13: the same for CUDA 13.
# Idempotent: a second run with the same accelerator only re-checks the pins.
set -euo pipefail
cd "$(dirname "$0")/.."
ACCELERATOR=${1:-${CA_FLAX_ACCELERATOR:-cpu}}
case $ACCELERATOR in
cpu | tpu | cuda | cuda13) ;;
*)
  echo "usage: scripts/setup_venv.sh [cpu|tpu|cuda|cuda13] (got '$ACCELERATOR')" >&2
  exit 2
  ;;
esac
PYTHON=${PYTHON:-python3.11}
# setuptools' "Editable installation" notice is advice for package authors, not for users.
export PYTHONWARNINGS="${PYTHONWARNINGS:+$PYTHONWARNINGS,}ignore:Editable installation"

pip_install() { # pip install -q ARGS, without pip's notices about unreadable index locations
  .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$({
  cat requirements.txt requirements-dev.txt pyproject.toml
  echo "accelerator=$ACCELERATOR"
} | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  pip_install --upgrade pip || true
  if [ "$ACCELERATOR" = cpu ]; then
    pip_install -r requirements-dev.txt
    pip_install --no-deps -e .
  else
    pip_install -r requirements.txt
    pip_install -e ".[$ACCELERATOR]"
  fi
  echo "$want" > "$stamp"
fi
