"""Batch-invariant mode, the "margingate" HF attention and canonical_forward, on every family.

Invariance is tested with bitwise equality; accuracy against a float64 forward of the same weights,
judged against the default (vendor) path's own error at the same precision. The same invariance
checks with the mode off must find differences somewhere (test_mode_off_shows_differences prints
them), so these tests prove something.
"""

from __future__ import annotations

import functools
import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import margingate
from margingate import hf_compat, invariant_mode
from margingate.batching import position_ids as position_ids_from_mask
from tests.models import FAMILIES, build_model

from .conftest import DTYPES

# The models run in fp32 and bf16 (fp16 is covered op by op).
MODEL_DTYPES = [d for d in DTYPES if d != torch.float16]
CASES = [(f, d) for f in FAMILIES for d in MODEL_DTYPES]
CASE_IDS = [f"{f}-{str(d).removeprefix('torch.')}" for f, d in CASES]
VOCAB = 384
PAD = 0


def mode_on_stack() -> bool:
    """Whether the calling thread's dispatch-mode stack holds the batch-invariant mode."""
    return any(
        isinstance(mode, invariant_mode.BatchInvariantMode)
        for mode in torch.utils._python_dispatch._get_current_dispatch_mode_stack()
    )


@functools.cache
def model_of(family: str, dtype: torch.dtype):
    return build_model(family, dtype)


@functools.cache
def sequences(seed: int, count: int = 9, max_len: int = 12) -> tuple[tuple[int, ...], ...]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (count,), generator=g)
    return tuple(tuple(torch.randint(3, VOCAB, (int(n),), generator=g).tolist()) for n in lengths)


def left_pad(seqs) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
    return ids, mask


def default_forward(model, ids, mask, cache=None):
    """The vendor path with the same positions convention as canonical_forward."""
    with torch.no_grad():
        return hf_compat.forward(model, ids, mask, position_ids_from_mask(mask, ids.shape[1]), cache)


def run(model, ids, mask, cache=None, *, canonical=True):
    if canonical:
        return margingate.canonical_forward(model, ids, attention_mask=mask, cache=cache)
    return default_forward(model, ids, mask, cache)


# --------------------------------------------------------------------------- invariance checks
def batch_mismatches(model, seqs, order, *, canonical=True) -> float:
    """Max |difference| between each sequence's logits alone and inside the left-padded batch
    ``[seqs[i] for i in order]`` (0.0 = bit-identical)."""
    ids, mask = left_pad([seqs[i] for i in order])
    batched = run(model, ids, mask, canonical=canonical)
    worst = 0.0
    for row, i in enumerate(order):
        n = len(seqs[i])
        alone = run(model, *left_pad([seqs[i]]), canonical=canonical)[0]
        mine = batched[row, -n:]
        if not torch.equal(alone, mine):
            worst = max(worst, float((alone.float() - mine.float()).abs().max()) or float("inf"))
    return worst


def query_mismatches(model, seqs, *, canonical=True) -> dict[str, float]:
    """Full prefill vs prefix prefill + token-by-token decode vs prefix + windows, on a padded
    batch; max |difference| over the real positions for each way."""
    ids, mask = left_pad(seqs)
    total = ids.shape[1]
    full = run(model, ids, mask, canonical=canonical)
    prefix = total // 2

    def stepwise(splits):
        cache = DynamicCache()
        parts = []
        start = 0
        for end in splits:
            parts.append(run(model, ids[:, start:end], mask[:, :end], cache, canonical=canonical))
            start = end
        return torch.cat(parts, dim=1)

    ways = {
        "decode": stepwise([prefix, *range(prefix + 1, total + 1)]),
        "window": stepwise(
            [prefix, min(prefix + 4, total), total] if prefix + 4 < total else [prefix, total]
        ),
    }
    real = mask.bool()
    out = {}
    for name, logits in ways.items():
        a, b = full[real], logits[real]
        out[name] = 0.0 if torch.equal(a, b) else float((a.float() - b.float()).abs().max()) or float("inf")
    return out


@pytest.mark.parametrize(("family", "dtype"), CASES, ids=CASE_IDS)
@settings(max_examples=4, deadline=None, derandomize=True)
@given(data=st.data())
def test_batch_invariance(family, dtype, data):
    model = model_of(family, dtype)
    seqs = sequences(1)
    size = data.draw(st.integers(1, 9), label="batch size")
    order = data.draw(st.permutations(range(len(seqs))), label="order")[:size]
    assert batch_mismatches(model, seqs, order) == 0.0


