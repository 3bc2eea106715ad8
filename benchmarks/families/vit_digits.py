"""Build the ``vit-digits`` benchmark family: a small ViT DP fine-tuned on private digits.

    python benchmarks/families/vit_digits.py            # builds benchmarks/families/vit-digits/

The recipe (splits, model, pre-training, DP configuration) is ``hf_dpdedup.training.digits``:
a small ViT pre-trained on the public half of scikit-learn's digits, then DP fine-tuned with
Opacus on the private half (encoder, final LayerNorm and classifier; embeddings frozen).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from hf_dpdedup.training import train_members
from hf_dpdedup.training.digits import (  # the recipe lives in the package (the demo uses it too)
    DATASET_ID,
    DP_CONFIG,
    accuracy,
    build_model,
    forward,
    freeze_embeddings,
    load_splits,
    pretrain,
    processor,
)
from minilm_sst2 import fairness_drops, write_figures  # sibling build script

HERE = Path(__file__).resolve().parent
EPSILONS = [1.0, 2.0, 4.0, 6.0, 8.0]
CONFIG = DP_CONFIG


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "vit-digits")
    parser.add_argument("--epsilons", type=float, nargs="+", default=EPSILONS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = load_splits()
    model = build_model()
    pretrain(model, data["pretrain"])
    pre_acc = accuracy(model, data["public_test"])
    print(f"pre-trained: public test accuracy {pre_acc:.4f} ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
    trained = freeze_embeddings(model)
    model.save_pretrained(args.out / "base")  # the public starting point every member shares
    rows = train_members(
        model=model, module=model, train_set=TensorDataset(*data["private_train"]), forward=forward,
        criterion=nn.CrossEntropyLoss(),
        evaluate=lambda m: (accuracy(m, data["public_val"]), accuracy(m, data["public_test"])),
        epsilons=args.epsilons, config=CONFIG, out=args.out,
        dataset_id=DATASET_ID, trained_names=trained,
        processor=processor(),
        extra_args={"base": "ViT pre-trained on the public half of sklearn digits (no DP)",
                    "pretrain_public_test_accuracy": pre_acc,
                    "splits": {k: len(v[1]) for k, v in data.items()}},
    )
    total = time.perf_counter() - started
    write_figures("vit_digits_family", rows, total)
    print(json.dumps({"wall_seconds": round(total, 1), "pretrain_public_test": pre_acc,
                      "members": [r.__dict__ for r in rows], "fairness_prefilter_drops": fairness_drops(rows)},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
