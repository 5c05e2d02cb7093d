"""The one reader of the JSON and JSONL files users hand margingate (transcripts, prompt files,
threshold files): total, so any file gives either its values or one :class:`JSONFileError` line
naming the file, the line and what is wrong, never a traceback.

Why a module of its own: ``json.loads`` alone is not total. A 5,000-digit integer raises a bare
``ValueError`` (Python's integer-string limit), a 100,000-deep nested array a ``RecursionError``,
and ``str.splitlines`` cuts a valid JSONL line at a raw U+2028 inside a string (JSON allows it
there; only ``\\n`` ends a JSONL record).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["JSONFileError", "loads", "read_json", "read_jsonl", "read_text", "records"]


class JSONFileError(ValueError):
    """A JSON/JSONL file that cannot be used; the message is one line naming the file and line."""


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of ``path``, or a one-line :class:`JSONFileError` (missing, a directory,
    unreadable, not UTF-8)."""
    p = Path(path).expanduser()
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JSONFileError(f"{what} {str(path)!r}: no such file") from None
    except IsADirectoryError:
        raise JSONFileError(f"{what} {str(path)!r}: is a directory") from None
    except UnicodeDecodeError as err:
        raise JSONFileError(f"{what} {str(path)!r}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise JSONFileError(f"{what} {str(path)!r}: cannot read ({err.strerror or err})") from None


def loads(text: str, where: str) -> Any:
    """``json.loads(text)``, with every way it can fail turned into one :class:`JSONFileError`
    line starting with ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise JSONFileError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise JSONFileError(f"{where}: JSON nested too deeply") from None
    except ValueError as err:  # integers over Python's digit limit, and whatever else json refuses
        message = str(err).split(";")[0].strip() or type(err).__name__
        raise JSONFileError(f"{where}: unreadable JSON value ({message})") from None


def records(text: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of each non-blank JSONL record: lines end at ``\\n`` only (a raw
    U+2028 or form feed inside a JSON string is part of its line), a trailing ``\\r`` is dropped."""
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            yield number, line


def read_jsonl(path: str | Path, what: str = "file") -> list[tuple[int, Any]]:
    """``(line number, value)`` for every non-blank line of a JSONL file; errors name the line."""
    text = read_text(path, what)
    return [(number, loads(line, f"{path} line {number}")) for number, line in records(text)]


def read_json(path: str | Path, what: str = "file") -> Any:
    """The value of a JSON file, or one :class:`JSONFileError` line."""
    return loads(read_text(path, what), f"{what} {str(path)!r}")