@pytest.mark.parametrize(("family", "dtype"), CASES, ids=CASE_IDS)
def test_query_invariance(family, dtype):
    model = model_of(family, dtype)
    seqs = sequences(2, count=3)
    # Longer than the sliding window (6), so sliding layers drop keys during decode.
    seqs = (seqs[0] + (5,) * 6, seqs[1], seqs[2] + (7,) * 3)
    assert query_mismatches(model, seqs) == {"decode": 0.0, "window": 0.0}


def test_mode_off_shows_differences(capsys):
    """The vendor path (sdpa + MKL/oneDNN) fails the same checks somewhere: report where."""
    batch_diffs, query_diffs = {}, {}
    seqs = sequences(1)
    for family, dtype in CASES:
        model = model_of(family, dtype)
        name = f"{family}-{str(dtype).removeprefix('torch.')}"
        batch_diffs[name] = max(
            batch_mismatches(model, seqs, order, canonical=False)
            for order in ([0, 1, 2, 3, 4, 5, 6, 7, 8], [4, 2])
        )
        q_seqs = sequences(2, count=3)
        q_seqs = (q_seqs[0] + (5,) * 6, q_seqs[1], q_seqs[2] + (7,) * 3)
        query_diffs[name] = max(query_mismatches(model, q_seqs, canonical=False).values())
    with capsys.disabled():
        print("\nmode OFF, max |logit difference| (0 = invariant by luck):")
        for name in batch_diffs:
            print(f"  {name:22s} batch {batch_diffs[name]:.3g}   query {query_diffs[name]:.3g}")
    assert any(v > 0 for v in batch_diffs.values()), "the default path was batch-invariant everywhere"
    assert any(v > 0 for v in query_diffs.values()), "the default path was query-invariant everywhere"


# --------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize(("family", "dtype"), CASES, ids=CASE_IDS)
def test_accuracy_vs_float64(family, dtype):
    """Canonical logits are as close to a float64 forward as the default path at that precision."""
    model = model_of(family, dtype)
    reference_model = build_model(family, torch.float64)
    ids, mask = left_pad(sequences(3, count=4))
    ref = default_forward(reference_model, ids, mask)
    real = mask.bool()
    canonical = run(model, ids, mask)[real].double()
    default = default_forward(model, ids, mask)[real].double()
    err_canonical = (canonical - ref[real]).abs().max().item()
    err_default = (default - ref[real]).abs().max().item()
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    assert err_canonical <= 2 * err_default + atol, (err_canonical, err_default)


# --------------------------------------------------------------------------- errors
def test_errors_are_clear():
    model = model_of("llama", torch.float32)
    ids, mask = left_pad(sequences(6, count=3))
    right_padded = mask.flip(-1)
    with pytest.raises(ValueError, match="not left-padded"):
        margingate.canonical_forward(model, ids, attention_mask=right_padded)
    with pytest.raises(TypeError, match="DynamicCache"):
        margingate.canonical_forward(model, ids, attention_mask=mask, cache=object())
    sliding_cache = DynamicCache(config=model_of("gemma3_text", torch.float32).config)
    gemma = model_of("gemma3_text", torch.float32)
    with pytest.raises(TypeError, match="sliding-window"):
        margingate.canonical_forward(gemma, ids, attention_mask=mask, cache=sliding_cache)
    model.config.model_type = "gpt2"
    try:
        with pytest.raises(ValueError, match="not supported"):
            margingate.canonical_forward(model, ids, attention_mask=mask)
    finally:
        model.config.model_type = "llama"
    with margingate.batch_invariant(), pytest.raises(RuntimeError, match="float64"):
        torch.randn(3, 4, dtype=torch.float64) @ torch.randn(4, 5, dtype=torch.float64)


def test_model_loaded_with_margingate_attention():
    """attn_implementation="margingate" works for a plain model(...) call under the mode."""
    model = build_model("qwen3", torch.bfloat16, attn_implementation="margingate")
    assert model.config._attn_implementation == "margingate"
    seqs = sequences(7, count=3)
    ids, mask = left_pad(seqs)
    with margingate.batch_invariant(), torch.no_grad():
        batched = model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask, ids.shape[1])
        )
        alone = model(input_ids=torch.tensor([seqs[1]]))
    assert torch.equal(batched.logits[1, -len(seqs[1]) :], alone.logits[0])


