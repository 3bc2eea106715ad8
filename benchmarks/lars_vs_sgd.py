"""LARS vs. SGD for DP-SGD at one large batch size and equal ε (minilm-sst2's trained top).

    python benchmarks/lars_vs_sgd.py     # needs the minilm-sst2 activation cache (built on first use)

Same data, model, clipping norm, seed and ε for every run; the logical batch is 4,096 (≈6.4 % of
the 63,982 private training sentences), so DP noise per step is small but steps are few. Each
optimizer gets a small learning-rate sweep; the table reports public test accuracy.
Writes ``benchmarks/results/lars_vs_sgd.json`` (flat name → number).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "families"))

import minilm_sst2  # noqa: E402

from hf_dpdedup.training.data import tokenize  # noqa: E402
from hf_dpdedup.training.heads import BertTopClsHead, freeze_all_but_top  # noqa: E402
from hf_dpdedup.training.opacus_train import train_dp  # noqa: E402
from hf_dpdedup.training.text import accuracy, cached_inputs, forward_head, load_base  # noqa: E402

EPSILON, BATCH, EPOCHS = 4.0, 4096, 3
GRID = {"sgd": [2.0, 8.0], "lars": [2.0, 4.0, 8.0, 32.0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lars_vs_sgd.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=sorted(GRID), help="run one optimizer and merge into --out")
    parser.add_argument("--lrs", type=float, nargs="+", help="learning rates for --only")
    args = parser.parse_args(argv)
    grid = {args.only: args.lrs or GRID[args.only]} if args.only else GRID
    torch.set_num_threads(args.threads)
    train, _, dev, test = minilm_sst2.load_splits()
    tokenizer, model = load_base(minilm_sst2.base_path(), 2, seed=minilm_sst2.SEED)
    freeze_all_but_top(model)
    encoded = {n: tokenize(tokenizer, d.texts, max_length=32) for n, d in (("train", train), ("val", dev), ("test", test))}
    inputs = cached_inputs(model, encoded, minilm_sst2.HERE / "minilm-sst2" / "_cache", None)
    labels = {n: torch.tensor(d.labels) for n, d in (("train", train), ("val", dev), ("test", test))}
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    head = BertTopClsHead(model)
    figures: dict[str, float] = json.loads(args.out.read_text()) if args.only and args.out.exists() else {}
    figures.update({"epsilon": EPSILON, "logical_batch": BATCH, "epochs": EPOCHS})
    for optimizer, lrs in grid.items():
        for lr in lrs:
            model.load_state_dict(initial)
            config = replace(minilm_sst2.CONFIG, epsilon=EPSILON, batch_size=BATCH, epochs=EPOCHS,
                             optimizer=optimizer, lr=lr)
            result = train_dp(head, TensorDataset(*inputs["train"], labels["train"]), forward=forward_head,
                              criterion=nn.CrossEntropyLoss(), config=config, dataset_ids=("sst2",))
            key = f"{optimizer}_lr{lr:g}"
            figures[f"{key}_val_acc"] = accuracy(head, forward_head, inputs["val"], labels["val"])
            figures[f"{key}_test_acc"] = accuracy(head, forward_head, inputs["test"], labels["test"])
            figures[f"{key}_seconds"] = round(result.seconds, 1)
            figures["steps"], figures["noise_multiplier"] = result.steps, result.noise_multiplier
            print(key, {k: v for k, v in figures.items() if k.startswith(key)}, flush=True)
    for optimizer in GRID:
        # Pick the learning rate on public validation, report its public test accuracy.
        lrs = [float(k[len(optimizer) + 3 : -8]) for k in figures if k.startswith(f"{optimizer}_lr") and k.endswith("_val_acc")]
        best = max(lrs, key=lambda lr: figures[f"{optimizer}_lr{lr:g}_val_acc"])
        figures[f"{optimizer}_best_lr"] = best
        figures[f"{optimizer}_best_test_acc"] = figures[f"{optimizer}_lr{best:g}_test_acc"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
