"""What a user or an attacker can hand margingate: model folders that ask to run their own code,
strings that try to drive the terminal, damaged files. Each case fails with one line and exit 2,
runs nothing it was not asked to, and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import margingate
from margingate import cli
from margingate.models import ModelLoadError, load_model

transformers = pytest.importorskip("transformers")

VOCAB = 96


def _subprocess_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(margingate.__file__).parent.parent), env.get("PYTHONPATH", "")])
    # transformers copies a folder's modules under HF_HOME before importing them: keep that in tmp
    env.update(OMP_NUM_THREADS="1", MARGINGATE_NO_REEXEC="1", HF_HOME=str(tmp_path / "hf"))
    return env


def _custom_code_folder(root: Path, marker: Path, model_type: str = "margingate_custom") -> Path:
    """A model folder whose config names a Python file of its own; importing it writes ``marker``."""
    folder = root / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": model_type,
                "architectures": ["CustomModel"],
                "auto_map": {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"},
            }
        )
    )
    (folder / "custom.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('the folder ran its code')\n"
        "from transformers import PretrainedConfig\n"
        "class CustomConfig(PretrainedConfig):\n"
        f"    model_type = {model_type!r}\n"
    )
    return folder


@pytest.mark.parametrize("command", ["audit", "flips"])
def test_cli_refuses_a_model_folder_that_asks_to_run_code(tmp_path, command):
    """transformers asks "run the custom code? [y/N]" on stdin unless told: with "y" waiting there,
    the folder's code ran before. Now: one line, exit 2, the code never imported, stdin unread."""
    marker = tmp_path / "ran"
    folder = _custom_code_folder(tmp_path, marker)
    transcripts = tmp_path / "t.jsonl"
    transcripts.write_text(json.dumps({"prompt_ids": [1, 2], "output_ids": [3]}) + "\n")
    extra = ["--transcripts", str(transcripts)] if command == "audit" else []
    proc = subprocess.run(
        [sys.executable, "-m", "margingate", command, "--model", str(folder), "--quiet", *extra],
        input="y\ny\n", capture_output=True, text=True, env=_subprocess_env(tmp_path), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused to run the Python code" in lines[0] and "--trust-remote-code" in lines[0]
    assert "custom.CustomModel" in lines[0]
    assert "[y/N]" not in proc.stdout + proc.stderr
    assert not marker.exists()


def test_load_model_refuses_custom_code_unless_trusted(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    folder = _custom_code_folder(tmp_path, marker)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("sys.stdin", None)  # anything that tried to ask would fail loudly
    with pytest.raises(ModelLoadError, match="refused to run the Python code"):
        load_model(folder, progress=False)
    assert not marker.exists()
    with pytest.raises(TypeError, match="trust_remote_code must be True or False"):
        load_model(folder, progress=False, trust_remote_code="yes")
    # The control: asked explicitly, transformers imports the folder's module (which then lacks a
    # model class, so loading fails, but only after the code ran).
    with pytest.raises(ModelLoadError):
        load_model(folder, progress=False, trust_remote_code=True)
    assert marker.exists()


def test_a_known_model_type_with_auto_map_loads_without_running_the_code(tmp_path, monkeypatch):
    """Many checkpoints name custom code for a model type transformers knows: transformers' own class
    loads them and the folder's file is never imported."""
    marker = tmp_path / "ran"
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16,
    )  # fmt: skip
    folder = tmp_path / "llama"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    data = json.loads((folder / "config.json").read_text())
    data["auto_map"] = {"AutoModelForCausalLM": "custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(data))
    (folder / "custom.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    model, _ = load_model(folder, torch.float32, progress=False)
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()


HOSTILE = "evil\x1b[2J\x1b]0;pwned\x07\nfake   row  exact\u2028\u202e"


def test_printable_escapes_what_drives_a_terminal():
    shown = cli.printable(HOSTILE)
    assert shown.isprintable() and "\x1b" not in shown and "\n" not in shown
    assert shown == "evil\\x1b[2J\\x1b]0;pwned\\x07\\x0afake   row  exact\\u2028\\u202e"
    assert cli.printable("plain é 名前") == "plain é 名前"


def test_cli_audit_prints_transcript_strings_escaped(tmp_path, capsys):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    path = tmp_path / "t.jsonl"
    # output token 0 is almost surely not the reference's: a mismatch line names the id too
    path.write_text(json.dumps({"id": HOSTILE, "provider": HOSTILE, "prompt_ids": [5, 6], "output_ids": [0, 1]}) + "\n")
    code = cli.main(["audit", "--model", str(tmp_path / "m"), "--quiet", "--transcripts", str(path)])
    out, err = capsys.readouterr()
    assert code in (0, 1), err
    assert "\x1b" not in out and "\u2028" not in out and "\u202e" not in out
    assert not any(line.startswith("fake") for line in out.splitlines())
    assert "evil\\x1b[2J" in out


# ----------------------------------------------------------------------------- every file reader total
def _tiny_llama_folder(root: Path) -> Path:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = root / "model"
    if not folder.exists():
        transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


DEEP = "[" * 100_000 + "]" * 100_000
HOSTILE_FILES = {
    "a 5000-digit integer": ('{"prompt_ids": [' + "7" * 5000 + '], "output_ids": [1]}', "unreadable JSON value"),
    "a 100000-deep nested array": ('{"prompt_ids": ' + DEEP + ', "output_ids": [1]}', "nested too deeply"),
    "not UTF-8": (b"\xff\xfe{}".decode("latin-1"), "not UTF-8"),
}


@pytest.mark.parametrize("case", list(HOSTILE_FILES))
@pytest.mark.parametrize("reader", ["transcripts", "prompts", "threshold"])
def test_cli_readers_are_total(tmp_path, capsys, case, reader):
    """Every file the CLI reads gives one line and exit 2, before the model loads (the model path
    here does not exist: reaching the loader would report that instead)."""
    content, message = HOSTILE_FILES[case]
    path = tmp_path / ("f.json" if reader == "threshold" else "f.jsonl")
    if case == "not UTF-8":
        path.write_bytes(b"\xff\xfe{}\n")
    elif reader == "prompts":
        path.write_text(content.replace('"prompt_ids"', '"input_ids"').replace(', "output_ids": [1]', "") + "\n")
    elif reader == "threshold":
        path.write_text(content.replace('"prompt_ids"', '"threshold"'))
    else:
        path.write_text(content + "\n")
    missing = str(tmp_path / "no-model")
    argv = {
        "transcripts": ["audit", "--transcripts", str(path)],
        "prompts": ["flips", "--prompts", str(path)],
        "threshold": ["check", "--threshold-file", str(path)],
    }[reader]
    code = cli.main([*argv, "--model", missing, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(path) in lines[0], err
    assert "no-model" not in lines[0]


def test_a_raw_line_separator_inside_a_json_string_is_one_line(tmp_path):
    """U+2028 is allowed raw inside a JSON string; str.splitlines cut the line there."""
    from margingate.prompt_sets import load_prompts_file
    from margingate.transcripts import read_transcripts

    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"id": "a\u2028b", "prompt_ids": [1], "output_ids": [2]}, ensure_ascii=False) + "\r\n")
    assert "\u2028" in path.read_text()
    [t] = read_transcripts(path)
    assert t.id == "a\u2028b" and t.source == f"{path} line 1"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "x\u2028y\u2029z\x0c"}, ensure_ascii=False) + "\n")
    assert load_prompts_file(prompts) == ["x\u2028y\u2029z\x0c"]