# --------------------------------------------------------------------------- the mode itself
def test_mode_is_reentrant_thread_aware_and_restored():
    torch.manual_seed(0)
    a, b = torch.randn(8, 64), torch.randn(64, 50)
    vendor = torch.mm(a, b)
    fixed = torch.ops.margingate.linear(a, b.t())
    # Precondition: the two kernels round differently here, so the checks below tell them apart.
    assert not torch.equal(vendor, fixed)
    seen_in_thread = {}

    x3 = torch.randn(3, 5, 64)
    vendor_ops = {
        "addmm": lambda: torch.addmm(b[0], a, b),
        "bmm": lambda: torch.bmm(x3, x3.transpose(1, 2)),
        "mean": lambda: x3.mean(-1),
        "sum_bool": lambda: (x3 > 0).sum(-1),
        "gelu": lambda: F.gelu(x3, approximate="tanh"),
        "silu": lambda: F.silu(x3),
    }
    expected = {name: op() for name, op in vendor_ops.items()}

    def other_thread():
        seen_in_thread["enabled"] = invariant_mode.is_enabled()
        seen_in_thread["mm"] = torch.mm(a, b)
        # Every overridden op falls back to the vendor kernel in a thread outside the mode.
        seen_in_thread["others"] = {
            name: torch.equal(op(), expected[name]) for name, op in vendor_ops.items()
        }

    with margingate.batch_invariant():
        with margingate.batch_invariant():
            assert invariant_mode.is_enabled()
            assert torch.equal(torch.mm(a, b), fixed)
        assert invariant_mode.is_enabled()
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert torch.equal(torch.mm(a, b), fixed)
    assert not invariant_mode.is_enabled() and not mode_on_stack()
    assert seen_in_thread["enabled"] is False and torch.equal(seen_in_thread["mm"], vendor)
    assert all(seen_in_thread["others"].values()), seen_in_thread["others"]
    assert torch.equal(torch.mm(a, b), vendor)
    with pytest.raises(KeyError), margingate.batch_invariant():
        raise KeyError("boom")
    assert not invariant_mode.is_enabled() and not mode_on_stack()
    assert torch.equal(torch.mm(a, b), vendor)


def test_package_layout():
    """margingate.batch_invariant is the context manager; the module behind it is invariant_mode
    (no submodule of the same name shadows the function), and HF attention does not import it."""
    import importlib.util

    assert margingate.batch_invariant is invariant_mode.batch_invariant
    assert importlib.util.find_spec("margingate.batch_invariant") is None
    source = importlib.util.find_spec("margingate.hf_attention").loader.get_source("margingate.hf_attention")
    assert "invariant_mode" not in source


@pytest.mark.parametrize("dtype", MODEL_DTYPES, ids=["float32", "bfloat16"])
def test_fixed_row_ops_are_invariant_and_accurate(dtype):
    """The recomposed activations / reductions give a row the same bits in any batch and layout,
    and stay within a few ulps of torch's own kernels."""
    torch.manual_seed(1)
    x = torch.randn(9, 33, 100, dtype=dtype) * 3
    view = x.view(9, 33, 4, 25).transpose(1, 2)
    ops = {
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "gelu": F.gelu,
        "silu": F.silu,
        "mean": lambda t: t.float().pow(2).mean(-1, keepdim=True),
        "sum": lambda t: t.sum(-1),
        "softmax": lambda t: invariant_mode.fixed_order_softmax(t, -1),
        "log_softmax": lambda t: invariant_mode.fixed_order_softmax(t, -1, log=True),
    }
    for name, op in ops.items():
        with margingate.batch_invariant():
            for tensor, index in ((x, (4, 7)), (view, (4, 2, 7))):
                whole = op(tensor)[index]
                alone = op(tensor[index].clone().reshape(1, 1, -1))[0, 0]
                assert torch.equal(whole, alone), name
            fixed = op(x)
        reference = {
            "softmax": lambda t: torch.softmax(t.float(), -1),
            "log_softmax": lambda t: torch.log_softmax(t.float(), -1),
        }.get(name, op)(x)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(fixed.float(), reference.float(), rtol=tol, atol=tol, msg=name)


