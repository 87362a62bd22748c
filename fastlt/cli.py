"""The ``fastlt`` command: ``fastlt demo [options]``, ``fastlt bench [args...]``, ``fastlt --version``."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    from . import __version__, demo

    parser = argparse.ArgumentParser(
        prog="fastlt", description="Fused GPU losses for long-tailed classification."
    )
    parser.add_argument("--version", action="version", version=f"fastlt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_demo = sub.add_parser(
        "demo",
        help="train every method on a long-tailed split of scikit-learn's digits (CPU, ~10 s)",
        description=demo.DESCRIPTION,
    )
    demo.add_arguments(p_demo)
    sub.add_parser(
        "bench", add_help=False, help="benchmarks (arguments are passed on to fastlt.bench; see 'fastlt bench -h')"
    )
    return parser


def _bench(argv: list[str]) -> int:
    try:
        from . import bench
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.bench":
            raise  # fastlt.bench exists but one of its own imports is missing: show that error
        print("fastlt bench: error: the benchmark module fastlt.bench is not available in this installation",
              file=sys.stderr)
        raise SystemExit(2) from None
    result = bench.main(argv)
    return int(result) if isinstance(result, int) and not isinstance(result, bool) else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastlt`` console script and of ``python -m fastlt``; returns the exit status. Ctrl-C
    exits 130 and a closed pipe (``fastlt demo | head -1``) quietly, without a traceback."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away: stop writing, and let the interpreter's final flush write nowhere
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # 'bench' hands every later argument (options included) to fastlt.bench untouched.
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import MissingDependency, run_from_args

        try:
            return run_from_args(args)
        except MissingDependency as exc:  # one line, as a usage error (a chained traceback before)
            print(f"fastlt demo: error: {exc}", file=sys.stderr)
            return 1
    parser.print_help()
    raise SystemExit(2)
