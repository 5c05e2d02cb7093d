"""The vLLM plugin's tests: they need vLLM (``pip install "margingate[vllm]"``, its own venv: see
the README); without it every module here is skipped with ``SKIP_REASON`` (``importorskip``), so
the main suite passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
SKIP_REASON = 'vLLM is not installed (pip install "margingate[vllm]" in a vLLM venv; see the README)'


def engine_env(plugin: str | None, **extra: str) -> dict[str, str]:
    """A vLLM engine in the calling process (no engine subprocess), 1 GiB of KV cache, the plugin
    on (``"invariant"``), off (None) or set to another value."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARGINGATE_VLLM")}
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", **extra)
    if plugin is not None:
        env["MARGINGATE_VLLM"] = plugin
    return env


def run_engine(model: Path, out: Path, plugin: str | None, *args: str, **env: str) -> tuple[dict, str]:
    """``engine_run.py`` in a fresh process (the plugin is loaded once per process); returns its
    JSON (empty when it wrote none) and its combined output."""
    done = subprocess.run(
        [sys.executable, str(HERE / "engine_run.py"), str(model), str(out), *args],
        env=engine_env(plugin, **env), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise AssertionError(f"engine_run.py exited {done.returncode}:\n{output[-4000:]}")
    return (json.loads(out.read_text()) if out.exists() else {}), output


def make_tiny_model(directory: Path) -> Path:
    """A 2-layer Llama with random bf16 weights (init range 0.2: large logits, so near-ties and
    batch-dependent roundings show within a few prompts); no tokenizer (prompts are token ids)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, initializer_range=0.2,
        tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
