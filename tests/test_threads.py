"""The batch-invariant mode under threads and interrupts (issue 18, items 1 and 2).

The mode is confined to the thread and the ``with`` block that entered it: another thread running
plain torch or the same model at the same time gets the vendor kernels and the model's own
attention, bit for bit; an exception or ``KeyboardInterrupt`` anywhere inside leaves nothing on.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import DynamicCache

import margingate
from margingate import hf_attention, hf_compat, invariant_mode
from margingate.batching import position_ids as position_ids_from_mask
from tests.models import build_model

STEPS = 6


def modes_on_stack() -> list:
    """Every torch function / dispatch mode on the calling thread's stacks."""
    from torch.overrides import _get_current_function_mode_stack

    return [
        *_get_current_function_mode_stack(),
        *torch.utils._python_dispatch._get_current_dispatch_mode_stack(),
    ]


def attn_implementations(model) -> set:
    return {config._attn_implementation for config in hf_attention._configs_of(model)}


def run_threads(*targets, seconds: float | None = None):
    """Runs the targets at once (each called with a stop event) and re-raises the first error."""
    errors: list[BaseException] = []
    stop = threading.Event()

    def wrap(target):
        def body():
            try:
                target(stop)
            except BaseException as error:  # noqa: BLE001 - reported to the test thread below
                errors.append(error)
                stop.set()

        return body

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    if seconds is not None:
        time.sleep(seconds)
        stop.set()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------- plain matmuls
def test_mode_toggling_thread_does_not_touch_another_threads_matmuls():
    """Issue 18's loop: one thread enters and leaves the mode while another runs torch.mm (the
    old process-wide aten registration crashed this within seconds)."""
    torch.manual_seed(0)
    a, b = torch.randn(8, 64), torch.randn(64, 50)
    vendor = torch.mm(a, b)
    fixed = torch.ops.margingate.linear(a, b.t())
    # Precondition: the two kernels round differently here, so each thread's result shows which ran.
    assert not torch.equal(vendor, fixed)
    counts = {"inside": 0, "outside": 0}

    def inside(stop):
        while not stop.is_set():
            with margingate.batch_invariant():
                assert invariant_mode.is_enabled()
                assert torch.equal(torch.mm(a, b), fixed)
            assert not invariant_mode.is_enabled()
            counts["inside"] += 1

    def outside(stop):
        while not stop.is_set():
            assert not invariant_mode.is_enabled()
            assert torch.equal(torch.mm(a, b), vendor)
            assert torch.equal(a @ b, vendor)
            counts["outside"] += 1

    run_threads(inside, outside, seconds=3.0)
    assert counts["inside"] > 100 and counts["outside"] > 100, counts
    assert modes_on_stack() == []
    assert torch.equal(torch.mm(a, b), vendor)


