"""The ``hf-dpdedup`` command line.

Each sub-command lives in its own module of this package and exposes ``register(subparsers)``,
which adds its parser (with ``help=COMMANDS[name][1]``) and sets ``func`` to the function that runs
it. Add a command by adding a module and naming it in :data:`COMMANDS`. Only the command being run
is imported (the engine, transformers and opacus take seconds to import): ``hf-dpdedup --help``
lists the commands from the table alone.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import sys

from .. import __version__
from ..errors import HfDpDedupError

# command -> (its module inside hf_dpdedup.cli, its one-line help), in the order `--help` lists them
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("inspect", "summarize a family folder, block store or member folder"),
    "demo": ("demo", "DP-train a ViT family on built-in digits, deduplicate, push, load, run a pipeline "
                     "(offline by default, ~3 minutes on 2 cores)"),
    "train-family": ("train_family", "DP fine-tune a base model on private data at several ε (Opacus)"),
    "dedup": ("dedup", "deduplicate a family of DP fine-tuned models into a store"),
    "push": ("push", "push a family to the Hugging Face Hub"),
    "serve-bench": ("serve_bench", "time the serving pool against loading full models (LRU)"),
}


def _command(argv: list[str]) -> str | None:
    """The sub-command named in ``argv`` (the first word that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv``, only the command it names is imported (``None``: every command)."""
    parser = argparse.ArgumentParser(
        prog="hf-dpdedup",
        description="Deduplicate families of differentially private fine-tuned models.",
    )
    parser.add_argument("--version", action="version", version=version_string())
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log what happens (-v: info, -vv: debug); progress bars honour "
                        "HF_HUB_DISABLE_PROGRESS_BARS=1")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = _command(argv) if argv is not None else None
    for name, (module, help_text) in COMMANDS.items():
        if argv is None or name == wanted:
            importlib.import_module(f"{__name__}.{module}").register(sub)
        else:
            sub.add_parser(name, help=help_text)  # listed; its options load when it is the one run
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
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
