"""The ``e3pose`` command line.

Each sub-command lives in its own module of this package with two functions: ``register(subparsers)`` adds its
parser (and sets ``func``), ``run(args) -> int`` does the work. Modules must stay light at import time (no torch at
module top): the parser is built by importing all of them.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (command module, in the order shown by --help)
COMMANDS = (
    "infer",
    "demo",
    "benchmark",
    "synth",
    "evaluate",
    "compare",
    "train",
    "train_refiner",
    "train_residual",
    "qc",
    "convert",
)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="e3pose",
        description="Fetal head 6-DoF pose from 3D MRI volumes with E(3)-Pose.",
    )
    parser.add_argument("--version", action="version", version=f"e3pose {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if importlib.util.find_spec(f"{__name__}.{name}") is None:
            continue  # command not built yet
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from ..atomic import interrupt_handlers

    try:
        with interrupt_handlers():  # SIGTERM too raises, so temporaries are removed and earlier outputs kept
            return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", 2)
        print("interrupted" + (f" ({exc})" if signum != 2 else ""), file=sys.stderr)
        return getattr(exc, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
