"""Tiny randomly initialised causal LMs of every supported family, built from configs (no download).

Shared by the batch-invariant and generation tests: ``build_model(family, dtype)`` returns a model in
eval mode whose sizes are small enough for this 2-core CPU but keep every feature that matters for
invariance: GQA (more query than key/value heads), q/k/v bias (Qwen2), q/k norm (Qwen3, Gemma3),
sliding-window layers (Mistral, Gemma3 with a window shorter than the test sequences), GELU-tanh MLP
and scaled embeddings (Gemma3).
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    Gemma3Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
    SiglipVisionConfig,
)

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text", "gemma3")

# A window shorter than the longest test sequence, so sliding layers actually drop keys.
SLIDING_WINDOW = 6

_COMMON = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def make_config(family: str):
    """The tiny config of one family (``attn_implementation`` is left to the caller)."""
    if family == "llama":
        return LlamaConfig(**_COMMON, head_dim=16)
    if family == "qwen2":
        # Qwen2 always has q/k/v bias.
        return Qwen2Config(**_COMMON, use_sliding_window=False)
    if family == "qwen3":
        return Qwen3Config(**_COMMON, head_dim=16, use_sliding_window=False)
    if family == "mistral":
        return MistralConfig(**_COMMON, head_dim=16, sliding_window=SLIDING_WINDOW)
    if family == "gemma3_text":
        return Gemma3TextConfig(
            **{**_COMMON, "tie_word_embeddings": True},
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            hidden_activation="gelu_pytorch_tanh",
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
        )
    if family == "gemma3":
        # The multimodal Gemma 3 (model_type "gemma3") around the same text model, with a minimal
        # vision tower; the tests feed it text only.
        vision = SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        return Gemma3Config(
            text_config=make_config("gemma3_text").to_dict(),
            vision_config=vision.to_dict(),
            mm_tokens_per_image=4,
            boi_token_index=_COMMON["vocab_size"] - 3,
            eoi_token_index=_COMMON["vocab_size"] - 2,
            image_token_index=_COMMON["vocab_size"] - 1,
        )
    raise ValueError(f"tests.models: unknown family {family!r}, expected one of {FAMILIES}")


def build_model(
    family: str, dtype: torch.dtype = torch.float32, *, seed: int = 0, attn_implementation: str = "sdpa"
):
    """A tiny random causal LM of ``family`` in ``dtype``, eval mode, deterministic for a seed.

    The weights are drawn with a larger std than HF's default (0.02) so that the logits have
    O(1) spread and rounding differences between kernels actually show up in the tests.
    """
    config = make_config(family)
    config.initializer_range = 0.2
    if family == "gemma3":
        config.text_config.initializer_range = 0.2
    torch.manual_seed(seed)
    model_class = AutoModelForImageTextToText if family == "gemma3" else AutoModelForCausalLM
    model = model_class.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    # RMSNorm weights start at 1 (or 0 for Gemma's 1+w); perturb them so the norms are not trivial.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()
