"""The ``hf-dpdedup`` command line.

Each sub-command lives in its own module of this package and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` to the function that runs it. Add a command by adding a
module and naming it in ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import HfDpDedupError

# module name inside hf_dpdedup.cli, in the order `--help` lists them
_COMMANDS = ("inspect", "demo", "train_family", "dedup", "push", "serve_bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-dpdedup",
        description="Deduplicate families of differentially private fine-tuned models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HfDpDedupError as exc:
        # Typed errors already say what to do: print them without a traceback.
        print(f"hf-dpdedup: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
