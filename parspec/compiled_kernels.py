"""How many variants of parspec's Triton kernels this process has compiled.

Triton compiles a kernel once per specialization: each ``tl.constexpr`` value, each plain
integer's class (== 1, divisible by 16, or neither), each pointer's alignment and each
launch option (num_warps, num_stages, ...). Compiling takes about a second, so a served
request that brings a new specialization waits that long for its first token.
``LLMEngine.warm_up`` is meant to compile every variant serving will use; this counts them,
so a test (tests/gpu/test_compile_variants_gpu.py) or a benchmark can check that the
number does not grow afterwards. Under ``TRITON_INTERPRET=1``, or before any launch on a
GPU, every count is 0."""

from __future__ import annotations

import importlib

# Every module that defines a Triton kernel parspec launches.
KERNEL_MODULES = ("parspec.attention", "parspec.metadata", "parspec.layer_kernels", "parspec.batch_invariant",
                  "parspec.speculative.verify", "parspec.speculative.draft_inputs")


def triton_kernels() -> dict[str, object]:
    """``module.name`` -> every ``@triton.jit`` function of KERNEL_MODULES (helpers called from
    kernels included: they are never launched, so they count 0)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    found = {}
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if isinstance(value, (JITFunction, InterpretedFunction)):
                found[f"{name}.{attr}"] = value
    return found


def compiled_variants() -> dict[str, set[str]]:
    """``module.name`` -> the cache keys (specialization and options) of the variants compiled
    so far, over every device, for each kernel with at least one."""
    out = {}
    for name, kernel in triton_kernels().items():
        keys = set()
        for caches in getattr(kernel, "device_caches", {}).values():
            keys.update(str(key) for key in caches[0])  # (kernel cache, key cache, target, backend, binder)
        if keys:
            out[name] = keys
    return out


def num_compiled_variants() -> int:
    """The number of Triton kernel variants parspec has compiled in this process."""
    return sum(len(keys) for keys in compiled_variants().values())
