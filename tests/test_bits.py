"""The canonical bit contract across CPUs: the canonical forward gives the same bits at every SIMD
level of one bit class (scalar, avx2, neon: ``build_info()['canonical_bits'] == '1/cpu-fma8'``)
and whatever ATen's own CPU capability is, so a transcript made on one CPU audits to exactly 0 on
another. Each configuration runs in its own process (a process fixes its level on first use).

Before the scalar linear fused its multiply-adds, fp32 logits differed between scalar and avx2
(hashes 87ce... vs 77f8... on the tiny Llama): the fp32 cases below are the control that failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import margingate
from tests.conftest import SIMD_LEVELS, run_at_simd_level

pytest.importorskip("transformers")

FAMILIES = ("llama", "qwen2", "gemma3")
# The levels of the fma8 class this machine can run (avx512 is a class of its own).
FMA8_LEVELS = [level for level in SIMD_LEVELS if level != "avx512"]
# ATen's capability values this CPU allows (it rejects those above the CPU's).
ATEN_CAPABILITIES = ["default", "avx2"] + (["avx512"] if margingate.build_info()["simd_supported"] == "avx512" else [])

LOGITS = (
    """
import hashlib, sys
import numpy as np, torch, margingate
from tests.models import build_model
torch.set_num_threads(int(sys.argv[1]))
rng = np.random.default_rng(0)  # numpy, not torch: torch's random kernels are vectorised per CPU capability
out = {}
for family in FAMILIES:
    for dtype in ("float32", "bfloat16"):
        model = build_model(family)
        with torch.no_grad():
            for name, p in model.named_parameters():
                values = rng.normal(0.0, 0.2, size=tuple(p.shape))
                p.copy_(torch.from_numpy(values + (1.0 if "norm" in name and "gemma" not in family else 0.0)))
        model = model.to(getattr(torch, dtype))
        ids = torch.tensor(rng.integers(3, 200, size=(3, 11)))
        mask = torch.ones_like(ids)
        mask[1, :4] = 0  # left padding in one row
        with torch.no_grad():
            logits = margingate.canonical_forward(model, ids, attention_mask=mask)
        logits = (logits if torch.is_tensor(logits) else logits.logits).float()
        out[family + " " + dtype] = hashlib.sha256(logits.numpy().tobytes()).hexdigest()
print(margingate.build_info()["canonical_bits"])
for key, digest in out.items():
    print(key, digest)
""".replace("FAMILIES", repr(FAMILIES))
)


def _logit_digests(level: str, threads: int = 2, aten: str | None = None) -> tuple[str, dict[str, str]]:
    if aten is not None:
        os.environ["ATEN_CPU_CAPABILITY"] = aten
    try:
        out = run_at_simd_level(level, LOGITS, str(threads)).strip().splitlines()
    finally:
        os.environ.pop("ATEN_CPU_CAPABILITY", None)
    return out[0], dict(line.rsplit(" ", 1) for line in out[1:])


@pytest.mark.skipif(len(FMA8_LEVELS) < 2, reason="this CPU runs one level of the fma8 bit class only")
def test_canonical_logits_are_the_same_bits_at_every_level_aten_capability_and_thread_count():
    reference_class, reference = _logit_digests(FMA8_LEVELS[0])
    assert reference_class == "1/cpu-fma8" and len(reference) == 2 * len(FAMILIES)
    runs = {}
    for level in FMA8_LEVELS:
        for aten in ATEN_CAPABILITIES:
            runs[f"{level} ATEN_CPU_CAPABILITY={aten}"] = _logit_digests(level, aten=aten)
    runs[f"{FMA8_LEVELS[-1]} one thread"] = _logit_digests(FMA8_LEVELS[-1], threads=1)
    for name, (bit_class, digests) in runs.items():
        assert bit_class == reference_class, name
        differing = sorted(k for k in reference if digests[k] != reference[k])
        assert not differing, f"{name}: canonical logits differ from {FMA8_LEVELS[0]}'s for {differing}"


def _cli(level: str, *argv: str) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, MARGINGATE_SIMD=level, MARGINGATE_NO_REEXEC="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(margingate.__file__).parent.parent), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "margingate", *argv], env=env, cwd=root, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from tests.models import build_model

    root = tmp_path_factory.mktemp("bits")
    import torch

    build_model("llama").to(torch.bfloat16).save_pretrained(root / "model")
    import numpy as np

    rng = np.random.default_rng(1)
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps({"input_ids": rng.integers(3, 200, size=int(n)).tolist()}) + "\n" for n in (5, 9, 2, 14))
    )
    return root


@pytest.mark.skipif(len(FMA8_LEVELS) < 2, reason="this CPU runs one level of the fma8 bit class only")
@pytest.mark.parametrize("policy,sampling", [("margin", []), ("always", ["--temperature", "0.8", "--seed", "7", "--top-k", "20"])])
def test_a_transcript_made_at_one_level_audits_to_exactly_zero_at_another(tiny_checkpoint, tmp_path, policy, sampling):
    made, audited = FMA8_LEVELS[0], FMA8_LEVELS[-1]
    transcripts = tmp_path / "t.jsonl"
    model, prompts = str(tiny_checkpoint / "model"), str(tiny_checkpoint / "prompts.jsonl")
    proc = _cli(
        made, "generate", "--model", model, "--prompts", prompts, "--max-new-tokens", "12", "--policy", policy,
        "--batch-size", "3", "--transcripts", str(transcripts), "--quiet", *sampling,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    recorded = {json.loads(line)["canonical_bits"] for line in transcripts.read_text().splitlines()}
    assert recorded == {"1/cpu-fma8"}
    report = tmp_path / "r.json"
    proc = _cli(audited, "audit", "--model", model, "--transcripts", str(transcripts), "--json", str(report), "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(report.read_text())["summary"]
    assert summary["exact"] == 4 and summary["max_score"] == 0 and summary["canonical_bits"] == "1/cpu-fma8"
    assert "another canonical bit class" not in proc.stdout


def test_a_transcript_of_another_bit_class_is_flagged(tiny_checkpoint, tmp_path, capsys):
    from margingate import cli

    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt_ids": [5, 6], "output_ids": [7], "canonical_bits": "1/cpu-avx512"}) + "\n")
    report = tmp_path / "r.json"
    code = cli.main(["audit", "--model", str(tiny_checkpoint / "model"), "--transcripts", str(path), "--json", str(report)])
    out = capsys.readouterr().out
    assert code in (0, 1)
    [row] = json.loads(report.read_text())["transcripts"]
    assert row["other_bit_class"] is True and row["canonical_bits"] == "1/cpu-avx512"
    assert "another canonical bit class than this machine's (1/cpu-fma8)" in out
    path.write_text(json.dumps({"prompt_ids": [5, 6], "output_ids": [7], "canonical_bits": 3}) + "\n")
    assert cli.main(["audit", "--model", str(tiny_checkpoint / "model"), "--transcripts", str(path)]) == 2
    assert "canonical_bits must be a short string" in capsys.readouterr().err
