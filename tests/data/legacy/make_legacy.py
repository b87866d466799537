"""Write converted-checkpoint directories and their logits (test data for
tests/models/test_models.py): `python tests/data/legacy/make_legacy.py OUT_DIR`.

The data in this folder was written by this script at commit 6d55123, with the API from before
the redesign: `ca_flax.cpu_kernels.use_kernels(False)` around
`model.clone(inference_block_mb=0).apply(v, x, train=False)`, i.e. XLA's loops, unblocked.
The new models have neither kernels nor blocking, so that is a plain `model.apply` now. Rerun
with the new API (at the redesign), this script wrote the same variables and bitwise the same
logits as the stored ones; the test checks the new code against the stored files, not a rerun.
"""

import sys

import jax
import numpy as np

import ca_flax
from ca_flax.pretrained import save_pretrained

out = sys.argv[1]
x = jax.random.normal(jax.random.key(7), (2, 64, 48, 3))
logits = {}
for name in ("mobilenetv2_ca", "mobilenext_ca", "mobilenetv2_cbam"):
    kw = dict(num_classes=10, width_mult=0.1)
    model = ca_flax.create_model(name, **kw)
    v = ca_flax.init_variables(model, jax.random.key(1), x)
    # non-trivial BatchNorm statistics
    _, upd = model.apply(
        v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)}
    )
    v = {"params": v["params"], "batch_stats": upd["batch_stats"]}
    save_pretrained(f"{out}/{name}", name, v, kw)
    logits[name] = np.asarray(model.apply(v, x, train=False))
np.savez(f"{out}/expected.npz", images=np.asarray(x), **logits)
