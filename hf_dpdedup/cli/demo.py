"""``hf-dpdedup demo``: the built-in end-to-end demo (offline by default)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import COMMANDS
from ..demo import run_demo


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help=COMMANDS["demo"][1])
    p.add_argument("--out", default="demo_out", help="folder for the demo's family (default: demo_out)")
    p.add_argument("--hub-endpoint", default="local",
                   help="Hub to push to and load from: 'local' (default) starts a Hub-compatible server on "
                   "127.0.0.1; a URL such as https://huggingface.co uses that Hub (needs --token, --namespace)")
    p.add_argument("--token", help="write token for --hub-endpoint (default: HF_TOKEN or the saved login)")
    p.add_argument("--namespace", default="demo", help="user or organisation to push to (default: demo)")
    p.add_argument("--no-hub", action="store_true", help="skip the push / load-from-Hub part")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # The demo's ViT is tiny: one intra-op thread beats thread hand-offs (and oversubscription
    # on a busy machine) for models this small.
    torch.set_num_threads(1)

    hub = None if args.no_hub else args.hub_endpoint
    run_demo(Path(args.out), hub=hub, token=args.token, namespace=args.namespace)
    return 0
