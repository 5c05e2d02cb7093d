"""The generation policies and the margin threshold: what each policy does, in one place.

- ``off``: the fast path only (the vendor kernels; the baseline that flips between batches);
- ``margin``: MarginGate: the prompt is prefilled canonically; at each step a row whose fast-path
  top-1/top-2 margin is below the threshold (or NaN) is verified: replayed canonically from its
  canonical frontier, its K/V repaired in place, its token taken from the canonical logits;
- ``always``: every row verified at every step (the always-on verification baseline);
- ``invariant``: the whole decode with the canonical forward (batch-invariant kernels throughout);
- ``window``: LLM-42's verify-and-rollback on our verifier: fast decoding, every W tokens one
  canonical pass over every row's unverified tokens, commit the matching prefix, take the
  verifier's token at the first mismatch, roll back and re-decode the rest.

``always``, ``invariant`` and ``window`` are exact by construction: their tokens are a function of
the prompt alone (and ``window``'s do not depend on W: the canonical forward is query-invariant). ``margin`` is exact wherever the fast path's error stays below the threshold; the
threshold is measured (``margingate calibrate``), not proven.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Any

from .jsonl import loads

POLICIES = ("off", "margin", "always", "invariant", "window")
# Policies whose determinism is guaranteed by construction: a failure of one is a bug.
EXACT_POLICIES = ("always", "invariant", "window")

# The gate: what the threshold is compared with and what its calibration counted. A threshold file
# names the gate it calibrated (``"gate"``); a file for another gate, or one written before gates
# were named (calibrated on fast-path-vs-fast-path flips), is refused, never misread.
# "fast-margin/canonical": the fast path's top-1/top-2 margin of the logits as the model returns
# them (under sampling the noised margin and the truncation cut-off's, ``sampling.choose``),
# calibrated on the steps where the fast token differs from the canonical one (docs/DESIGN.md,
# "The gate").
GATE = "fast-margin/canonical"

# For a model without a shipped calibration. DESIGN.md measured first divergences at margins
# 0.06-0.13 on Gemma 3 270M (median margin 3.4): 0.5 is 4x the largest of those.
FALLBACK_THRESHOLD = 0.5



def check_policy(policy: Any, where: str, allowed: tuple[str, ...] = POLICIES) -> None:
    if policy not in allowed:
        raise ValueError(f"{where}: policy must be one of {', '.join(allowed)}; got {policy!r}")


def check_threshold(threshold: Any, where: str) -> None:
    if threshold is None:
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"{where}: threshold must be a float, got {type(threshold).__name__}")
    if math.isnan(threshold) or threshold < 0:
        raise ValueError(f"{where}: threshold must be >= 0 (a logit margin), got {threshold}")


def load_threshold_file(text: str, source: str) -> dict[str, Any]:
    """A calibration file's contents; raises ``ValueError`` unless it holds a threshold >= 0."""
    data = loads(text, f"threshold file {source}")  # JSONFileError (a ValueError): one line
    value = data.get("threshold") if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"threshold file {source} has no 'threshold' number >= 0")
    gate = data.get("gate")
    if gate != GATE:
        calibrated = (
            "names no gate (written before calibrations named their gate, from fast-path-vs-fast-path flips)"
            if gate is None
            else f"calibrated the gate {str(gate)[:80]!r}"
        )
        raise ValueError(
            f"threshold file {source} {calibrated}; this margingate gates with {GATE!r}: re-run "
            "`margingate calibrate` to write a threshold for it"
        )
    return data


def shipped_calibrations() -> dict[tuple[str, int], dict[str, Any]]:
    """The calibration files shipped in ``margingate/thresholds`` (each one the ``--output`` of a
    ``margingate calibrate`` run; thresholds/README.md names the runs), keyed by the
    (model_type, vocab size) they record."""
    found = {}
    folder = resources.files("margingate") / "thresholds"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name) if folder.is_dir() else ():
        name = entry.name
        if not name.endswith(".json"):
            continue
        data = load_threshold_file(entry.read_text(), name)
        model = data["model"]
        found[(str(model["model_type"]), int(model["vocab_size"]))] = {**data, "file": name}
    return found


def default_threshold(model: Any) -> tuple[float, str]:
    """``(threshold, source)`` for ``model``: its shipped calibration, else ``FALLBACK_THRESHOLD``."""
    from .hf_compat import text_config, vocab_size

    key = (str(getattr(text_config(model), "model_type", "")), vocab_size(model))
    calibration = shipped_calibrations().get(key)
    if calibration is None:
        return FALLBACK_THRESHOLD, "fallback (no shipped calibration for this model)"
    return float(calibration["threshold"]), f"shipped calibration {calibration['file']}"