def test_logits_to_keep_matches_full_logits():
    model = model_of("mistral", torch.bfloat16)
    ids, mask = left_pad(sequences(8, count=4))
    full = run(model, ids, mask)
    last = margingate.canonical_forward(model, ids, attention_mask=mask, logits_to_keep=1)
    assert last.shape[1] == 1 and torch.equal(last, full[:, -1:])


def test_sdpa_model_inside_the_mode():
    """An sdpa model raises inside batch_invariant() (instead of batch-dependent logits);
    batch_invariant(model) switches it to the margingate attention and back."""
    model = model_of("qwen2", torch.float32)
    seqs = sequences(9, count=3)
    ids, mask = left_pad(seqs)
    positions = position_ids_from_mask(mask, ids.shape[1])
    with (
        margingate.batch_invariant(),
        torch.no_grad(),
        pytest.raises(RuntimeError, match="not batch-invariant"),
    ):
        model(input_ids=ids, attention_mask=mask, position_ids=positions)
    with margingate.batch_invariant(model), torch.no_grad():
        assert model.config._attn_implementation == "margingate"
        batched = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(batched, run(model, ids, mask))
    default_forward(model, ids, mask)  # the guard is gone with the mode


def test_other_attention_kernels_are_refused_inside_the_mode():
    """Every sdpa backend (the math fallback too) and flex_attention raise inside the mode, without
    anything patched in transformers; outside the mode they run."""
    import warnings

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.randn(1, 2, 8, 16)
    for backend in (None, SDPBackend.MATH):
        context = sdpa_kernel(backend) if backend is not None else torch.no_grad()
        with context, margingate.batch_invariant(), pytest.raises(RuntimeError, match="not batch-invariant"):
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex without torch.compile warns that it is unfused
        # torch.compile (which flex_attention wraps its op in) re-raises our error as a RuntimeError.
        with margingate.batch_invariant(), pytest.raises(RuntimeError, match="not batch-invariant"):
            flex_attention(q, q, q)
    assert F.scaled_dot_product_attention(q, q, q).shape == q.shape
    assert not invariant_mode.is_enabled() and not mode_on_stack()


def test_autograd_through_the_mode():
    """The direct paths (F.linear, mean) step aside when autograd records: gradients flow, and the
    forward is the same routed result as without grad."""
    torch.manual_seed(2)
    x, w = torch.randn(8, 64), torch.randn(50, 64, requires_grad=True)
    with margingate.batch_invariant():
        y = F.linear(x, w).pow(2).mean(-1)
        y.sum().backward()
        with torch.no_grad():
            y_no_grad = F.linear(x, w).pow(2).mean(-1)
    assert torch.equal(y.detach(), y_no_grad)
    expected = torch.autograd.grad(F.linear(x, w).pow(2).mean(-1).sum(), w)[0]
    torch.testing.assert_close(w.grad, expected)


@pytest.mark.parametrize("family", ["mistral", "gemma3_text"])
def test_generate_with_sliding_window_cache(family):
    """model.generate under batch_invariant(model), with generate's own cache (sliding layers keep
    only the window): greedy tokens are identical alone and in a left-padded batch."""
    model = model_of(family, torch.bfloat16)
    seqs = sequences(10, count=3)
    ids, mask = left_pad(seqs)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    with margingate.batch_invariant(model), torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1] :]
        for i, s in enumerate(seqs):
            alone = model.generate(input_ids=torch.tensor([s]), **kwargs)[:, len(s) :]
            assert torch.equal(alone[0], batched[i]), (i, alone, batched[i])


def test_mask_patterns_the_kernel_cannot_reproduce_raise():
    from transformers import masking_utils as mu

    from margingate.hf_attention import margingate_mask

    mask = torch.ones(2, 5, dtype=torch.bool)
    ok = [mu.causal_mask_function, mu.sliding_window_causal_mask_function(3)]
    for fn in ok:
        assert torch.equal(margingate_mask(2, 5, 5, mask_function=fn, attention_mask=mask), mask)
    bad = [
        mu.bidirectional_mask_function,
        mu.or_masks(mu.causal_mask_function, mu.bidirectional_mask_function),
        mu.chunked_causal_mask_function(4, torch.zeros(2, dtype=torch.long)),
        mu.packed_sequence_mask_function(torch.zeros(2, 5, dtype=torch.long)),
    ]
    for fn in bad:
        with pytest.raises(ValueError, match="only causal and sliding-window"):
            margingate_mask(2, 5, 5, mask_function=fn, attention_mask=mask)
