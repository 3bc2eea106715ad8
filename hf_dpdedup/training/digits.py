"""The ``vit-digits`` recipe: a small ViT pre-trained on public digits, DP fine-tuned on private ones.

scikit-learn's 1,797 8×8 digit images (they ship inside scikit-learn: nothing is downloaded) are
split (seed 0) into a public and a private half. The public half is split into pre-training
(60 %), public validation (10 %), public confirmation (10 %) and public test (20 %); a
``ViTForImageClassification`` (patch 2, hidden 64, 4 layers, 0.14 M parameters) is pre-trained on
it without DP. The private half is split into a private training part (80 %) and a disjoint
private validation part (20 %, for the dedup engine's SVT). Every member is DP fine-tuned from the
pre-trained model on the private training part with Opacus: the encoder, final LayerNorm and
classifier (99 % of the parameters) are DP-trained; the embeddings (patch projection, [CLS] token,
position embeddings: raw parameters Opacus cannot compute per-sample gradients for) stay frozen.

Used by the demo (``hf-dpdedup demo``) and the benchmark family ``benchmarks/families/vit_digits.py``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from .data import load_digits_halves, seed_everything, split_indices
from .opacus_train import DPConfig
from .tasks import classification_correct, mean_score

SEED = 0
DATASET_ID = "sklearn/digits#private-half(seed=0)/train(frac=0.8)"
PRETRAIN_EPOCHS = 40
#: DP fine-tuning of one member (ε is set per member); ~20 s on one CPU core.
DP_CONFIG = DPConfig(
    epsilon=1.0, delta=1e-5, epochs=20, batch_size=256, lr=0.02, optimizer="sgd", momentum=0.9,
    max_grad_norm=1.0, grad_sample_mode="ghost",
)

Split = tuple[torch.Tensor, torch.Tensor]  # (pixel_values [N, 1, 8, 8], labels [N])


def pixels(images: np.ndarray) -> torch.Tensor:
    """[N, 8, 8] in [0, 1] → normalised [N, 1, 8, 8] (what :func:`processor` produces)."""
    return (torch.from_numpy(images).unsqueeze(1) - 0.5) / 0.5


def load_splits(seed: int = SEED) -> dict[str, Split]:
    """``pretrain``, ``public_val``, ``public_confirm``, ``public_test`` (public half) and
    ``private_train``, ``private_val`` (private half), deterministic given ``seed``."""
    (pub_x, pub_y), (priv_x, priv_y) = load_digits_halves(seed=seed)
    rest, test = split_indices(len(pub_y), validation_fraction=0.2, seed=seed + 1)
    pre, val = rest[: int(0.75 * len(rest))], rest[int(0.75 * len(rest)):]
    search, confirm = val[: len(val) // 2], val[len(val) // 2:]
    train, private_val = split_indices(len(priv_y), validation_fraction=0.2, seed=seed + 2)

    def part(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> Split:
        return pixels(x[idx]), torch.from_numpy(y[idx])

    return {
        "pretrain": part(pub_x, pub_y, pre), "public_val": part(pub_x, pub_y, search),
        "public_confirm": part(pub_x, pub_y, confirm), "public_test": part(pub_x, pub_y, test),
        "private_train": part(priv_x, priv_y, train), "private_val": part(priv_x, priv_y, private_val),
    }


def public_test_images(seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """The public test split as raw images (8×8, pixel values 0–16, what a user would hand a
    ``pipeline`` as greyscale pictures) and their labels."""
    x, y = load_splits(seed)["public_test"]
    return np.rint((x[:, 0].numpy() * 0.5 + 0.5) * 16).astype(np.uint8), y.numpy()


def build_model(seed: int = SEED):
    """The untrained ViT, with digit names as labels (``pipeline`` shows "3", not "LABEL_3")."""
    from transformers import ViTConfig, ViTForImageClassification

    seed_everything(seed)
    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=128, num_labels=10,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       id2label={i: str(i) for i in range(10)}, label2id={str(i): i for i in range(10)})
    return ViTForImageClassification(config)


def processor():
    """The image processor members are saved with: 8×8 greyscale, pixel values 0–16 → [−1, 1]."""
    from transformers import ViTImageProcessorPil  # one channel: no RGB conversion, no torchvision needed

    return ViTImageProcessorPil(do_resize=True, size={"height": 8, "width": 8}, do_rescale=True,
                                rescale_factor=1 / 16, do_normalize=True, image_mean=[0.5], image_std=[0.5],
                                do_convert_rgb=False)


def forward(module: nn.Module, batch: Split):
    x, y = batch
    return module(pixel_values=x).logits, y


def pretrain(model: nn.Module, data: Split, *, epochs: int = PRETRAIN_EPOCHS, seed: int = SEED) -> None:
    """Non-private pre-training on the public half (Adam, batch 64)."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loader = torch.utils.data.DataLoader(TensorDataset(*data), batch_size=64, shuffle=True)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            opt.zero_grad()
            logits, y = forward(model, batch)
            nn.functional.cross_entropy(logits, y).backward()
            opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: Split) -> float:
    was_training = model.training
    model.eval()
    logits, y = forward(model, data)
    model.train(was_training)
    return mean_score(classification_correct(logits, y))


def freeze_embeddings(model: nn.Module) -> list[str]:
    """Freeze the embeddings; return the names of the parameters DP-SGD trains."""
    for p in model.vit.embeddings.parameters():
        p.requires_grad_(False)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def batches(split: Split, batch_size: int = 256) -> list[dict[str, torch.Tensor]]:
    """Evaluation batches for the dedup engine (``pixel_values`` + ``labels``)."""
    x, y = split
    return [{"pixel_values": x[i : i + batch_size], "labels": y[i : i + batch_size]}
            for i in range(0, len(y), batch_size)]
