"""Pretrained directories load whichever device wrote them, and get a plain directory's mode."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ca_flax

KWARGS = {"width_mult": 0.35, "num_classes": 10}
SAVE_FROM_SECOND_DEVICE = textwrap.dedent(
    """
    import sys, jax, jax.numpy as jnp, ca_flax
    from ca_flax.pretrained import save_pretrained
    model = ca_flax.create_model("mobilenetv2_ca", width_mult=0.35, num_classes=10)
    variables = ca_flax.init_variables(model, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    save_pretrained(sys.argv[1], "mobilenetv2_ca", jax.device_put(variables, jax.devices()[1]),
                    {"width_mult": 0.35, "num_classes": 10})
    """
)


def test_checkpoint_written_on_another_device_loads_here(tmp_path: Path) -> None:
    out = tmp_path / "from_cpu1"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    subprocess.run([sys.executable, "-c", SAVE_FROM_SECOND_DEVICE, str(out)], env=env, check=True)
    model, variables = ca_flax.load_pretrained(out)  # this process has no cpu:1
    expected = ca_flax.init_variables(model, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    here = {jax.local_devices()[0]}
    assert all(leaf.sharding.device_set == here for leaf in jax.tree.leaves(variables))
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert [p.name for p in tmp_path.iterdir()] == ["from_cpu1"]  # no temporary left
