"""Tiny Hugging Face models on CUDA: batch_invariant(model) and margingate.generate give every
sequence the same bits alone and in left-padded batches.
"""

from __future__ import annotations

import pytest
import torch

import margingate
from margingate.batching import left_pad

from .cuda_support import DEVICE, cuda, seeded

# Tiny random models from tests/models.py (the CPU tests' builder), moved to the GPU in bf16: GQA,
# and for gemma3_text sliding-window layers, q/k norms and a GELU MLP.
GPU_FAMILIES = ("llama", "gemma3_text")
GEN_NEW_TOKENS = 16
GEN_PROMPTS = 6
# (prompt order, batch size): alone, shuffled in batches of 4 (the last one of 2), all at once reversed.
GEN_CONFIGS = {"alone": (list(range(GEN_PROMPTS)), 1), "b4": ([3, 0, 5, 1, 4, 2], 4), "b6": ([5, 4, 3, 2, 1, 0], 6)}
_gpu_models: dict[str, torch.nn.Module] = {}


def gpu_model(family: str) -> torch.nn.Module:
    pytest.importorskip("transformers")
    from tests.models import build_model

    if family not in _gpu_models:
        _gpu_models[family] = build_model(family, torch.bfloat16).to(DEVICE)
    return _gpu_models[family]


def gen_prompts() -> list[list[int]]:
    g = seeded(72)
    lengths = torch.randint(2, 40, (GEN_PROMPTS,), generator=g)
    return [torch.randint(3, 384, (int(n),), generator=g).tolist() for n in lengths]


@cuda
@pytest.mark.parametrize("family", GPU_FAMILIES)
def test_batch_invariant_mode_on_cuda_model(family):
    """Inside batch_invariant(model) (the model's sdpa attention switched to margingate's) every
    sequence's logits are bitwise the same alone and inside a left-padded batch."""
    model = gpu_model(family)
    prompts = gen_prompts()
    ids, mask = left_pad(prompts, 0, DEVICE)
    width = ids.shape[1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with margingate.batch_invariant(model), torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        for i, p in enumerate(prompts):
            alone_ids = torch.tensor([p], device=DEVICE)
            alone = model(
                input_ids=alone_ids,
                attention_mask=torch.ones_like(alone_ids),
                position_ids=torch.arange(len(p), device=DEVICE)[None],
            ).logits
            assert torch.equal(alone[0], batched[i, width - len(p) :]), (family, i)


def generate_in_every_config(model, policy: str, threshold: float | None = None):
    """{config: GenerationResult with sequences and margins back in prompt order}."""
    prompts = gen_prompts()
    out = {}
    for name, (order, batch_size) in GEN_CONFIGS.items():
        r = margingate.generate(
            model,
            [prompts[i] for i in order],
            policy=policy,
            threshold=threshold,
            batch_size=batch_size,
            max_new_tokens=GEN_NEW_TOKENS,
            record_margins=True,
        )
        back = {i: j for j, i in enumerate(order)}
        out[name] = margingate.GenerationResult(
            sequences=[r.sequences[back[i]] for i in range(GEN_PROMPTS)],
            stats=r.stats,
            margins=[r.margins[back[i]] for i in range(GEN_PROMPTS)],
        )
    return out


@cuda
@pytest.mark.parametrize("family", GPU_FAMILIES)
def test_generation_deterministic_across_batch_sizes_on_cuda(family):
    """margingate.generate on a CUDA model: `always` and `margin` (threshold above every margin at
    which `off` flipped here) give every prompt the same tokens alone and in batches of 4 and 6;
    `off` (cuBLAS / SDPA) is reported, and may flip."""
    model = gpu_model(family)
    off = generate_in_every_config(model, "off")
    flips, margins = [], []
    for name, r in off.items():
        for i in range(GEN_PROMPTS):
            a, b = off["alone"].sequences[i], r.sequences[i]
            margins += r.margins[i]
            step = next((s for s in range(min(len(a), len(b))) if a[s] != b[s]), None)
            if step is not None:
                flips.append((name, i, step, off["alone"].margins[i][step], r.margins[i][step]))
    flip_margin = max((max(m1, m2) for *_, m1, m2 in flips), default=0.0)
    threshold = float(max(2 * flip_margin, torch.tensor(margins).quantile(0.10)))
    print(f"\n{family} on CUDA: off flips (config, prompt, step, margin alone, margin batched): {flips}")
    for policy, t in (("always", None), ("margin", threshold)):
        results = generate_in_every_config(model, policy, t)
        base = results["alone"].sequences
        assert all(len(seq) > 0 for seq in base)
        rates = {name: r.stats["trigger_rate"] for name, r in results.items()}
        print(f"{family}: {policy} (threshold {t}) trigger rates {rates}")
        for name, r in results.items():
            assert r.sequences == base, f"{policy} on {family} (CUDA): {name} differs from alone"
