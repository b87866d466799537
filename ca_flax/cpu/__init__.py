"""The fast CPU backend: takes a model and its variables, runs its inference through ca_flax's
C++ kernels (`kernels`, built on first use), fused (`fusion`), cache-blocked (`blocking`), one
device per core (`spread`), and gives training its depthwise gradient kernels (`training`).

    from ca_flax import cpu
    cpu.use_cpu_cores()                      # before JAX's first computation
    infer = cpu.make_inference_fn(model, variables)
    logits = infer(images)                   # (N, H, W, 3) -> (N, classes)

Nothing in `ca_flax.models` knows about this package; `import ca_flax` does not import it.
"""

from ca_flax.cpu.inference import make_inference_fn, make_plan, why_not
from ca_flax.cpu.kernels import available as kernels_available
from ca_flax.cpu.kernels import use_kernels
from ca_flax.cpu.spread import available_cores, spread_over_devices, use_cpu_cores
from ca_flax.cpu.training import training_ops

__all__ = [
    "available_cores",
    "kernels_available",
    "make_inference_fn",
    "make_plan",
    "spread_over_devices",
    "training_ops",
    "use_cpu_cores",
    "use_kernels",
    "why_not",
]
