"""Write converted-checkpoint directories with the code before the redesign (test data)."""
import sys, numpy as np, jax, jax.numpy as jnp
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
    _, upd = model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
    v = {"params": v["params"], "batch_stats": upd["batch_stats"]}
    save_pretrained(f"{out}/{name}", name, v, kw)
    with ca_flax.cpu_kernels.use_kernels(False):
        logits[name] = np.asarray(model.apply(v, x, train=False, inference_block_mb=0) if False else model.clone(inference_block_mb=0).apply(v, x, train=False))
np.savez(f"{out}/expected.npz", images=np.asarray(x), **logits)
