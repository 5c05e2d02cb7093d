"""What the commands write: tables on the terminal (every string made printable), the JSON report
(atomically), and the one histogram writer behind every ``--plot``."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .options import UsageError


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: control and format characters (escape sequences, line
    breaks, U+2028, bidi overrides) shown as Python escapes, so a string read from a file can
    neither drive the terminal nor fake a table row."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable() or ch == " ":
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return printable(str(value))


def pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def band_rows(bands: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``measure.margin_bands`` as table rows ("0 (tie)", "(0, 0.0625)", "[0.0625, 0.125)", ...;
    a band without flips shows its 95 % bound), the trailing bands without steps left out."""
    rows = []
    for band in bands:
        lo, hi = band["from"], band["below"]
        if band["flips"]:
            rate = pct(band["flip_rate"])
        else:
            rate = f"< {pct(band['upper_95'])}" if band["steps"] else "-"
        label = "0 (tie)" if hi == 0 else f"{'(' if lo == 0 else '['}{lo:g}, {hi:g})"
        rows.append({"fast margin": label, "steps": band["steps"], "flips": band["flips"], "flip rate": rate})
    while len(rows) > 1 and not rows[-1]["steps"]:
        rows.pop()
    return rows


def print_table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    if not rows:
        return
    columns = list(columns or rows[0].keys())
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def check_writable(path: str | None, what: str) -> None:
    """Fails before an expensive run, not after it, when an output cannot be written: the path
    must not be a directory and its directory must exist and take a new file."""
    if not path:
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise UsageError(f"{what} {path}: is a directory, expected a file name")
    parent = target.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"{what} {path}: directory {str(parent)!r} does not exist")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise UsageError(f"{what} {path}: cannot write in {str(parent)!r} ({err.strerror or err})") from None


def write_json(path: str | None, report: dict[str, Any]) -> None:
    """Writes atomically: a temporary file beside the target, renamed over it; removed on failure."""
    if not path:
        return
    target = Path(path).expanduser()
    text = json.dumps(jsonable(report), indent=1, allow_nan=False) + "\n"
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.resolve().parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, target)
        tmp = None
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def jsonable(value: Any) -> Any:
    """NaN/inf (not JSON) become null; tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError('--plot needs matplotlib: pip install "margingate[plot]"') from None


def write_histogram(
    path: str,
    series: Sequence[tuple[str, Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    floor: float = 1e-3,
    bins: int = 60,
    filled: bool = True,
    marker: tuple[str, float] | None = None,
) -> None:
    """One PNG: a log-log histogram of each series (margins, scores: they span ~1e-3 near-ties to
    ~30, so log-spaced bins show both ends; values below ``floor``, exact zeros included, are drawn
    in the first bin; NaN and inf are left out), and a dashed vertical ``marker`` (label, x)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arrays = [
        (label, np.clip(np.array([v for v in values if math.isfinite(v)], dtype=np.float64), floor, None))
        for label, values in series
    ]
    top = max([1.0, *(float(a.max()) for _, a in arrays if a.size)])
    edges = np.logspace(math.log10(floor), math.log10(top * 1.05), bins)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for label, values in arrays:
        if values.size or filled:
            ax.hist(values, bins=edges, histtype="bar" if filled else "step", linewidth=1.5, label=label)
    if marker is not None and math.isfinite(marker[1]) and marker[1] > 0:
        ax.axvline(marker[1], color="black", linestyle="--", label=marker[0])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        plt.close(fig)


def write_margin_plot(
    path: str, step_margins: Sequence[float], flip_margins: Sequence[float], threshold: float | None, title: str
) -> None:
    """``--plot`` of check, flips and calibrate: the fast-path margins of all steps vs. the flip steps."""
    steps = [m for m in step_margins if not math.isnan(m)]
    flips = [m for m in flip_margins if not math.isnan(m)]
    series = [(f"all steps ({len(steps)})", steps)] + ([(f"flip steps ({len(flips)})", flips)] if flips else [])
    write_histogram(
        path, series, xlabel="fast-path top-1/top-2 logit margin (exact ties plotted at 0.001)", ylabel="decode steps",
        title=title, marker=None if threshold is None else (f"threshold {threshold:.3g}", threshold),
    )  # fmt: skip
