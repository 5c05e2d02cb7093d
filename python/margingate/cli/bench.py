"""``margingate bench``: runs ``bench/run.py`` of the margingate source checkout this package was
installed from (or of ``--bench-dir``), with the same options. The benchmarks are not part of
the wheel; a directory that merely happens to be the current one is never run."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .options import UsageError
from .report import check_writable


def find_bench_dir(explicit: str | None) -> Path:
    if explicit:
        path = Path(explicit).expanduser()
        if not (path / "run.py").is_file() or not (path / "python").is_dir():
            raise UsageError(f"--bench-dir {explicit!r} is not a margingate bench/ directory (no run.py and python/)")
        return path
    checkout = Path(__file__).resolve().parents[3] / "bench"  # python/margingate/cli/ -> the checkout
    if (checkout / "run.py").is_file() and (checkout / "python" / "harness.py").is_file():
        return checkout
    raise UsageError(
        "margingate bench needs the benchmarks of a source checkout: this margingate was installed from a wheel; "
        "pass --bench-dir CHECKOUT/bench or run `python bench/run.py` in a checkout"
    )


def run(args: argparse.Namespace) -> int:
    check_writable(args.json, "--json")
    bench_dir = find_bench_dir(args.bench_dir)
    argv = [sys.executable, str(bench_dir / "run.py"), "--timeout", str(args.timeout)]
    for flag in ("quick", "list", "quiet"):
        if getattr(args, flag):
            argv.append(f"--{flag}")
    if args.only:
        argv += ["--only", args.only]
    if args.json:
        argv += ["--json", str(Path(args.json).expanduser().resolve())]
    return subprocess.run(argv, cwd=bench_dir.parent).returncode
