"""A real vLLM engine (the ``LLM`` class) on a tiny random Llama, plugin on vs plugin off (the
control): the same prompts alone, batched, shuffled among other requests and from the prefix
cache, with chunked prefill forced (64-token budget), greedy and seeded T > 0.

Compared per prompt: the output tokens and the raw logprob of each (its fp32 bits). The tiny model
rarely flips a token in 24 steps, but the logprob bits show every batch-dependent rounding."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from .conftest import SKIP_REASON, engine_env, run_engine

pytest.importorskip("vllm", reason=SKIP_REASON)

COMPARISONS = [("batched", "cold"), ("shuffled", "batched"), ("repeat", "batched"), ("warm", "cold")]


def same(run: dict, a: str, b: str, *, tokens_only: bool = False) -> tuple[int, int]:
    first, second = run["runs"][a], run["runs"][b]
    key = (lambda r: r["tokens"]) if tokens_only else (lambda r: (r["tokens"], r["logprobs"]))
    common = [i for i in first if i in second]
    return sum(key(first[i]) == key(second[i]) for i in common), len(common)


@pytest.fixture(scope="module")
def plugin_on(tiny_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("on")
    margins = directory / "margins.jsonl"
    result, _ = run_engine(tiny_model, directory / "out.json", "invariant", "--seeded", "--margins",
                           MARGINGATE_VLLM_MARGINS=str(margins))  # fmt: skip
    result["margins_path"] = margins
    return result


@pytest.fixture(scope="module")
def plugin_off(tiny_model, tmp_path_factory):
    result, output = run_engine(tiny_model, tmp_path_factory.mktemp("off") / "out.json", None, "--seeded")
    result["output"] = output
    return result


@pytest.mark.parametrize("mode", ["greedy", "seeded"])
def test_plugin_on_every_configuration_is_identical(plugin_on, mode):
    assert not plugin_on["errors"], plugin_on["errors"]
    for a, b in COMPARISONS:
        equal, total = same(plugin_on, f"{mode}/{a}", f"{mode}/{b}")
        print(f"plugin on, {mode}, {a} vs {b}: {equal}/{total} identical")
        assert equal == total, f"{mode}: {a} vs {b}: only {equal}/{total} identical"


def test_seeded_requests_really_sample(plugin_on):
    greedy, seeded = plugin_on["runs"]["greedy/batched"], plugin_on["runs"]["seeded/batched"]
    assert sum(greedy[i]["tokens"] != seeded[i]["tokens"] for i in greedy) >= len(greedy) // 2


def test_plugin_off_control_differs(plugin_off):
    """The control: the same engine and prompts without the plugin give batch-dependent bits, and
    seeded sampling with chunked prefill either kills vLLM's engine or differs too."""
    differing = []
    for a, b in COMPARISONS:
        equal, total = same(plugin_off, f"greedy/{a}", f"greedy/{b}")
        print(f"plugin off, greedy, {a} vs {b}: {equal}/{total} identical")
        if equal < total:
            differing.append((a, b))
    assert ("batched", "cold") in differing and ("shuffled", "batched") in differing, differing
    seeded_error = plugin_off["errors"].get("seeded", "")
    print(f"plugin off, seeded: {seeded_error[:200] or 'ran'}")
    if seeded_error:
        assert "Generator" in seeded_error or "EngineDead" in seeded_error, seeded_error
    else:
        assert any(same(plugin_off, f"seeded/{a}", f"seeded/{b}")[0] < same(plugin_off, f"seeded/{a}", f"seeded/{b}")[1]
                   for a, b in COMPARISONS)  # fmt: skip


def test_margins_side_channel(plugin_on):
    from margingate.vllm import read_margins

    margins = read_margins(plugin_on["margins_path"])
    for mode in ("greedy", "seeded"):
        for run in ("batched", "shuffled", "cold", "warm"):
            for i, request in plugin_on["runs"][f"{mode}/{run}"].items():
                recorded = margins[f"{mode}/{run}/p{i}"]
                n = len(request["prompt"])
                assert [recorded[n + j]["token"] for j in range(len(request["tokens"]))] == request["tokens"]
                assert all(recorded[n + j]["margin"] >= 0 for j in range(len(request["tokens"])))
        # a prompt's margins are the same bits in every batch configuration
        for i in plugin_on["runs"][f"{mode}/cold"]:
            per_run = [margins[f"{mode}/{run}/p{i}"] for run in ("cold", "batched", "shuffled", "warm")]
            assert all(m == per_run[0] for m in per_run[1:])


def test_transcripts_from_outputs(plugin_on):
    from margingate.vllm import transcripts_from_outputs
    from vllm import SamplingParams

    run = plugin_on["runs"]["seeded/batched"]
    outputs = [SimpleNamespace(prompt_token_ids=r["prompt"], outputs=[SimpleNamespace(token_ids=r["tokens"])],
                               request_id=r["request_id"]) for r in run.values()]  # fmt: skip
    params = [SamplingParams(temperature=0.8, top_k=40, seed=1000 + int(i)) for i in run]
    transcripts = transcripts_from_outputs(outputs, params)
    assert [t.seed for t in transcripts] == [1000 + int(i) for i in run]
    assert all(t.temperature == 0.8 and t.top_k == 40 and t.provider == "vllm" for t in transcripts)
    with pytest.raises(ValueError, match="without a seed"):
        transcripts_from_outputs(outputs[:1], SamplingParams(temperature=0.8))


def test_unknown_plugin_value_stops_vllm(tiny_model):
    script = (
        "from vllm import LLM\n"
        "if __name__ == '__main__':\n"
        f"    LLM({str(tiny_model)!r}, skip_tokenizer_init=True, enforce_eager=True, max_model_len=256)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=engine_env("invarient"),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode != 0
    assert "MARGINGATE_VLLM='invarient' is not a known value" in done.stdout + done.stderr