def test_out_of_vocabulary_ids_name_the_line(tmp_path, capsys):
    folder = _tiny_llama_folder(tmp_path)
    capsys.readouterr()  # save_pretrained's progress bar
    path = tmp_path / "t.jsonl"
    path.write_text(
        json.dumps({"prompt_ids": [1], "output_ids": [2]}) + "\n\n"
        + json.dumps({"prompt_ids": [1], "output_ids": [VOCAB + 5]}) + "\n"
    )  # fmt: skip
    code = cli.main(["audit", "--model", str(folder), "--quiet", "--transcripts", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and f"{path} line 3: output_ids holds token id {VOCAB + 5}" in err, err
    assert f"[0, {VOCAB})" in err and len(err.strip().splitlines()) == 1
    path.write_text(json.dumps({"prompt_ids": [1], "output_ids": [-4]}) + "\n")
    code = cli.main(["audit", "--model", str(folder), "--quiet", "--transcripts", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "token id -4; token ids are >= 0" in err and "None" not in err, err


# ----------------------------------------------------------------------------- arguments that failed late
@pytest.mark.parametrize("temperature", [1e39, 1e-46])
def test_a_temperature_outside_float32_is_refused_up_front(tmp_path, capsys, temperature):
    folder = _tiny_llama_folder(tmp_path)
    model, _ = load_model(folder, progress=False)
    with pytest.raises(ValueError, match="outside float32's range"):
        margingate.generate(model, [[3, 4, 5]], temperature=temperature, seed=1, max_new_tokens=2, progress=False)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"input_ids": [3, 4, 5]}\n')
    code = cli.main(
        ["generate", "--model", str(tmp_path / "no-model"), "--prompts", str(prompts), "--temperature",
         repr(temperature), "--transcripts", str(tmp_path / "t.jsonl"), "--quiet"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "float32" in err and "no-model" not in err, err


def test_pad_token_outside_the_vocabulary_and_a_smaller_drafter_are_refused(tmp_path):
    folder = _tiny_llama_folder(tmp_path)
    model, _ = load_model(folder, progress=False)
    with pytest.raises(ValueError, match=f"pad_token_id {VOCAB} is outside the model's vocabulary"):
        margingate.generate(model, [[3, 4, 5], [6]], pad_token_id=VOCAB, max_new_tokens=2, progress=False)
    small = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(
            vocab_size=VOCAB // 2, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8,
        )  # fmt: skip
    ).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"drafter's vocabulary \(48\) is smaller than the model's \(96\)"):
        margingate.generate(
            model, [[3, 70, 90]], policy="always", speculative=2, drafter=small, max_new_tokens=4, progress=False
        )


def test_sample_margin_refuses_a_meta_argument_next_to_cpu_logits():
    logits = torch.randn(2, 10)
    meta = torch.zeros(2, dtype=torch.int64, device="meta")
    with pytest.raises(RuntimeError, match="seed is on meta but logits is on cpu"):
        margingate.sample_margin(logits, meta, 0, 0.7)
    with pytest.raises(RuntimeError, match="temperature is on meta"):
        margingate.sample_margin(logits, 1, 0, torch.full((2,), 0.7, device="meta"))
    assert margingate.sample_margin(logits.to("meta"), 1, 0, 0.7)[0].device.type == "meta"


# ----------------------------------------------------------------------------- progress
@pytest.mark.parametrize("policy,extra", [("off", {}), ("margin", {}), ("window", {"window": 3}),
                                          ("always", {"speculative": 2})])  # fmt: skip
def test_the_progress_bar_ends_exactly_at_its_total(tmp_path, monkeypatch, policy, extra):
    """The window bar overshot its total (it counted every row's tokens against a per-step total)."""
    import tqdm.auto

    bars = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": False, "file": open(os.devnull, "w")})  # noqa: SIM115
            self.updates = []
            bars.append(self)

        def update(self, n=1):
            self.updates.append(n)
            return super().update(n)

    model, _ = load_model(_tiny_llama_folder(tmp_path), progress=False)
    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12], [13, 14]]
    margingate.generate(model, prompts, policy=policy, max_new_tokens=7, batch_size=3, eos_token_id=5,
                        progress=True, **extra)  # fmt: skip
    [bar] = [b for b in bars if str(b.desc).startswith("generate")]
    assert bar.total == len(prompts) * 7 and all(n >= 0 for n in bar.updates)
    assert sum(bar.updates) == bar.total, (policy, bar.updates)
