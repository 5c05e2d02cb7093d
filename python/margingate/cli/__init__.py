"""The ``margingate`` command line: ``check`` (the main job), ``flips``, ``calibrate``,
``generate``, ``audit`` and ``bench``.

``margingate check`` is what a user runs first: it decodes a built-in prompt set with the default
model (Gemma 3 270M, converted once from the PyPI package into a local cache) alone and in
batches under the policies ``off``, ``margin`` and ``always`` (``--policies all`` adds ``window``
and ``invariant``), and prints whether each policy's sequences stay identical across the batch
configurations, with its flip rate, trigger rate, repairs, throughput, latency increment over
``off`` and the fastest deterministic policy among those it timed.

Exit codes: 0 ok; 1 a determinism failure: an exact policy (``always``, ``invariant``,
``window``) that is not deterministic (always a bug), ``margin`` too with ``check --strict``, a
failing transcript in ``audit``, or a failed benchmark in ``bench``; 2 a usage error (bad option,
missing file, unusable model), reported in one line.

A thin layer: every measurement is a library function (``margingate.measure``,
``margingate.audit``; the tests and benchmarks call the same ones). The package:

- ``options``: the defaults, option groups and one parser per command; light, so a usage error
  is reported before the model stack is imported;
- ``common``: the model, prompts, threshold, progress bars and machine facts the commands share;
- ``report``: tables, the JSON report, the one histogram writer behind ``--plot``;
- one module per command: ``check``, ``flips``, ``calibrate``, ``generate``, ``audit``, ``bench``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

from .options import COMMAND_NAMES, UsageError, build_parser
from .report import printable

__all__ = ["COMMANDS", "EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "UsageError", "main", "printable"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# command -> the module whose ``run(args)`` carries it out (imported only when chosen)
COMMANDS = {name: f"{__name__}.{name}" for name in COMMAND_NAMES}
# The commands that decode: they restart once with a passive OpenMP wait policy (see below).
_DECODING = ("check", "flips", "calibrate", "generate", "audit")


def _reexec_with_passive_openmp(argv: Sequence[str]) -> None:
    """Restarts this process once with ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy.

    Why: torch's OpenMP threads spin-wait between parallel regions. On a machine with more busy
    threads than cores (a shared 2-core box) the spinning thread eats the time slice of the thread
    it waits for, and every small bf16 matmul of a decode step costs ~20 ms instead of ~0.1 ms
    (measured with torch 2.13: the default model's decode step 2.3 s vs 0.1 s); `flips` on the
    default prompts took 19 min instead of 3. libgomp reads the variable only when torch loads it,
    so it cannot be set from here without a restart. Results are unchanged (same kernels, same
    partitioning); only the idle threads sleep instead of spinning. Called after the arguments
    parsed, so a usage error never pays for a restart."""
    if "OMP_WAIT_POLICY" in os.environ or os.environ.get("MARGINGATE_NO_REEXEC"):
        return
    if not argv or argv[0] not in _DECODING:
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", MARGINGATE_NO_REEXEC="1")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, "-m", "margingate", *argv], env)
    except OSError:
        return  # cannot restart: run as we are


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code (the console script exits with it).

    Called without ``argv`` (the console script, ``python -m margingate``) it may restart itself
    once with a passive OpenMP wait policy (see ``_reexec_with_passive_openmp``)."""
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
        if args.command is None:
            raise UsageError(f"margingate: error: a command is required: {', '.join(COMMAND_NAMES)} (see --help)")
        if argv is None:
            _reexec_with_passive_openmp(sys.argv[1:])
        command = importlib.import_module(COMMANDS[args.command])
        _quiet_libraries()
        return command.run(args)
    except UsageError as err:
        message = str(err)
        if not message.startswith("margingate"):
            message = f"margingate: error: {message}"
        print(message.splitlines()[0] if message else "margingate: error", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exit_:  # --help / --version
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else EXIT_USAGE
    except KeyboardInterrupt:
        print("margingate: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass
