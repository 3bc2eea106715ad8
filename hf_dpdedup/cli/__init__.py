"""The ``hf-dpdedup`` command line.

Each sub-command lives in its own module of this package and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` to the function that runs it. Add a command by adding a
module and naming it in ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import sys

from .. import __version__
from ..errors import HfDpDedupError

# module name inside hf_dpdedup.cli, in the order `--help` lists them
_COMMANDS = ("inspect", "demo", "train_family", "dedup", "push", "serve_bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-dpdedup",
        description="Deduplicate families of differentially private fine-tuned models.",
    )
    parser.add_argument("--version", action="version", version=version_string())
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log what happens (-v: info, -vv: debug); progress bars honour "
                        "HF_HUB_DISABLE_PROGRESS_BARS=1")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def version_string() -> str:
    """``hf-dpdedup X (transformers Y, huggingface_hub Z, torch W)``, without importing them."""
    deps = []
    for name in ("transformers", "huggingface_hub", "torch"):
        try:
            deps.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            deps.append(f"{name} not installed")
    return f"hf-dpdedup {__version__} ({', '.join(deps)})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("hf_dpdedup").setLevel(logging.INFO if args.verbose == 1 else logging.DEBUG)
    try:
        return int(args.func(args) or 0)
    except HfDpDedupError as exc:
        # Typed errors already say what to do: print them without a traceback.
        print(f"hf-dpdedup: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