# --------------------------------------------------------------------------- models
def greedy(model, ids, steps: int = STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decode with a DynamicCache: (tokens [B, steps], every step's logits)."""
    mask = torch.ones_like(ids)
    cache = DynamicCache()
    tokens, logits = [], []
    step_ids = ids
    with torch.no_grad():
        for _ in range(steps):
            out = hf_compat.forward(
                model, step_ids, mask, position_ids_from_mask(mask, step_ids.shape[1]), cache
            )[:, -1]
            step_ids = out.argmax(-1, keepdim=True)
            tokens.append(step_ids)
            logits.append(out)
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
    return torch.cat(tokens, 1), torch.stack(logits, 1)


def canonical_greedy(model, ids):
    with margingate.batch_invariant(model):
        return greedy(model, ids)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_same_model_decoded_inside_and_outside_the_mode_at_once(family):
    """One model object, two threads: one decodes in the mode (switching the model's attention to
    "margingate" and back on every run), the other decodes outside. Each gets, bit for bit, what
    it gets single-threaded; the outside thread keeps the model's own sdpa attention even while
    the model names "margingate", including a switch or restore in the middle of its forward."""
    model = build_model(family, torch.float32)
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    canonical = canonical_greedy(model, ids)
    default = greedy(model, ids)
    # Precondition: the two paths differ somewhere, so the checks below tell them apart.
    assert not torch.equal(canonical[1], default[1])
    runs = {"inside": 0, "outside": 0}

    def inside(stop):
        while not stop.is_set():
            tokens, logits = canonical_greedy(model, ids)
            assert torch.equal(tokens, canonical[0]) and torch.equal(logits, canonical[1])
            runs["inside"] += 1

    def outside(stop):
        while not stop.is_set():
            tokens, logits = greedy(model, ids)
            assert torch.equal(tokens, default[0]) and torch.equal(logits, default[1])
            runs["outside"] += 1

    run_threads(inside, outside, seconds=2.0)
    assert runs["inside"] > 2 and runs["outside"] > 2, runs
    assert attn_implementations(model) == {"sdpa"}


def test_two_models_two_threads_equal_single_threaded():
    """Different models in two threads, one in the mode, one not, at once."""
    llama = build_model("llama", torch.bfloat16)
    gemma = build_model("gemma3_text", torch.float32)
    ids = torch.randint(3, 300, (3, 5), generator=torch.Generator().manual_seed(2))
    expected = {"llama": canonical_greedy(llama, ids), "gemma": greedy(gemma, ids)}
    got = {}

    def run_llama(stop):
        got["llama"] = canonical_greedy(llama, ids)

    def run_gemma(stop):
        got["gemma"] = greedy(gemma, ids)

    run_threads(run_llama, run_gemma)
    for name, (tokens, logits) in expected.items():
        assert torch.equal(got[name][0], tokens) and torch.equal(got[name][1], logits), name


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("release_mid_forward", [False, True])
def test_switch_in_the_middle_of_a_forward_stays_consistent(release_mid_forward, implementation):
    """Deterministic version of the race above: a forward outside the mode during which the model
    is switched to "margingate" (or switched back) after its mask is built. Its mask and every
    layer's attention stay the model's own (sdpa, or eager: its modeling file's function): the
    result equals a plain forward bit for bit."""
    model = build_model("qwen2", torch.float32, attn_implementation=implementation)
    ids = torch.randint(3, 300, (3, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    positions = position_ids_from_mask(mask, ids.shape[1])
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    switch = hf_attention.use_margingate_attention(model)
    layers = model.model.layers
    if release_mid_forward:
        switch.__enter__()
        hook = layers[1].register_forward_pre_hook(lambda module, args: switch.__exit__(None, None, None))
    else:
        hook = layers[1].register_forward_pre_hook(lambda module, args: switch.__enter__())
    try:
        with torch.no_grad():
            mixed = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    finally:
        hook.remove()
        if not release_mid_forward:
            switch.__exit__(None, None, None)
    assert attn_implementations(model) == {implementation}
    assert torch.equal(mixed, plain)


# --------------------------------------------------------------------------- interrupts
@pytest.mark.parametrize("layer", [0, 1, -1])
@pytest.mark.parametrize("nested", [False, True])
def test_keyboard_interrupt_inside_the_mode_restores_everything(layer, nested):
    """A KeyboardInterrupt from a forward hook inside ``batch_invariant(model)``, with its traceback
    kept alive (as IPython keeps it): the mode is off at once, the model's attention restored, and
    fresh forwards equal clean ones bitwise."""
    model = build_model("gemma3_text", torch.bfloat16)
    ids = torch.randint(3, 300, (2, 5), generator=torch.Generator().manual_seed(4))
    clean_default = greedy(model, ids, steps=2)
    clean_canonical = canonical_greedy(model, ids)
    a, b = torch.randn(8, 64), torch.randn(64, 50)
    vendor = torch.mm(a, b)

    def interrupt(module, args, output):
        raise KeyboardInterrupt

    hook = model.model.layers[layer].register_forward_hook(interrupt)
    kept = []
    try:
        with margingate.batch_invariant(model):
            if nested:
                with margingate.batch_invariant(model), margingate.batch_invariant():
                    greedy(model, ids)
            else:
                greedy(model, ids)
    except KeyboardInterrupt as error:
        kept.append(error.__traceback__)  # keeps every frame of the forward alive
    finally:
        hook.remove()
    assert kept, "the hook did not fire"
    assert not invariant_mode.is_enabled()
    assert not hf_attention.canonical_attention_active()
    assert modes_on_stack() == []
    assert attn_implementations(model) == {"sdpa"}
    assert torch.equal(torch.mm(a, b), vendor)
    default = greedy(model, ids, steps=2)
    assert torch.equal(default[0], clean_default[0]) and torch.equal(default[1], clean_default[1])
    canonical = canonical_greedy(model, ids)
    assert torch.equal(canonical[0], clean_canonical[0]) and torch.equal(canonical[1], clean_canonical[1])
