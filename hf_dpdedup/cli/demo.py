"""``hf-dpdedup demo``: the built-in, offline end-to-end demo."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the offline demo on the bundled MiniLM")
    p.add_argument("--out", default="demo_out", help="folder for the demo's family (default: demo_out)")
    p.add_argument("--block-size", type=int, default=16384)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(Path(args.out), block_size=args.block_size)
    return 0
