"""Build the ``vit-digits`` benchmark family: a small ViT DP fine-tuned on private digits.

    python benchmarks/families/vit_digits.py            # builds benchmarks/families/vit-digits/

scikit-learn's 1,797 8×8 digit images are split (seed 0) into a public and a private half. The
public half is split again into pre-training (60 %), public validation (20 %) and public test
(20 %); a ``ViTForImageClassification`` (patch 2, hidden 64, 4 layers, ~0.2 M parameters) is
pre-trained on it without DP. The private half is split into a private training part (80 %) and
a disjoint private validation part (20 %, for the dedup engine's SVT). Every member is then DP
fine-tuned from the pre-trained model on the private training part. The embeddings (patch
projection, [CLS] token, position embeddings: raw parameters Opacus cannot compute per-sample
gradients for) are frozen; the encoder, final LayerNorm and classifier are DP-trained.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from hf_dpdedup.training import DPConfig, load_digits_halves, split_indices, train_members
from hf_dpdedup.training.data import seed_everything
from hf_dpdedup.training.tasks import classification_correct, mean_score
from minilm_sst2 import fairness_drops, write_figures  # sibling build script


HERE = Path(__file__).resolve().parent
SEED = 0
EPSILONS = [1.0, 2.0, 4.0, 6.0, 8.0]
DELTA = 1e-5
PRETRAIN_EPOCHS = 40
CONFIG = DPConfig(
    epsilon=1.0, delta=DELTA, epochs=20, batch_size=256, lr=0.02, optimizer="sgd", momentum=0.9,
    max_grad_norm=1.0, grad_sample_mode="ghost", seed=SEED,
)


def pixels(images: np.ndarray) -> torch.Tensor:
    """[N, 8, 8] in [0, 1] → normalised [N, 1, 8, 8] (what the saved image processor produces)."""
    return (torch.from_numpy(images).unsqueeze(1) - 0.5) / 0.5


def load_splits():
    (pub_x, pub_y), (priv_x, priv_y) = load_digits_halves(seed=SEED)
    rest, test = split_indices(len(pub_y), validation_fraction=0.2, seed=SEED + 1)
    pre, val = rest[: int(0.75 * len(rest))], rest[int(0.75 * len(rest)):]
    train, private_val = split_indices(len(priv_y), validation_fraction=0.2, seed=SEED + 2)
    part = lambda x, y, idx: (pixels(x[idx]), torch.from_numpy(y[idx]))  # noqa: E731
    return {
        "pretrain": part(pub_x, pub_y, pre), "public_val": part(pub_x, pub_y, val),
        "public_test": part(pub_x, pub_y, test), "private_train": part(priv_x, priv_y, train),
        "private_val": part(priv_x, priv_y, private_val),
    }


def build_model():
    from transformers import ViTConfig, ViTForImageClassification

    seed_everything(SEED)
    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=128, num_labels=10,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(config)


def processor():
    from transformers import ViTImageProcessor

    return ViTImageProcessor(do_resize=True, size={"height": 8, "width": 8}, do_rescale=True,
                             rescale_factor=1 / 16, do_normalize=True, image_mean=[0.5], image_std=[0.5])


def forward(module: nn.Module, batch):
    x, y = batch
    return module(pixel_values=x).logits, y


def pretrain(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], epochs: int = PRETRAIN_EPOCHS) -> None:
    """Non-private pre-training on the public half (Adam, batch 64)."""
    torch.manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loader = torch.utils.data.DataLoader(TensorDataset(*data), batch_size=64, shuffle=True)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            opt.zero_grad()
            logits, y = forward(model, batch)
            nn.functional.cross_entropy(logits, y).backward()
            opt.step()


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    model.eval()
    logits, y = forward(model, data)
    model.train()
    return mean_score(classification_correct(logits, y))


def freeze_embeddings(model: nn.Module) -> list[str]:
    for p in model.vit.embeddings.parameters():
        p.requires_grad_(False)
    return [n for n, p in model.named_parameters() if p.requires_grad]


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
        dataset_id="sklearn/digits#private-half(seed=0)/train(frac=0.8)", trained_names=trained,
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
