"""Training at scale: configs in, checkpoints and metrics out; see docs/training.md.

`train_and_evaluate(config, workdir)` is the whole run; `train.py` is a thin command line
over it, and a notebook can call it directly.
"""

from ca_flax.training.trainer import train_and_evaluate

__all__ = ["train_and_evaluate"]
