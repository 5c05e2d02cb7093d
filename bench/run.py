"""Runs margingate's benchmarks and prints one summary table: every ``bench/python/bench_*.py``
(each prints its own ratio table vs torch, timed interleaved in one run) and the C++
``margingate_bench`` binary if it was built.

    python bench/run.py [--only margin,linear,cpp] [--quick] [--list] [--timeout S] [--json PATH] [--quiet]

``margingate bench`` (the installed command) finds this file in the source checkout it was
installed from and runs it with the same options. Exit code 1 when a benchmark fails.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def _takes_quick(script: Path) -> bool:
    """Whether a benchmark declares ``--quick`` (an ``add_argument("--quick", ...)`` call)."""
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "add_argument"
            and any(isinstance(a, ast.Constant) and a.value == "--quick" for a in node.args)
        ):
            return True
    return False


def _cpp_binary() -> Path | None:
    found = shutil.which("margingate_bench")
    if found:
        return Path(found)
    built = sorted(ROOT.glob("build/*/margingate_bench"), key=lambda p: p.stat().st_mtime, reverse=True)
    return built[0] if built else None


def benchmarks(quick: bool) -> list[tuple[str, list[str]]]:
    """``(name, command)`` of every benchmark found, the C++ binary (``cpp``) last."""
    entries = []
    for script in sorted((BENCH / "python").glob("bench_*.py")):
        cmd = [sys.executable, "-m", f"bench.python.{script.stem}"]
        if quick and _takes_quick(script):
            cmd.append("--quick")
        entries.append((script.stem.removeprefix("bench_"), cmd))
    cpp = _cpp_binary()
    if cpp is not None:
        entries.append(("cpp", [str(cpp)]))
    return entries


def _run_one(cmd: list[str], env: dict[str, str], timeout: int) -> tuple[int, str]:
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        out = err.stdout if isinstance(err.stdout, str) else ""
        return 124, out + f"\n(timed out after {timeout} s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", metavar="NAMES", help="comma-separated benchmark names (margin, linear, ..., cpp)")
    parser.add_argument("--quick", action="store_true", help="pass --quick to the benchmarks that declare it")
    parser.add_argument("--list", action="store_true", help="list the benchmarks found and exit")
    parser.add_argument("--timeout", type=int, default=900, metavar="S", help="seconds allowed per benchmark")
    parser.add_argument("--json", metavar="PATH", help="write the outputs and timings as JSON")
    parser.add_argument("--quiet", action="store_true", help="print only the summary table")
    args = parser.parse_args(argv)

    from margingate.cli.report import print_table, write_json

    entries = benchmarks(args.quick)
    if args.only:
        wanted = {w.strip() for w in args.only.split(",") if w.strip()}
        unknown = wanted - {name for name, _ in entries}
        if unknown:
            print(
                f"margingate bench: --only: no benchmark named {', '.join(sorted(unknown))}; found "
                f"{', '.join(name for name, _ in entries) or 'none'}",
                file=sys.stderr,
            )
            return 2
        entries = [e for e in entries if e[0] in wanted]
    if args.list:
        for name, cmd in entries:
            print(f"{name}: {' '.join(cmd)}")
        return 0
    import margingate

    # The subprocesses must import the same margingate as this process, and the bench package.
    package_parent = str(Path(margingate.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), package_parent, *filter(None, [env.get("PYTHONPATH")])])
    summary, outputs = [], []
    for name, cmd in entries:
        if not args.quiet:
            print(f"\n== {name}: {' '.join(cmd)}", flush=True)
        started = time.perf_counter()
        rc, out = _run_one(cmd, env, args.timeout)
        seconds = time.perf_counter() - started
        if not args.quiet:
            print(out.rstrip(), flush=True)
        geomean = next((line.strip() for line in out.splitlines() if re.search(r"geomean", line, re.I)), "")
        status = "ok" if rc == 0 else f"FAILED ({rc})"
        summary.append({"benchmark": name, "status": status, "seconds": round(seconds, 1), "summary": geomean[:90]})
        outputs.append({"name": name, "command": cmd, "returncode": rc, "seconds": seconds, "output": out})
    print("\nbenchmarks:")
    print_table(summary)
    write_json(args.json, {"command": "bench", "bench_dir": str(BENCH), "benchmarks": outputs})
    return 0 if all(o["returncode"] == 0 for o in outputs) else 1


if __name__ == "__main__":
    sys.exit(main())
