"""``margingate.audit``: Token-DiFR and Activation-DiFR against the canonical reference, on tiny models.

Claims tested: a transcript produced by an exact policy (or ``margin``) in any batch audits to
exactly 0 in any other batch; one changed token is flagged at that token with the reference's score;
``off`` transcripts differ only where the reference's margin is small; sampled transcripts
(``sample_margin`` on canonical logits) audit to 0 under their own seed and fail under another, and
the audit's reference choices and margins are the op's bit for bit; the score equals
``token_difr``'s on shared noise; fingerprints are exact for the reference and not for a perturbed
model; malformed transcript files are one-line usage errors that write nothing.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import margingate
from margingate import cli
from margingate.difr import fingerprint_matrix, fingerprints, token_scores
from margingate.noise import gumbel_noise
from margingate.ops import sample_margin
from margingate.transcripts import Transcript, TranscriptError, read_transcripts, transcripts_from_generation

transformers = pytest.importorskip("transformers")
from tests.models import build_model  # noqa: E402
from tests.references import token_scores_reference  # noqa: E402

VOCAB = 384
NEW_TOKENS = 10
EOS = 2
PAD = 0


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Spinning OpenMP threads on a shared 2-core machine make small ops ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return build_model("llama", torch.bfloat16)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [
        torch.randint(3, VOCAB, (int(torch.randint(2, 24, (1,), generator=g)),), generator=g).tolist()
        for _ in range(6)
    ]


def _generate(model, prompts, policy, batch_size):
    result = margingate.generate(
        model, prompts, policy=policy, max_new_tokens=NEW_TOKENS, batch_size=batch_size, eos_token_id=EOS,
        stop_at_eos=False, pad_token_id=PAD, window=4,
    )  # fmt: skip
    return transcripts_from_generation(prompts, result.sequences, f"{policy} b{batch_size}")


def _canonical_logits(model, prompt, output):
    """The reference logits predicting ``output``, computed alone (batch of one)."""
    ids = torch.tensor([prompt + output[:-1]])
    logits = margingate.canonical_forward(model, ids, attention_mask=torch.ones_like(ids))
    return logits[0, -len(output) :].float()


@pytest.mark.parametrize("policy,batch_size", [("margin", 4), ("always", 1), ("window", 3), ("invariant", 6)])
def test_honest_transcript_scores_exactly_zero(model, prompts, policy, batch_size):
    transcripts = _generate(model, prompts, policy, batch_size)
    report = margingate.audit(model, transcripts, batch_size=5, pad_token_id=PAD)
    for r in report["transcripts"]:
        assert r["scores"] == [0.0] * NEW_TOKENS
        assert r["verdict"] == "exact" and r["match_rate"] == 1.0 and r["mismatches"] == []
    s = report["summary"]
    assert (s["exact"], s["failed"], s["tokens"], s["max_score"]) == (
        len(prompts),
        0,
        len(prompts) * NEW_TOKENS,
        0.0,
    )


def test_changed_token_is_flagged_at_that_token(model, prompts):
    honest = _generate(model, prompts, "margin", 6)
    step, row = 4, 2
    tampered = copy.deepcopy(honest)
    original = tampered[row].output_ids[step]
    tampered[row].output_ids[step] = (original + 1) % VOCAB
    report = margingate.audit(model, tampered, batch_size=3, pad_token_id=PAD)
    for i, r in enumerate(report["transcripts"]):
        if i != row:
            assert r["verdict"] == "exact"
    r = report["transcripts"][row]
    assert r["scores"][:step] == [0.0] * step
    assert r["mismatches"][0]["step"] == step and r["mismatches"][0]["reference"] == original
    assert r["verdict"] == "fail"
    # The score is the reference's top-1 logit minus the provided token's, computed alone.
    x = _canonical_logits(model, prompts[row], tampered[row].output_ids)[step]
    assert r["scores"][step] == float(x[original] - x[(original + 1) % VOCAB]) > 0
    assert r["max_score"] >= r["scores"][step]


def test_off_differs_only_at_near_ties(model, prompts):
    """The fast path's logits differ from the reference by rounding noise, so wherever an ``off``
    transcript disagrees the reference's margin (and the score, at most that margin when the provided
    token is the runner-up) is small: the report shows them."""
    transcripts = _generate(model, prompts, "off", 6)
    report = margingate.audit(model, transcripts, batch_size=6, pad_token_id=PAD)
    for r in report["transcripts"]:
        for m in r["mismatches"]:
            print(f"off mismatch: {m}")  # for the reader of -s: the near-ties
            assert m["score"] <= 0.5 and m["reference_margin"] <= 0.5, m
        assert r["verdict"] in ("exact", "fail")
    assert report["summary"]["mismatch_margins"] == sorted(
        m["reference_margin"] for r in report["transcripts"] for m in r["mismatches"]
    )


def _sample(model, prompt, n, *, seed, temperature, top_k, min_p):
    """Sampled decoding with the native op on canonical logits (full recompute each step: tiny model)."""
    out, margins = [], []
    for _ in range(n):
        ids = torch.tensor([prompt + out])
        logits = margingate.canonical_forward(
            model, ids, attention_mask=torch.ones_like(ids), logits_to_keep=1
        )[:, -1]
        token, _runner, m, _cut = sample_margin(
            logits, seed, len(prompt) + len(out), temperature, top_k, min_p
        )
        out.append(int(token[0]))
        margins.append(float(m[0]))
    return out, margins


@pytest.mark.parametrize("top_k,min_p", [(0, 0.0), (20, 0.05)])
def test_sampled_transcript_exact_under_its_seed(model, prompts, top_k, min_p):
    params = dict(seed=1234, temperature=0.7, top_k=top_k, min_p=min_p)
    transcripts, margins = [], []
    for p in prompts[:3]:
        out, m = _sample(model, p, NEW_TOKENS, **params)
        transcripts.append({"prompt_ids": p, "output_ids": out, **params})
        margins.append(m)
    report = margingate.audit(model, transcripts, batch_size=2, pad_token_id=PAD)
    for r, m in zip(report["transcripts"], margins, strict=True):
        assert r["verdict"] == "exact" and r["scores"] == [0.0] * NEW_TOKENS
        assert r["reference_margins"] == m  # the audit's noise and candidates are the op's, bit for bit
    wrong = [{**t, "seed": 1235} for t in transcripts] + [{**t, "temperature": 1.3} for t in transcripts]
    report = margingate.audit(model, wrong, batch_size=4, pad_token_id=PAD)
    # The native path (sample_margin + the provided token's noise) equals the materialised definition.
    for t, r in zip(wrong, report["transcripts"], strict=True):
        logits = _canonical_logits(model, t["prompt_ids"], t["output_ids"])
        positions = torch.arange(len(t["prompt_ids"]), len(t["prompt_ids"]) + NEW_TOKENS)
        expected = token_scores_reference(
            logits, t["output_ids"], temperature=t["temperature"], seed=t["seed"], positions=positions,
            top_k=top_k, min_p=min_p,
        )  # fmt: skip
        assert {k: r[k] for k in expected} == expected
    verdicts = [r["verdict"] for r in report["transcripts"]]
    assert verdicts[:3] == ["fail"] * 3  # another seed: other noise, other tokens
    assert "fail" in verdicts[3:]  # another temperature: the same noise, scaled differently


def _token_difr_common():
    """``token_difr.common`` without its package ``__init__`` (which imports the API clients)."""
    spec = importlib.util.find_spec("token_difr")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("token-difr is not installed (pip install --no-deps token-difr)")
    path = Path(next(iter(spec.submodule_search_locations))) / "common.py"
    module_spec = importlib.util.spec_from_file_location("token_difr_common", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["token_difr_common"] = module  # its dataclasses look their module up there
    module_spec.loader.exec_module(module)
    return module


def test_score_agrees_with_token_difr():
    common = _token_difr_common()
    g = torch.Generator().manual_seed(0)
    n, vocab = 12, 500
    logits = 3 * torch.randn(n, vocab, generator=g)
    logits[0, 7] = logits[0, 9] = logits[0].max() + 1  # a tie
    gold = torch.randint(0, vocab, (n,), generator=g)
    gold[1] = logits[1].argmax()
    no_mask = torch.zeros(n, vocab, dtype=torch.bool)
    # Greedy: both are top-1 logit minus the gold logit, exactly.
    ours = token_scores(logits, gold.tolist())["scores"]
    theirs = common._compute_margin_batch(logits, torch.ones(n, vocab), no_mask, 0.0, gold)
    assert ours == theirs.tolist()
    # Sampled: the same Gumbel noise, handed to token-difr as the exponentials it turns into Gumbels.
    temperature, seed = 0.7, 42
    positions = torch.arange(30, 30 + n)
    noise = gumbel_noise(seed, positions[:, None], torch.arange(vocab))
    ours = torch.tensor(
        token_scores(logits, gold.tolist(), temperature=temperature, seed=seed, positions=positions)["scores"]
    )
    theirs = common._compute_margin_batch(
        logits, torch.exp(-noise.double()).float(), no_mask, temperature, gold
    )
    # Evaluation order differs (T * (x/T + g) vs x + T * g, and exp/log round trip): a few fp32 ulps.
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-4 * (1 + float(logits.abs().max())))
    assert bool(((ours == 0) == (theirs == 0)).all())


def test_fingerprints_exact_for_reference_and_not_for_a_perturbed_model(model, prompts):
    transcripts = _generate(model, prompts, "always", 6)
    marked = fingerprints(model, transcripts[:2], k=8, seed=5, batch_size=1, pad_token_id=PAD)
    marked += fingerprints(
        model, transcripts[2:], k=8, seed=5, layer="model.layers.0", batch_size=4, pad_token_id=PAD
    )
    report = margingate.audit(model, marked, batch_size=5, pad_token_id=PAD)
    for r in report["transcripts"]:
        assert r["fingerprint_distances"] == [0.0] * NEW_TOKENS and r["verdict"] == "exact"
    # A provider whose weights differ slightly (one matrix scaled by 1.01) ships other fingerprints.
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(1.01)
    theirs = fingerprints(other, transcripts, k=8, seed=5, pad_token_id=PAD)
    report = margingate.audit(model, theirs, pad_token_id=PAD)
    assert all(r["fingerprint_max"] > 0 and r["verdict"] == "fail" for r in report["transcripts"])
    assert (
        margingate.audit(model, theirs, fingerprint_tolerance=1e9, threshold=1e9, pad_token_id=PAD)[
            "summary"
        ]["failed"]
        == 0
    )


def test_fingerprint_matrix_is_orthonormal_and_seeded():
    m = fingerprint_matrix(64, 8, seed=3).double()
    assert torch.allclose(m @ m.T, torch.eye(8, dtype=torch.float64), atol=1e-6)
    assert torch.equal(fingerprint_matrix(64, 8, seed=3), fingerprint_matrix(64, 8, seed=3))
    assert not torch.equal(fingerprint_matrix(64, 8, seed=3), fingerprint_matrix(64, 8, seed=4))
    with pytest.raises(ValueError, match="k must be in"):
        fingerprint_matrix(64, 65, seed=0)


def test_transcript_round_trip(tmp_path, model, prompts):
    marked = fingerprints(model, _generate(model, prompts[:2], "margin", 2), k=4, seed=1, pad_token_id=PAD)
    path = tmp_path / "t.jsonl"
    from margingate.transcripts import write_transcripts

    write_transcripts(path, marked)
    back = read_transcripts(path, VOCAB)
    assert [t.to_json() for t in back] == [t.to_json() for t in marked]
    assert margingate.audit(model, back, pad_token_id=PAD)["summary"]["exact"] == 2


# ----------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, model, prompts):
    root = tmp_path_factory.mktemp("audit")
    model.save_pretrained(root / "model")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in prompts))
    return root


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate_then_audit(tiny, capsys, tmp_path):
    out = tmp_path / "t.jsonl"
    code, _, err = _run(
        capsys, "generate", "--model", str(tiny / "model"), "--prompts", str(tiny / "prompts.jsonl"), "--quiet",
        "--max-new-tokens", "6", "--policy", "margin", "--batch-size", "4", "--fingerprint", "8", "--transcripts", str(out),
    )  # fmt: skip
    assert code == 0, err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 6 and all(
        len(d["output_ids"]) <= 6 and len(d["fingerprint"]["values"][0]) == 8 for d in lines
    )
    report = tmp_path / "r.json"
    code, text, err = _run(
        capsys,
        "audit",
        "--model",
        str(tiny / "model"),
        "--quiet",
        "--transcripts",
        str(out),
        "--json",
        str(report),
        "--batch-size",
        "5",
    )
    assert code == 0, err
    assert "6 exact, 0 passed, 0 failed" in text
    assert json.loads(report.read_text())["summary"]["exact"] == 6
    lines[1]["output_ids"][0] = (lines[1]["output_ids"][0] + 1) % VOCAB
    out.write_text("".join(json.dumps(d) + "\n" for d in lines))
    code, text, _ = _run(
        capsys, "audit", "--model", str(tiny / "model"), "--quiet", "--transcripts", str(out)
    )
    assert code == 1 and "transcript 1 token 0:" in text and "5 exact, 0 passed, 1 failed" in text


def test_cli_audit_plot(tiny, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path, png = tmp_path / "t.jsonl", tmp_path / "scores.png"
    path.write_text(json.dumps({**GOOD, "provider": "x"}) + "\n")
    code, _, err = _run(
        capsys,
        "audit",
        "--model",
        str(tiny / "model"),
        "--quiet",
        "--transcripts",
        str(path),
        "--plot",
        str(png),
    )
    assert code in (0, 1), err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


GOOD = {"prompt_ids": [5, 6, 7], "output_ids": [8, 9]}


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json\n", "not valid JSON"),
        ("", "no transcripts"),
        (json.dumps({"prompt_ids": [5]}) + "\n", "output_ids is missing"),
        (json.dumps({"output_ids": [5]}) + "\n", "exactly one of prompt"),
        (json.dumps({**GOOD, "output_ids": []}) + "\n", "non-empty list"),
        (json.dumps({**GOOD, "output_ids": [1.5]}) + "\n", "must be integers"),
        (json.dumps({**GOOD, "temperature": 0.7}) + "\n", "needs an integer seed"),
        (json.dumps({**GOOD, "temperature": 0.7, "seed": 1, "top_p": 0.9}) + "\n", "top_p cannot be audited"),
        (json.dumps({**GOOD, "temperature": -1}) + "\n", "temperature must be in"),
        (json.dumps({**GOOD, "colour": 1}) + "\n", "unknown field"),
        (
            json.dumps({**GOOD, "fingerprint": {"k": 2, "seed": 0, "values": [[1, 2]]}}) + "\n",
            "one vector per output token",
        ),
        (json.dumps(GOOD) + "\n[1, 2]\n", "line 2: expected a JSON object"),
        (json.dumps({**GOOD, "output_ids": [8, VOCAB]}) + "\n", f"outside the vocabulary [0, {VOCAB})"),
        (
            json.dumps({**GOOD, "fingerprint": {"k": 1, "seed": 0, "layer": "nope", "values": [[1], [2]]}})
            + "\n",
            "'nope' is not a module",
        ),
    ],
)
def test_cli_malformed_transcripts_exit_2_and_write_nothing(tiny, capsys, tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    report = tmp_path / "report.json"
    code, out, err = _run(
        capsys,
        "audit",
        "--model",
        str(tiny / "model"),
        "--quiet",
        "--transcripts",
        str(path),
        "--json",
        str(report),
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err and err.startswith("margingate"), err
    assert not report.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_cli_missing_or_directory_transcripts(tiny, capsys, tmp_path):
    for path, message in ((tmp_path / "none.jsonl", "no such file"), (tmp_path, "is a directory")):
        code, _, err = _run(capsys, "audit", "--model", str(tiny / "model"), "--transcripts", str(path))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_parse_errors_name_the_transcript():
    with pytest.raises(TranscriptError, match="margingate.audit: transcript 1: output_ids"):
        margingate.audit(build_model("llama"), [GOOD, {"prompt_ids": [1]}])
    with pytest.raises(ValueError, match="text prompt; pass tokenizer="):
        margingate.audit(build_model("llama"), [Transcript(output_ids=[3], prompt="hi")])


def test_sampled_generate_transcripts_audit_to_exactly_zero():
    """Sampling in ``generate`` and the audit share one convention (per-prompt seed, position = real
    tokens before the token): honest sampled transcripts of every exact policy score exactly 0."""
    from margingate.sampling import prompt_seed

    model = build_model("llama", torch.bfloat16)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    seeds = [prompt_seed(3, i) for i in range(3)]
    for policy, batch_size in (("margin", 2), ("always", 3), ("window", 1)):
        r = margingate.generate(model, prompts, policy=policy, temperature=0.8, top_k=20, seed=seeds,
                                max_new_tokens=12, batch_size=batch_size, stop_at_eos=False)
        transcripts = transcripts_from_generation(prompts, r.sequences)
        for t, seed in zip(transcripts, seeds, strict=True):
            t.temperature, t.seed, t.top_k = 0.8, seed, 20
        summary = margingate.audit(model, transcripts)["summary"]
        assert summary["exact"] == 3 and summary["max_score"] == 0.0, (policy, summary)
