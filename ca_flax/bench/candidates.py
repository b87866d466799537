"""What `ca_flax.bench` times: ca_flax's jitted inference or train step, and the PyTorch
reference of the same layout (ca_flax.convert.torch_reference) in each configuration (eager,
channels_last, torch.compile, AMP on GPU), each wrapped as a `Candidate`.

Compiled PyTorch inference runs with inductor freezing (weights and BatchNorm folded into
the graph as constants), PyTorch's recommended inference setting: on the 2-core CPU it took
torch.compile from 284 to 331 img/s (mobilenext) and 258 to 305 (mobilenetv2_ca), batch 16.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ca_flax import cpu
from ca_flax.bench.roofline import xla_cost, xla_memory_mb
from ca_flax.models.initializers import init_variables
from ca_flax.models.registry import create_model
from ca_flax.ops import active_formulation, conv_formulation

Step = Callable[[], None]
OPTIMIZER = optax.sgd(0.01, momentum=0.9)  # the train step's, as in PyTorch's candidates


@dataclass
class Candidate:
    """One implementation of one (model, mode, batch) case, ready to be timed: `step` dispatches
    a step (it may return before the device is done), `sync` waits for all dispatched steps."""

    impl: str
    step: Step
    sync: Step
    compile_s: float
    memory_mb: float | None = None
    flops: float | None = None  # per step, from XLA's cost analysis (ca_flax, unblocked only)
    bytes_accessed: float | None = None  # per step, likewise
    times: list[float] = field(default_factory=list)


@functools.cache
def initial_variables(name: str, dtype: Any, width: float) -> dict[str, Any]:
    """One model's random variables, shared by its candidates (blocking does not change them)."""
    model = create_model(name, dtype=dtype, width_mult=width)
    return init_variables(model, jax.random.key(0), jnp.zeros((1, 32, 32, 3), dtype), train=False)


def make_train_step(model: Any) -> Callable[..., Any]:
    """The benchmark's train step: forward, cross-entropy backward, SGD with momentum, BatchNorm
    update. Its state is (params, batch_stats, OPTIMIZER's state); dropout uses the step's key.
    Traced with the CPU backend's training ops where they apply, as the trainer's."""

    def train_step(state, x, labels, key):
        params, stats, opt = state

        def loss_fn(p):
            with cpu.training_ops():
                logits, new = model.apply(
                    {"params": p, "batch_stats": stats}, x, train=True,
                    mutable=["batch_stats"], rngs={"dropout": key},
                )  # fmt: skip
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, new["batch_stats"]

        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = OPTIMIZER.update(grads, opt, params)
        return optax.apply_updates(params, updates), stats, opt

    return train_step


def jax_candidate(
    name: str,
    mode: str,
    batch: int,
    size: int,
    dtype: Any,
    width: float = 1.0,
    block_mb: float | None = None,
    formulation: str | None = None,
    devices: int = 1,
    kernels: bool = True,
) -> Candidate:
    """Jitted inference or train step; compile time and XLA's memory estimate measured.

    CPU inference runs through the CPU backend (`ca_flax.cpu.make_plan`) on `devices` local
    devices, blocked in `block_mb` (None: the family's default), with its kernels unless
    `kernels=False`; `block_mb=0` with `kernels=False`, or a `formulation` other than the
    backend's, is XLA's own program, `jax.jit` of the plain model, as inference elsewhere. `formulation` is the convolutions' form (None:
    the backend's default); training takes the CPU backend's gradient kernels unless
    `kernels=False`.
    """
    if devices > 1 and mode != "infer":
        raise ValueError(f"devices={devices}: only inference is spread over devices")
    model = create_model(name, dtype=dtype, width_mult=width)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, size, size, 3)), dtype)
    labels = jnp.zeros((batch,), jnp.int32)
    variables = initial_variables(name, jnp.dtype(dtype), width)
    own_form = formulation in (None, "shifted_windows")  # the CPU backend's convolutions
    backend = mode == "infer" and cpu.why_not(model) is None and own_form
    backend = backend and (kernels or block_mb != 0)
    if backend:
        with cpu.use_kernels(kernels):
            plan = cpu.make_plan(model, variables, block_mb)
        spread = cpu.spread_over_devices(plan, plan.variables, jax.local_devices()[:devices])
        fn, args = spread.jitted, (spread.variables, jax.device_put(x, spread.split))
    elif mode == "infer":
        fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
        args = (variables, x)
    else:
        fn = jax.jit(make_train_step(model), donate_argnums=0)
        params, stats = jax.tree.map(jnp.copy, (variables["params"], variables["batch_stats"]))
        args = [(params, stats, OPTIMIZER.init(params)), x, labels, jax.random.key(1)]  # donated
    start = time.perf_counter()
    with conv_formulation(formulation or active_formulation()), cpu.use_kernels(kernels):
        compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    memory_mb = xla_memory_mb(compiled)
    # XLA's cost analysis counts one trip of a loop (a blocked program) and cannot see into a
    # kernel call: only programs with neither are counted.
    opaque = backend or 'custom_call_target="ca_flax_' in compiled.as_text()
    flops, bytes_accessed = (None, None) if opaque else xla_cost(compiled)

    outputs = []

    def step() -> None:
        out = compiled(*args)
        if mode == "train":
            args[0] = out  # the next step consumes this one's state
        outputs[:] = [out]  # a device runs its steps in order: the last one done, all done

    def sync() -> None:
        jax.block_until_ready(outputs)

    step()
    sync()
    label = f"ca_flax ({jnp.dtype(dtype).name})"
    if block_mb is not None:
        label += f" block {block_mb:g} MB" if block_mb else " unblocked"
    if formulation is not None:
        label += f" {formulation} convs"
    if devices > 1:
        label += f" on {devices} devices"
    if not kernels:
        label += " XLA loops"
    return Candidate(label, step, sync, compile_s, memory_mb, flops, bytes_accessed)


def load_torch_reference() -> Any:
    """The PyTorch reference models (imports torch: needs `pip install -e '.[convert]'`)."""
    from ca_flax.convert import torch_reference

    return torch_reference


def torch_candidate(
    ref: Any, name: str, mode: str, batch: int, size: int, config: str, width: float = 1.0
) -> Candidate | None:
    """PyTorch reference in one configuration (eager, channels_last, compile, amp)."""
    import torch
    import torch._inductor.config as inductor_config

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if config == "amp" and not cuda:
        return None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = ref.build(name, width=width).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    if config in ("channels_last", "compile", "amp"):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.train(mode == "train")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    compiled = config in ("compile", "amp")
    run_model = torch.compile(model) if compiled else model
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=config == "amp")

    frozen = compiled and mode == "infer"

    def freezing() -> Any:
        """Inductor freezing for compiled inference, set while compiling and calling alike
        (it is read at compile time; dynamo does not recompile when it changes)."""
        return inductor_config.patch(freezing=True) if frozen else contextlib.nullcontext()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step() -> None:
        if mode == "infer":
            with freezing(), torch.inference_mode(), autocast:
                run_model(x)
        else:
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = torch.nn.functional.cross_entropy(run_model(x), labels)
            loss.backward()
            opt.step()

    start = time.perf_counter()
    try:
        step()
        sync()
    except Exception as e:  # torch.compile needs a working toolchain; report, don't crash
        print(f"  torch {config} unavailable: {type(e).__name__}: {str(e)[:120]}")
        return None
    compile_s = time.perf_counter() - start
    memory_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return Candidate(f"torch {config}", step, sync, compile_s, memory_mb)
