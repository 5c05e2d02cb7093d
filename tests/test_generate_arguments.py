"""Property: any call of ``margingate.generate`` either succeeds or raises one clear ``ValueError``
/ ``TypeError``, and never leaves the batch-invariant mode on or the model changed."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import margingate
from margingate.invariant_mode import is_enabled
from tests.models import build_model

_model = build_model("llama", torch.bfloat16)
_state = {k: v.clone() for k, v in _model.state_dict().items()}
_attn = [m.config._attn_implementation for m in _model.modules() if hasattr(m, "config")]

token = st.one_of(st.integers(-2, 390), st.floats(allow_nan=True), st.booleans(), st.text(max_size=2))
valid_prompt = st.lists(st.integers(3, 383), min_size=1, max_size=5)
prompt = st.one_of(valid_prompt, st.lists(token, max_size=5), st.text(max_size=4), st.none(), st.integers())
valid_count = st.integers(1, 3)
count = st.one_of(valid_count, valid_count, st.integers(-1, 3), st.floats(-1, 3), st.text(max_size=2), st.none(), st.booleans())
valid_arguments = st.fixed_dictionaries(
    {"max_new_tokens": valid_count},
    optional={
        "policy": st.sampled_from(margingate.POLICIES),
        "threshold": st.floats(0, 5),
        "window": valid_count,
        "batch_size": valid_count,
        "stop_at_eos": st.booleans(),
    },
)
fuzzed_arguments = st.fixed_dictionaries(
    {},
    optional={
        "policy": st.one_of(st.sampled_from(margingate.POLICIES), st.text(max_size=6), st.none()),
        "threshold": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.none(), st.text(max_size=2)),
        "window": count,
        "max_new_tokens": count,
        "batch_size": count,
        "stop_at_eos": st.booleans(),
        "eos_token_id": st.one_of(st.none(), st.integers(0, 400)),
        "pad_token_id": st.one_of(st.none(), st.integers(-1, 400), st.text(max_size=1)),
        "num_beams": st.integers(1, 2),
        "do_sample": st.booleans(),
        "temperature": st.one_of(st.just(0.0), st.floats(0, 2)),
    },
)


@st.composite
def calls(draw):
    """Three calls in four are well-formed (so the success path is exercised), one is fuzzed."""
    if draw(st.integers(0, 3)) < 3:
        return draw(st.lists(valid_prompt, min_size=1, max_size=3)), draw(valid_arguments)
    return draw(st.one_of(st.lists(prompt, max_size=3), prompt)), draw(fuzzed_arguments)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=calls())
def test_generate_succeeds_or_raises_one_clear_error(call):
    prompts, kwargs = call
    try:
        result = margingate.generate(_model, prompts, **kwargs)
    except (ValueError, TypeError) as err:
        message = str(err)
        assert message.startswith("margingate"), message  # ours, naming the argument; not torch's
        assert "\n" not in message
        event(type(err).__name__)
    else:
        event("succeeded")
        assert len(result.sequences) == len(prompts)
    assert not is_enabled()
    assert [m.config._attn_implementation for m in _model.modules() if hasattr(m, "config")] == _attn
    for k, v in _model.state_dict().items():
        assert torch.equal(v, _state[k]), k
