"""The plugin's switches and refusals, in this process (no engine started)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from .conftest import SKIP_REASON

vllm = pytest.importorskip("vllm", reason=SKIP_REASON)

from margingate.vllm import plugin  # noqa: E402
from margingate.vllm.attention import _slots  # noqa: E402
from margingate.vllm.sampler import MARGINS_ENV, MarginGateLogitsProcessor  # noqa: E402


@pytest.mark.parametrize("value", [None, "", "off"])
def test_off_values_change_nothing(monkeypatch, value):
    from vllm.model_executor.layers import utils

    if value is None:
        monkeypatch.delenv(plugin.ENV, raising=False)
    else:
        monkeypatch.setenv(plugin.ENV, value)
    before = utils.dispatch_cpu_unquantized_gemm
    assert plugin.enabled() is False
    plugin.register()
    assert utils.dispatch_cpu_unquantized_gemm is before


@pytest.mark.parametrize("value", ["on", "Invariant", "invariant2", "1"])
def test_unknown_value_is_an_error(monkeypatch, value):
    monkeypatch.setenv(plugin.ENV, value)
    with pytest.raises(plugin.UnsupportedError, match="is not a known value"):
        plugin.register()


def test_invariant_is_on(monkeypatch):
    monkeypatch.setenv(plugin.ENV, "invariant")
    assert plugin.enabled() is True


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0", "0.3.2"])
def test_version_outside_the_tested_range_is_refused(monkeypatch, version):
    monkeypatch.setenv(plugin.ENV, "invariant")
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(vllm, "__version__", version)
    with pytest.raises(plugin.UnsupportedError, match=f"vLLM {version} is not supported"):
        plugin.register()


def test_the_installed_version_passes_the_check():
    plugin.check_version(vllm.__version__)  # the control of the refusal above: no raise
    plugin.check_version("0.32.7")


def test_a_gpu_platform_is_refused(monkeypatch):
    from vllm.platforms import current_platform

    monkeypatch.setenv(plugin.ENV, "invariant")
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
    with pytest.raises(plugin.UnsupportedError, match="CPU platform only"):
        plugin.register()


def _config(**model):
    model_config = SimpleNamespace(quantization=None, runner_type="generate", use_mla=False, is_hybrid=False,
                                   is_attention_free=False, **model)  # fmt: skip
    return SimpleNamespace(
        model_config=model_config,
        cache_config=SimpleNamespace(cache_dtype="auto"),
        speculative_config=None,
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        lora_config=None,
    )


def test_supported_config_passes():
    plugin.check_config(_config())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: setattr(c.model_config, "quantization", "awq"), "quantized models"),
        (lambda c: setattr(c.model_config, "use_mla", True), "MLA"),
        (lambda c: setattr(c.model_config, "is_hybrid", True), "hybrid"),
        (lambda c: setattr(c.cache_config, "cache_dtype", "fp8"), "quantized KV cache"),
        (lambda c: setattr(c, "speculative_config", object()), "speculative decoding"),
        (lambda c: setattr(c.parallel_config, "tensor_parallel_size", 2), "tensor/pipeline parallelism"),
        (lambda c: setattr(c, "lora_config", object()), "LoRA"),
    ],
)
def test_unsupported_features_are_refused_in_one_line(change, message):
    config = _config()
    change(config)
    with pytest.raises(plugin.UnsupportedError, match=message) as error:
        plugin.check_config(config)
    assert "\n" not in str(error.value)


def test_seeded_top_p_and_penalties_are_refused(monkeypatch):
    from vllm import SamplingParams

    MarginGateLogitsProcessor.validate_params(SamplingParams(temperature=0.7, seed=1, top_k=5, min_p=0.1))
    MarginGateLogitsProcessor.validate_params(SamplingParams(temperature=0.7, top_p=0.9))  # unseeded: vLLM's
    with pytest.raises(ValueError, match="top_p"):
        MarginGateLogitsProcessor.validate_params(SamplingParams(temperature=0.7, seed=1, top_p=0.9))
    with pytest.raises(ValueError, match="penalties"):
        MarginGateLogitsProcessor.validate_params(SamplingParams(temperature=0.7, seed=1, repetition_penalty=1.1))
    monkeypatch.delenv(MARGINS_ENV, raising=False)
    with pytest.raises(ValueError, match=MARGINS_ENV):
        MarginGateLogitsProcessor.validate_params(SamplingParams(extra_args={"margingate_margins": "a"}))
    monkeypatch.setenv(MARGINS_ENV, "/tmp/margins.jsonl")
    MarginGateLogitsProcessor.validate_params(SamplingParams(extra_args={"margingate_margins": "a"}))


def test_slots_right_align_each_request():
    import torch

    block_table = torch.tensor([[7, 3, 0], [5, 0, 0]])
    slots, kv_start = _slots(block_table, torch.tensor([5, 2]), block_size=4)
    assert kv_start.tolist() == [0, 3]
    # request 0: positions 0..4 -> block 7 rows 0..3, block 3 row 0
    assert slots[0].tolist() == [28, 29, 30, 31, 12]
    # request 1: three padding slots (its position 0), then positions 0, 1 in block 5
    assert slots[1].tolist() == [20, 20, 20, 20, 21]
