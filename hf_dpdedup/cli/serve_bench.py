"""``hf-dpdedup serve-bench STORE``: the serving pool against loading full models, one query stream.

Example::

    hf-dpdedup serve-bench family/ --queries 100 --pattern round-robin --budget-models 2 \\
        --sentences hf_dpdedup/data/sst2/dev.tsv

Both servers get the same memory budget: the pool counts its unique bytes (the family's blocks,
loaded once, plus materialized tensors); the baseline holds ``budget-models`` full transformers
models and loads a model's ``save_pretrained`` folder when it is not resident (the folders are
written first, untimed, under ``--plain-dir`` or a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

from transformers.utils.logging import disable_progress_bar

from . import COMMANDS
from ..serving import ServingPool
from ..serving.bench import TransformersLRU, compare, query_inputs, query_order, read_sentences, save_plain_folders


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve-bench", help=COMMANDS["serve-bench"][1])
    p.add_argument("store", type=Path, help="family folder (block_store/ + members/)")
    p.add_argument("--queries", type=int, default=100, help="queries in the stream (default 100)")
    p.add_argument("--pattern", choices=("round-robin", "random"), default="round-robin")
    p.add_argument("--budget-models", type=float, default=2.0, help="memory budget in full models (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seeds the random pattern")
    p.add_argument("--sentences", type=Path, help="TSV with a 'sentence' column, or one sentence per line")
    p.add_argument("--plain-dir", type=Path, help="where the baseline's plain model folders are kept")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    disable_progress_bar()  # as a server would: no progress bar per load
    pool = ServingPool(args.store, budget_models=args.budget_models)
    members = pool.members
    first = pool.plan(members[0])
    sentences = read_sentences(args.sentences, args.queries) if args.sentences else None
    inputs = query_inputs(first.path, sentences, args.queries, seed=args.seed)
    order = query_order(members, args.queries, args.pattern, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        plain_dir = args.plain_dir or Path(tmp)
        folders = save_plain_folders(pool.family, plain_dir, members)
        capacity = max(1, math.floor(pool.budget_bytes / pool.full_model_bytes))
        baseline = TransformersLRU(folders, first.klass, capacity)
        figures = compare(pool, baseline, order, inputs)
    figures.update({f"pool_{k}": v for k, v in pool.memory().items() if k != "resident"})
    print(f"{len(members)} members, {args.queries} queries, {args.pattern}, budget {args.budget_models:g} models "
          f"({pool.budget_bytes / 2**20:.1f} MiB; baseline holds {capacity})")
    for key, value in figures.items():
        print(f"  {key:<28} {value:.4g}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0
