"""Write a random PyTorch state_dict with the exact layout of the released `mbv2_ca.pth`.

Used by run.sh to demonstrate conversion offline; it holds no trained weights.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
import torch

from ca_flax.convert import expected_layout, torch_shape


def main(path: str) -> None:
    rng = np.random.default_rng(0)
    state = {}
    for key, (_, _, shape) in expected_layout("mobilenetv2_ca").items():
        value = rng.standard_normal(torch_shape(shape)).astype(np.float32) * 0.05
        if key.endswith("running_var"):
            value = np.abs(value) + 1.0
        state[key] = torch.from_numpy(value)
    torch.save({"state_dict": state}, path)
    print(f"wrote {path} ({len(state)} tensors, random weights; jax {jax.__version__})")


if __name__ == "__main__":
    main(sys.argv[1])
