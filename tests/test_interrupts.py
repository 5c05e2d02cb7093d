"""Interrupts (Ctrl-C) anywhere in ``margingate.generate`` leave nothing behind.

A KeyboardInterrupt raised from inside the model at the prefill, at a fast decode step and inside
a verification, with the traceback kept alive (as IPython and the REPL keep it): afterwards the
batch-invariant mode is off in this thread, the model's attention implementation is what it was,
and a fresh run is bitwise equal to a clean one.
"""

from __future__ import annotations

import pytest
import torch

import margingate
from margingate.invariant_mode import is_enabled
from tests.models import build_model

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19]]


@pytest.fixture(scope="module")
def model():
    return build_model("llama", torch.bfloat16)


def attn_implementations(model) -> list:
    return [m.config._attn_implementation for m in model.modules() if hasattr(m, "config")]


def run(model, policy):
    return margingate.generate(model, PROMPTS, policy=policy, max_new_tokens=5, stop_at_eos=False, record_margins=True)


_clean: dict = {}


def clean(model, policy):
    if policy not in _clean:
        _clean[policy] = run(model, policy)
    return _clean[policy]


@pytest.mark.parametrize(
    "policy,call,inside_mode",
    [
        ("always", 1, True),  # the canonical prefill
        ("always", 2, False),  # the first fast decode step
        ("always", 3, True),  # the first verification (canonical replay)
        ("margin", 4, None),  # later in the decode
        ("invariant", 2, True),  # a canonical decode step
        ("off", 1, False),  # the fast prefill
    ],
)
def test_interrupt_leaves_nothing_behind(model, policy, call, inside_mode):
    clean_off, clean_policy = clean(model, "off"), clean(model, policy)
    before = attn_implementations(model)
    seen = {"calls": 0, "inside": None}

    def hook(module, args):
        seen["calls"] += 1
        if seen["calls"] == call:
            seen["inside"] = is_enabled()
            raise KeyboardInterrupt

    handle = model.model.layers[1].register_forward_pre_hook(hook)
    kept = None
    try:
        run(model, policy)
    except KeyboardInterrupt as interrupt:
        kept = interrupt  # keeps the traceback, and every frame in it, alive
    finally:
        handle.remove()
    assert kept is not None and kept.__traceback__ is not None, "the interrupt was swallowed"
    if inside_mode is not None:
        assert seen["inside"] is inside_mode, "the interrupt did not hit the intended phase"
    assert not is_enabled(), "the batch-invariant mode leaked past the interrupt"
    assert attn_implementations(model) == before, "the model's attention implementation was not restored"
    again_off, again_policy = run(model, "off"), run(model, policy)
    assert again_off.sequences == clean_off.sequences and again_off.margins == clean_off.margins
    assert again_policy.sequences == clean_policy.sequences and again_policy.margins == clean_policy.margins
    del kept
